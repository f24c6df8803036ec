"""Top-p as the trainer and the server both sample with it (kuberft_core.sampling), against the
definition (Holtzman et al. 2020: the smallest set of most likely tokens whose mass reaches p)
and against Hugging Face's TopPLogitsWarper."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from kuberft_core.sampling import nucleus, warp  # noqa: E402


def reference_nucleus(probs: list[float], top_p: float) -> list[float]:
    """The definition, one token at a time: take tokens from the most likely down until their
    mass reaches top_p, drop the rest, renormalise."""
    kept, mass = set(), 0.0
    for index in sorted(range(len(probs)), key=lambda i: -probs[i]):
        if mass >= top_p:
            break
        kept.add(index)
        mass += probs[index]
    total = sum(probs[i] for i in kept)
    return [probs[i] / total if i in kept else 0.0 for i in range(len(probs))]


def test_top_p_keeps_the_smallest_set_reaching_the_mass():
    probs = torch.tensor([0.15, 0.5, 0.05, 0.3], dtype=torch.float64)
    assert nucleus(probs, 0.8).tolist() == pytest.approx([0.0, 0.625, 0.0, 0.375])
    assert nucleus(probs, 0.81).tolist() == pytest.approx([0.15 / 0.95, 0.5 / 0.95, 0.0, 0.3 / 0.95])
    assert nucleus(probs, 0.1).tolist() == [0.0, 1.0, 0.0, 0.0]  # always the most likely token
    assert nucleus(probs, 1.0) is probs


def test_top_p_matches_the_definition_on_random_distributions():
    generator = torch.Generator().manual_seed(0)
    for top_p in (0.05, 0.3, 0.5, 0.9, 0.99):
        logits = torch.randn(8, 50, generator=generator, dtype=torch.float64) * 3
        got = warp(logits, 0.7, top_p)
        for row, probs in zip(got, (logits / 0.7).softmax(-1)):
            assert row.tolist() == pytest.approx(reference_nucleus(probs.tolist(), top_p), abs=1e-12)


def test_top_p_keeps_the_tokens_hugging_face_keeps():
    warper = pytest.importorskip("transformers.generation.logits_process").TopPLogitsWarper
    generator = torch.Generator().manual_seed(1)
    logits = torch.randn(16, 100, generator=generator) * 2
    for top_p in (0.2, 0.6, 0.95):
        ours = warp(logits, 1.0, top_p) > 0
        theirs = warper(top_p)(None, logits.clone()) > float("-inf")
        assert torch.equal(ours, theirs)
