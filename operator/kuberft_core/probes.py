"""`GET /metrics` and `GET /healthz`, the same for every component: one function answers both
(`respond`), served as aiohttp routes by the processes with an event loop (reward pool, server,
operator) and by a threaded server by the one without (the trainer).

- `/metrics`: the component's Prometheus metrics (`ComponentMetrics.exposition()`).
- `/healthz`: JSON with at least `status`; 200 when it is `ok`, 503 otherwise (what the
  readiness probes read). A component without a health check of its own answers `{"status": "ok"}`
  as long as it answers at all.
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, Optional

from .metrics import ComponentMetrics

Health = Callable[[], dict[str, Any]]
"""A component's health: a JSON object whose `status` is `ok` when it can do its work."""

PATHS = ("/metrics", "/healthz")
JSON = "application/json; charset=utf-8"


def alive() -> dict[str, Any]:
    return {"status": "ok"}


def respond(path: str, metrics: ComponentMetrics, health: Optional[Health] = None) -> tuple[int, bytes, str]:
    """(status code, body, content type) of `GET path`."""
    path = path.split("?", 1)[0]
    if path == "/metrics":
        body, content_type = metrics.exposition()
        return 200, body, content_type
    if path == "/healthz":
        report = (health or alive)()
        return (200 if report.get("status") == "ok" else 503), json.dumps(report).encode() + b"\n", JSON
    return 404, b"not found: try /metrics or /healthz\n", "text/plain; charset=utf-8"


def metrics_routes(metrics: ComponentMetrics, health: Optional[Health] = None) -> list:
    """aiohttp routes for `/metrics` and `/healthz`: `app.add_routes(metrics_routes(...))`."""
    from aiohttp import web

    async def handler(request: web.Request) -> web.Response:
        code, body, content_type = respond(request.path, metrics, health)
        return web.Response(status=code, body=body, headers={"Content-Type": content_type})

    return [web.get(path, handler) for path in PATHS]


class MetricsServer:
    """`/metrics` and `/healthz` on a port, in a daemon thread: for a process without an event
    loop (the trainer)."""

    def __init__(self, metrics: ComponentMetrics, port: int, host: str = "0.0.0.0", health: Optional[Health] = None):
        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 - http.server's naming
                code, body, content_type = respond(self.path, metrics, health)
                self.send_response(code)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):  # scrapes every few seconds: keep the log clean
                pass

        self.server = ThreadingHTTPServer((host, port), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, name="metrics", daemon=True)

    def start(self) -> "MetricsServer":
        self.thread.start()
        return self

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
