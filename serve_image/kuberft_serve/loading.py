"""Loading what a `ServeConfig` names: the base model and tokenizer, LoRA adapters (in the lean
forward, mixed in one batch; or peft, switched per batch), the draft model or the heads, and the
engine around them."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch

from kuberft_core.models import resolve_dtype, resolve_model_path

from .adapter_pool import AdapterPool
from .config import ServeConfig
from .engine import Engine
from .heads import MedusaHeads, train_heads
from .kv_batch import ModelRunner
from .lean_llama import LeanRunner
from .lora import AdapterError
from .prefix_cache import PrefixCache
from .speculators import DraftSpeculator, HeadsSpeculator, NgramSpeculator, Speculator

log = logging.getLogger(__name__)


def pick_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def load_causal_lm(name: str, *, dtype: torch.dtype, device: torch.device, revision=None, trust_remote_code=False):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        resolve_model_path(name), dtype=dtype, revision=revision, trust_remote_code=trust_remote_code
    )
    return model.to(device).eval().requires_grad_(False)


def load_tokenizer(name: str, *, revision=None, trust_remote_code=False):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(resolve_model_path(name), revision=revision, trust_remote_code=trust_remote_code)


def read_prompts(path: str | Path, tokenizer) -> list[list[int]]:
    """Prompts as token ids from a JSONL or JSON file of objects with `prompt` (text) or
    `messages` (chat, rendered with the tokenizer's template), or a text file of one prompt per
    line."""
    path = Path(path)
    text = path.read_text()
    if path.suffix == ".json":
        rows = json.loads(text)
        if not isinstance(rows, list):
            raise ValueError(f"{path}: expected a JSON list of rows")
    elif path.suffix == ".jsonl":
        rows = []
        for number, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as err:
                    raise ValueError(f"{path}:{number}: not JSON: {err}") from None
    else:
        rows = [{"prompt": line} for line in text.splitlines() if line.strip()]
    prompts = []
    for number, row in enumerate(rows, 1):
        if isinstance(row, dict) and isinstance(row.get("prompt"), str):
            prompts.append(tokenizer.encode(row["prompt"]))
        elif isinstance(row, dict) and isinstance(row.get("messages"), list):
            prompts.append(list(tokenizer.apply_chat_template(row["messages"], add_generation_prompt=True, tokenize=True, return_dict=False)))
        else:
            raise ValueError(f"{path}: row {number} has neither a `prompt` string nor a `messages` list")
    if not prompts:
        raise ValueError(f"{path}: no prompts")
    return prompts


def unconditional_prompts(tokenizer, count: int = 32) -> list[list[int]]:
    """Start-of-text prompts, when heads are trained on no data: the model writes freely."""
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    return [[start] for _ in range(count)]


def target_runner(model, *, adapters: dict[str, str], device: torch.device, compile: bool = False):
    """(runner, the start-up `adapters` read for it by name). On the CPU, a Llama-architecture
    model runs our lean forward (about half the time of transformers' pass at batch 1, and
    verification of k tokens costs little more than one), its LoRA adapters mixed in one batch;
    `compile` compiles it (`LeanRunner.compile`). Accelerators, other architectures and adapters
    the lean forward cannot serve (DoRA, ...) go through transformers and peft, whose mixed-batch
    inference also serves rows of several adapters in one forward pass. The lean forward keeps its
    own (fused) copy of the weights: twice the model's memory."""
    if device.type == "cpu" and LeanRunner.supports(model):
        lean = LeanRunner(model)
        try:
            weights = {name: lean.read_adapter(path) for name, path in adapters.items()}
        except AdapterError as err:
            if compile:
                raise ValueError(f"compile: the adapters need transformers' forward, which is not compiled: {err}") from err
            log.warning("serving the adapters through transformers and peft (slower than the lean forward): %s", err)
        else:
            if compile:
                log.info("compiling the forward pass (torch.compile; a minute or more)")
                started = time.monotonic()
                lean.compile()
                log.info("forward pass compiled in %.0f s", time.monotonic() - started)
            return lean, weights
    if compile:
        why = "not on the CPU" if device.type != "cpu" else f"{type(model).__name__} is not a plain Llama-architecture model"
        raise ValueError(f"compile compiles the lean CPU forward of Llama-architecture models; this model cannot take it ({why})")
    runner = ModelRunner(model)
    return runner, {name: runner.read_adapter(path) for name, path in adapters.items()}


def build_engine(config: ServeConfig, metrics=None) -> Engine:
    """Load everything `config` names and return a ready (not yet started) engine."""
    device = pick_device(config.device)
    dtype = resolve_dtype(config.model.dtype, device)
    load = {"revision": config.model.revision, "trust_remote_code": config.model.trust_remote_code}
    log.info("loading %s (%s on %s)", config.model.name, dtype, device)
    model = load_causal_lm(config.model.name, dtype=dtype, device=device, **load)
    tokenizer = load_tokenizer(config.model.name, **load)
    runner, weights = target_runner(model, adapters=config.adapters, device=device, compile=config.compile)
    max_bytes = None if config.max_lora_memory_mib is None else int(config.max_lora_memory_mib * 2**20)
    pool = AdapterPool(runner, max_loras=config.max_loras, max_bytes=max_bytes)
    for name, path in config.adapters.items():
        pool.register(name, path, weights[name])
    spec = config.speculator
    prefix_bytes = int(config.prefix_cache_mib * 2**20)
    options = {
        "num_speculative_tokens": spec.num_speculative_tokens,
        "adaptive": spec.adaptive,
        "max_batch_size": config.max_batch_size,
        "metrics": metrics,
        "adapters": pool,
        "prefix_cache": PrefixCache(prefix_bytes) if prefix_bytes > 0 else None,
    }
    speculator: Speculator
    if spec.type == "none":
        speculator = Speculator()
    elif spec.type == "ngram":
        speculator = NgramSpeculator()
    elif spec.type == "draft":
        draft = load_causal_lm(spec.draft_model, dtype=dtype, device=device, **load)
        if draft.config.vocab_size != runner.config.get_text_config().vocab_size:
            log.warning("draft vocabulary (%d) differs in size from the model's; it must share the tokenizer", draft.config.vocab_size)
        # the draft runs at batch sizes where transformers' per-op overhead is its whole cost
        draft_runner = LeanRunner(draft) if LeanRunner.supports(draft) else ModelRunner(draft)
        speculator = DraftSpeculator(draft_runner, tokenizer.pad_token_id or 0)
    else:  # heads (SpeculatorSpec admits no other type)
        speculator = HeadsSpeculator(load_or_train_heads(config, runner, tokenizer, options), model.get_output_embeddings())
    return Engine(runner, tokenizer, speculator, **options)


def heads_paths(config: ServeConfig) -> dict[str | None, str]:
    """Heads directories by served model (None = the base): `speculator.headsPath` for the default
    model, `heads_by_model` for the others."""
    paths: dict[str | None, str] = {}
    if config.speculator.heads_path:
        paths[config.default_model] = config.speculator.heads_path
    for name, path in config.heads_by_model.items():
        if name == config.base_name:
            paths[None] = path
        elif name in config.adapters:
            paths[name] = path
        else:
            raise ValueError(f"heads for {name!r}: {name!r} is neither the base model nor an adapter name")
    return paths


def load_or_train_heads(config: ServeConfig, runner: ModelRunner, tokenizer, options: dict) -> dict:
    """Heads per served model (None = the base): loaded from their directories, or trained when
    `speculator.trainHeads` (then saved to the given directory, if any). Served models without
    heads decode without speculation."""
    device = runner.device
    dtype = next(runner.model.parameters()).dtype
    paths = heads_paths(config)
    needed = list(config.adapters) or [None]
    heads: dict = {}
    for key in dict.fromkeys([*needed, *paths]):
        path = paths.get(key)
        if path and (Path(path) / "heads.json").is_file():
            heads[key] = MedusaHeads.load(path, runner.model).to(device=device, dtype=dtype)
            continue
        name = key or config.base_name
        if not config.speculator.train_heads:
            if path:
                raise FileNotFoundError(f"heads for {name!r}: {path} holds no heads.json (train them with --train-heads)")
            raise ValueError(f"no heads for {name!r}: give --heads [NAME=]DIR with trained heads, or --train-heads")
        plain = Engine(runner, tokenizer, None, **{**options, "metrics": None})
        prompts = read_prompts(config.train_heads_data, tokenizer) if config.train_heads_data else unconditional_prompts(tokenizer)
        num_heads = config.speculator.num_speculative_tokens
        log.info("training %d heads for %s on %d prompts", num_heads, name, len(prompts))
        trained = train_heads(
            plain,
            prompts,
            adapter=key,
            num_heads=num_heads,
            temperature=0.0 if config.train_heads_data else 1.0,
        )
        if path:
            trained.save(path, base_model=config.model.name, adapter=config.adapters.get(key) if key else None)
        heads[key] = trained
    return heads
