"""The lean draft forward computes what transformers computes for the same Llama weights, through
the same `SequenceBatch` steps the draft speculator takes: a left-padded prefill, several tokens
fed at once, a rollback that leaves a hole, and one token at a time after it."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM

from kuberft_serve.config import ServeConfig
from kuberft_serve.kv_batch import ModelRunner, SequenceBatch
from kuberft_serve.lean_llama import LeanRunner
from kuberft_serve.loading import build_engine


def logits_through_a_batch(runner) -> list[torch.Tensor]:
    batch = SequenceBatch(runner)
    outputs = [batch.prefill([[3, 4, 5, 6, 7, 8], [9, 10, 11]], pad_id=0).logits[:, -1]]
    outputs.append(batch.extend(torch.tensor([[4, 5, 6], [7, 8, 0]])).logits)
    batch.commit([3, 1])  # row 1 keeps one of three slots: two holes, masked from now on
    for token in ([[5], [6]], [[7], [8]]):
        outputs.append(batch.extend(torch.tensor(token)).logits)
        batch.commit([1, 1])
    return outputs


def test_lean_forward_gives_the_logits_of_transformers_for_the_same_weights(draft_dir):
    model = AutoModelForCausalLM.from_pretrained(draft_dir, dtype=torch.float64).eval()
    assert LeanRunner.supports(model)
    reference = logits_through_a_batch(ModelRunner(model))
    lean = logits_through_a_batch(LeanRunner(model))
    for theirs, ours in zip(reference, lean):
        assert ours.shape == theirs.shape
        # transformers' RMSNorm computes in float32 whatever the model's dtype; ours in float64
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)
        assert torch.equal(ours.argmax(dim=-1), theirs.argmax(dim=-1))


def test_the_draft_speculator_runs_the_lean_forward_for_a_llama_draft(tiny_dir, draft_dir):
    engine = build_engine(ServeConfig(model=str(tiny_dir), speculator="draft", draft_model=str(draft_dir), device="cpu", dtype="float64"))
    assert isinstance(engine.speculator.runner, LeanRunner)
