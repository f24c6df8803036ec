"""The trainer on a tiny model built in code: it learns a toy verifiable task, resumes from a
checkpoint with the same results as an uninterrupted run, handles every loss option, and
treats reward-pool failures as unscorable, never as zero."""

from __future__ import annotations

import json

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


class Recorder:
    """Wraps the trainer's GRPO functions and records what each call received: the loss
    options' mathematics is tested in test_grpo.py; these tests check that every option reaches
    it and changes what it should in a run."""

    def __init__(self, monkeypatch):
        import kuberft_trainer.rollout as rollout
        import kuberft_trainer.train as train

        self.losses, self.advantages, self.samples, self.logprob_temperatures = [], [], [], []

        def loss(logprobs, old_logprobs, advantages, mask, **options):
            self.losses.append({"logprobs": logprobs.detach().clone(), "old": old_logprobs.detach().clone(),
                                "mask": mask.clone(), **options})
            return grpo.policy_loss(logprobs, old_logprobs, advantages, mask, **options)

        def advantages(rewards, num_generations, scale):
            self.advantages.append(scale)
            return grpo.group_advantages(rewards, num_generations, scale)

        def sample(logits, temperature, top_p, generators=None):
            self.samples.append((temperature, top_p))
            return sample_next(logits, temperature, top_p, generators)

        def logprobs(model, rollout_, *, temperature=1.0, **kwargs):
            self.logprob_temperatures.append(temperature)
            return sequence_logprobs(model, rollout_, temperature=temperature, **kwargs)

        from kuberft_trainer import grpo
        from kuberft_trainer.rollout import sample_next, sequence_logprobs

        monkeypatch.setattr(train, "policy_loss", loss)
        monkeypatch.setattr(train, "group_advantages", advantages)
        monkeypatch.setattr(train, "sequence_logprobs", logprobs)
        monkeypatch.setattr(rollout, "sample_next", sample)


def run_with(tiny_model, tmp_path, monkeypatch, steps=1, dtype="auto", **options):
    recorder = Recorder(monkeypatch)
    spec = toy_spec(tiny_model, steps=steps, **options)
    spec.model.dtype = dtype
    with Trainer(spec, tmp_path, ToyRewardBackend()) as trainer:
        result = trainer.run()
    return recorder, result


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_loss_type_and_reward_scaling_reach_the_loss(tiny_model, tmp_path, monkeypatch, loss_type, scale):
    recorder, _ = run_with(tiny_model, tmp_path, monkeypatch, lossType=loss_type, scaleRewards=scale, epsilonHigh=0.28)
    assert recorder.advantages == [scale]
    (call,) = recorder.losses
    assert call["loss_type"] == loss_type and call["epsilon_high"] == 0.28 and call["epsilon_low"] == 0.2
    assert call["max_completion_length"] == 8 and call["step_sequences"] == 32


def test_micro_batches_split_the_step_and_leave_the_update_unchanged(tiny_model, tmp_path, monkeypatch):
    # float64: Adam's first steps move every weight by about the learning rate whatever the size of
    # its gradient, so float32 rounding in a near-zero gradient would show in the adapter.
    whole, _ = run_with(tiny_model, tmp_path / "whole", monkeypatch, steps=2, dtype="float64")
    split, _ = run_with(tiny_model, tmp_path / "split", monkeypatch, steps=2, dtype="float64", microBatchSize=8)
    assert len(whole.losses) == 2 and len(split.losses) == 8  # 32 completions a step, 8 per micro-batch
    assert all(c["logprobs"].shape[0] == 8 and c["step_sequences"] == 32 for c in split.losses)
    a, b = adapter_weights(tmp_path / "whole" / "adapter"), adapter_weights(tmp_path / "split" / "adapter")
    assert all(torch.allclose(a[k], b[k], rtol=1e-9, atol=1e-12) for k in a), max(float((a[k] - b[k]).abs().max()) for k in a)
    assert any(not torch.equal(a[k], torch.zeros_like(a[k])) for k in a if "lora_B" in k)  # it did train


def test_more_iterations_reuse_the_rollout_against_stored_old_logprobs(tiny_model, tmp_path, monkeypatch):
    recorder, result = run_with(tiny_model, tmp_path, monkeypatch, numIterations=3, learningRate=5e-2)
    first, second, third = recorder.losses  # three updates on one rollout
    assert torch.equal(first["logprobs"], first["old"])  # the first pass is on-policy
    assert torch.equal(second["old"], first["old"]) and torch.equal(third["old"], first["old"])
    mask = first["mask"].bool()
    assert (second["logprobs"][mask] - second["old"][mask]).abs().max() > 1e-4  # the policy moved: ratios != 1
    assert result.last_metrics.clip_ratio > 0  # and lr 5e-2 moves it past the clip range on some tokens


def test_beta_adds_the_kl_to_the_base_model_and_zero_leaves_it_out(tiny_model, tmp_path, monkeypatch):
    with_kl, result = run_with(tiny_model, tmp_path / "kl", monkeypatch, steps=2, beta=0.1)
    assert all(c["beta"] == 0.1 and c["ref_logprobs"] is not None for c in with_kl.losses)
    assert result.history[0].kl == 0 and result.history[1].kl > 0  # the adapter starts as the base model
    without, result = run_with(tiny_model, tmp_path / "none", monkeypatch, steps=2)
    assert all(c["beta"] == 0.0 and c["ref_logprobs"] is None for c in without.losses)
    assert result.last_metrics.kl == 0


