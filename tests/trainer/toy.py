"""A toy verifiable task for trainer tests: reward = fraction of the completion's characters
that belong to the row's `allowed` set (a completion made only of digits scores 1)."""

from __future__ import annotations

from kuberft_core.reward_protocol import EvaluateRequest, EvaluateResponse, ItemResult, RewardResult


def allowed_fraction(completion: str, allowed: str) -> float:
    return sum(c in allowed for c in completion) / len(completion) if completion else 0.0


class ToyRewardBackend:
    """An in-process reward backend: scores every reward of the request with `allowed_fraction`
    (the `allowed` field of the row); records how many items it scored."""

    def __init__(self):
        self.items_scored = 0

    async def evaluate(self, request: EvaluateRequest) -> EvaluateResponse:
        results = []
        for item in request.items:
            score = allowed_fraction(item.completion, item.row["allowed"])
            outcome = "ok" if score == 1.0 else "wrong"
            results.append(ItemResult(rewards={
                r.effective_name: RewardResult(score=score, outcome=outcome, reason=f"{score:.2f} of the characters allowed")
                for r in request.rewards
            }))
        self.items_scored += len(request.items)
        return EvaluateResponse(results=results)


TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"]
"""Every linear layer and the output head: the tiny random model's tied output embeddings are
small, so without adapting the head it can hardly sharpen its next-token distribution."""


def toy_spec(model_dir, **grpo):
    """An RFTJobSpec for the digits task on the tiny model at `model_dir`."""
    from kuberft_core.api import RFTJobSpec

    rows = [{"prompt": f"Write digits {i}:", "allowed": "0123456789"} for i in range(16)]
    settings = dict(steps=30, promptsPerStep=4, numGenerations=8, learningRate=2e-2, maxCompletionLength=8,
                    temperature=1.0, evalEvery=0, seed=0)
    settings.update(grpo)
    return RFTJobSpec.model_validate({
        "model": {"name": str(model_dir)},
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0, "targetModules": TARGETS},
        "dataset": {"rows": rows, "useChatTemplate": False, "evalFraction": 0.25},
        "rewards": [{"kind": "regex", "name": "digits"}],
        "grpo": settings,
        "checkpoint": {"everySteps": 10},
    })
