"""`kuberft run`: the whole RFT pipeline on this machine, from an RFTJob manifest."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

DESCRIPTION = """\
Run an RFTJob manifest (the same file `kubectl apply` takes) on this machine, with no
cluster: a local reward pool (sandboxed worker processes) scores the completions, the GRPO
trainer updates the LoRA adapter, and a progress bar shows step, mean reward per function,
tokens/s and ETA. Cluster-only fields (resources, node selectors, volumes, Kueue...) are
ignored with a note.

Writes under --output (default runs/<job name>): checkpoints/, metrics.jsonl, adapter/ (peft
format), config.json, samples/, and at the end report.json and report.png (reward curves per
function, loss and KL). Ctrl-C stops after the current step with a checkpoint; running the
same command again resumes from it.
"""

EPILOG = """\
examples:
  kuberft run examples/local-countdown.yaml              the demo: a tiny model learns Countdown
  kuberft run examples/local-triton.yaml --steps 2       the Triton reward pipeline end to end
  kuberft run job.yaml --output runs/try1 --serve        train, then serve the adapter (OpenAI API)
  kuberft run job.yaml --nproc 2                         the trainer as 2 processes (sharded with trainer.sharding: fsdp)
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "run",
        help="run an RFTJob manifest on this machine (no cluster): reward pool + trainer + report",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("file", type=Path, metavar="FILE", help="RFTJob manifest (YAML)")
    parser.add_argument("--steps", type=int, metavar="N", help="run N steps instead of spec.grpo.steps")
    parser.add_argument("--output", type=Path, metavar="DIR", help="output directory (default: runs/<job name>)")
    parser.add_argument("--serve", action="store_true", help="after training, serve the adapter with an OpenAI-compatible API")
    parser.add_argument("--port", type=int, default=8000, help="port for --serve (default: 8000)")
    parser.add_argument("--nproc", type=int, default=1, metavar="N",
                        help="trainer processes (torchrun; gloo on a CPU): each takes its share of every step's prompts, "
                             "and spec.trainer.sharding: fsdp shards the model over them (default: 1)")
    parser.add_argument("--no-progress", action="store_true", help="log one line per step instead of a progress bar")
    parser.set_defaults(handler=_run)


def _run(args: argparse.Namespace) -> int:
    from kuberft_core.api import RFTJob
    from kuberft_core.manifests import ManifestError, load

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("httpx", "urllib3", "transformers", "aiohttp.access"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        job = load(args.file, RFTJob)
    except ManifestError as error:
        for problem in error.problems:
            print(problem, file=sys.stderr)
        return 2
    if args.steps is not None and args.steps < 1:
        print("--steps must be at least 1", file=sys.stderr)
        return 2

    from .local_runner import ignored_fields, run_job

    for note in ignored_fields(job.spec):
        print(f"note: {note}", file=sys.stderr)
    output = args.output or Path("runs") / job.metadata.name
    print(f"running RFTJob/{job.metadata.name} locally; outputs in {output}/", file=sys.stderr)
    try:
        result = run_job(job, output, steps=args.steps, progress=not args.no_progress, nproc=args.nproc)
    except (ValueError, FileNotFoundError, RuntimeError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2

    print(f"\n{job.metadata.name}: {result.steps_done}/{result.total_steps} steps")
    for name, values in result.summary.items():
        print(f"  {name:<22} mean reward {values['first']:.3f} (first steps) -> {values['last']:.3f} (last steps)")
    if result.eval_pass_at_1 is not None:
        print(f"  held-out pass@1 (greedy): {result.eval_pass_at_1:.3f}")
    print(f"report: {result.report_json}\n        {result.report_png}")
    if result.interrupted:
        print(f"stopped at step {result.steps_done} with a checkpoint; run the same command again to resume")
        return 130
    print(f"adapter: {result.adapter_dir}")
    if args.serve:
        return _serve(job, result.adapter_dir, args.port)
    return 0


def _serve(job, adapter_dir: Path, port: int) -> int:
    import json
    import shlex

    from kuberft_serve.config import ServeConfig
    from kuberft_serve.server import run_server
    from kuberft_trainer.data import PromptFormatter, load_rows

    adapter_name = job.metadata.name
    spec = job.spec
    # A prompt of the job itself, as /v1/completions takes it (templated, without a chat template).
    prompt = PromptFormatter(None, spec.dataset, spec.grpo.max_prompt_length).text(load_rows(spec.dataset)[0])
    request = {"model": adapter_name, "prompt": prompt, "max_tokens": spec.grpo.max_completion_length, "temperature": 0}
    config = ServeConfig(model=spec.model, adapters={adapter_name: str(adapter_dir)}, port=port, host="127.0.0.1")
    print(
        "serving; try:\n"
        f"  curl -s http://127.0.0.1:{port}/v1/completions -H 'Content-Type: application/json' -d {shlex.quote(json.dumps(request))}"
    )
    run_server(config)
    return 0
