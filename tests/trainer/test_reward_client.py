"""The HTTP client of the reward pool: batching, concurrency, retries with backoff on 429 /
5xx / timeouts, no retry on a bad request, and failures reported as failures (never as 0)."""

from __future__ import annotations

import asyncio

import pytest

from kuberft_core.reward_protocol import EvaluateRequest, Item, RewardRequest
from kuberft_trainer.rewards import HttpRewardBackend, score_completions, score_matrix

from .reward_server import RewardServer

REWARDS = [RewardRequest(kind="regex", name="digits")]


def request(n: int) -> EvaluateRequest:
    return EvaluateRequest(items=[Item(completion="12a4", row={"allowed": "0123456789"}) for _ in range(n)], rewards=REWARDS)


def evaluate(backend: HttpRewardBackend, req: EvaluateRequest):
    async def go():
        try:
            return await backend.evaluate(req)
        finally:
            await backend.close()

    return asyncio.run(go())


@pytest.fixture
def server():
    with RewardServer() as running:
        yield running


def test_items_are_sent_in_batches_at_most_n_at_once_and_answered_in_order(server):
    server.delay = 0.05
    backend = HttpRewardBackend(server.url, batch_size=4, concurrency=2)
    req = EvaluateRequest(items=[Item(completion="1" * (i % 3) + "x", row={"allowed": "1"}) for i in range(10)], rewards=REWARDS)
    response = evaluate(backend, req)
    assert sorted(server.batch_sizes) == [2, 4, 4]
    assert server.max_in_flight == 2
    scores = [r.rewards["digits"].score for r in response.results]
    assert scores == [[0.0, 0.5, 2 / 3][i % 3] for i in range(10)]


def test_429_and_5xx_are_retried_with_backoff_honouring_retry_after(server):
    server.failures = [(429, {"Retry-After": "0.2"}), (503, {})]
    backend = HttpRewardBackend(server.url, backoff_seconds=0.01)
    loop_time = []

    async def go():
        start = asyncio.get_running_loop().time()
        try:
            return await backend.evaluate(request(3))
        finally:
            loop_time.append(asyncio.get_running_loop().time() - start)
            await backend.close()

    response = asyncio.run(go())
    assert [r.rewards["digits"].score for r in response.results] == [0.75] * 3
    assert backend.retries == 2 and server.requests == 3
    assert loop_time[0] >= 0.2  # waited the Retry-After the pool asked for


def test_a_bad_request_is_not_retried_and_comes_back_as_failures(server):
    server.failures = [(400, {})]
    backend = HttpRewardBackend(server.url, backoff_seconds=0.01)
    response = evaluate(backend, request(2))
    assert server.requests == 1 and backend.retries == 0
    result = response.results[0].rewards["digits"]
    assert result.outcome == "error" and "HTTP 400" in result.reason and "injected failure" in result.reason


def test_a_pool_that_never_answers_in_time_gives_failures_after_the_retries(server):
    server.delay = 1.0
    backend = HttpRewardBackend(server.url, timeout_seconds=0.1, max_retries=1, backoff_seconds=0.01)
    matrix = score_matrix(evaluate(backend, request(2)), REWARDS, 2)
    assert matrix.scores == [[None], [None]] and matrix.failures == 2
    assert "no answer" in matrix.failure_reasons[0] and "within 0.1s" in matrix.failure_reasons[0]
    assert backend.retries == 1


def test_an_unreachable_pool_is_a_failure_not_a_zero():
    backend = HttpRewardBackend("http://127.0.0.1:9", max_retries=1, backoff_seconds=0.01)

    async def go():
        try:
            return await score_completions(backend, ["12"], [{"allowed": "1"}], REWARDS)
        finally:
            await backend.close()

    matrix = asyncio.run(go())
    assert matrix.scores == [[None]] and "cannot reach http://127.0.0.1:9/v1/evaluate" in matrix.failure_reasons[0]


def test_a_response_missing_a_reward_marks_that_reward_failed():
    from kuberft_core.reward_protocol import EvaluateResponse, ItemResult, RewardResult

    response = EvaluateResponse(results=[ItemResult(rewards={"other": RewardResult(score=1.0, outcome="ok")})])
    matrix = score_matrix(response, REWARDS, 1)
    assert matrix.scores == [[None]] and matrix.failure_reasons == ["digits: no result for reward 'digits'"]


def test_the_client_rejects_a_url_without_a_scheme():
    with pytest.raises(ValueError, match="must start with http"):
        HttpRewardBackend("reward-pool:8080")


def test_the_trainer_waits_for_a_pool_that_starts_late_and_gives_up_on_one_that_never_does():
    import socket
    import threading
    import time

    with socket.socket() as probe:  # a port nothing listens on yet
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    client = HttpRewardBackend(f"http://127.0.0.1:{port}")
    started = time.monotonic()
    assert client.wait_until_ready(timeout_seconds=1.0, poll_seconds=0.2) is False
    assert 1.0 <= time.monotonic() - started < 5

    with RewardServer() as late:
        client = HttpRewardBackend(late.url)
        ready = []
        waiter = threading.Thread(target=lambda: ready.append(client.wait_until_ready(timeout_seconds=30, poll_seconds=0.1)))
        waiter.start()
        waiter.join(timeout=10)
        assert ready == [True]
