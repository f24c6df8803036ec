"""What the benchmarks share: the toy reward they train on and how they time generation.
(Each benchmark is run as a script, so its folder is on sys.path: `from common import ...`.)"""

from __future__ import annotations

import statistics
import time


def digit_fraction(completion: str) -> float:
    """The toy reward: the fraction of the completion's characters that are digits."""
    return sum(c.isdigit() for c in completion) / max(1, len(completion))


class DigitsBackend:
    """An in-process reward backend scoring the reward `digits` with `digit_fraction`."""

    async def evaluate(self, request):
        from kuberft_core.reward_protocol import EvaluateResponse, ItemResult, RewardResult

        return EvaluateResponse(results=[
            ItemResult(rewards={"digits": RewardResult(score=digit_fraction(i.completion), outcome="ok")}) for i in request.items
        ])


def median_tokens_per_second(produce, rounds: int) -> float:
    """Median generated tokens per second of `produce()` (a Rollout) over `rounds`, after a warm-up call."""
    produce()
    rates = []
    for _ in range(rounds):
        started = time.perf_counter()
        rollout = produce()
        rates.append(int(rollout.completion_mask.sum()) / (time.perf_counter() - started))
    return statistics.median(rates)


def percentile(values: list[float], q: float) -> float:
    """The value at quantile q (0..1) of `values`, nearest rank (q = 0.5: the median, 0.99: p99)."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]
