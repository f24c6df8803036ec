"""`kuberft train`: run the GRPO trainer for one job, as the RFTJob's trainer pod does.

Imports nothing heavy at module level (torch loads only when the command runs)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

DESCRIPTION = """\
Train a LoRA adapter with GRPO for one RFTJob: sample completions for the job's prompts,
score them with the reward pool, update the adapter; checkpoint every checkpoint.everySteps
steps and resume from the latest checkpoint in --output when restarted.

--config is an RFTJob manifest (YAML or JSON) or just its spec as JSON (what the operator
mounts from the job's ConfigMap). Rewards are scored by the reward pool at --reward-url
(default: spec.rewardPool.url); without one, an in-process pool is started (local runs).

Writes into --output: checkpoints/step-N/ (adapter, optimizer, RNG, data position),
metrics.jsonl (one line per step), samples/step-N.jsonl (held-out completions and their
rewards), and at the end adapter/ (peft format) and config.json.

Serves /metrics (Prometheus) and /healthz on --metrics-port. In a cluster, with
KUBERFT_JOB_NAME (and KUBERFT_JOB_NAMESPACE) set, it reports step, rewards, meanReward and
the adapter being written into that RFTJob's progress ConfigMap (<job>-progress), which the
operator copies into the status. SIGTERM or Ctrl-C stops after the current step with a
checkpoint; running the same command again resumes.
"""

ROLLOUT_SERVER_DESCRIPTION = """\
vLLM in a process of its own, sampling completions for a job's trainer (spec.rollout.mode:
server): the trainer sends it the adapter it is training (PUT /v1/adapter/<digest>) and the
step's prompts (POST /v1/generate). The model, dtype, LoRA rank, lengths, seed and
rollout.gpuMemoryUtilization come from --config. Serves /healthz once the model is loaded.
"""

EPILOG = """\
examples:
  kuberft train --config job.yaml --output runs/job --reward-url http://localhost:8080
  kuberft train --config /etc/kuberft/job.json --output /checkpoints/job --reward-url http://job-reward:8080
  torchrun --standalone --nproc-per-node=4 --no-python kuberft train --config job.json --output out
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "train",
        help="run the GRPO + LoRA trainer for one job (what the trainer pod runs)",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", type=Path, required=True, metavar="FILE", help="RFTJob manifest (YAML/JSON) or its spec as JSON")
    parser.add_argument("--output", type=Path, required=True, metavar="DIR", help="checkpoints, metrics and the final adapter go here")
    parser.add_argument("--reward-url", metavar="URL", help="reward pool base URL (POST URL/v1/evaluate); default: spec.rewardPool.url")
    parser.add_argument("--max-steps", type=int, metavar="N", help="stop at step N (with a checkpoint) instead of spec.grpo.steps")
    parser.add_argument("--metrics-port", type=int, default=8080, help="port of /metrics and /healthz; 0 turns the server off (default: 8080)")
    parser.add_argument("--reward-batch-size", type=int, default=64, help="completions per request to the reward pool (default: 64)")
    parser.add_argument("--reward-concurrency", type=int, default=4, help="requests to the reward pool in flight at once (default: 4)")
    parser.add_argument("--reward-timeout", type=float, default=600.0, help="seconds to wait for one reward request (default: 600)")
    parser.add_argument("--reward-retries", type=int, default=5, help="retries of a failed reward request, with backoff (default: 5)")
    parser.add_argument("--reward-wait", type=float, default=900.0,
                        help="seconds to wait for the reward pool's /healthz before training; 0: do not wait (default: 900)")
    parser.add_argument("--no-progress", action="store_true", help="log one line per step instead of a progress bar")
    parser.add_argument("--rollout-url", action="append", default=[], metavar="URL",
                        help="sample on the rollout server at URL (repeatable; what `kuberft run` passes for spec.rollout.mode: server)")
    parser.add_argument("--rollout-service", metavar="HOST:PORT",
                        help="sample on the rollout servers behind this headless Service (what the operator passes)")
    parser.add_argument("--rollout-replicas", type=int, default=1, metavar="N", help="rollout servers to wait for behind --rollout-service (default: 1)")
    parser.add_argument("--rollout-wait", type=float, default=1800.0,
                        help="seconds to wait for the rollout servers to load the model before training (default: 1800)")
    parser.set_defaults(handler=_train)

    server = subparsers.add_parser(
        "rollout-server",
        help="serve vLLM rollouts to a job's trainer (what a rollout pod runs for spec.rollout.mode: server)",
        description=ROLLOUT_SERVER_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    server.add_argument("--config", type=Path, required=True, metavar="FILE", help="RFTJob manifest (YAML/JSON) or its spec as JSON")
    server.add_argument("--host", default="0.0.0.0", help="address to listen on (default: 0.0.0.0)")
    server.add_argument("--port", type=int, default=8300, help="port (default: 8300)")
    server.add_argument("--tensor-parallel-size", type=int, default=1, metavar="N", help="GPUs the model is split over (default: 1)")
    server.set_defaults(handler=_rollout_server)


def _rollout_server(args: argparse.Namespace) -> int:
    from .rollout_server import serve

    return serve(args)


def _rollout_servers(args: argparse.Namespace, spec):
    """The rollout servers' client when the job samples on servers; None when the trainer samples."""
    if not args.rollout_url and not args.rollout_service:
        if spec.rollout.mode == "server":
            raise SystemExit("spec.rollout.mode is server: pass --rollout-service or --rollout-url "
                             "(the operator and `kuberft run` start the servers and pass them)")
        return None
    from .rollout_server import RolloutServers

    return RolloutServers(args.rollout_url, service=args.rollout_service, replicas=args.rollout_replicas)


def _reward_backend(args: argparse.Namespace, spec):
    url = args.reward_url or spec.reward_pool.url
    if url:
        from .rewards import HttpRewardBackend

        return HttpRewardBackend(
            url,
            batch_size=args.reward_batch_size,
            concurrency=args.reward_concurrency,
            timeout_seconds=args.reward_timeout,
            max_retries=args.reward_retries,
        )
    raise SystemExit("no reward pool to call: set spec.rewardPool.url or pass --reward-url "
                     "(`kuberft run` runs a job on this machine with a reward pool of its own)")


def _train(args: argparse.Namespace) -> int:
    from kuberft_core.api import RFTJob
    from kuberft_core.manifests import ManifestError, load_spec

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        manifest_name, spec = load_spec(args.config, RFTJob)
    except ManifestError as error:
        for problem in error.problems:
            print(problem, file=sys.stderr)
        return 2
    if args.max_steps is not None and args.max_steps < 1:
        print("--max-steps must be at least 1", file=sys.stderr)
        return 2

    from kuberft_core.metrics import component_metrics
    from kuberft_core.probes import MetricsServer

    from .data import DatasetError
    from .progress import StepProgress
    from .report import ProgressReporter
    from .train import Trainer

    job_name = os.environ.get("KUBERFT_JOB_NAME") or manifest_name or "local"
    rank0 = int(os.environ.get("RANK", "0")) == 0
    metrics = component_metrics("trainer")
    server = MetricsServer(metrics, args.metrics_port).start() if args.metrics_port and rank0 else None
    status = ProgressReporter.from_environment() if rank0 else None
    backend = _reward_backend(args, spec)
    rollouts = _rollout_servers(args, spec)
    progress = None
    try:
        try:
            trainer = Trainer(spec, args.output, backend, job_name, metrics=metrics, status=status, vllm=rollouts)
        except (DatasetError, FileNotFoundError, ValueError) as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
        # The model loads while the pool starts; the first step needs the pool.
        if args.reward_wait > 0 and not backend.wait_until_ready(args.reward_wait):
            print(f"error: the reward pool at {backend.health_url} did not become ready within {args.reward_wait:g}s", file=sys.stderr)
            return 3
        if rollouts is not None and not rollouts.wait_until_ready(args.rollout_wait):
            print(f"error: the rollout servers did not all become ready within {args.rollout_wait:g}s", file=sys.stderr)
            return 3
        with trainer:
            if rank0:
                progress = StepProgress(bar=not args.no_progress and sys.stderr.isatty())
                trainer.on_step = progress
            result = trainer.run(max_steps=args.max_steps)
    finally:
        if progress is not None:
            progress.close()
        if server is not None:
            server.close()
    if rank0:
        summary = {"step": result.step, "total_steps": result.total_steps, "interrupted": result.interrupted,
                   "resumed_from": result.resumed_from, "adapter": str(result.adapter_dir) if result.adapter_dir else None,
                   "eval_pass_at_1": result.eval_pass_at_1,
                   "reward": result.last_metrics.reward if result.last_metrics else None}
        print(json.dumps(summary))
    return 0 if not result.interrupted or args.max_steps is not None else 130
