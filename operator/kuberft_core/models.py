"""Base models by name, shared by the trainer and the server: what a `model.name` resolves to,
the dtype a `model.dtype` means on a device, and tiny causal LMs built in code (a character-level
or byte-pair tokenizer and a small Llama, saved in the Hugging Face format so everything downstream loads them
exactly like a real model by path; tests, benchmarks and the local demo use them, as no model hub
is reachable there). Needs the torch extra: torch and transformers are imported inside the
functions, so importing this module costs nothing."""

from __future__ import annotations

import logging
import string
from pathlib import Path

SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>")
DEFAULT_ALPHABET = "".join(c for c in string.printable if c not in "\x0b\x0c\r")

# A minimal chat template: enough for prompts built with the model's own template.
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ '<s>' + m['role'] + ': ' + m['content'] + '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<s>assistant: ' }}{% endif %}"
)


def build_char_tokenizer(alphabet: str = DEFAULT_ALPHABET, chat_template: bool = True):
    """A fast tokenizer with one token per character of `alphabet` (plus pad, bos, eos, unk);
    decoding returns the exact text."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS)}
    for char in alphabet:
        vocab.setdefault(char, len(vocab))
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    core.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    if chat_template:
        tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_line_bpe_tokenizer(texts: list[str], vocab_size: int, max_token_length: int, alphabet: str = DEFAULT_ALPHABET):
    """A byte-pair-encoding tokenizer learnt from `texts` (deterministic for the same texts)
    whose tokens never cross the end of a line and are at most `max_token_length` characters,
    so a prompt ending with a newline tokenizes the same alone as before its completion; every
    character of `alphabet` is a token, and decoding returns the exact text. No chat template."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE(unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"\n"), behavior="merged_with_previous")
    core.decoder = decoders.Fuse()
    core.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS), initial_alphabet=list(alphabet),
        max_token_length=max_token_length, show_progress=False,
    ))
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>", clean_up_tokenization_spaces=False)


def build_tiny_model(
    out_dir: str | Path,
    *,
    tokenizer=None,
    alphabet: str = DEFAULT_ALPHABET,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 128,
    max_positions: int = 1024,
    seed: int = 0,
    chat_template: bool = True,
) -> Path:
    """Build a randomly initialised tiny Llama and its tokenizer (`tokenizer`, or one token per
    character of `alphabet`), save both to `out_dir` (loadable with AutoModelForCausalLM /
    AutoTokenizer), and return the path."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if tokenizer is None:
        tokenizer = build_char_tokenizer(alphabet, chat_template=chat_template)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=max_positions,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out



def resolve_model_path(name: str) -> str:
    """What to hand to `from_pretrained` for the spec's `model.name`.

    A hub name or a path is returned as is. `tiny:<recipe>` names the demo models built in
    code (`tiny_zoo`), built and cached on first use. This is the single place model names are
    resolved: every loader goes through it."""
    from . import tiny_zoo

    if tiny_zoo.is_tiny(name):
        return str(tiny_zoo.resolve(name))
    return name


SMALL_MODEL_PARAMETERS = 50_000_000


def limit_cpu_threads_for_small_models(model, device) -> None:
    """One intra-op thread for a small model on the CPU: its matrices are so small that waking
    and syncing threads costs more than it saves, and on a busy machine (reward workers beside
    the trainer) the spinning threads slowed a tiny model's step ~15x. OMP_NUM_THREADS wins."""
    import os

    import torch

    if device.type != "cpu" or "OMP_NUM_THREADS" in os.environ:
        return
    if sum(p.numel() for p in model.parameters()) < SMALL_MODEL_PARAMETERS and torch.get_num_threads() > 1:
        logging.getLogger(__name__).info("small model on the CPU: using 1 intra-op thread (set OMP_NUM_THREADS to override)")
        torch.set_num_threads(1)


def resolve_dtype(dtype: str, device):
    """The torch dtype for the spec's `model.dtype` on `device` (`auto`: bfloat16 on a GPU that
    supports it, float32 otherwise)."""
    import torch

    if dtype == "auto":
        if getattr(device, "type", str(device)) == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}
    if dtype not in dtypes:
        raise ValueError(f"dtype {dtype!r} is not one of auto, {', '.join(dtypes)}")
    return dtypes[dtype]