def test_masking_truncated_completions_drops_them_from_the_loss(tiny_model, tmp_path, monkeypatch):
    # maxCompletionLength 16: some completions end, the others are cut at the limit.
    recorder, result = run_with(tiny_model, tmp_path, monkeypatch, steps=2, maxCompletionLength=16, maskTruncatedCompletions=True)
    assert 0 < result.history[0].truncated_fraction <= 1
    for call in recorder.losses:
        lengths = call["mask"].sum(dim=1)
        assert (lengths == 0).any()  # the truncated rows carry no weight
    unmasked, _ = run_with(tiny_model, tmp_path / "kept", monkeypatch, steps=1, maxCompletionLength=16)
    assert (unmasked.losses[0]["mask"].sum(dim=1) > 0).all()


def test_temperature_and_top_p_shape_sampling_and_the_scored_logprobs(tiny_model, tmp_path, monkeypatch):
    recorder, _ = run_with(tiny_model, tmp_path, monkeypatch, temperature=0.7, topP=0.9)
    training, evaluation = recorder.samples[:8], recorder.samples[8:]  # 8 tokens sampled, then the greedy eval
    assert set(training) == {(0.7, 0.9)} and {temperature for temperature, _ in evaluation} == {0.0}
    assert set(recorder.logprob_temperatures) == {0.7}  # log-probs of the distribution sampled from


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


class HackedBackend:
    """Every third completion is caught hacking (outcome `hacked`, score 0); the others pass."""

    async def evaluate(self, request):
        caught = RewardResult(score=0.0, outcome="hacked", reason="forged frame")
        passed = RewardResult(score=1.0, outcome="ok", reason="")
        return EvaluateResponse(results=[
            ItemResult(rewards={r.effective_name: caught if i % 3 == 0 else passed for r in request.rewards}, hacked=i % 3 == 0)
            for i in range(len(request.items))
        ])


def test_each_step_counts_its_outcomes_and_the_completions_caught_hacking(tiny_model, tmp_path):
    with Trainer(toy_spec(tiny_model, steps=1), tmp_path, HackedBackend()) as trainer:
        trainer.run()
    step = read_metrics(tmp_path)[-1]
    assert step["hacked"] == 11  # completions 0, 3, ..., 30 of 32
    assert step["reward_outcomes"] == {"digits": {"hacked": 11, "ok": 21}}
    caught = [json.loads(line) for line in (tmp_path / "samples" / "hacked-step-00000001.jsonl").read_text().splitlines()]
    assert len(caught) == 11 and all(c["reasons"] == {"digits": "forged frame"} and "prompt" in c["row"] for c in caught)


def test_held_out_rows_come_from_the_eval_source_and_every_training_row_trains(tiny_model, tmp_path):
    spec = toy_spec(tiny_model, steps=1)
    held_out = [{"prompt": f"Held out {i}:", "allowed": "0123456789"} for i in range(3)]
    dataset = spec.dataset.model_validate({**spec.dataset.to_wire(), "evalFraction": 0.0, "eval": {"rows": held_out}})
    with Trainer(spec.model_copy(update={"dataset": dataset}), tmp_path, ToyRewardBackend()) as trainer:
        trainer.run()
        assert len(trainer.train_rows) == 16
    samples = [json.loads(line) for line in (tmp_path / "samples" / "step-00000001.jsonl").read_text().splitlines()]
    assert [s["row"]["prompt"] for s in samples] == ["Held out 0:", "Held out 1:", "Held out 2:"]


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


def test_activation_checkpointing_recomputes_layers_without_changing_the_update(tiny_model, tmp_path, monkeypatch):
    import kuberft_trainer.train as train
    import transformers.modeling_utils

    recomputed = []
    real = torch.utils.checkpoint.checkpoint

    def counting(*args, **kwargs):
        recomputed.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(transformers.modeling_utils, "checkpoint", counting)  # what gradient_checkpointing_enable wraps
    outputs = {}
    for checkpointing in (False, True):
        spec = toy_spec(tiny_model, steps=2)
        spec.model.dtype = "float64"
        spec.trainer.activation_checkpointing = checkpointing
        outputs[checkpointing] = tmp_path / str(checkpointing)
        with train.Trainer(spec, outputs[checkpointing], ToyRewardBackend()) as trainer:
            trainer.run()
        assert bool(recomputed) == checkpointing  # each decoder layer's forward went through checkpoint()
    # Checkpointing also turns off the shared-prompt forward (its KV cache is not recomputed), whose
    # gradients differ from the plain forward's by ~3e-8 relative (some of the model's arithmetic
    # is float32 even in a float64 model): equal metrics, and adapters within 1e-4.
    plain, checkpointed = ([v for m in read_metrics(outputs[c]) for v in (m["loss"], m["grad_norm"], m["reward"])] for c in (False, True))
    assert checkpointed == pytest.approx(plain, rel=1e-6, abs=1e-8)
    a, b = (adapter_weights(outputs[c] / "adapter") for c in (False, True))
    assert all(torch.allclose(a[k], b[k], atol=1e-4) for k in a)
