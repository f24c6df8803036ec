"""Scoring completions: the reward backend protocol, the HTTP client of the reward pool, and the
conversion of responses into a score matrix.

A backend is anything with `async evaluate(request: EvaluateRequest) -> EvaluateResponse`:
- `HttpRewardBackend`: the reward pool's `POST /v1/evaluate` (in a cluster, or any URL);
- `kuberft_reward.pool.RewardPool`: the same pool in-process (local runs);
- a test's own object.

Failures are values, not zeros: an evaluation the pool could not perform (the pool unreachable
after retries, an HTTP error, an `error` outcome, a missing result) is reported with outcome
`error`, and `score_matrix` turns it into NaN, which the trainer leaves out of the advantages
and the loss and counts in `kuberft_trainer_reward_failures_total`. Only the model's own
failures (wrong, invalid, timeout, crash, hacked...) are scored as the pool says.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from dataclasses import dataclass, field
from typing import Optional, Protocol, Sequence, runtime_checkable

from kuberft_core.reward_protocol import EvaluateRequest, EvaluateResponse, Item, ItemResult, Outcome, RewardRequest, RewardResult

log = logging.getLogger(__name__)

FAILURE_OUTCOME = Outcome.ERROR


@runtime_checkable
class RewardBackend(Protocol):
    async def evaluate(self, request: EvaluateRequest) -> EvaluateResponse: ...


def reward_requests(reward_specs) -> list[RewardRequest]:
    """The `rewards` of an evaluate request for the job's `spec.rewards` (RewardSpec list)."""
    return [RewardRequest(kind=r.kind, name=r.effective_name, module=r.module, args=r.args) for r in reward_specs]


def failed_result(rewards: Sequence[RewardRequest], reason: str) -> ItemResult:
    """An item result saying the pool could not score the item (not the model's fault)."""
    return ItemResult(rewards={r.effective_name: RewardResult(score=0.0, outcome=FAILURE_OUTCOME, reason=reason) for r in rewards})


@dataclass
class ScoreMatrix:
    """Per-function scores of a batch: `scores[i][k]` for item i and reward k (None = failed)."""

    names: list[str]
    scores: list[list[Optional[float]]]
    outcomes: list[dict[str, str]]
    reasons: list[dict[str, str]]
    failures: int = 0
    failure_reasons: list[str] = field(default_factory=list)


def score_matrix(response: EvaluateResponse, rewards: Sequence[RewardRequest], num_items: int) -> ScoreMatrix:
    names = [r.effective_name for r in rewards]
    results = list(response.results)
    if len(results) != num_items:
        reason = f"the reward pool answered {len(results)} results for {num_items} items"
        results = [failed_result(rewards, reason)] * num_items
    matrix = ScoreMatrix(names, [], [], [])
    for result in results:
        row, outcomes, reasons = [], {}, {}
        for name in names:
            reward = result.rewards.get(name)
            if reward is None:
                reward = RewardResult(score=0.0, outcome=FAILURE_OUTCOME, reason=f"no result for reward {name!r}")
            outcomes[name], reasons[name] = reward.outcome.value, reward.reason
            if reward.outcome == FAILURE_OUTCOME:
                row.append(None)
                matrix.failures += 1
                matrix.failure_reasons.append(f"{name}: {reward.reason}")
            else:
                row.append(reward.score)
        matrix.scores.append(row)
        matrix.outcomes.append(outcomes)
        matrix.reasons.append(reasons)
    return matrix


async def score_completions(
    backend: RewardBackend, completions: Sequence[str], rows: Sequence[dict], rewards: Sequence[RewardRequest]
) -> ScoreMatrix:
    """Score each completion (with the dataset row it answers) with every reward. Never raises
    for a pool failure: those come back as failed entries."""
    request = EvaluateRequest(items=[Item(completion=c, row=r) for c, r in zip(completions, rows)], rewards=list(rewards))
    try:
        response = await backend.evaluate(request)
    except Exception as error:  # noqa: BLE001 - any backend failure is a scoring failure, reported below
        log.warning("reward backend failed: %s", error)
        response = EvaluateResponse(results=[failed_result(rewards, f"reward backend failed: {error}")] * len(completions))
    matrix = score_matrix(response, rewards, len(completions))
    if matrix.failures:
        log.warning("%d reward evaluations failed (left out of the update): %s", matrix.failures, matrix.failure_reasons[0])
    return matrix


