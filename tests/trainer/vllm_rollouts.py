"""The trainer's vLLM rollouts, run for real on vLLM's CPU build: what
tests/trainer/test_vllm_rollouts.py runs in .venv-vllm (vLLM needs its own torch), writing one
JSON object of measurements for the test to judge.

    .venv-vllm/bin/python tests/trainer/vllm_rollouts.py OUT_DIR     (writes OUT_DIR/measured.json)

One engine is loaded (about a minute) and used for every check: greedy completions against the
model's own generation with the same adapter, before and after the adapter changes (the sync of
every step); per-prompt seeds; stop tokens and truncation; the engine's log-probabilities against
the trainer's; then two GRPO steps of the trainer on it, with the rollout correction. Then the
same through a rollout server (spec.rollout.mode server, a second engine in its own process)."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch


def main(out: Path) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kuberft_core.api import LoraSpec, RFTJobSpec
    from kuberft_core.models import build_tiny_model
    from kuberft_trainer.modeling import add_lora
    from kuberft_trainer.rollout import VllmGenerator, generate, sequence_logprobs

    # vLLM's CPU attention needs a head dimension it has kernels for: 64 (hidden 256, 4 heads).
    model_dir = build_tiny_model(out / "model", hidden_size=256, num_heads=4, num_kv_heads=2, intermediate_size=512)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    policy = add_lora(AutoModelForCausalLM.from_pretrained(model_dir), LoraSpec(r=8, alpha=16, dropout=0.0)).eval()
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    prompts = [tokenizer(text)["input_ids"] for text in ("hello world", "abc", "the quick brown fox")]
    results: dict = {}

    def set_adapter(seed: int) -> None:
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, parameter in policy.named_parameters():
                if "lora_B" in name:
                    parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.3)

    started = time.monotonic()
    engine = VllmGenerator(str(model_dir), lora_rank=8, dtype="float32", max_model_len=256, seed=0)
    results["load_seconds"] = time.monotonic() - started

    # A random tiny model hardly ever emits its eos: stop instead at a token it does write (the
    # 4th of a greedy completion), so that completions end at the stop token as well as at the limit.
    set_adapter(1)
    probe = generate(policy, prompts[:1], num_generations=1, max_new_tokens=8, temperature=0.0, eos_token_id=eos, pad_token_id=pad)
    eos = int(probe.completion_ids[0, 3])
    results["stop_token"] = eos
    options = dict(max_new_tokens=24, eos_token_id=eos, pad_token_id=pad, top_p=1.0)
    greedy = {}
    for version in (1, 2):  # the adapter changes between steps: the engine must follow it
        set_adapter(version)
        ours = generate(policy, prompts, num_generations=2, temperature=0.0, **options)
        theirs = engine.generate(policy, prompts, num_generations=2, temperature=0.0, **options)
        greedy[version] = theirs.completion_ids.tolist()
        width = ours.completion_ids.shape[1]
        results[f"greedy_equal_v{version}"] = (
            theirs.completion_ids.shape == ours.completion_ids.shape
            and theirs.completion_ids.tolist() == ours.completion_ids[:, :width].tolist()
            and theirs.completion_mask.tolist() == ours.completion_mask.tolist()
            and theirs.truncated.tolist() == ours.truncated.tolist()
        )
    results["adapter_sync_changes_output"] = greedy[1] != greedy[2]

    sample = dict(num_generations=4, temperature=0.9, **options)
    first = engine.generate(policy, prompts, seeds=[11, 12, 13], **sample)
    again = engine.generate(policy, prompts, seeds=[11, 12, 13], **sample)
    other = engine.generate(policy, prompts, seeds=[21, 22, 23], **sample)
    results["same_seeds_same_samples"] = first.completion_ids.tolist() == again.completion_ids.tolist()
    results["other_seeds_other_samples"] = first.completion_ids.tolist() != other.completion_ids.tolist()
    rows = []
    for ids, mask, truncated in zip(first.completion_ids.tolist(), first.completion_mask.tolist(), first.truncated.tolist()):
        length = sum(mask)
        rows.append({"length": length, "ends_with_eos": length > 0 and ids[length - 1] == eos, "truncated": truncated,
                     "eos_inside": eos in ids[:max(0, length - 1)]})
    results["completions"] = rows
    with torch.no_grad():
        trainer_logprobs = sequence_logprobs(policy, first, temperature=0.9)
    active = first.completion_mask.bool()
    gap = (trainer_logprobs - first.sampling_logprobs)[active].abs()
    results["logprob_gap_max"] = float(gap.max())
    results["logprob_gap_mean"] = float(gap.mean())

    # Two GRPO steps with the trainer's rollouts from this engine (the digits toy task).
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from tests.trainer.toy import ToyRewardBackend, toy_spec
    from kuberft_trainer.train import Trainer

    spec: RFTJobSpec = toy_spec(model_dir, steps=2, maxCompletionLength=8)
    spec.lora = LoraSpec(r=8, alpha=16, dropout=0.0)
    started = time.monotonic()
    with Trainer(spec, out / "train", ToyRewardBackend(), vllm=engine) as trainer:
        result = trainer.run()
    results["train_seconds"] = time.monotonic() - started
    results["train_steps"] = [
        {k: getattr(m, k) for k in ("step", "reward", "loss", "grad_norm", "rollout_is_weight_mean", "rollout_is_capped",
                                     "rollout_logprob_diff_mean", "rollout_logprob_diff_max", "generated_tokens")}
        for m in result.history
    ]
    results["adapter_written"] = (out / "train" / "adapter" / "adapter_model.safetensors").is_file()
    results["server"] = rollout_server_checks(out, model_dir, policy, prompts, options, set_adapter, engine)
    return results


def rollout_server_checks(out: Path, model_dir: Path, policy, prompts, options, set_adapter, engine) -> dict:
    """spec.rollout.mode server, as `kuberft run` starts it: a `kuberft rollout-server` process
    (vLLM) that the trainer's client sends its adapter and prompts."""
    from kuberft_core.api import LoraSpec
    from kuberft_operator.local_runner import _local_rollout_servers
    from kuberft_trainer.rollout import generate
    from kuberft_trainer.rollout_server import RolloutServers
    from kuberft_trainer.train import Trainer
    from tests.trainer.toy import ToyRewardBackend, toy_spec

    spec = toy_spec(model_dir, steps=2, maxCompletionLength=8)
    spec.lora = LoraSpec(r=8, alpha=16, dropout=0.0)
    spec.model.dtype = "float32"
    spec.rollout.mode = "server"
    results: dict = {}
    started = time.monotonic()
    with _local_rollout_servers(spec, "server-test", out / "server") as urls:
        results["load_seconds"] = time.monotonic() - started
        client = RolloutServers(urls)
        for version in (1, 2):
            set_adapter(version)
            ours = generate(policy, prompts, num_generations=2, temperature=0.0, **options)
            theirs = client.generate(policy, prompts, num_generations=2, temperature=0.0, **options)
            results[f"greedy_equal_v{version}"] = (theirs.completion_ids.tolist() == ours.completion_ids.tolist()
                                                   and theirs.truncated.tolist() == ours.truncated.tolist())
        sample = dict(num_generations=4, temperature=0.9, **options)
        served = client.generate(policy, prompts, seeds=[11, 12, 13], **sample)
        colocated = engine.generate(policy, prompts, seeds=[11, 12, 13], **sample)
        results["samples_equal_colocated"] = served.completion_ids.tolist() == colocated.completion_ids.tolist()
        results["logprob_gap_to_colocated"] = float((served.sampling_logprobs - colocated.sampling_logprobs).abs().max())

        started = time.monotonic()
        with Trainer(spec, out / "server-train", ToyRewardBackend(), vllm=client) as trainer:
            result = trainer.run()
        results["train_seconds"] = time.monotonic() - started
        results["train_steps"] = [{k: getattr(m, k) for k in ("step", "grad_norm", "rollout_is_weight_mean", "rollout_logprob_diff_max",
                                                             "generated_tokens")} for m in result.history]
    return results


if __name__ == "__main__":  # vLLM spawns its engine process: the guard is needed
    folder = Path(sys.argv[1])
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "measured.json").write_text(json.dumps(main(folder)))  # vLLM prints to stdout too
