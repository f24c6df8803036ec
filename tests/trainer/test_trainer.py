"""The trainer on a tiny model built in code: it learns a toy verifiable task, resumes from a
checkpoint with the same results as an uninterrupted run, handles every loss option, and
treats reward-pool failures as unscorable, never as zero."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from kuberft_core.reward_protocol import EvaluateResponse, ItemResult, RewardResult
from kuberft_trainer.checkpoint import complete_checkpoints
from kuberft_trainer.train import Trainer

from .toy import ToyRewardBackend, toy_spec


def adapter_weights(folder):
    return load_file(str(folder / "adapter_model.safetensors"))


def read_metrics(output_dir):
    return [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]


def test_mean_reward_rises_on_a_toy_verifiable_task(tiny_model, tmp_path):
    seen = []
    with Trainer(toy_spec(tiny_model, steps=14), tmp_path, ToyRewardBackend(), on_step=seen.append) as trainer:
        result = trainer.run()
    rewards = [m.reward for m in seen]
    assert [m.step for m in seen] == list(range(1, 15))
    assert sum(rewards[:3]) / 3 < 0.25  # about the share of digits among the characters
    # Once every completion scores 1 the advantages are 0, but Adam's momentum still moves the
    # adapter for a few steps (as in TRL): a single step may dip, so the median of the last five.
    assert sorted(rewards[-5:])[2] > 0.8
    assert result.eval_pass_at_1 == 1.0 and not result.interrupted
    # outputs: the adapter in peft format, the config, eval samples, one metrics line per step
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()
    assert json.loads((tmp_path / "config.json").read_text())["grpo"]["steps"] == 14
    sample = json.loads((tmp_path / "samples" / "step-00000014.jsonl").read_text().splitlines()[0])
    assert set(sample) >= {"prompt", "completion", "rewards", "outcomes", "reasons", "row"}
    assert [m["step"] for m in read_metrics(tmp_path)] == list(range(1, 15))


def deterministic_part(metrics):
    return {k: v for k, v in metrics.items() if k not in ("phase_seconds", "step_seconds", "tokens_per_second")}


def test_a_resumed_run_ends_exactly_where_an_uninterrupted_run_does(tiny_model, tmp_path):
    spec = toy_spec(tiny_model, steps=6, learningRate=1e-2, lrScheduler="cosine", warmupSteps=2)
    spec.checkpoint.every_steps = 2
    with Trainer(spec, tmp_path / "straight", ToyRewardBackend()) as trainer:
        trainer.run()
    with Trainer(spec, tmp_path / "resumed", ToyRewardBackend()) as trainer:
        first = trainer.run(max_steps=3)  # stops with a checkpoint at step 3
    assert first.interrupted and first.step == 3
    with Trainer(spec, tmp_path / "resumed", ToyRewardBackend()) as trainer:
        second = trainer.run()
    assert second.resumed_from == 3 and second.step == 6 and not second.interrupted
    straight, resumed = adapter_weights(tmp_path / "straight" / "adapter"), adapter_weights(tmp_path / "resumed" / "adapter")
    assert straight.keys() == resumed.keys()
    for name in straight:
        assert torch.equal(straight[name], resumed[name]), name
    # the curve continues: one line per step, equal to the uninterrupted run's
    assert [deterministic_part(m) for m in read_metrics(tmp_path / "resumed")] == [
        deterministic_part(m) for m in read_metrics(tmp_path / "straight")
    ]
    assert [step for step, _ in complete_checkpoints(tmp_path / "resumed")] == [4, 6]  # keepLast 2


def test_metric_lines_after_the_checkpoint_are_replaced_on_resume(tiny_model, tmp_path):
    spec = toy_spec(tiny_model, steps=4)
    spec.checkpoint.every_steps = 2
    with Trainer(spec, tmp_path, ToyRewardBackend()) as trainer:
        trainer.run(max_steps=2)
    with open(tmp_path / "metrics.jsonl", "a") as handle:  # a step that ran but was never checkpointed
        handle.write(json.dumps({"step": 3, "reward": 0.5}) + "\n")
    with Trainer(spec, tmp_path, ToyRewardBackend()) as trainer:
        trainer.run()
    assert [m["step"] for m in read_metrics(tmp_path)] == [1, 2, 3, 4]


@pytest.mark.parametrize(
    "options",
    [
        {"lossType": "grpo", "scaleRewards": "group"},
        {"lossType": "bnpo", "scaleRewards": "batch", "microBatchSize": 8},
        {"lossType": "dr_grpo", "scaleRewards": "none"},
        {"lossType": "dapo", "epsilonHigh": 0.28, "numIterations": 2, "beta": 0.1, "microBatchSize": 12},
        {"maskTruncatedCompletions": True, "topP": 0.9, "temperature": 0.7},
    ],
    ids=["grpo", "bnpo-microbatch", "dr_grpo", "dapo-iterations-kl", "mask-truncated"],
)
def test_every_loss_option_trains(tiny_model, tmp_path, options):
    with Trainer(toy_spec(tiny_model, steps=2, **options), tmp_path, ToyRewardBackend()) as trainer:
        result = trainer.run()
    last = result.last_metrics
    assert result.step == 2 and math.isfinite(last.loss) and last.grad_norm >= 0
    if options.get("beta"):
        assert last.kl > 0  # the adapter moved away from the base model in the first update
    if options.get("numIterations"):
        assert last.clip_ratio >= 0  # the second pass sees ratios != 1
    if options.get("maskTruncatedCompletions"):
        assert 0 <= last.truncated_fraction <= 1


class FlakyBackend:
    """Full marks for every completion, except every fourth, whose evaluation fails (a pool error)."""

    async def evaluate(self, request):
        failed = RewardResult(score=0.0, outcome="error", reason="worker lost")
        full = RewardResult(score=1.0, outcome="ok", reason="")
        return EvaluateResponse(results=[
            ItemResult(rewards={r.effective_name: failed if i % 4 == 0 else full for r in request.rewards})
            for i in range(len(request.items))
        ])


def test_failed_evaluations_are_counted_and_left_out_not_scored_zero(tiny_model, tmp_path):
    seen = []
    with Trainer(toy_spec(tiny_model, steps=1), tmp_path, FlakyBackend(), on_step=seen.append) as trainer:
        trainer.run()
        exposition = trainer.metrics.exposition()[0].decode()
    step = seen[0]
    assert step.reward_failures == 8  # 32 completions, one reward each, every fourth failed
    assert 'kuberft_trainer_reward_failures_total{rftjob="local"} 8.0' in exposition
    assert step.reward == 1.0  # the mean of the 24 scored completions; 0.75 if failures counted as 0
    assert step.rewards == {"digits": 1.0}


class BrokenBackend:
    async def evaluate(self, request):
        raise ConnectionError("reward pool is down")


def test_a_step_whose_rewards_all_failed_changes_nothing(tiny_model, tmp_path):
    spec = toy_spec(tiny_model, steps=2)
    with Trainer(spec, tmp_path, ToyRewardBackend()) as trainer:
        trainer.run(max_steps=1)  # a normal step first: the optimizer has momentum now
    before = adapter_weights(tmp_path / "checkpoints" / "step-00000001" / "adapter")
    with Trainer(spec, tmp_path, BrokenBackend()) as trainer:
        result = trainer.run()
    assert result.resumed_from == 1
    assert result.last_metrics.reward is None and result.last_metrics.reward_failures == 32
    after = adapter_weights(tmp_path / "adapter")
    assert all(torch.equal(before[n], after[n]) for n in before)


def test_step_metrics_reach_prometheus_with_stable_names(tiny_model, tmp_path):
    with Trainer(toy_spec(tiny_model, steps=1), tmp_path, ToyRewardBackend(), job_name="demo") as trainer:
        trainer.run()
        text = trainer.metrics.exposition()[0].decode()
    for series in (
        'kuberft_trainer_step{rftjob="demo"} 1.0',
        'kuberft_trainer_total_steps{rftjob="demo"} 1.0',
        'kuberft_trainer_reward_mean{reward="digits",rftjob="demo"}',
        'kuberft_trainer_step_phase_seconds{phase="generate",rftjob="demo"}',
        'kuberft_trainer_learning_rate{rftjob="demo"} 0.02',
        'kuberft_trainer_checkpoints_total{rftjob="demo"} 1.0',
        'kuberft_trainer_eval_pass_at_1{rftjob="demo"}',
    ):
        assert series in text, series


class JudgeBackend:
    """`digits` passes (outcome ok) on even items only; `penalty` (negative weight) never says ok."""

    async def evaluate(self, request):
        def result(i, name):
            if name == "penalty":
                return RewardResult(score=0.0, outcome="wrong", reason="")
            return RewardResult(score=1.0 if i % 2 == 0 else 0.5, outcome="ok" if i % 2 == 0 else "wrong", reason="")

        return EvaluateResponse(results=[
            ItemResult(rewards={r.effective_name: result(i, r.effective_name) for r in request.rewards})
            for i in range(len(request.items))
        ])


def test_pass_at_1_counts_held_out_rows_whose_positively_weighted_rewards_all_passed(tiny_model, tmp_path):
    spec = toy_spec(tiny_model, steps=1)
    spec = spec.model_copy(update={"rewards": [*spec.rewards, type(spec.rewards[0]).model_validate(
        {"kind": "exact_match", "name": "penalty", "weight": -1.0})]})
    with Trainer(spec, tmp_path, JudgeBackend()) as trainer:
        result = trainer.run()
    assert result.eval_pass_at_1 == 0.5  # 4 held-out rows, the two even ones pass
    samples = [json.loads(line) for line in (tmp_path / "samples" / "step-00000001.jsonl").read_text().splitlines()]
    assert [s["passed"] for s in samples] == [True, False, True, False]
    assert samples[1]["outcomes"] == {"digits": "wrong", "penalty": "wrong"}
    assert read_metrics(tmp_path)[-1]["eval_pass_at_1"] == 0.5
