"""`kuberft serve` (the OpenAI-compatible server) and `kuberft serve train-heads`."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

SERVE_DESCRIPTION = """\
Serve a model and its LoRA adapters behind an OpenAI-compatible API, decoding with lossless
speculative decoding: a cheap speculator proposes the next tokens and the model checks them all
in one forward pass, so output is the same as plain decoding, in fewer model passes.

Speculators:
  none    plain decoding
  ngram   prompt lookup: copies what followed the last few tokens earlier in the text (no model)
  draft   a small model sharing the tokenizer (--draft-model) drafts tokens ahead
  heads   Medusa-style heads on the model's last hidden state ("Turbo"): no extra model pass;
          train them with `kuberft serve train-heads` (or --train-heads at start-up)

API: POST /v1/completions, POST /v1/chat/completions (stream: true for server-sent events),
GET /v1/models (the base model and each adapter; the request's `model` field picks one),
POST /v1/load_lora_adapter {"lora_name", "lora_path"} and POST /v1/unload_lora_adapter
{"lora_name"} (as vLLM's; with --enable-runtime-lora-updating), GET /health, GET /healthz, GET /metrics (Prometheus).

Adapters: on the CPU, requests for different adapters and the base model are decoded in one
batch (one forward pass per step, each row with its adapter's LoRA). --max-loras and
--max-lora-memory bound the adapters kept in memory: the least recently used idle one is
evicted, and reloaded from its directory when a request names it again.

Prefix caching: the KV of prompts' leading 16-token blocks is kept (--prefix-cache-memory MiB,
per served model, least recently used first) and reused by later prompts that start the same
way, which then prefill only the rest.

A TurboDeployment's pods run `kuberft serve --config FILE`: FILE is the deployment's spec as one
JSON document (the operator mounts it, the adapter resolved to a directory); a TurboDeployment
manifest works too. The flags below describe the same things for a server started by hand.
"""

SERVE_EPILOG = """\
examples:
  kuberft serve --model Qwen/Qwen2.5-Coder-7B-Instruct --adapter kernels=/adapters/kernels \\
      --speculator heads --heads kernels=/adapters/kernels-heads --port 8000
  kuberft serve --model ./base --speculator draft --draft-model ./small --num-speculative-tokens 6
  kuberft serve --config /etc/kuberft/serve.json --device cuda:1
  curl localhost:8000/v1/completions -d '{"model": "kernels", "prompt": "def add(", "max_tokens": 32}'
"""

TRAIN_HEADS_DESCRIPTION = """\
Train Medusa-style speculation heads by self-distillation: the model (with the adapter, if
given) completes the prompts in --data, and each head learns to predict the model's own next
token distribution one, two, ... positions further ahead. Serve them with
`kuberft serve --speculator heads --heads DIR`.
"""


def _named_path(value: str) -> tuple[str | None, str]:
    """`NAME=DIR` -> (NAME, DIR); a bare `DIR` -> (None, DIR)."""
    name, sep, path = value.partition("=")
    if sep and name and path:
        return name, path
    return None, value


def _add_model_options(parser: argparse.ArgumentParser) -> None:
    # Defaults of the model's fields are ModelSpec's (None here: "not given").
    parser.add_argument("--model", metavar="NAME_OR_PATH", help="base model: Hugging Face name, local directory, or a built-in tiny model name")
    parser.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16", "float64"],
                        help="weights dtype (default auto: bfloat16 on a GPU that supports it, else float32)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")
    parser.add_argument("--revision", help="model revision when loading by name")
    parser.add_argument("--trust-remote-code", action="store_true", default=None, help="run model code shipped with the checkpoint")


def register(subparsers: argparse._SubParsersAction) -> None:
    serve = subparsers.add_parser(
        "serve",
        help="serve a model + LoRA adapters with lossless speculative decoding (OpenAI API)",
        description=SERVE_DESCRIPTION,
        epilog=SERVE_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    serve.add_argument("--config", type=Path, metavar="FILE",
                       help="a TurboDeployment spec (JSON or YAML) to serve, as the operator mounts it in a serve pod; "
                       "then only --host, --device, --seed, --served-model-name, --train-heads-data, --compile and the "
                       "LoRA memory flags may be added")
    _add_model_options(serve)
    # Defaults of the speculator's fields are SpeculatorSpec's (None here: "not given").
    serve.add_argument("--adapter", action="append", default=[], metavar="[NAME=]DIR",
                       help="a peft LoRA adapter directory, served as model NAME (default: the directory name); repeatable")
    serve.add_argument("--speculator", choices=["none", "ngram", "draft", "heads"], help="speculator (default: ngram)")
    serve.add_argument("--draft-model", metavar="NAME_OR_PATH", help="for --speculator draft: the draft model (same tokenizer)")
    serve.add_argument("--heads", action="append", default=[], metavar="[NAME=]DIR",
                       help="for --speculator heads: trained heads for served model NAME (default: the first adapter, "
                       "or the base model without adapters); repeatable")
    serve.add_argument("--train-heads", action="store_true", default=None,
                       help="for --speculator heads: train heads at start-up for models without them (saved to --heads DIR if given)")
    serve.add_argument("--train-heads-data", metavar="FILE", help="prompts for --train-heads (JSONL/JSON rows with `prompt` or "
                       "`messages`, or one prompt per line); default: the model writes freely from start of text")
    serve.add_argument("--num-speculative-tokens", type=int, metavar="K",
                       help="tokens proposed per step; the upper bound when adaptive (default: 4)")
    serve.add_argument("--no-adaptive", dest="adaptive", action="store_false", default=None,
                       help="always propose K tokens instead of adapting to the observed acceptance rate")
    serve.add_argument("--max-batch-size", type=int, help="requests decoded together (default: 8)")
    serve.add_argument("--host", default="0.0.0.0", help="listen address (default: 0.0.0.0)")
    serve.add_argument("--port", type=int, help="listen port (default: 8000)")
    serve.add_argument("--served-model-name", help="name of the base model in the API (default: the --model value)")
    serve.add_argument("--seed", type=int, help="seed for requests that give none (default: random per request)")
    serve.add_argument("--max-loras", type=int, metavar="N", help="LoRA adapters in memory at once (default: no limit)")
    serve.add_argument("--max-lora-memory", type=float, metavar="MIB",
                       help="memory the adapters in memory may take, in MiB (default: no limit)")
    serve.add_argument("--prefix-cache-memory", type=float, metavar="MIB",
                       help="memory for the KV of prompts' leading tokens, reused by later prompts that start the same way, "
                       "in MiB (default: 1024; 0: no prefix caching)")
    serve.add_argument("--compile", action="store_true",
                       help="compile the forward pass with torch.compile at start-up, as vLLM does (the CPU forward of "
                       "Llama-architecture models: about 1.5x the tokens/s of one request; needs a C++ compiler such as g++, "
                       "and a minute or more to start)")
    serve.add_argument("--enable-runtime-lora-updating", dest="runtime_lora_updating", action="store_true",
                       help="serve POST /v1/load_lora_adapter and /v1/unload_lora_adapter (off by default, as in vLLM: "
                       "whoever reaches the server may then load any directory it can read)")
    serve.set_defaults(handler=_serve, serve_parser=serve)

    commands = serve.add_subparsers(dest="serve_command", metavar="COMMAND")
    train = commands.add_parser(
        "train-heads",
        help="train speculation heads by self-distillation",
        description=TRAIN_HEADS_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_model_options(train)
    train.add_argument("--adapter", metavar="DIR", help="the LoRA adapter the heads are for (its outputs are distilled)")
    train.add_argument("--data", metavar="FILE",
                       help="prompts: JSONL/JSON rows with `prompt` or `messages`, or one prompt per line (default: free writing)")
    train.add_argument("--output", required=True, type=Path, metavar="DIR", help="directory to write heads.json and heads.safetensors")
    train.add_argument("--num-heads", type=int, default=4, help="heads = tokens proposed per step (default: 4)")
    train.add_argument("--max-new-tokens", type=int, default=128, help="tokens generated per prompt (default: 128)")
    train.add_argument("--epochs", type=int, default=3, help="passes over the generated completions (default: 3)")
    train.add_argument("--learning-rate", type=float, default=1e-3, help="AdamW learning rate (default: 1e-3)")
    train.add_argument("--max-batch-size", type=int, default=32, help="prompts generated together (default: 32)")
    train.set_defaults(handler=_train_heads, serve_parser=train)


# Flags that set a field of the TurboDeployment spec: argparse dest -> (flag, field path in the spec).
SPEC_FLAGS = {
    "model": ("--model", "model.name"),
    "dtype": ("--dtype", "model.dtype"),
    "revision": ("--revision", "model.revision"),
    "trust_remote_code": ("--trust-remote-code", "model.trustRemoteCode"),
    "adapter": ("--adapter", "adapters"),
    "speculator": ("--speculator", "speculator.type"),
    "num_speculative_tokens": ("--num-speculative-tokens", "speculator.numSpeculativeTokens"),
    "adaptive": ("--no-adaptive", "speculator.adaptive"),
    "draft_model": ("--draft-model", "speculator.draftModel"),
    "heads": ("--heads", "speculator.headsPath"),
    "train_heads": ("--train-heads", "speculator.trainHeads"),
    "max_batch_size": ("--max-batch-size", "maxBatchSize"),
    "port": ("--port", "port"),
    "max_loras": ("--max-loras", "maxLoadedAdapters"),
    "max_lora_memory": ("--max-lora-memory", "maxAdapterMemoryMiB"),
    "prefix_cache_memory": ("--prefix-cache-memory", "prefixCacheMiB"),
}


def _given(values: dict):
    """The values a person gave (None: the flag was not given, the API's default applies)."""
    return {key: value for key, value in values.items() if value is not None}


def _validate_flags(parser: argparse.ArgumentParser, parts: dict[str, tuple[type, dict]]) -> dict:
    """Each part's core model from its wire form; a problem names the flag and the spec field."""
    from pydantic import ValidationError

    from kuberft_core.manifests import problems_from

    flag_of = {path: flag for flag, path in SPEC_FLAGS.values()}
    built, messages = {}, []
    for prefix, (model_type, wire) in parts.items():
        try:
            built[prefix] = model_type.model_validate(wire)
        except ValidationError as error:
            for problem in problems_from(error, ""):
                path = f"{prefix}.{problem.path}" if problem.path else prefix
                flag = flag_of.get(path)
                messages.append(f"{flag} ({path}): {problem.message}" if flag else f"{path}: {problem.message}")
    if messages:
        parser.error("; ".join(messages))
    return built


def _model_wire(args: argparse.Namespace) -> dict:
    return _given({"name": args.model, "dtype": args.dtype, "revision": args.revision, "trustRemoteCode": args.trust_remote_code})


def _config_from_flags(args: argparse.Namespace, local: dict):
    """`kuberft serve --model ...`: the flags as the same core models a TurboDeployment holds."""
    from kuberft_core.api import ModelSpec, SpeculatorSpec

    from .config import ServeConfig

    parser: argparse.ArgumentParser = args.serve_parser
    if not args.model:
        parser.error("--model is required (or --config FILE)")
    adapters: dict[str, str] = {}
    for value in args.adapter:
        name, path = _named_path(value)
        name = name or Path(path).name
        if name in adapters:
            parser.error(f"--adapter {value}: the name {name!r} is used twice (give NAME=DIR)")
        adapters[name] = path
    # Heads of the default served model are the speculator's headsPath; others are by name.
    default_name = next(iter(adapters), None) or args.served_model_name or args.model
    heads_path, heads_by_model = None, {}
    for value in args.heads:
        name, path = _named_path(value)
        name = name or default_name
        given_before = heads_path if name == default_name else heads_by_model.get(name)
        if given_before is not None:
            parser.error(f"--heads {value}: heads for {name!r} are given twice")
        if name == default_name:
            heads_path = path
        else:
            heads_by_model[name] = path
    speculator = _given({
        "type": args.speculator,
        "numSpeculativeTokens": args.num_speculative_tokens,
        "adaptive": args.adaptive,
        "draftModel": args.draft_model,
        "headsPath": heads_path,
        "trainHeads": args.train_heads,
    })
    parts = _validate_flags(parser, {"model": (ModelSpec, _model_wire(args)), "speculator": (SpeculatorSpec, speculator)})
    if args.max_batch_size is not None and args.max_batch_size < 1:
        parser.error("--max-batch-size must be at least 1")
    return ServeConfig(
        model=parts["model"],
        speculator=parts["speculator"],
        adapters=adapters,
        heads_by_model=heads_by_model,
        **_given({"max_batch_size": args.max_batch_size, "port": args.port, "max_loras": args.max_loras,
                  "max_lora_memory_mib": args.max_lora_memory, "prefix_cache_mib": args.prefix_cache_memory}),
        **local,
    )


def _serve(args: argparse.Namespace) -> int:
    parser: argparse.ArgumentParser = args.serve_parser
    local = {
        "host": args.host,
        "device": args.device,
        "seed": args.seed,
        "served_model_name": args.served_model_name,
        "train_heads_data": args.train_heads_data,
        "runtime_lora_updating": args.runtime_lora_updating,
        "compile": args.compile,
    }
    if args.max_loras is not None and args.max_loras < 1:
        parser.error("--max-loras must be at least 1")
    if args.max_lora_memory is not None and args.max_lora_memory <= 0:
        parser.error("--max-lora-memory must be more than 0 MiB")
    if args.prefix_cache_memory is not None and args.prefix_cache_memory < 0:
        parser.error("--prefix-cache-memory must be 0 MiB (off) or more")
    if args.config:
        given = [flag for dest, (flag, _) in SPEC_FLAGS.items() if getattr(args, dest) not in (None, [])]
        if given:
            parser.error(f"{', '.join(given)}: not with --config (the file sets the model, adapters, speculator, batch size, port, adapter limits and prefix cache)")
        from kuberft_core.manifests import ManifestError

        from .config import ServeConfig, load_spec_document

        try:
            spec = load_spec_document(args.config)
        except ManifestError as error:
            for problem in error.problems:
                print(f"kuberft serve: {problem}", file=sys.stderr)
            return 2
        config = ServeConfig.from_spec(spec, **local)
    else:
        config = _config_from_flags(args, local)

    from .server import run_server

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    run_server(config)
    return 0


def _train_heads(args: argparse.Namespace) -> int:
    parser: argparse.ArgumentParser = args.serve_parser
    if not args.model:
        parser.error("--model is required")
    if args.num_heads < 1 or args.num_heads > 32:
        parser.error("--num-heads must be between 1 and 32")
    if args.data and not Path(args.data).is_file():
        parser.error(f"--data {args.data}: no such file")

    from kuberft_core.api import ModelSpec, SpeculatorSpec

    from .config import ServeConfig
    from .engine import Engine
    from .heads import train_heads
    from .loading import build_engine, read_prompts, unconditional_prompts

    model = _validate_flags(parser, {"model": (ModelSpec, _model_wire(args))})["model"]
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    adapters = {"adapter": args.adapter} if args.adapter else {}
    config = ServeConfig(model=model, speculator=SpeculatorSpec(type="none"), adapters=adapters, device=args.device,
                         max_batch_size=args.max_batch_size)
    engine: Engine = build_engine(config)
    prompts = read_prompts(args.data, engine.tokenizer) if args.data else unconditional_prompts(engine.tokenizer)
    heads = train_heads(
        engine,
        prompts,
        adapter="adapter" if args.adapter else None,
        num_heads=args.num_heads,
        max_new_tokens=args.max_new_tokens,
        epochs=args.epochs,
        learning_rate=args.learning_rate,
        temperature=0.0 if args.data else 1.0,
    )
    out = heads.save(args.output, base_model=args.model, adapter=args.adapter)
    print(f"wrote {args.num_heads} heads to {out}", file=sys.stderr)
    return 0
