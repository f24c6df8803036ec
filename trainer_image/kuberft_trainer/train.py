"""The GRPO + LoRA training loop.

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
- `output_dir/samples/hacked-step-N.jsonl`: the training completions of step N an anti-hacking
  check caught, with the evaluator's reasons (only for steps that caught one).
- Async reward backends run on the trainer's own event loop (`event_loop=` to share one).
- Rollouts come from vLLM in this process (`rollout.VllmGenerator`) on a GPU where it is
  installed, or when `use_vllm=True` is given; from vLLM rollout servers (`vllm=` a
  `rollout_server.RolloutServers`, spec.rollout.mode server); otherwise from the model itself.

One step (`_train_step`): take promptsPerStep prompts; sample numGenerations completions each
(HF with a KV cache, or vLLM on a GPU); score them; total reward = weighted sum; group-relative
advantages; numIterations clipped policy-gradient updates of the LoRA parameters (old log-probs
stored when > 1; reference = the base model with the adapter disabled when beta > 0).

Several processes (torchrun, or `kuberft run --nproc N`): each generates and scores its share
of the prompts (promptsPerStep must divide by their number); rewards are gathered so that
advantages and loss normalisers are those of the whole step, and the LoRA gradients are summed:
the update is the single-process update. Every prompt samples from a generator seeded by the
job's seed, the step and the prompt's place in the step, so the samples, and hence the run, do
not depend on the number of processes. `trainer.sharding: fsdp` shards the model over the
processes (see distributed.py); multi-node is the same with torchrun's `--nnodes`.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import math
import random
import signal
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from kuberft_core import paths
from kuberft_core.api import RFTJobSpec
from kuberft_core.metrics import ComponentMetrics, component_metrics
from kuberft_core.models import limit_cpu_threads_for_small_models, resolve_model_path

from . import checkpoint as ckpt
from .data import DatasetError, PromptFormatter, PromptSampler, train_and_eval_rows
from .distributed import (
    Distributed,
    default_device,
    full_parameters,
    grad_norm_value,
    is_sharded,
    load_optimizer_state,
    optimizer_state,
    shard_model,
    trainable_state,
)
from .evaluation import hacked_items, judge, write_hacked, write_samples
from .grpo import combine_rewards, group_advantages, policy_loss, rollout_correction
from .modeling import add_lora, load_model_and_tokenizer
from .report import ProgressReporter
from .rewards import RewardBackend, ScoreMatrix, reward_requests, score_completions
from .rollout import Rollout, generate, rollout_from_completions, sequence_logprobs
from .step_metrics import (
    METRICS_FILE,
    StepMetrics,
    TrainResult,
    length_statistics,
    outcome_statistics,
    publish,
    read_metrics,
    reward_statistics,
    truncate_metrics,
)

__all__ = ["Trainer", "StepMetrics", "TrainResult", "read_metrics", "METRICS_FILE", "default_device"]

log = logging.getLogger(__name__)

ADAPTER_DIR = paths.ADAPTER_DIR  # the operator reports `<output>/adapter` as the job's adapter
CONFIG_FILE = "config.json"
SFT_METRICS_FILE = "sft_metrics.jsonl"


def _schedule(kind: str, warmup: int, total: int) -> Callable[[int], float]:
    def factor(update: int) -> float:
        if warmup and update < warmup:
            return (update + 1) / (warmup + 1)
        if kind == "constant":
            return 1.0
        progress = min(1.0, (update - warmup) / max(1, total - warmup))
        return 1.0 - progress if kind == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def prompt_seed(seed: int, step: int, position: int) -> int:
    """The sampling seed of the prompt at `position` in `step` (1-based) of a job seeded `seed`."""
    digest = hashlib.blake2b(f"{seed}:{step}:{position}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


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
        vllm=None,
    ):
        self.spec = spec
        self.grpo = spec.grpo
        self.output_dir = Path(output_dir)
        self.backend = rewards
        self.job_name = job_name
        self.on_step = on_step
        self.status = status
        # A tiny model is built on first use, and built before the process group exists: once
        # there is one, transformers writes a model's files from rank 0 only.
        resolve_model_path(spec.model.name)
        self.dist = Distributed()
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

        self.train_rows, self.eval_rows = train_and_eval_rows(spec.dataset, self.grpo.seed)
        self.sampler = PromptSampler(len(self.train_rows), self.grpo.seed)

        base, self.tokenizer = load_model_and_tokenizer(spec.model, self.device)
        limit_cpu_threads_for_small_models(base, self.device)
        self.model = add_lora(base, spec.lora)
        if spec.trainer.activation_checkpointing:
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.formatter = PromptFormatter(self.tokenizer, spec.dataset, self.grpo.max_prompt_length)
        self.eos_id = self.tokenizer.eos_token_id
        self.pad_id = self.tokenizer.pad_token_id
        self.reward_requests = reward_requests(spec.rewards)
        self.reward_names = [r.effective_name for r in self.reward_requests]
        self.reward_weights = torch.tensor([r.weight for r in spec.rewards], dtype=torch.float64)
        self.step = 0
        self.sft_rows = self._labelled_rows() if spec.sft is not None else []

        latest = self._latest_checkpoint()
        self.sft_done = spec.sft is None or latest is not None  # checkpoints are written after the SFT phase
        if latest is not None:  # the adapter's weights, before they are sharded
            self._load_adapter(latest[1])
        if spec.trainer.sharding == "fsdp" and self.dist.enabled:
            groups = shard_model(self.model)
            log.info("model sharded over %d processes (FSDP2, %d shard groups)", self.dist.world, groups)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=self.grpo.learning_rate, weight_decay=self.grpo.weight_decay)
        total_updates = self.grpo.steps * self.grpo.num_iterations
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, _schedule(self.grpo.lr_scheduler, self.grpo.warmup_steps, total_updates)
        )
        self.resumed_from = self._resume(latest)
        if vllm is None and spec.rollout.mode == "server":
            raise ValueError("spec.rollout.mode is server: give the trainer its rollout servers (vllm=RolloutServers(...))")
        if vllm is None and (use_vllm if use_vllm is not None else self._vllm_available()):
            vllm = self._vllm_generator()
        self.vllm = vllm

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

    def _labelled_rows(self) -> list[dict]:
        sft = self.spec.sft
        rows = [r for r in self.train_rows if isinstance(r.get(sft.completion_field), str) and r[sft.completion_field]]
        if not rows:
            raise DatasetError(f"sft.completionField: no training row has a {sft.completion_field!r} text to learn from")
        if sft.batch_size % self.dist.world:
            raise ValueError(f"sft.batchSize ({sft.batch_size}) must divide by the number of processes ({self.dist.world})")
        return rows

    # ------------------------------------------------------------------ checkpoints

    def _latest_checkpoint(self) -> Optional[tuple[int, Path]]:
        latest = ckpt.latest_checkpoint(self.output_dir)
        if latest is not None:
            summary = json.loads((latest[1] / "state.json").read_text())
            if summary.get("model") != self.spec.model.name or summary.get("lora") != self.spec.lora.to_wire():
                raise ValueError(
                    f"{latest[1]}: this checkpoint trained another model or adapter shape "
                    f"({summary.get('model')!r}, lora {summary.get('lora')}); use another output folder"
                )
        return latest

    def _load_adapter(self, path: Path) -> None:
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        set_peft_model_state_dict(self.model, load_file(str(path / "adapter" / "adapter_model.safetensors"), device=str(self.device)))

    def _step_start(self) -> dict[str, Any]:
        """The data position and random streams before a step (every process takes part)."""
        return {"step": self.step, "sampler": self.sampler.state_dict(), "rng": self.dist.gather_list(ckpt.rng_state())}

    def _training_state(self, start: dict[str, Any]) -> dict[str, Any]:
        """Everything but the adapter's weights: `start` and the optimizer and schedule as they
        are now (every process takes part)."""
        return {
            **start,
            "optimizer": optimizer_state(self.model, self.optimizer),
            "scheduler": self.scheduler.state_dict(),
            "world_size": self.dist.world,
        }

    def _resume(self, latest: Optional[tuple[int, Path]]) -> Optional[int]:
        if latest is None:
            if self.dist.main:
                truncate_metrics(self.output_dir, 0)
            return None
        step, path = latest
        state = ckpt.load_training_state(path)
        self.step = state["step"]
        load_optimizer_state(self.model, self.optimizer, state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.sampler.load_state_dict(state["sampler"])
        if state.get("world_size", 1) == self.dist.world:
            ckpt.set_rng_state(state["rng"][self.dist.rank])
        else:  # sampling does not depend on these streams; dropout does
            log.info("checkpoint written by %s processes, resuming with %s: the processes' random streams restart from the seed",
                     state.get("world_size"), self.dist.world)
        if self.dist.main:
            truncate_metrics(self.output_dir, step)
        log.info("resumed from %s (step %d of %d)", path, step, self.grpo.steps)
        return step

    def _full_adapter_state(self) -> Optional[dict]:
        """The adapter's weights gathered whole when the model is sharded (every process must take
        part); None otherwise, where peft reads them from the model itself."""
        return trainable_state(self.model) if is_sharded(self.model) else None

    def _save_checkpoint(self, start: Optional[dict[str, Any]] = None) -> None:
        """A checkpoint of the adapter and the training state; `start`: the data position and
        random streams to record (default: now)."""
        state = self._training_state(start or self._step_start())
        adapter = self._full_adapter_state()
        if self.dist.main:
            summary = {"model": self.spec.model.name, "lora": self.spec.lora.to_wire(), "total_steps": self.grpo.steps}
            path = ckpt.save_checkpoint(self.output_dir, state["step"], self.model, state, summary,
                                        self.spec.checkpoint.keep_last, adapter_state=adapter)
            self.metrics.checkpoints.labels(self.job_name).inc()
            log.info("checkpoint %s", path)
        self.dist.barrier()

    def _save_adapter(self) -> Optional[Path]:
        adapter_state = self._full_adapter_state()
        if not self.dist.main:
            return None
        adapter = self.output_dir / ADAPTER_DIR
        scratch = self.output_dir / f".{ADAPTER_DIR}.tmp"
        self.model.save_pretrained(scratch, state_dict=adapter_state)
        self.tokenizer.save_pretrained(scratch)
        if adapter.exists():
            import shutil

            shutil.rmtree(adapter)
        scratch.rename(adapter)
        return adapter

    # ------------------------------------------------------------------ rollouts and scores

    def _generate(self, prompts: list[list[int]], positions: Optional[list[int]], num_generations: int) -> Rollout:
        """Completions of `prompts`; sampled (each prompt from its own seed, by its `positions` in
        the step) or, without positions, greedy."""
        self.model.eval()
        greedy = positions is None
        temperature = 0.0 if greedy else self.grpo.temperature
        seeds = None if greedy else [prompt_seed(self.grpo.seed, self.step + 1, p) for p in positions]
        options = dict(num_generations=num_generations, max_new_tokens=self.grpo.max_completion_length,
                       eos_token_id=self.eos_id, pad_token_id=self.pad_id, temperature=temperature, top_p=self.grpo.top_p)
        if self.vllm is not None:
            adapter = self._full_adapter_state()
            return self.vllm.generate(self.model, prompts, seeds=seeds, adapter_state=adapter, **options)
        generators = None if greedy else [torch.Generator(self.device).manual_seed(s) for s in seeds]
        with full_parameters(self.model):
            return generate(self.model, prompts, generators=generators, **options)

    def _decode(self, rollout: Rollout) -> list[str]:
        ids = rollout.completion_ids.masked_fill(rollout.completion_mask == 0, self.pad_id)
        return self.tokenizer.batch_decode(ids.tolist(), skip_special_tokens=True)

    def _score(self, texts: list[str], rows: list[dict]) -> tuple[ScoreMatrix, torch.Tensor]:
        """The pool's answers and their (N, K) scores, NaN where an evaluation failed."""
        matrix = self.loop.run_until_complete(score_completions(self.backend, texts, rows, self.reward_requests))
        return matrix, torch.tensor([[math.nan if s is None else s for s in row] for row in matrix.scores], dtype=torch.float64)

    def _micro_batches(self, rows: int) -> list[slice]:
        """Slices of the completions per forward/backward; whole groups when the size allows
        (a group's completions then share one forward of their prompt)."""
        size = self.grpo.micro_batch_size or rows
        return [slice(i, min(rows, i + size)) for i in range(0, rows, size)]

    def _sequence_logprobs(self, rollout: Rollout) -> torch.Tensor:
        # Activation checkpointing recomputes layers without their KV cache: no shared prompt forward.
        group = 1 if self.spec.trainer.activation_checkpointing else self.grpo.num_generations
        return sequence_logprobs(self.model, rollout, temperature=self.grpo.temperature, group_size=group)

    def _logprobs(self, rollout: Rollout, batches: list[slice]) -> torch.Tensor:
        return torch.cat([self._sequence_logprobs(rollout.select(b)) for b in batches])

    # ------------------------------------------------------------------ one step

    def _train_step(self) -> StepMetrics:
        grpo, G = self.grpo, self.grpo.num_generations
        started = time.perf_counter()
        positions = list(range(grpo.prompts_per_step))[self.dist.rank::self.dist.world]
        indices = self.sampler.take(grpo.prompts_per_step)
        rows = [self.train_rows[indices[p]] for p in positions]

        rollout = self._generate([self.formatter.token_ids(r) for r in rows], positions, G)
        # The same width on every process: their forwards (and shards' gathers) then line up.
        rollout = rollout.padded_to(self.dist.max_(rollout.completion_ids.shape[1]), self.pad_id)
        generated = time.perf_counter()

        texts, step_rows = self._decode(rollout), [row for row in rows for _ in range(G)]
        matrix, local_scores = self._score(texts, step_rows)
        hacked = [item for part in self.dist.gather_list(hacked_items(texts, step_rows, matrix)) for item in part]
        if hacked and self.dist.main:
            write_hacked(self.output_dir, self.step + 1, hacked)
        scored = time.perf_counter()

        # Advantages over the whole step (all processes), then this process's rows.
        scores = torch.cat(self.dist.gather_list(local_scores))
        totals = combine_rewards(scores, self.reward_weights)
        mine = slice(self.dist.rank * len(local_scores), (self.dist.rank + 1) * len(local_scores))
        advantages = group_advantages(totals, G, grpo.scale_rewards).float()[mine].to(self.device)
        mask = rollout.completion_mask.float()
        mask[torch.isnan(totals[mine]).to(self.device)] = 0.0  # unscorable: no push, no weight in the normaliser
        if grpo.mask_truncated_completions:
            mask[rollout.truncated] = 0.0
        step_sequences = int(self.dist.sum_(torch.tensor(float(mask.shape[0]), device=self.device)).item())
        step_tokens = float(self.dist.sum_(mask.sum().detach().clone()).item())

        batches = self._micro_batches(mask.shape[0])
        correct = rollout.sampling_logprobs is not None and grpo.rollout_correction
        self._updating = True
        self.model.eval()
        with torch.no_grad():
            old = self._logprobs(rollout, batches) if grpo.num_iterations > 1 or correct else None
            ref = None
            if grpo.beta > 0:
                with self.model.disable_adapter():
                    ref = self._logprobs(rollout, batches)
        weights, correction = None, {}
        if correct:  # another engine sampled: weight each token by min(p_trainer / p_rollout, cap)
            weights, correction = rollout_correction(old, rollout.sampling_logprobs, mask, grpo.rollout_correction_cap)
        self.model.train()
        loss_value = grad_norm = 0.0
        totals_kl_clip_tokens = torch.zeros(3, dtype=torch.float64)
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
                    logprobs, old[b] if old is not None else logprobs.detach(), advantages[b], mask[b],
                    ref_logprobs=ref[b] if ref is not None else None, beta=grpo.beta,
                    rollout_weights=weights[b] if weights is not None else None,
                    epsilon_low=grpo.epsilon, epsilon_high=grpo.effective_epsilon_high, loss_type=grpo.loss_type,
                    max_completion_length=grpo.max_completion_length, step_sequences=step_sequences, step_tokens=step_tokens,
                )
                loss.backward()
                loss_value += loss.item()
                totals_kl_clip_tokens += torch.tensor([stats["kl"], stats["clip_ratio"], 1.0], dtype=torch.float64) * stats["tokens"]
            self._sum_gradients()
            loss_value = float(self.dist.sum_(torch.tensor(loss_value, device=self.device)).item())
            grad_norm = grad_norm_value(torch.nn.utils.clip_grad_norm_(self.params, grpo.max_grad_norm))
            self.optimizer.step()
            self.scheduler.step()
        self.model.eval()
        self._updating = False
        trained = time.perf_counter()

        kl_sum, clip_sum, token_sum = self.dist.sum_(totals_kl_clip_tokens.to(self.device)).cpu().tolist()
        generate_seconds = float(self.dist.sum_(torch.tensor(generated - started, dtype=torch.float64))) / self.dist.world
        return StepMetrics(
            step=self.step + 1,
            total_steps=grpo.steps,
            loss=loss_value,
            kl=kl_sum / max(token_sum, 1.0),
            clip_ratio=clip_sum / max(token_sum, 1.0),
            grad_norm=grad_norm,
            learning_rate=self.scheduler.get_last_lr()[0],
            phase_seconds={"generate": generated - started, "reward": scored - generated, "train": trained - scored},
            step_seconds=trained - started,
            **reward_statistics(scores, totals, self.reward_names, G),
            **outcome_statistics([o for part in self.dist.gather_list(matrix.outcomes) for o in part], self.reward_names),
            **self._mean_over_processes(correction),
            **length_statistics(torch.cat(self.dist.gather_list(rollout.lengths.cpu())),
                                torch.cat(self.dist.gather_list(rollout.truncated.cpu())), generate_seconds),
        )

    def _mean_over_processes(self, values: dict[str, float]) -> dict[str, float]:
        """Per-process statistics averaged over the processes (max for a `_max`)."""
        gathered = self.dist.gather_list(values)
        return {key: (max if key.endswith("_max") else lambda v: sum(v) / len(v))([g[key] for g in gathered]) for key in values}

    def _sum_gradients(self) -> None:
        """Sum the LoRA gradients over the processes (a sharded model's backward did it already)."""
        if not self.dist.enabled or is_sharded(self.model):
            return
        for p in self.params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            self.dist.sum_(p.grad)

    # ------------------------------------------------------------------ supervised fine-tuning

    def _supervised_phase(self) -> bool:
        """`spec.sft`: its steps on the labelled rows, one line each in sft_metrics.jsonl; then a
        checkpoint, so a resumed run goes on with GRPO. False when stopped before the end (the
        next run starts the phase again)."""
        sft = self.spec.sft
        sampler = PromptSampler(len(self.sft_rows), self.grpo.seed)
        optimizer = torch.optim.AdamW(self.params, lr=sft.learning_rate, weight_decay=self.grpo.weight_decay)
        records = []
        log.info("supervised fine-tuning: %d steps of %d labelled rows (of %d)", sft.steps, sft.batch_size, len(self.sft_rows))
        for step in range(1, sft.steps + 1):
            if self._stop_requested:
                log.warning("stopped during supervised fine-tuning (step %d of %d): the next run starts it again", step - 1, sft.steps)
                return False
            rows = [self.sft_rows[i] for i in sampler.take(sft.batch_size)][self.dist.rank::self.dist.world]
            batch = self._labelled_batch(rows)
            tokens = float(self.dist.sum_(batch.completion_mask.sum().float()).item())
            self.model.train()
            optimizer.zero_grad(set_to_none=True)
            logprobs = sequence_logprobs(self.model, batch, temperature=1.0)
            loss = -(logprobs * batch.completion_mask).sum() / tokens  # mean over the step's tokens, all processes
            loss.backward()
            self._sum_gradients()
            grad_norm = grad_norm_value(torch.nn.utils.clip_grad_norm_(self.params, self.grpo.max_grad_norm))
            optimizer.step()
            loss_value = float(self.dist.sum_(loss.detach().clone()).item())
            records.append({"step": step, "loss": loss_value, "tokens": int(tokens), "grad_norm": grad_norm})
            if step == 1 or step % 10 == 0 or step == sft.steps:
                log.info("sft step %d/%d: loss %.4f", step, sft.steps, loss_value)
        self.model.eval()
        if self.dist.main:
            ckpt.write_atomically(self.output_dir / SFT_METRICS_FILE, "".join(json.dumps(r) + "\n" for r in records))
        self.sft_done = True
        self._save_checkpoint()
        return True

    def _labelled_batch(self, rows: list[dict]) -> Rollout:
        """The rows' prompts and labelled completions (+ eos, at most maxCompletionLength tokens) as a rollout."""
        field, limit = self.spec.sft.completion_field, self.grpo.max_completion_length
        completions = [(self.tokenizer(r[field], add_special_tokens=False)["input_ids"] + [self.eos_id])[:limit] for r in rows]
        return rollout_from_completions([self.formatter.token_ids(r) for r in rows], completions, [[] for _ in rows],
                                        num_generations=1, eos_token_id=self.eos_id, pad_token_id=self.pad_id, device=self.device)

    # ------------------------------------------------------------------ evaluation

    def evaluate(self, step: int) -> tuple[Optional[float], Optional[float]]:
        """Greedy pass@1 and mean total reward on the held-out rows (see evaluation.py); writes
        samples/step-N.jsonl. Every process generates (a sharded model needs all of them), rank 0
        scores and writes; returns (None, None) elsewhere and without held-out rows."""
        if not self.eval_rows:
            return None, None
        prompts = [self.formatter.token_ids(r) for r in self.eval_rows]
        texts: list[str] = []
        batch = max(1, self.grpo.prompts_per_step * self.grpo.num_generations)
        for i in range(0, len(prompts), batch):
            texts.extend(self._decode(self._generate(prompts[i:i + batch], None, 1)))
        if not self.dist.main:
            return None, None
        matrix, scores = self._score(texts, self.eval_rows)
        totals = combine_rewards(scores, self.reward_weights)
        result = judge(matrix, totals, self.reward_names, [r.weight for r in self.spec.rewards])
        write_samples(self.output_dir, step, self.eval_rows, [self.formatter.text(r) for r in self.eval_rows],
                      texts, matrix, totals, self.reward_names, result)
        if result.pass_at_1 is not None:
            self.metrics.eval_pass_at_1.labels(self.job_name).set(result.pass_at_1)
        return result.pass_at_1, result.mean_reward

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
            if not self.sft_done and not self._supervised_phase():
                return TrainResult(output_dir=self.output_dir, step=0, total_steps=total, interrupted=True,
                                   resumed_from=self.resumed_from, adapter_dir=None, last_metrics=None, eval_pass_at_1=None, history=[])
            while self.step < stop_at and not self._stop_requested:
                snapshot = self._step_start()
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
                    publish(metrics, self.job_name, self.metrics, self.output_dir, self.status)
                    if self.on_step is not None:
                        self.on_step(metrics)
                history.append(metrics)
                if self.step % self.spec.checkpoint.every_steps == 0 or self.step == stop_at or self._stop_requested:
                    self._save_checkpoint()
        finished = self.step >= total
        adapter = None
        if finished:
            if not history:  # resumed after the last step: evaluate the final adapter once more
                eval_pass, _ = self.evaluate(self.step)
            adapter = self._save_adapter()
            if adapter is not None and self.status is not None:
                self.status.finished()
            self.dist.barrier()
        elif self.step > 0 and ckpt.latest_checkpoint(self.output_dir) is None:
            self._save_checkpoint()
        return TrainResult(
            output_dir=self.output_dir,
            step=self.step,
            total_steps=total,
            interrupted=not finished,
            resumed_from=self.resumed_from,
            adapter_dir=adapter,
            last_metrics=history[-1] if history else None,
            eval_pass_at_1=eval_pass,
            history=history,
        )

    def _on_hard_interrupt(self, snapshot: dict[str, Any]) -> None:
        """Interrupted inside a step. Before the update began, the parameters and optimizer are
        those of the last completed step: checkpoint them with the data position and random
        streams taken at the step's start. During the update, keep the latest checkpoint."""
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
