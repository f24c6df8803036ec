"""GRPO step time and peak memory: kuberft's trainer against TRL's `GRPOTrainer`, on the CPU.

Both train the same tiny Llama (built in code) with the same LoRA config, prompts, number of
generations, completion length, loss (dapo, beta 0, one update per generation batch), learning
rate and reward function. Equal work: every completion is generated to the full length (EOS is
suppressed on both sides: TRL through `min_new_tokens`, kuberft by giving its loop an EOS id no
token has), so both generate and train on exactly prompts x generations x length tokens.

Each side runs in its own process (so neither inherits the other's allocations); step time is
the median over the steps after warm-up; memory is the peak resident set size sampled during
the steps, and its growth over the size just before the first step.

    python benchmarks/grpo_step.py            # about 2-4 minutes on 2 cores
    python benchmarks/grpo_step.py --steps 6 --layers 2 --hidden 128
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

from common import DigitsBackend, digit_fraction

PROMPTS = [f"Write a number with {n} digits, then stop: " for n in range(1, 33)]


class RssSampler:
    """Peak resident set size of this process, sampled every few milliseconds."""

    def __init__(self):
        import psutil

        self.process = psutil.Process()
        self.peak = 0
        self.start_rss = self.process.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(0.002)

    def __enter__(self):
        self.start_rss = self.process.memory_info().rss
        self.peak = self.start_rss
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def run_kuberft(args, model_dir: str, out: dict) -> None:
    import torch

    from kuberft_core.api import RFTJobSpec
    from kuberft_trainer.train import Trainer

    torch.set_num_threads(args.threads)

    spec = RFTJobSpec.model_validate({
        "model": {"name": model_dir, "dtype": "float32"},
        "lora": {"r": args.lora_r, "alpha": 2 * args.lora_r, "dropout": 0.0, "targetModules": ["all-linear"]},
        "dataset": {"rows": [{"prompt": p} for p in PROMPTS], "useChatTemplate": False},
        "rewards": [{"kind": "regex", "name": "digits"}],
        "grpo": {"steps": args.steps, "promptsPerStep": args.prompts, "numGenerations": args.generations,
                 "maxCompletionLength": args.length, "learningRate": 1e-4, "lossType": "dapo", "beta": 0.0,
                 "temperature": 1.0, "evalEvery": 0, "seed": 0},
        "checkpoint": {"everySteps": 1_000_000},
    })
    times, tokens, phases = [], [], []
    with tempfile.TemporaryDirectory() as output:
        trainer = Trainer(spec, Path(output), DigitsBackend(), on_step=lambda m: (times.append(m.step_seconds), tokens.append(m.generated_tokens), phases.append(m.phase_seconds)))
        trainer.eos_id = -1  # equal work: no completion ends before the length limit
        with RssSampler() as memory:
            trainer.run()
        trainer.close()
    out.update(step_seconds=times, tokens=tokens, phases=phases, peak_rss=memory.peak, start_rss=memory.start_rss)


def run_trl(args, model_dir: str, out: dict) -> None:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    torch.set_num_threads(args.threads)
    batch = args.prompts * args.generations
    config = GRPOConfig(
        output_dir=tempfile.mkdtemp(),
        per_device_train_batch_size=batch,
        gradient_accumulation_steps=1,
        num_generations=args.generations,
        generation_batch_size=batch,
        max_completion_length=args.length,
        generation_kwargs={"min_new_tokens": args.length},
        temperature=1.0,
        top_p=1.0,
        learning_rate=1e-4,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=1.0,
        beta=0.0,
        loss_type="dapo",
        scale_rewards="group",
        num_iterations=1,
        max_steps=args.steps,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        disable_tqdm=True,
        seed=0,
        bf16=False,
        use_cpu=True,
        dataloader_num_workers=0,
    )
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    lora = LoraConfig(r=args.lora_r, lora_alpha=2 * args.lora_r, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")

    def digits(completions, **kwargs):
        return [digit_fraction(c) for c in completions]

    dataset = Dataset.from_list([{"prompt": p} for p in PROMPTS])
    times = []
    tokens = []

    class Timer(TrainerCallback):
        def on_step_begin(self, *a, **k):
            self.started = time.perf_counter()

        def on_step_end(self, *a, **k):
            times.append(time.perf_counter() - self.started)

        def on_log(self, _args, _state, _control, logs=None, **k):
            if logs and "completions/mean_length" in logs:
                tokens.append(int(logs["completions/mean_length"] * batch))

    trainer = GRPOTrainer(model=model, reward_funcs=digits, args=config, train_dataset=dataset,
                          processing_class=tokenizer, peft_config=lora, callbacks=[Timer()])
    with RssSampler() as memory:
        trainer.train()
    out.update(step_seconds=times, tokens=tokens, peak_rss=memory.peak, start_rss=memory.start_rss)


def child(which: str, args, model_dir: str, queue) -> None:
    out: dict = {}
    try:
        (run_kuberft if which == "kuberft" else run_trl)(args, model_dir, out)
    except Exception as error:  # noqa: BLE001 - reported by the parent
        out["error"] = f"{type(error).__name__}: {error}"
    queue.put(out)


def measure(which: str, args, model_dir: str) -> dict:
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=child, args=(which, args, model_dir, queue))
    process.start()
    result = queue.get()
    process.join()
    if "error" in result:
        raise SystemExit(f"{which} failed: {result['error']}")
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=8, help="steps per trainer (the first --warmup are not timed)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps at the start of each run")
    parser.add_argument("--rounds", type=int, default=2, help="runs per trainer, alternating which goes first")
    parser.add_argument("--prompts", type=int, default=4, help="prompts per step")
    parser.add_argument("--generations", type=int, default=8, help="completions per prompt")
    parser.add_argument("--length", type=int, default=32, help="completion tokens")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--lora-r", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per side (default 1: stable on a shared machine)")
    args = parser.parse_args()

    from kuberft_core.models import build_tiny_model

    with tempfile.TemporaryDirectory() as folder:
        model_dir = str(build_tiny_model(folder, hidden_size=args.hidden, num_layers=args.layers, num_heads=4,
                                         num_kv_heads=2, intermediate_size=4 * args.hidden))
        # Alternate the order over rounds so a neighbour's load on the machine hits both sides.
        results = {"kuberft": {"step_seconds": [], "tokens": [], "peak_rss": 0, "start_rss": 0},
                   "trl": {"step_seconds": [], "tokens": [], "peak_rss": 0, "start_rss": 0}}
        for round_index in range(args.rounds):
            order = ("kuberft", "trl") if round_index % 2 == 0 else ("trl", "kuberft")
            for name in order:
                r = measure(name, args, model_dir)
                total = results[name]
                total["step_seconds"] += r["step_seconds"][args.warmup:]
                total["tokens"] += r["tokens"][args.warmup:]
                if r["peak_rss"] > total["peak_rss"]:
                    total["peak_rss"], total["start_rss"] = r["peak_rss"], r["start_rss"]

    print(f"GRPO step on the CPU ({args.threads} threads): tiny Llama hidden {args.hidden} x {args.layers} layers, "
          f"LoRA r={args.lora_r} all-linear, {args.prompts} prompts x {args.generations} generations x {args.length} tokens, "
          f"{args.rounds} runs x {args.steps} steps ({args.warmup} warm-up)")
    rows = {}
    for name, r in results.items():
        timed = r["step_seconds"]
        rows[name] = {
            "median_step_s": statistics.median(timed),
            "tokens_per_step": statistics.median(r["tokens"]) if r["tokens"] else float("nan"),
            "peak_rss_mib": r["peak_rss"] / 2**20,
            "rss_growth_mib": (r["peak_rss"] - r["start_rss"]) / 2**20,
        }
        print(f"  {name:8s} median step {rows[name]['median_step_s']:.3f} s  tokens/step {rows[name]['tokens_per_step']:.0f}  "
              f"peak RSS {rows[name]['peak_rss_mib']:.0f} MiB (+{rows[name]['rss_growth_mib']:.0f} MiB during the steps)")
    speedup = rows["trl"]["median_step_s"] / rows["kuberft"]["median_step_s"]
    memory = rows["kuberft"]["peak_rss_mib"] / rows["trl"]["peak_rss_mib"]
    growth = rows["kuberft"]["rss_growth_mib"] / max(rows["trl"]["rss_growth_mib"], 1e-9)
    print(f"speedup (TRL step time / kuberft step time): {speedup:.2f}x  (goal >= 1.5x)")
    print(f"peak memory ratio (kuberft / TRL): {memory:.2f}  (goal <= 1.0); growth during steps ratio: {growth:.2f}")
    print(json.dumps({"speedup": round(speedup, 3), "peak_memory_ratio": round(memory, 3), "growth_ratio": round(growth, 3), **{k: {kk: round(vv, 4) for kk, vv in v.items()} for k, v in rows.items()}}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
