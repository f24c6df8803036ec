"""What the reward pool and its sandbox workers say to each other (one JSON line each way);
the HTTP contract with the trainer is `kuberft_core.reward_protocol`."""

from __future__ import annotations

from typing import Any, Optional

from pydantic import Field

from kuberft_core.reward_protocol import Outcome, RewardResult, Wire


class SandboxLimits(Wire):
    """Per-evaluation limits the pool gives a worker (see `sandbox.Limits`)."""

    wall_seconds: float
    cpu_seconds: int
    memory_bytes: Optional[int]
    allow_processes: bool = False


class WorkerReward(Wire):
    """One reward of a worker job."""

    name: str
    kind: str
    args: dict[str, Any] = Field(default_factory=dict)
    module: Optional[str] = None


class WorkerTask(Wire):
    name: Optional[str] = None
    source: str


class WorkerJob(Wire):
    """What the pool asks a sandbox worker, one JSON line on its stdin: the sandboxed triton
    rewards of one completion (`kernel`), or its custom rewards (`custom`)."""

    id: int = 0
    type: str = Field(pattern="^(kernel|custom)$")
    completion: str
    rewards: list[WorkerReward]
    limits: SandboxLimits
    task: Optional[WorkerTask] = None
    row: dict[str, Any] = Field(default_factory=dict)


class WorkerAnswer(Wire):
    """A worker's answer to one job, one JSON line on its stdout."""

    id: int = 0
    rewards: dict[str, RewardResult]
    hacked: bool = False
    timeouts: int = 0
    crashes: int = 0
    seconds: float = 0.0
    max_rss_bytes: int = 0
    retire: bool = False
    """The worker's sandbox set-up is damaged: the pool replaces it with a fresh one."""

    @classmethod
    def everyone(cls, job: WorkerJob, outcome: Outcome | str, reason: str, hacked: bool = False, **extra: Any) -> "WorkerAnswer":
        """The same verdict (score 0) for every reward of the job."""
        return cls(rewards={r.name: RewardResult.of(0.0, outcome, reason) for r in job.rewards}, hacked=hacked, **extra)
