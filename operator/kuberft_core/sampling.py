"""Temperature and nucleus (top-p) filtering: the one definition the trainer's rollouts and the
serving engine sample with, so a trained policy is served from the distribution it was trained
on. Works on torch tensors through their methods only: the core imports no torch."""

from __future__ import annotations

from typing import Any

Tensor = Any  # a torch.Tensor; the core does not import torch


def nucleus(probs: Tensor, top_p: float) -> Tensor:
    """Probabilities [..., V] restricted to the smallest set of most likely tokens whose mass
    reaches `top_p` (always at least the most likely token), renormalised; top_p 1 keeps all
    (Holtzman et al. 2020)."""
    if top_p >= 1.0:
        return probs
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs  # mass of the tokens more likely than each
    kept = sorted_probs.masked_fill(mass_before >= top_p, 0.0)
    kept = probs.scatter(-1, order, kept)  # back to vocabulary order (order is a permutation)
    return kept / kept.sum(dim=-1, keepdim=True)


def warp(logits: Tensor, temperature: float, top_p: float) -> Tensor:
    """Sampling probabilities [..., V] from logits [..., V]: softmax at `temperature` (> 0), then
    top-p; computed in the logits' dtype."""
    return nucleus((logits / temperature).softmax(dim=-1), top_p)