class HttpRewardBackend:
    """Client of the reward pool's `POST {url}/v1/evaluate`.

    The items of a request are sent in batches of `batch_size`, at most `concurrency` at once.
    A batch is retried up to `max_retries` times with exponential backoff and jitter on a
    connection error, a timeout, a 5xx, or a 429 (waiting at least the `Retry-After` the pool
    sends). A 4xx other than 429 is a bad request and is not retried. A batch that still fails
    comes back as `error` results with the reason, never as zero scores.

    Use it inside one event loop (the trainer keeps one); `close()` releases the connections."""

    def __init__(
        self,
        url: str,
        *,
        batch_size: int = 64,
        concurrency: int = 4,
        timeout_seconds: float = 600.0,
        max_retries: int = 5,
        backoff_seconds: float = 0.5,
        max_backoff_seconds: float = 30.0,
    ):
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"reward URL must start with http:// or https://, got {url!r}")
        if batch_size < 1 or concurrency < 1 or max_retries < 0:
            raise ValueError("batch_size and concurrency must be at least 1 and max_retries at least 0")
        self.endpoint = url.rstrip("/") + "/v1/evaluate"
        self.health_url = url.rstrip("/") + "/healthz"
        self.batch_size = batch_size
        self.concurrency = concurrency
        self.timeout_seconds = timeout_seconds
        self.max_retries = max_retries
        self.backoff_seconds = backoff_seconds
        self.max_backoff_seconds = max_backoff_seconds
        self._jitter = random.Random()  # private: the global RNG belongs to the training run
        self._session = None
        self.retries = 0

    def wait_until_ready(self, timeout_seconds: float, poll_seconds: float = 2.0) -> bool:
        """Wait for the pool's `/healthz` to answer 200 (the operator starts the pool beside the
        trainer, and parks it while the trainer cannot start); False after `timeout_seconds`."""
        import urllib.error
        import urllib.request

        deadline = time.monotonic() + timeout_seconds
        next_log = time.monotonic()
        while True:
            try:
                with urllib.request.urlopen(self.health_url, timeout=5) as answer:
                    if answer.status == 200:
                        return True
                reason = f"HTTP {answer.status}"
            except (urllib.error.URLError, OSError) as error:
                reason = str(getattr(error, "reason", error))
            if time.monotonic() >= deadline:
                log.warning("the reward pool at %s is not ready after %.0fs (%s)", self.health_url, timeout_seconds, reason)
                return False
            if time.monotonic() >= next_log:
                log.info("waiting for the reward pool at %s (%s)", self.health_url, reason)
                next_log = time.monotonic() + 30
            time.sleep(poll_seconds)

    async def _get_session(self):
        import aiohttp

        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.timeout_seconds))
        return self._session

    async def close(self) -> None:
        if self._session is not None and not self._session.closed:
            await self._session.close()
        self._session = None

    async def evaluate(self, request: EvaluateRequest) -> EvaluateResponse:
        batches = [request.items[i:i + self.batch_size] for i in range(0, len(request.items), self.batch_size)]
        gate = asyncio.Semaphore(self.concurrency)

        async def send(items: list[Item]) -> list[ItemResult]:
            async with gate:
                return await self._send_with_retries(EvaluateRequest(items=items, rewards=request.rewards))

        parts = await asyncio.gather(*(send(b) for b in batches))
        return EvaluateResponse(results=[result for part in parts for result in part])

    def _backoff(self, attempt: int) -> float:
        base = min(self.max_backoff_seconds, self.backoff_seconds * 2**attempt)
        return base * (0.5 + self._jitter.random() / 2)

    async def _send_with_retries(self, request: EvaluateRequest) -> list[ItemResult]:
        import aiohttp

        body = request.model_dump(mode="json", by_alias=True, exclude_none=True)
        reason = "not sent"
        for attempt in range(self.max_retries + 1):
            wait = self._backoff(attempt)
            try:
                session = await self._get_session()
                async with session.post(self.endpoint, json=body) as answer:
                    text = await answer.text()
                    if answer.status == 200:
                        response = EvaluateResponse.model_validate_json(text)
                        if len(response.results) != len(request.items):
                            reason = f"the reward pool answered {len(response.results)} results for {len(request.items)} items"
                            break
                        return response.results
                    reason = f"HTTP {answer.status} from {self.endpoint}: {text[:300]}"
                    if answer.status == 429:
                        wait = max(wait, _retry_after(answer.headers.get("Retry-After")))
                    elif answer.status < 500:
                        break  # our request is wrong: retrying changes nothing
            except asyncio.TimeoutError:
                reason = f"no answer from {self.endpoint} within {self.timeout_seconds:g}s"
            except aiohttp.ClientError as error:
                reason = f"cannot reach {self.endpoint}: {error}"
            except ValueError as error:  # a 200 whose body is not an EvaluateResponse
                reason = f"unreadable answer from {self.endpoint}: {error}"
                break
            if attempt < self.max_retries:
                self.retries += 1
                log.info("reward pool request failed (%s); retry %d/%d in %.1fs", reason, attempt + 1, self.max_retries, wait)
                await asyncio.sleep(wait)
        return [failed_result(request.rewards, reason)] * len(request.items)


def _retry_after(value: Optional[str]) -> float:
    try:
        return max(0.0, float(value)) if value else 0.0
    except ValueError:
        return 0.0
