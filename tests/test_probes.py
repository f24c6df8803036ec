"""/metrics and /healthz: one answer (kuberft_core.probes.respond) served the same way by every
component, over aiohttp routes or the trainer's threaded server."""

from __future__ import annotations

import ast
import asyncio
import json
import urllib.error
import urllib.request
from pathlib import Path

from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from kuberft_core.metrics import component_metrics
from kuberft_core.probes import MetricsServer, metrics_routes, respond

REPO = Path(__file__).resolve().parents[1]
SERVERS = {  # the module of each component that serves /metrics and /healthz
    "trainer": "trainer_image/kuberft_trainer/cli.py",
    "reward": "reward_image/kuberft_reward/server.py",
    "serve": "serve_image/kuberft_serve/server.py",
    "operator": "operator/kuberft_operator/controller.py",
}


def test_healthz_is_503_unless_the_component_says_ok():
    metrics = component_metrics("reward")
    assert respond("/healthz", metrics) == (200, b'{"status": "ok"}\n', "application/json; charset=utf-8")
    code, body, _ = respond("/healthz?verbose=1", metrics, lambda: {"status": "degraded", "workers": 0})
    assert (code, json.loads(body)) == (503, {"status": "degraded", "workers": 0})
    assert respond("/nope", metrics)[:2] == (404, b"not found: try /metrics or /healthz\n")


def test_aiohttp_routes_and_the_threaded_server_answer_alike():
    metrics = component_metrics("trainer")
    metrics.step.labels("demo").set(7)

    async def over_aiohttp():
        app = web.Application()
        app.add_routes(metrics_routes(metrics, lambda: {"status": "starting"}))
        async with TestClient(TestServer(app)) as client:
            answers = []
            for path in ("/metrics", "/healthz"):
                response = await client.get(path)
                answers.append((response.status, await response.read()))
            return answers

    aiohttp_answers = asyncio.run(over_aiohttp())
    server = MetricsServer(metrics, 0, host="127.0.0.1", health=lambda: {"status": "starting"}).start()
    try:
        base = f"http://127.0.0.1:{server.port}"
        metrics_body = urllib.request.urlopen(f"{base}/metrics", timeout=5).read()
        try:
            urllib.request.urlopen(f"{base}/healthz", timeout=5)
        except urllib.error.HTTPError as error:
            health = (error.code, error.read())
    finally:
        server.close()
    assert b'kuberft_trainer_step{rftjob="demo"} 7.0' in metrics_body
    assert aiohttp_answers == [(200, metrics_body), health] and health == (503, b'{"status": "starting"}\n')


def test_every_component_serves_the_probes_from_the_core():
    for component, relative in SERVERS.items():
        tree = ast.parse((REPO / relative).read_text())
        imports_probes = any(isinstance(n, ast.ImportFrom) and n.module == "kuberft_core.probes" for n in ast.walk(tree))
        own_routes = [n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and n.value in ("/metrics", "/healthz")]
        assert (component, imports_probes, own_routes) == (component, True, [])
