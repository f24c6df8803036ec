"""Rollouts: vLLM (its CPU build here; the trainer's `VllmGenerator`) against the trainer's own
generation loop (KV cache, HF model with the LoRA adapter), on the same model, adapter, prompts
and sampling settings, in one run: rollout tokens/s, then the GRPO step time with each.

Run it with the interpreter that has vLLM (`make test` installs .venv-vllm):

    .venv-vllm/bin/python benchmarks/rollout.py            # about 5 minutes on 2 cores

The model is a Llama built in code with a head dimension vLLM's CPU attention supports (64).
Tokens/s counts the tokens actually generated (completions end at EOS or the length limit), the
median of --repeats rounds after a warm-up round; the engine's one-time load is reported apart.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from common import DigitsBackend, median_tokens_per_second

PROMPTS = [f"Write a number with {n} digits, then stop: " for n in range(1, 33)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--generations", type=int, default=8)
    parser.add_argument("--length", type=int, default=64)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kuberft_core.api import LoraSpec, RFTJobSpec
    from kuberft_core.models import build_tiny_model
    from kuberft_trainer.modeling import add_lora
    from kuberft_trainer.rollout import VllmGenerator, generate
    from kuberft_trainer.train import Trainer

    scratch = Path(tempfile.mkdtemp(prefix="kuberft-rollout-bench-"))
    model_dir = build_tiny_model(scratch / "model", hidden_size=args.hidden, num_layers=args.layers,
                                 num_heads=args.hidden // 64, num_kv_heads=max(1, args.hidden // 128), intermediate_size=4 * args.hidden)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    lora = LoraSpec(r=16, alpha=32, dropout=0.0)
    policy = add_lora(AutoModelForCausalLM.from_pretrained(model_dir), lora).eval()
    prompts = [tokenizer(p)["input_ids"] for p in PROMPTS[:args.prompts]]
    options = dict(num_generations=args.generations, max_new_tokens=args.length, eos_token_id=tokenizer.eos_token_id,
                   pad_token_id=tokenizer.pad_token_id, temperature=1.0, top_p=1.0)
    seeds = list(range(len(prompts)))

    started = time.perf_counter()
    engine = VllmGenerator(str(model_dir), lora_rank=lora.r, dtype="float32", max_model_len=256, seed=0)
    load_seconds = time.perf_counter() - started
    vllm_rate = median_tokens_per_second(lambda: engine.generate(policy, prompts, seeds=seeds, **options), args.repeats)
    builtin_rate = median_tokens_per_second(
        lambda: generate(policy, prompts, generators=[torch.Generator().manual_seed(s) for s in seeds], **options), args.repeats)

    spec = RFTJobSpec.model_validate({
        "model": {"name": str(model_dir), "dtype": "float32"},
        "lora": lora.to_wire(),
        "dataset": {"rows": [{"prompt": p} for p in PROMPTS], "useChatTemplate": False, "evalFraction": 0.0},
        "rewards": [{"kind": "regex", "name": "digits"}],
        "grpo": {"steps": args.steps, "promptsPerStep": args.prompts, "numGenerations": args.generations,
                 "maxCompletionLength": args.length, "learningRate": 1e-4, "evalEvery": 0, "seed": 0},
        "checkpoint": {"everySteps": 1_000_000},
    })
    step_seconds = {}
    for name, engine_or_none in (("vllm", engine), ("builtin", None)):
        with tempfile.TemporaryDirectory() as output:
            with Trainer(spec, Path(output), DigitsBackend(), vllm=engine_or_none, use_vllm=False) as trainer:
                history = trainer.run().history
        step_seconds[name] = statistics.median(m.step_seconds for m in history[1:])

    print(f"vLLM engine load (once): {load_seconds:.1f} s")
    print(f"{'rollouts':<10} {'tokens/s':>10} {'GRPO step s':>12}")
    for name, rate in (("vllm", vllm_rate), ("builtin", builtin_rate)):
        print(f"{name:<10} {rate:>10.0f} {step_seconds[name]:>12.2f}")
    print(json.dumps({"vllm_tokens_per_second_vs_builtin": vllm_rate / builtin_rate,
                      "vllm_step_time_vs_builtin": step_seconds["vllm"] / step_seconds["builtin"],
                      "vllm_load_seconds": load_seconds}))


if __name__ == "__main__":  # vLLM spawns its engine process: the guard is needed
    main()
