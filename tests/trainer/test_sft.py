"""Supervised fine-tuning in the product (`spec.sft`): the same LoRA adapter learns labelled
completions before GRPO ("SFT then RFT") or alone (`grpo.steps: 0`, "SFT only"), from one spec."""

from __future__ import annotations

import json

import pytest
import torch

from kuberft_core.api import SFTSpec
from kuberft_trainer.checkpoint import complete_checkpoints
from kuberft_trainer.data import DatasetError
from kuberft_trainer.train import Trainer, read_metrics

from .test_trainer import adapter_weights
from .toy import ToyRewardBackend, toy_spec

LABEL = "7777"
"""The tiny random model is nearly a unigram model (its hidden states hardly depend on earlier
tokens), so the label is one it can learn without context: SFT is then visible in a few steps."""


def labelled_spec(model_dir, grpo_steps: int, sft_steps: int = 40, **sft):
    spec = toy_spec(model_dir, steps=max(1, grpo_steps), evalEvery=0)
    spec.dataset.rows = [{**row, "completion": LABEL} for row in spec.dataset.rows]
    spec.sft = SFTSpec(steps=sft_steps, batchSize=4, learningRate=3e-2, **sft)
    spec.grpo.steps = grpo_steps
    return type(spec).model_validate(spec.to_wire())


def sft_losses(output_dir) -> list[float]:
    return [json.loads(line)["loss"] for line in (output_dir / "sft_metrics.jsonl").read_text().splitlines()]


def test_sft_only_learns_the_labelled_completions(tiny_model, tmp_path):
    spec = labelled_spec(tiny_model, grpo_steps=0)
    with Trainer(spec, tmp_path, ToyRewardBackend()) as trainer:
        result = trainer.run()
    losses = sft_losses(tmp_path)
    assert len(losses) == 40 and losses[-1] < 0.25 * losses[0]
    assert result.step == 0 and not result.interrupted and result.adapter_dir is not None
    assert read_metrics(tmp_path) == []  # no GRPO step ran
    # Greedy held-out completions are now the label: every character a digit.
    assert result.eval_pass_at_1 == 1.0
    samples = [json.loads(line) for line in next((tmp_path / "samples").iterdir()).read_text().splitlines()]
    assert all(s["completion"] and set(s["completion"]) == {"7"} for s in samples)


def test_sft_then_rft_starts_grpo_from_the_fine_tuned_adapter_and_resumes_past_sft(tiny_model, tmp_path):
    spec = labelled_spec(tiny_model, grpo_steps=2)
    with Trainer(spec, tmp_path, ToyRewardBackend()) as trainer:
        first = trainer.run(max_steps=1)
    assert [step for step, _ in complete_checkpoints(tmp_path)] == [0, 1]  # after SFT, after GRPO step 1
    assert [m["reward"] for m in read_metrics(tmp_path)][0] > 0.9  # the completions are already digits
    assert first.interrupted and first.step == 1
    with Trainer(spec, tmp_path, ToyRewardBackend()) as trainer:
        second = trainer.run()
    assert second.resumed_from == 1 and second.step == 2 and len(sft_losses(tmp_path)) == 40  # SFT not run again

    # The same SFT phase, then the same GRPO steps, as one run: the same adapter.
    with Trainer(spec, tmp_path / "straight", ToyRewardBackend()) as trainer:
        trainer.run()
    resumed, straight = adapter_weights(tmp_path / "adapter"), adapter_weights(tmp_path / "straight" / "adapter")
    assert all(torch.equal(resumed[name], straight[name]) for name in straight)


def test_an_sft_phase_stopped_early_runs_again_in_full(tiny_model, tmp_path):
    spec = labelled_spec(tiny_model, grpo_steps=1, sft_steps=4)
    trainer = Trainer(spec, tmp_path, ToyRewardBackend())
    trainer.request_stop()  # as a SIGTERM would, before the first SFT step
    with trainer:
        stopped = trainer._supervised_phase()
    assert not stopped and complete_checkpoints(tmp_path) == []
    with Trainer(spec, tmp_path, ToyRewardBackend()) as trainer:
        result = trainer.run()
    assert len(sft_losses(tmp_path)) == 4 and result.step == 1 and not result.interrupted


def test_rows_without_the_labelled_field_are_refused_by_name(tiny_model, tmp_path):
    spec = labelled_spec(tiny_model, grpo_steps=0, completionField="solution")
    with pytest.raises(DatasetError, match="sft.completionField: no training row has a 'solution' text"):
        Trainer(spec, tmp_path, ToyRewardBackend())
