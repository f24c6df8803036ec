"""The GRPO + LoRA training loop.

Public entry point (used by `kuberft train` and by the local runner `kuberft run`):

    trainer = Trainer(spec, output_dir, rewards=backend, job_name="my-job", on_step=callback)
    result = trainer.run()            # or run(max_steps=N): stop at step N (absolute)
    trainer.close()

- `spec` is the job's `RFTJobSpec`; `rewards` any `RewardBackend` (`HttpRewardBackend`, the
  in-process `kuberft_reward.pool.RewardPool`, a test's object).
- Resumes from the latest complete checkpoint in `output_dir/checkpoints/` if there is one;
  `output_dir/metrics.jsonl` (one JSON `StepMetrics` per step) continues across restarts.
- Calls `on_step(StepMetrics)` after every step (on rank 0).
- SIGINT/SIGTERM (first one) finishes the current step, writes a checkpoint and returns a
  result with `interrupted=True`; a second SIGINT interrupts at once (the latest checkpoint stays).
- At the end: `output_dir/adapter/` (peft format), `output_dir/config.json` (the spec),
  `output_dir/samples/step-N.jsonl` (eval completions with their rewards) per evaluation.
- Async reward backends run on the trainer's own event loop (`event_loop=` to share one).

One step, as in `_train_step`: take promptsPerStep prompts; sample numGenerations
completions each (HF with a KV cache, or vLLM on a GPU); score them; total reward =
weighted sum; group-relative advantages; numIterations clipped policy-gradient updates of the
LoRA parameters (old log-probs stored when > 1; reference = the base model with the adapter
disabled when beta > 0).

Multi-GPU: under `torchrun --nproc-per-node N`, each rank generates and scores its share of
the prompts (promptsPerStep must divide by N); rewards are gathered so advantages and loss
normalisers are those of the whole step, and the LoRA gradients are summed across ranks:
the update is the single-process update. Multi-node is the same with torchrun's `--nnodes`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import random
import signal
import threading
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from kuberft_core import paths
from kuberft_core.api import RFTJobSpec
from kuberft_core.metrics import ComponentMetrics, component_metrics
from kuberft_core.models import limit_cpu_threads_for_small_models, resolve_model_path

from . import checkpoint as ckpt
from .data import PromptFormatter, PromptSampler, load_rows, split_rows
from .grpo import combine_rewards, group_advantages, policy_loss
from .modeling import add_lora, load_model_and_tokenizer
from .report import ProgressReporter
from .rewards import RewardBackend, ScoreMatrix, reward_requests, score_completions
from .rollout import Rollout, generate, sequence_logprobs

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
ADAPTER_DIR = paths.ADAPTER_DIR  # the operator reports `<output>/adapter` as the job's adapter
CONFIG_FILE = "config.json"
SAMPLES_DIR = "samples"
PHASES = ("generate", "reward", "train")


def read_metrics(output_dir: Path) -> list[dict[str, Any]]:
    """The `StepMetrics` lines of `output_dir/metrics.jsonl`, one per step in order (a resumed
    run first drops the lines past its checkpoint, so no step appears twice)."""
    path = Path(output_dir) / METRICS_FILE
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@dataclass
class StepMetrics:
    """What one step did; one line of metrics.jsonl, and the argument of `on_step`."""

    step: int
    total_steps: int
    reward: Optional[float]
    """Mean weighted total reward of the scorable completions (None if none was scorable)."""
    reward_std: Optional[float]
    rewards: dict[str, float]
    """Mean score per reward function."""
    rewards_std: dict[str, float]
    loss: float
    kl: float
    clip_ratio: float
    grad_norm: float
    learning_rate: float
    completion_length_mean: float
    completion_length_max: int
    truncated_fraction: float
    generated_tokens: int
    tokens_per_second: float
    phase_seconds: dict[str, float]
    step_seconds: float
    reward_failures: int
    """(completion, reward) evaluations the pool failed to score in this step."""
    frac_reward_zero_std: float
    """Fraction of groups whose rewards were all equal (no learning signal)."""
    eval_pass_at_1: Optional[float] = None
    eval_reward: Optional[float] = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class TrainResult:
    output_dir: Path
    step: int
    """Last completed step."""
    total_steps: int
    interrupted: bool
    """Stopped by a signal or max_steps before the last step (a checkpoint holds the state)."""
    resumed_from: Optional[int]
    adapter_dir: Optional[Path]
    """The final adapter (when all steps ran)."""
    last_metrics: Optional[StepMetrics] = None
    eval_pass_at_1: Optional[float] = None
    history: list[StepMetrics] = field(default_factory=list)
    """Metrics of the steps run by this call."""


class _Distributed:
    """The process group when launched by torchrun (WORLD_SIZE > 1), else a single process."""

    def __init__(self):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.enabled = self.world > 1
        if self.enabled and not torch.distributed.is_initialized():
            backend = "nccl" if torch.cuda.is_available() else "gloo"
            if torch.cuda.is_available():
                torch.cuda.set_device(self.local_rank)
            torch.distributed.init_process_group(backend)

    @property
    def main(self) -> bool:
        return self.rank == 0

    def gather_list(self, value: Any) -> list[Any]:
        if not self.enabled:
            return [value]
        out: list[Any] = [None] * self.world
        torch.distributed.all_gather_object(out, value)
        return out

    def sum_(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.enabled:
            torch.distributed.all_reduce(tensor)
        return tensor

    def barrier(self) -> None:
        if self.enabled:
            torch.distributed.barrier()


def default_device(local_rank: int = 0) -> torch.device:
    return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")


def _schedule(kind: str, warmup: int, total: int) -> Callable[[int], float]:
    def factor(update: int) -> float:
        if warmup and update < warmup:
            return (update + 1) / (warmup + 1)
        if kind == "constant":
            return 1.0
        progress = min(1.0, (update - warmup) / max(1, total - warmup))
        return 1.0 - progress if kind == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def _mean_std(values: list[float]) -> tuple[Optional[float], Optional[float]]:
    if not values:
        return None, None
    mean = sum(values) / len(values)
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))


class Trainer:
    """GRPO with LoRA for one RFTJob spec (see the module docstring)."""

    def __init__(
        self,
        spec: RFTJobSpec,
        output_dir: Path,
        rewards: RewardBackend,
        job_name: str = "local",
        *,
        on_step: Optional[Callable[[StepMetrics], None]] = None,
        device: Optional[torch.device] = None,
        metrics: Optional[ComponentMetrics] = None,
        status: Optional[ProgressReporter] = None,
        event_loop: Optional[asyncio.AbstractEventLoop] = None,
        use_vllm: Optional[bool] = None,
    ):
        self.spec = spec
        self.grpo = spec.grpo
        self.output_dir = Path(output_dir)
        self.backend = rewards
        self.job_name = job_name
        self.on_step = on_step
        self.status = status
        self.dist = _Distributed()
        self.device = device or default_device(self.dist.local_rank)
        self.metrics = metrics or component_metrics("trainer")
        self._own_loop = event_loop is None
        self.loop = event_loop or asyncio.new_event_loop()
        self._stop_requested = False
        self._updating = False

        if self.grpo.prompts_per_step % self.dist.world:
            raise ValueError(f"grpo.promptsPerStep ({self.grpo.prompts_per_step}) must divide by the number of processes ({self.dist.world})")
        self._seed_everything(self.grpo.seed)
        self.output_dir.mkdir(parents=True, exist_ok=True)

        rows = load_rows(spec.dataset)
        self.train_rows, self.eval_rows = split_rows(rows, spec.dataset.eval_fraction, self.grpo.seed)
        self.sampler = PromptSampler(len(self.train_rows), self.grpo.seed)

        base, self.tokenizer = load_model_and_tokenizer(spec.model, self.device)
        limit_cpu_threads_for_small_models(base, self.device)
        self.model = add_lora(base, spec.lora)
        self.formatter = PromptFormatter(self.tokenizer, spec.dataset, self.grpo.max_prompt_length)
        self.eos_id = self.tokenizer.eos_token_id
        self.pad_id = self.tokenizer.pad_token_id
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=self.grpo.learning_rate, weight_decay=self.grpo.weight_decay)
        total_updates = self.grpo.steps * self.grpo.num_iterations
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, _schedule(self.grpo.lr_scheduler, self.grpo.warmup_steps, total_updates)
        )
        self.sample_generator = torch.Generator(self.device).manual_seed(self.grpo.seed * 7919 + self.dist.rank)
        self.reward_requests = reward_requests(spec.rewards)
        self.reward_names = [r.effective_name for r in self.reward_requests]
        self.reward_weights = torch.tensor([r.weight for r in spec.rewards], dtype=torch.float64)
        self.step = 0
        self.vllm = self._vllm_generator() if (use_vllm if use_vllm is not None else self._vllm_available()) else None

    # ------------------------------------------------------------------ set-up helpers

    @staticmethod
    def _seed_everything(seed: int) -> None:
        random.seed(seed)
        torch.manual_seed(seed)
        try:
            import numpy

            numpy.random.seed(seed % 2**32)
        except ImportError:
            pass

    def _vllm_available(self) -> bool:
        if self.device.type != "cuda" or self.dist.enabled:
            return False
        import importlib.util

        return importlib.util.find_spec("vllm") is not None

    def _vllm_generator(self):
        from .rollout import VllmGenerator

        return VllmGenerator(
            resolve_model_path(self.spec.model.name),
            lora_rank=self.spec.lora.r,
            dtype=self.spec.model.dtype,
            max_model_len=self.grpo.max_prompt_length + self.grpo.max_completion_length,
            seed=self.grpo.seed,
        )

    # ------------------------------------------------------------------ checkpoints

    def _training_state(self) -> dict[str, Any]:
        rng = {
            "python": random.getstate(),
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            "sampling": self.sample_generator.get_state(),
        }
        try:
            import numpy

            rng["numpy"] = numpy.random.get_state()
        except ImportError:
            pass
        return {
            "step": self.step,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "sampler": self.sampler.state_dict(),
            "rng": self.dist.gather_list(rng),
            "world_size": self.dist.world,
        }

    def _restore(self, state: dict[str, Any]) -> None:
        self.step = state["step"]
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.sampler.load_state_dict(state["sampler"])
        if state.get("world_size", 1) != self.dist.world:
            log.warning("checkpoint written by %s processes, resuming with %s: random streams restart from the seed",
                        state.get("world_size"), self.dist.world)
            return
        rng = state["rng"][self.dist.rank]
        random.setstate(rng["python"])
        torch.set_rng_state(rng["torch"])
        if rng.get("cuda") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
        self.sample_generator.set_state(rng["sampling"])
        if "numpy" in rng:
            import numpy

            numpy.random.set_state(rng["numpy"])

    def _resume(self) -> Optional[int]:
        latest = ckpt.latest_checkpoint(self.output_dir)
        if latest is None:
            self._truncate_metrics(0)
            return None
        step, path = latest
        summary = json.loads((path / "state.json").read_text())
        if summary.get("model") != self.spec.model.name or summary.get("lora") != self.spec.lora.to_wire():
            raise ValueError(
                f"{path}: this checkpoint trained another model or adapter shape "
                f"({summary.get('model')!r}, lora {summary.get('lora')}); use another output folder"
            )
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        weights = load_file(str(path / "adapter" / "adapter_model.safetensors"), device=str(self.device))
        set_peft_model_state_dict(self.model, weights)
        self._restore(ckpt.load_training_state(path))
        self._truncate_metrics(step)
        log.info("resumed from %s (step %d of %d)", path, step, self.grpo.steps)
        return step

    def _save_checkpoint(self, state: Optional[dict[str, Any]] = None) -> None:
        state = state or self._training_state()  # every rank takes part (RNG gather)
        if self.dist.main:
            summary = {"model": self.spec.model.name, "lora": self.spec.lora.to_wire(), "total_steps": self.grpo.steps}
            path = ckpt.save_checkpoint(self.output_dir, state["step"], self.model, state, summary, self.spec.checkpoint.keep_last)
            self.metrics.checkpoints.labels(self.job_name).inc()
            log.info("checkpoint %s", path)
        self.dist.barrier()

    def _truncate_metrics(self, step: int) -> None:
        """Drop metric lines past the checkpoint (steps that will run again) so curves continue."""
        path = self.output_dir / METRICS_FILE
        if not self.dist.main or not path.exists():
            return
        kept = [m for m in read_metrics(self.output_dir) if m["step"] <= step]
        ckpt.write_atomically(path, "".join(json.dumps(m) + "\n" for m in kept))

    # ------------------------------------------------------------------ one step

    def _generate(self, prompts: list[list[int]], num_generations: int, greedy: bool) -> Rollout:
        self.model.eval()
        temperature = 0.0 if greedy else self.grpo.temperature
        if self.vllm is not None:
            return self.vllm.generate(
                self.model, prompts, num_generations=num_generations, max_new_tokens=self.grpo.max_completion_length,
                eos_token_id=self.eos_id, pad_token_id=self.pad_id, temperature=temperature, top_p=self.grpo.top_p,
                seed=int(torch.randint(0, 2**31 - 1, (1,), generator=self.sample_generator, device=self.device).item()),
            )
        return generate(
            self.model, prompts, num_generations=num_generations, max_new_tokens=self.grpo.max_completion_length,
            eos_token_id=self.eos_id, pad_token_id=self.pad_id, temperature=temperature, top_p=self.grpo.top_p,
            generator=self.sample_generator,
        )

    def _decode(self, rollout: Rollout) -> list[str]:
        ids = rollout.completion_ids.masked_fill(rollout.completion_mask == 0, self.pad_id)
        return self.tokenizer.batch_decode(ids.tolist(), skip_special_tokens=True)

    def _score(self, texts: list[str], rows: list[dict]) -> ScoreMatrix:
        return self.loop.run_until_complete(score_completions(self.backend, texts, rows, self.reward_requests))

    @staticmethod
    def _score_tensor(matrix: ScoreMatrix) -> torch.Tensor:
        return torch.tensor([[math.nan if s is None else s for s in row] for row in matrix.scores], dtype=torch.float64)

    def _micro_batches(self, rows: int) -> list[slice]:
        """Slices of the completions per forward/backward; whole groups when the size allows
        (a group's completions then share one forward of their prompt)."""
        size = self.grpo.micro_batch_size or rows
        return [slice(i, min(rows, i + size)) for i in range(0, rows, size)]

    def _logprobs(self, rollout: Rollout, batches: list[slice]) -> torch.Tensor:
        return torch.cat([self._sequence_logprobs(rollout.select(b)) for b in batches])

    def _sequence_logprobs(self, rollout: Rollout) -> torch.Tensor:
        return sequence_logprobs(self.model, rollout, temperature=self.grpo.temperature, group_size=self.grpo.num_generations)

    def _train_step(self) -> StepMetrics:
        grpo, G = self.grpo, self.grpo.num_generations
        started = time.perf_counter()
        indices = self.sampler.take(grpo.prompts_per_step)[self.dist.rank::self.dist.world]
        rows = [self.train_rows[i] for i in indices]

        rollout = self._generate([self.formatter.token_ids(r) for r in rows], G, greedy=False)
        generated = time.perf_counter()

        item_rows = [row for row in rows for _ in range(G)]
        matrix = self._score(self._decode(rollout), item_rows)
        scores_local = self._score_tensor(matrix)
        scored = time.perf_counter()

        # Advantages over the whole step (all ranks), then this rank's slice.
        scores = torch.cat(self.dist.gather_list(scores_local))
        totals = combine_rewards(scores, self.reward_weights)
        advantages_all = group_advantages(totals, G, grpo.scale_rewards).float()
        start = self.dist.rank * scores_local.shape[0]
        advantages = advantages_all[start:start + scores_local.shape[0]].to(self.device)
        scorable = ~torch.isnan(totals[start:start + scores_local.shape[0]])

        mask = rollout.completion_mask.float()
        mask[~scorable.to(self.device)] = 0.0  # unscorable: no push, no weight in the normaliser
        if grpo.mask_truncated_completions:
            mask[rollout.truncated] = 0.0
        step_sequences = int(self.dist.sum_(torch.tensor(float(mask.shape[0]), device=self.device)).item())
        step_tokens = float(self.dist.sum_(mask.sum().detach().clone()).item())

        batches = self._micro_batches(mask.shape[0])
        self._updating = True
        self.model.eval()
        with torch.no_grad():
            old = self._logprobs(rollout, batches) if grpo.num_iterations > 1 else None
            ref = None
            if grpo.beta > 0:
                with self.model.disable_adapter():
                    ref = self._logprobs(rollout, batches)
        self.model.train()
        loss_value = kl_sum = clip_sum = token_sum = 0.0
        grad_norm = 0.0
        iterations = grpo.num_iterations
        if step_tokens == 0:  # nothing scorable (or everything masked): no signal, and no momentum step either
            log.warning("step %d: no completion could be used (all unscorable or masked): no update", self.step + 1)
            iterations = 0
        for _ in range(iterations):
            self.optimizer.zero_grad(set_to_none=True)
            loss_value = 0.0
            for b in batches:
                logprobs = self._sequence_logprobs(rollout.select(b))
                loss, stats = policy_loss(
                    logprobs,
                    old[b] if old is not None else logprobs.detach(),
                    advantages[b],
                    mask[b],
                    ref_logprobs=ref[b] if ref is not None else None,
                    beta=grpo.beta,
                    epsilon_low=grpo.epsilon,
                    epsilon_high=grpo.effective_epsilon_high,
                    loss_type=grpo.loss_type,
                    max_completion_length=grpo.max_completion_length,
                    step_sequences=step_sequences,
                    step_tokens=step_tokens,
                )
                loss.backward()
                loss_value += loss.item()
                kl_sum += stats["kl"] * stats["tokens"]
                clip_sum += stats["clip_ratio"] * stats["tokens"]
                token_sum += stats["tokens"]
            if self.dist.enabled:
                for p in self.params:
                    if p.grad is None:
                        p.grad = torch.zeros_like(p)
                    self.dist.sum_(p.grad)
                loss_value = float(self.dist.sum_(torch.tensor(loss_value, device=self.device)).item())
            grad_norm = float(torch.nn.utils.clip_grad_norm_(self.params, grpo.max_grad_norm))
            self.optimizer.step()
            self.scheduler.step()
        self.model.eval()
        self._updating = False
        trained = time.perf_counter()

        # Step statistics over all ranks.
        lengths = torch.cat(self.dist.gather_list(rollout.lengths.cpu()))
        truncated = torch.cat(self.dist.gather_list(rollout.truncated.cpu()))
        kl_sum, clip_sum, token_sum = (float(v) for v in self.dist.sum_(torch.tensor([kl_sum, clip_sum, token_sum], dtype=torch.float64, device=self.device)).cpu())
        failures = int(torch.isnan(scores).sum())
        valid_totals = totals[~torch.isnan(totals)].tolist()
        reward_mean, reward_std = _mean_std(valid_totals)
        per_function = {}
        per_function_std = {}
        for k, name in enumerate(self.reward_names):
            column = scores[:, k]
            mean, std = _mean_std(column[~torch.isnan(column)].tolist())
            if mean is not None:
                per_function[name], per_function_std[name] = mean, std
        grouped = totals.view(-1, G)
        zero_std = sum(1 for g in grouped if len(set(g[~torch.isnan(g)].tolist())) <= 1) / grouped.shape[0]
        generate_seconds = torch.tensor(generated - started, dtype=torch.float64)
        generate_seconds = float(self.dist.sum_(generate_seconds)) / self.dist.world
        tokens = int(lengths.sum())
        return StepMetrics(
            step=self.step + 1,
            total_steps=grpo.steps,
            reward=reward_mean,
            reward_std=reward_std,
            rewards=per_function,
            rewards_std=per_function_std,
            loss=loss_value,
            kl=kl_sum / max(token_sum, 1.0),
            clip_ratio=clip_sum / max(token_sum, 1.0),
            grad_norm=grad_norm,
            learning_rate=self.scheduler.get_last_lr()[0],
            completion_length_mean=float(lengths.float().mean()),
            completion_length_max=int(lengths.max()),
            truncated_fraction=float(truncated.float().mean()),
            generated_tokens=tokens,
            tokens_per_second=tokens / max(generate_seconds, 1e-9),
            phase_seconds={"generate": generated - started, "reward": scored - generated, "train": trained - scored},
            step_seconds=trained - started,
            reward_failures=failures,
            frac_reward_zero_std=zero_std,
        )

    # ------------------------------------------------------------------ evaluation

    def evaluate(self, step: int) -> tuple[Optional[float], Optional[float]]:
        """Greedy pass@1 and mean total reward on the held-out rows; writes
        samples/step-N.jsonl. A row passes when every positively weighted reward answered
        outcome `ok` (the reward pool's word for "passed its check": a correct countdown
        expression, a kernel matching the reference and timed). Rows the pool failed to score
        are left out. Runs on rank 0 only; returns (None, None) without held-out rows."""
        if not self.eval_rows or not self.dist.main:
            return None, None
        prompts = [self.formatter.token_ids(r) for r in self.eval_rows]
        texts: list[str] = []
        batch = max(1, self.grpo.prompts_per_step * self.grpo.num_generations)
        for i in range(0, len(prompts), batch):
            texts.extend(self._decode(self._generate(prompts[i:i + batch], 1, greedy=True)))
        matrix = self._score(texts, self.eval_rows)
        totals = combine_rewards(self._score_tensor(matrix), self.reward_weights)
        scorable = ~torch.isnan(totals)
        if not bool(scorable.any()):
            return None, None
        judged = [name for name, spec in zip(self.reward_names, self.spec.rewards) if spec.weight > 0] or self.reward_names
        passes = [all(outcomes[name] == "ok" for name in judged) for outcomes in matrix.outcomes]
        passed = sum(p for p, ok in zip(passes, scorable.tolist()) if ok) / int(scorable.sum())
        mean_reward = totals[scorable].mean().item()
        folder = self.output_dir / SAMPLES_DIR
        folder.mkdir(exist_ok=True)
        lines = []
        for row, text, total, outcomes, reasons, scores, passed_row in zip(
            self.eval_rows, texts, totals.tolist(), matrix.outcomes, matrix.reasons, matrix.scores, passes
        ):
            lines.append(json.dumps({
                "prompt": self.formatter.text(row), "completion": text, "total": None if math.isnan(total) else total, "passed": passed_row,
                "rewards": dict(zip(self.reward_names, scores)), "outcomes": outcomes, "reasons": reasons, "row": row,
            }, default=str))
        ckpt.write_atomically(folder / f"step-{step:08d}.jsonl", "\n".join(lines) + "\n")
        self.metrics.eval_pass_at_1.labels(self.job_name).set(passed)
        return passed, mean_reward

    # ------------------------------------------------------------------ reporting

    def _publish(self, m: StepMetrics) -> None:
        job, g = self.job_name, self.metrics
        g.step.labels(job).set(m.step)
        g.total_steps.labels(job).set(m.total_steps)
        for name, value in m.rewards.items():
            g.reward_mean.labels(job, name).set(value)
            g.reward_std.labels(job, name).set(m.rewards_std[name])
        if m.reward is not None:
            g.reward_total_mean.labels(job).set(m.reward)
        g.loss.labels(job).set(m.loss)
        g.kl.labels(job).set(m.kl)
        g.clip_ratio.labels(job).set(m.clip_ratio)
        g.completion_length_mean.labels(job).set(m.completion_length_mean)
        g.completion_length_max.labels(job).set(m.completion_length_max)
        g.truncated_fraction.labels(job).set(m.truncated_fraction)
        g.generated_tokens_per_second.labels(job).set(m.tokens_per_second)
        g.generated_tokens.labels(job).inc(m.generated_tokens)
        for phase in PHASES:
            g.step_phase_seconds.labels(job, phase).set(m.phase_seconds[phase])
        g.learning_rate.labels(job).set(m.learning_rate)
        if m.reward_failures:
            g.reward_failures.labels(job).inc(m.reward_failures)
        with open(self.output_dir / METRICS_FILE, "a") as handle:
            handle.write(json.dumps(m.to_json()) + "\n")
        if self.status is not None:
            self.status.step(m.step, m.total_steps, m.rewards, m.reward)
        if self.on_step is not None:
            self.on_step(m)

    # ------------------------------------------------------------------ the loop

    @contextmanager
    def _graceful_stop(self):
        """First SIGINT/SIGTERM: finish the step, checkpoint, return. Second SIGINT: stop now."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def request_stop(signum, frame):
            if self._stop_requested and signum == signal.SIGINT:
                raise KeyboardInterrupt
            self._stop_requested = True
            log.warning("%s: stopping after this step with a checkpoint (Ctrl-C again to stop now)", signal.Signals(signum).name)

        previous = {s: signal.signal(s, request_stop) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)

    def request_stop(self) -> None:
        """Ask the loop to stop after the current step, with a checkpoint (thread-safe)."""
        self._stop_requested = True

    def run(self, max_steps: Optional[int] = None) -> TrainResult:
        total = self.grpo.steps
        stop_at = total if max_steps is None else min(total, max_steps)
        resumed = self._resume()
        if self.dist.main:
            ckpt.write_atomically(self.output_dir / CONFIG_FILE, json.dumps(self.spec.to_wire(), indent=2) + "\n")
            self.metrics.total_steps.labels(self.job_name).set(total)
            self.metrics.step.labels(self.job_name).set(self.step)
            if self.status is not None:
                self.status.running(total, self.step)
        history: list[StepMetrics] = []
        eval_pass = None
        self._stop_requested = False
        with self._graceful_stop():
            while self.step < stop_at and not self._stop_requested:
                snapshot = self._training_state()  # the state of the last completed step
                try:
                    metrics = self._train_step()
                except KeyboardInterrupt:
                    self._on_hard_interrupt(snapshot)
                    raise
                self.step += 1
                if self.step == total or (self.grpo.eval_every and self.step % self.grpo.eval_every == 0):
                    metrics.eval_pass_at_1, metrics.eval_reward = self.evaluate(self.step)
                    eval_pass = metrics.eval_pass_at_1
                if self.dist.main:
                    self._publish(metrics)
                history.append(metrics)
                if self.step % self.spec.checkpoint.every_steps == 0 or self.step == stop_at or self._stop_requested:
                    self._save_checkpoint()
        finished = self.step >= total
        adapter = None
        if finished:
            if not history:  # resumed after the last step: evaluate the final adapter once more
                eval_pass, _ = self.evaluate(self.step)
            if self.dist.main:
                adapter = self.output_dir / ADAPTER_DIR
                scratch = self.output_dir / f".{ADAPTER_DIR}.tmp"
                self.model.save_pretrained(scratch)
                self.tokenizer.save_pretrained(scratch)
                if adapter.exists():
                    import shutil

                    shutil.rmtree(adapter)
                scratch.rename(adapter)
                if self.status is not None:
                    self.status.finished()
            self.dist.barrier()
        elif self.step > 0 and ckpt.latest_checkpoint(self.output_dir) is None and self.dist.main:
            self._save_checkpoint()
        return TrainResult(
            output_dir=self.output_dir,
            step=self.step,
            total_steps=total,
            interrupted=not finished,
            resumed_from=resumed,
            adapter_dir=adapter,
            last_metrics=history[-1] if history else None,
            eval_pass_at_1=eval_pass,
            history=history,
        )

    def _on_hard_interrupt(self, snapshot: dict[str, Any]) -> None:
        """Interrupted inside a step. Before the update began, the parameters and optimizer are
        those of the last completed step: checkpoint them with the data position and RNG state
        taken at the step's start. During the update, keep the latest checkpoint."""
        if self._updating:
            log.warning("interrupted during the update of step %d: resuming from the latest checkpoint", snapshot["step"] + 1)
            return
        latest = ckpt.latest_checkpoint(self.output_dir)
        if snapshot["step"] > 0 and (latest is None or latest[0] < snapshot["step"]):
            self._save_checkpoint(snapshot)

    def close(self) -> None:
        """Release the reward backend's connections (if it has an async `close`) and the event loop."""
        close = getattr(self.backend, "close", None)
        if close is not None and asyncio.iscoroutinefunction(close) and not self.loop.is_closed():
            self.loop.run_until_complete(close())
        if self._own_loop and not self.loop.is_closed():
            self.loop.close()

    def __enter__(self) -> "Trainer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
