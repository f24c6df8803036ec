"""The reward pool's HTTP service, a thin layer over `RewardPool`:

- `POST /v1/evaluate`: an `EvaluateRequest` in, an `EvaluateResponse` out; 400 with an
  `ErrorResponse` naming the field for a bad request, 429 when the queue is full.
- `GET /healthz`: workers, queue, isolation in effect; 503 while degraded.
- `GET /metrics`: Prometheus metrics (`kuberft_reward_*`).
"""

from __future__ import annotations

import ctypes
import json
import logging

from aiohttp import web
from pydantic import ValidationError

from kuberft_core.probes import metrics_routes
from kuberft_core.reward_protocol import ErrorResponse, EvaluateRequest

from .pool import PoolBusy, PoolClosed, RewardPool
from .rewards import RequestError

log = logging.getLogger("kuberft.reward")
MAX_REQUEST_BYTES = 256 << 20
POOL_KEY = web.AppKey("pool", RewardPool)


def _error(status: int, message: str, pool: RewardPool, headers: dict | None = None) -> web.Response:
    pool.metrics.requests.labels(code=str(status)).inc()
    return web.json_response(ErrorResponse(error=message).model_dump(), status=status, headers=headers)


def validation_message(error: ValidationError) -> str:
    """`items.0.completion: String should have at most 1000000 characters; ...`"""
    parts = []
    for e in error.errors()[:5]:
        loc = ".".join(str(p) for p in e["loc"])
        parts.append(f"{loc}: {e['msg']}" if loc else e["msg"])
    return "; ".join(parts)


async def evaluate(request: web.Request) -> web.Response:
    pool = request.app[POOL_KEY]
    try:
        body = await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        return _error(400, f"the body is not JSON: {e}", pool)
    try:
        evaluate_request = EvaluateRequest.model_validate(body)
    except ValidationError as e:
        return _error(400, validation_message(e), pool)
    try:
        response = await pool.evaluate(evaluate_request)
    except RequestError as e:
        return _error(400, str(e), pool)
    except PoolBusy as e:
        return _error(429, str(e), pool, headers={"Retry-After": "5"})
    except PoolClosed as e:
        return _error(503, str(e), pool)
    pool.metrics.requests.labels(code="200").inc()
    return web.Response(body=response.model_dump_json(), content_type="application/json")


def build_app(pool: RewardPool) -> web.Application:
    app = web.Application(client_max_size=MAX_REQUEST_BYTES)
    app[POOL_KEY] = pool
    app.router.add_post("/v1/evaluate", evaluate)
    app.add_routes(metrics_routes(pool.metrics, pool.health))  # /healthz: 503 while degraded
    return app


def protect_process_memory() -> None:
    """Mark this process non-dumpable: where the sandbox cannot hide /proc, a same-user child
    still cannot read this process's environment (credentials) or memory through it."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(4, 0, 0, 0, 0)  # PR_SET_DUMPABLE = 4
    except (OSError, AttributeError):
        pass


def serve(pool: RewardPool, host: str, port: int) -> None:
    protect_process_memory()
    with pool:
        health = pool.health()
        missing = [k for k, v in health["isolation"].items() if v is False]
        if missing:
            log.warning("sandbox isolation not available here: %s (%s)", ", ".join(missing), "; ".join(health["isolation"].get("problems", [])))
        print(
            f"kuberft reward pool: {pool.num_workers} workers on {pool.device}, listening on http://{host}:{port} "
            "(POST /v1/evaluate, GET /healthz, GET /metrics)",
            flush=True,
        )
        web.run_app(build_app(pool), host=host, port=port, print=None, access_log=None)
