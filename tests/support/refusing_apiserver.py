"""A Kubernetes API server that refuses every request as RBAC does (403 with a `Status` body), on
a thread, and a kubeconfig for it: what an operator started without its RBAC meets."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

USER = "system:serviceaccount:kuberft-system:kuberft-operator"


class _Refuse(BaseHTTPRequestHandler):
    def _refuse(self) -> None:
        path = self.path.split("?")[0]
        self.server.paths.append(f"{self.command} {path}")  # type: ignore[attr-defined]
        if self.server.not_served:  # type: ignore[attr-defined]
            # What the API server answers for a resource it does not serve (a CRD not installed).
            body = b"404 page not found\n"
            self.send_response(404)
            self.send_header("Content-Type", "text/plain; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            return
        body = json.dumps({
            "kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "Forbidden", "code": 403,
            "message": f'{path} is forbidden: User "{USER}" cannot {self.command.lower()} this resource',
        }).encode()
        self.send_response(403)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _refuse

    def log_message(self, *args) -> None:
        pass


@contextmanager
def refusing_apiserver(directory: Path, host: str = "127.0.0.1", not_served: bool = False) -> Iterator[tuple[Path, list[str]]]:
    """(a kubeconfig for the server, the list of requests it refused so far). `not_served`: 404
    for every path, as for resources whose CRDs are not installed, instead of 403."""
    server = ThreadingHTTPServer((host, 0), _Refuse)
    server.paths = []  # type: ignore[attr-defined]
    server.not_served = not_served  # type: ignore[attr-defined]
    kubeconfig = directory / "kubeconfig"
    kubeconfig.write_text(
        "apiVersion: v1\nkind: Config\n"
        f"clusters: [{{name: c, cluster: {{server: 'http://{host}:{server.server_address[1]}'}}}}]\n"
        "users: [{name: u, user: {token: not-allowed}}]\n"
        "contexts: [{name: c, context: {cluster: c, user: u, namespace: default}}]\n"
        "current-context: c\n"
    )
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield kubeconfig, server.paths  # type: ignore[attr-defined]
    finally:
        server.shutdown()
        server.server_close()
