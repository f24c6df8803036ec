"""The HTTP layer: POST /v1/evaluate, GET /healthz, GET /metrics, errors naming the field,
429 when the queue is full."""

import asyncio

import pytest
from aiohttp.test_utils import TestClient, TestServer

from kuberft_reward.server import build_app

from .conftest import TIMEOUT_SECONDS, solution


def call(pool, method: str, path: str, **kwargs):
    async def go():
        async with TestClient(TestServer(build_app(pool))) as client:
            response = await client.request(method, path, **kwargs)
            body = await response.json() if response.content_type == "application/json" else await response.text()
            return response.status, body, response.headers

    return asyncio.run(go())


def test_evaluate_scores_a_batch(pool):
    status, body, _ = call(
        pool,
        "POST",
        "/v1/evaluate",
        json={
            "items": [
                {"completion": solution("relu"), "row": {"task": "relu", "numbers": [3, 7, 25], "target": 46}},
                {"completion": "25+3*7", "row": {"task": "relu", "numbers": [3, 7, 25], "target": 46}},
            ],
            "rewards": [{"kind": "triton.correctness", "name": "correct"}, {"kind": "countdown"}],
        },
    )
    assert status == 200
    first, second = body["results"]
    assert first["rewards"]["correct"] == {"score": 1.0, "outcome": "ok", "reason": "6/6 test cases match the reference"}  # 4 seeds, signed, scaled
    assert second["rewards"]["countdown"]["score"] == 1.0
    assert second["rewards"]["correct"]["outcome"] == "invalid"


@pytest.mark.parametrize(
    "payload, message",
    [
        ({"items": [], "rewards": [{"kind": "countdown"}]}, "items: List should have at least 1 item after validation, not 0"),
        ({"items": [{"completion": "x", "extra": 1}], "rewards": [{"kind": "countdown"}]}, "items.0.extra: Extra inputs are not permitted"),
        ({"items": [{"completion": "x"}], "rewards": [{"kind": "chess"}]}, "rewards[0].kind: unknown reward 'chess'"),
        (
            {"items": [{"completion": "x"}], "rewards": [{"kind": "countdown"}, {"kind": "countdown"}]},
            "reward names must be unique",
        ),
    ],
)
def test_bad_requests_get_400_naming_the_field(pool, payload, message):
    status, body, _ = call(pool, "POST", "/v1/evaluate", json=payload)
    assert status == 400
    assert message in body["error"]


def test_a_body_that_is_not_json_gets_400(pool):
    status, body, _ = call(pool, "POST", "/v1/evaluate", data=b"{not json", headers={"Content-Type": "application/json"})
    assert status == 400 and body["error"].startswith("the body is not JSON")


def test_a_full_queue_gets_429(pool, monkeypatch):
    monkeypatch.setattr(pool, "max_queue", 0)
    status, body, headers = call(
        pool, "POST", "/v1/evaluate", json={"items": [{"completion": solution("relu"), "row": {"task": "relu"}}], "rewards": [{"kind": "triton.compile"}]}
    )
    assert status == 429 and headers["Retry-After"] == "5"
    assert body["error"].startswith("the queue is full")


def test_healthz_reports_workers_and_isolation(pool):
    status, body, _ = call(pool, "GET", "/healthz")
    assert status == 200
    assert body["status"] == "ok" and body["workers"] == 2 and body["device"] == "cpu"
    assert body["isolation"]["seccomp"] is True
    assert body["sandbox"] == {"timeoutSeconds": TIMEOUT_SECONDS, "memoryMiB": 4096}


def test_metrics_are_served_under_their_catalogue_names(pool):
    call(pool, "POST", "/v1/evaluate", json={"items": [{"completion": "1"}], "rewards": [{"kind": "chess"}]})
    status, body, headers = call(pool, "GET", "/metrics")
    assert status == 200 and headers["Content-Type"].startswith("text/plain")
    assert 'kuberft_reward_requests_total{code="400"}' in body
    for name in ("kuberft_reward_queue_depth", "kuberft_reward_busy_workers", "kuberft_reward_crashes_total", "kuberft_reward_evaluation_seconds_count"):
        assert name in body
