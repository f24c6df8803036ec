"""How the trainer is watched: Prometheus metrics with `/metrics` and `/healthz`, and the
RFTJob status patched in the cluster.

In a cluster the trainer patches the status of its own RFTJob (phase, step, progress,
rewards, meanReward, adapter) when these environment variables are set (the operator sets
them in the trainer pod):
- `KUBERFT_JOB_NAME`: the RFTJob's name;
- `KUBERFT_JOB_NAMESPACE`: its namespace (default: the pod's namespace from the service
  account, else `default`).
The pod's service account needs only `patch` on `rftjobs/status` for that one name
(an RBAC Role with `resourceNames: [<job>]`). A failed patch is logged and never stops training.
"""

from __future__ import annotations

import logging
import os
import threading
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Optional

from kuberft_core.api import GROUP, VERSION, RFTJob
from kuberft_core.metrics import ComponentMetrics

log = logging.getLogger(__name__)

SERVICE_ACCOUNT_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")


class MetricsServer:
    """`/metrics` (Prometheus text) and `/healthz` on a port, in a daemon thread."""

    def __init__(self, metrics: ComponentMetrics, port: int, host: str = "0.0.0.0"):
        exposition = metrics.exposition

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 - http.server's naming
                if self.path.split("?")[0] == "/metrics":
                    body, content_type = exposition()
                    self._answer(200, body, content_type)
                elif self.path.split("?")[0] == "/healthz":
                    self._answer(200, b"ok\n", "text/plain")
                else:
                    self._answer(404, b"not found: try /metrics or /healthz\n", "text/plain")

            def _answer(self, code: int, body: bytes, content_type: str):
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


def now_rfc3339() -> str:
    return datetime.now(timezone.utc).replace(microsecond=0).isoformat().replace("+00:00", "Z")


class JobStatusReporter:
    """Patches `status` of one RFTJob through the Kubernetes API (merge patch on the status
    subresource). `api` is a `kubernetes.client.CustomObjectsApi` (or a test double)."""

    def __init__(self, name: str, namespace: str, api: Any):
        self.name = name
        self.namespace = namespace
        self.api = api

    @classmethod
    def from_environment(cls) -> Optional["JobStatusReporter"]:
        """A reporter when `KUBERFT_JOB_NAME` is set (in-cluster credentials), else None."""
        name = os.environ.get("KUBERFT_JOB_NAME")
        if not name:
            return None
        namespace = os.environ.get("KUBERFT_JOB_NAMESPACE")
        if not namespace:
            namespace = SERVICE_ACCOUNT_NAMESPACE.read_text().strip() if SERVICE_ACCOUNT_NAMESPACE.is_file() else "default"
        from kubernetes import client, config

        try:
            config.load_incluster_config()
        except config.ConfigException:
            config.load_kube_config()
        return cls(name, namespace, client.CustomObjectsApi())

    def patch(self, status: dict[str, Any]) -> bool:
        """Merge `status` (camelCase keys) into the job's status; False (logged) on failure."""
        body = {"status": status}
        try:
            self.api.patch_namespaced_custom_object_status(GROUP, VERSION, self.namespace, RFTJob.plural, self.name, body)
            return True
        except Exception as error:  # noqa: BLE001 - the API being down must not stop training
            log.warning("cannot patch the status of RFTJob %s/%s: %s", self.namespace, self.name, error)
            return False

    def running(self, total_steps: int, step: int) -> bool:
        status = {"phase": "Running", "step": step, "totalSteps": total_steps, "progress": f"{step}/{total_steps}"}
        if step == 0:  # a fresh start; a restart keeps the first start time
            status["startTime"] = now_rfc3339()
        return self.patch(status)

    def step(self, step: int, total_steps: int, rewards: dict[str, float], mean_reward: Optional[float]) -> bool:
        status: dict[str, Any] = {"step": step, "totalSteps": total_steps, "progress": f"{step}/{total_steps}",
                                  "rewards": {k: round(v, 6) for k, v in rewards.items()}}
        if mean_reward is not None:
            status["meanReward"] = round(mean_reward, 6)
        return self.patch(status)

    def finished(self, adapter: str) -> bool:
        # Succeeded is the operator's call (it watches the trainer Job); the trainer reports the adapter.
        return self.patch({"adapter": adapter})
