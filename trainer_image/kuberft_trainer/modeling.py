"""The trainer's model: the base causal LM and its tokenizer for a `ModelSpec`, and the LoRA
adapter trained on top of it."""

from __future__ import annotations

from pathlib import Path

from kuberft_core.models import resolve_dtype, resolve_model_path


def load_model_and_tokenizer(model_spec, device):
    """The base causal LM (eval mode, frozen) and its tokenizer, for a `kuberft_core.api.ModelSpec`.

    The tokenizer pads on the left (generation appends to the right end of every row)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model_path(model_spec.name)
    common = {"revision": model_spec.revision, "trust_remote_code": model_spec.trust_remote_code}
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, **common)
    except OSError as error:
        raise FileNotFoundError(f"model.name {model_spec.name!r}: cannot load it ({error})") from error
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token_id is None:
            raise ValueError(f"model {model_spec.name!r}: the tokenizer has neither a pad nor an eos token")
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(path, dtype=resolve_dtype(model_spec.dtype, device), **common)
    model.to(device)
    model.requires_grad_(False)
    return model, tokenizer


def add_lora(model, lora_spec, adapter_path: str | Path | None = None):
    """Wrap `model` with a trainable LoRA adapter from a `kuberft_core.api.LoraSpec`
    (or load an existing peft adapter from `adapter_path` as trainable)."""
    from peft import LoraConfig, PeftModel, get_peft_model

    if adapter_path is not None:
        return PeftModel.from_pretrained(model, str(adapter_path), is_trainable=True)
    targets = lora_spec.target_modules
    config = LoraConfig(
        r=lora_spec.r,
        lora_alpha=lora_spec.alpha,
        lora_dropout=lora_spec.dropout,
        target_modules="all-linear" if targets == ["all-linear"] else list(targets),
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)
