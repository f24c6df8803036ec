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
GET /healthz, GET /metrics (Prometheus).
"""

SERVE_EPILOG = """\
examples:
  kuberft serve --model Qwen/Qwen2.5-Coder-7B-Instruct --adapter kernels=/adapters/kernels \\
      --speculator heads --heads kernels=/adapters/kernels-heads --port 8000
  kuberft serve --model ./base --speculator draft --draft-model ./small --num-speculative-tokens 6
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
    parser.add_argument("--model", metavar="NAME_OR_PATH", help="base model: Hugging Face name, local directory, or a built-in tiny model name")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16", "float64"],
                        help="weights dtype (auto: bfloat16 on a GPU that supports it, else float32)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")
    parser.add_argument("--revision", help="model revision when loading by name")
    parser.add_argument("--trust-remote-code", action="store_true", help="run model code shipped with the checkpoint")


def register(subparsers: argparse._SubParsersAction) -> None:
    serve = subparsers.add_parser(
        "serve",
        help="serve a model + LoRA adapters with lossless speculative decoding (OpenAI API)",
        description=SERVE_DESCRIPTION,
        epilog=SERVE_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_model_options(serve)
    serve.add_argument("--adapter", action="append", default=[], metavar="[NAME=]DIR",
                       help="a peft LoRA adapter directory, served as model NAME (default: the directory name); repeatable")
    serve.add_argument("--speculator", default="ngram", choices=["none", "ngram", "draft", "heads"], help="speculator (default: ngram)")
    serve.add_argument("--draft-model", metavar="NAME_OR_PATH", help="for --speculator draft: the draft model (same tokenizer)")
    serve.add_argument("--heads", action="append", default=[], metavar="[NAME=]DIR",
                       help="for --speculator heads: trained heads for served model NAME (default: the first adapter, "
                       "or the base model without adapters); repeatable")
    serve.add_argument("--train-heads", action="store_true",
                       help="for --speculator heads: train heads at start-up for models without them (saved to --heads DIR if given)")
    serve.add_argument("--train-heads-data", metavar="FILE", help="prompts for --train-heads (JSONL/JSON rows with `prompt` or "
                       "`messages`, or one prompt per line); default: the model writes freely from start of text")
    serve.add_argument("--num-speculative-tokens", type=int, default=4, metavar="K",
                       help="tokens proposed per step; the upper bound when adaptive (default: 4)")
    serve.add_argument("--no-adaptive", dest="adaptive", action="store_false",
                       help="always propose K tokens instead of adapting to the observed acceptance rate")
    serve.add_argument("--max-batch-size", type=int, default=8, help="requests decoded together (default: 8)")
    serve.add_argument("--host", default="0.0.0.0", help="listen address (default: 0.0.0.0)")
    serve.add_argument("--port", type=int, default=8000, help="listen port (default: 8000)")
    serve.add_argument("--served-model-name", help="name of the base model in the API (default: the --model value)")
    serve.add_argument("--seed", type=int, help="seed for requests that give none (default: random per request)")
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


def _serve(args: argparse.Namespace) -> int:
    parser: argparse.ArgumentParser = args.serve_parser
    if not args.model:
        parser.error("--model is required")
    adapters: dict[str, str] = {}
    for value in args.adapter:
        name, path = _named_path(value)
        name = name or Path(path).name
        if name in adapters:
            parser.error(f"--adapter {value}: the name {name!r} is used twice (give NAME=DIR)")
        adapters[name] = path
    heads = {}
    for value in args.heads:
        name, path = _named_path(value)
        heads[name] = path
    if args.speculator == "draft" and not args.draft_model:
        parser.error("--speculator draft needs --draft-model")
    if args.speculator == "heads" and not heads and not args.train_heads:
        parser.error("--speculator heads needs --heads DIR or --train-heads")
    if args.num_speculative_tokens < 1 or args.num_speculative_tokens > 32:
        parser.error("--num-speculative-tokens must be between 1 and 32")
    if args.max_batch_size < 1:
        parser.error("--max-batch-size must be at least 1")

    from .config import ServeConfig
    from .server import run_server

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = ServeConfig(
        model=args.model,
        adapters=adapters,
        speculator=args.speculator,
        num_speculative_tokens=args.num_speculative_tokens,
        adaptive=args.adaptive,
        draft_model=args.draft_model,
        heads=heads,
        train_heads=args.train_heads,
        train_heads_data=args.train_heads_data,
        max_batch_size=args.max_batch_size,
        host=args.host,
        port=args.port,
        dtype=args.dtype,
        device=args.device,
        revision=args.revision,
        trust_remote_code=args.trust_remote_code,
        served_model_name=args.served_model_name,
        seed=args.seed,
    )
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

    from .config import ServeConfig
    from .engine import Engine
    from .heads import train_heads
    from .loading import build_engine, read_prompts, unconditional_prompts

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    adapters = {"adapter": args.adapter} if args.adapter else {}
    config = ServeConfig(model=args.model, adapters=adapters, speculator="none", dtype=args.dtype, device=args.device,
                         revision=args.revision, trust_remote_code=args.trust_remote_code, max_batch_size=args.max_batch_size)
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
