import os
from pathlib import Path

import pytest

from kuberft_core.api import SandboxSpec
from kuberft_core.kernel_tasks import shipped_solution
from kuberft_core.reward_protocol import EvaluateRequest

SECRET = "tok-9f8e7d6c5b4a-kuberft-test"
TIMEOUT_SECONDS = 20
"""Per evaluation: the slowest shipped solution (matmul, 7 test cases under the CPU interpreter)
takes a few seconds on a quiet core; a loaded CI machine needs the headroom."""
KERNEL_REWARDS = [{"kind": "triton.format"}, {"kind": "triton.compile"}, {"kind": "triton.correctness"}]


@pytest.fixture(scope="session")
def pool():
    """One pool of 2 sandbox workers for the reward tests (workers take ~10 s to start).
    The service's environment holds a secret, which no reason may ever show."""
    from kuberft_reward.pool import RewardPool

    os.environ["KUBERFT_TEST_TOKEN"] = SECRET
    custom = str(Path(__file__).parent / "custom")
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (custom, os.environ.get("PYTHONPATH")) if p)
    with RewardPool(2, SandboxSpec(timeout_seconds=TIMEOUT_SECONDS)) as started:
        yield started


def tagged(program: str) -> str:
    return f"<triton>\n{program}\n</triton>"


def kernel_request(completions, task="relu", rewards=None) -> EvaluateRequest:
    return EvaluateRequest.model_validate(
        {"items": [{"completion": c, "row": {"task": task}} for c in completions], "rewards": rewards or KERNEL_REWARDS}
    )


def solution(task: str) -> str:
    return tagged(shipped_solution(task))
