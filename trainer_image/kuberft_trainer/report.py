"""The trainer's progress report to its RFTJob, over plain HTTPS to the Kubernetes API server.

The operator is the only writer of an RFTJob's status. The trainer reports into the one object
it may write: its job's progress ConfigMap `<job>-progress` (`kuberft_core.job_progress`),
with a JSON merge patch of the ConfigMap's `data`: its step and total steps when it starts or
resumes, step, per-reward means and mean reward after every step, and `adapterWritten` at the
end. The operator checks the report and copies it into the status; phase, times and the
adapter location are the operator's. The trainer's Role allows `get` and `patch` on that
ConfigMap by name and nothing else.

In a cluster it reports when `KUBERFT_JOB_NAME` is set (the operator sets it in the trainer
pod), with
- `KUBERFT_JOB_NAMESPACE`: the job's namespace (default: the pod's namespace from the service
  account, else `default`);
- the service account's token and CA from `/var/run/secrets/kubernetes.io/serviceaccount`
  (the token is read for every request: the kubelet rotates it);
- the API server at `https://$KUBERNETES_SERVICE_HOST:$KUBERNETES_SERVICE_PORT`, or at
  `KUBERFT_API_SERVER` (a base URL, e.g. a test's local `http://127.0.0.1:PORT`).

No Kubernetes client library: one PATCH with urllib, no proxy. A failed report is logged and
never stops training.
"""

from __future__ import annotations

import json
import logging
import os
import ssl
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Mapping, Optional

from kuberft_core.job_progress import ProgressReport, progress_config_map_name

log = logging.getLogger(__name__)

SERVICE_ACCOUNT_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")
MERGE_PATCH = "application/merge-patch+json"


class ProgressReporter:
    """Merge-patches the `data` of one job's progress ConfigMap at `api_server` (a base URL),
    with the bearer token in `token_file` and, over HTTPS, the CA bundle in `ca_file`."""

    def __init__(
        self,
        job_name: str,
        namespace: str,
        api_server: str,
        token_file: Optional[Path] = None,
        ca_file: Optional[Path] = None,
        timeout: float = 10.0,
    ):
        self.config_map = progress_config_map_name(job_name)
        self.namespace = namespace
        self.url = (
            f"{api_server.rstrip('/')}/api/v1/namespaces/{urllib.parse.quote(namespace)}"
            f"/configmaps/{urllib.parse.quote(self.config_map)}"
        )
        self.token_file = token_file
        self.timeout = timeout
        handlers: list[urllib.request.BaseHandler] = [urllib.request.ProxyHandler({})]
        if self.url.startswith("https://"):
            context = ssl.create_default_context(cafile=str(ca_file) if ca_file and ca_file.is_file() else None)
            handlers.append(urllib.request.HTTPSHandler(context=context))
        self._opener = urllib.request.build_opener(*handlers)

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] = os.environ) -> Optional["ProgressReporter"]:
        """A reporter when `KUBERFT_JOB_NAME` is set and an API server is known, else None."""
        name = environ.get("KUBERFT_JOB_NAME")
        if not name:
            return None
        namespace = environ.get("KUBERFT_JOB_NAMESPACE")
        namespace_file = SERVICE_ACCOUNT_DIR / "namespace"
        if not namespace:
            namespace = namespace_file.read_text().strip() if namespace_file.is_file() else "default"
        server = environ.get("KUBERFT_API_SERVER")
        host, port = environ.get("KUBERNETES_SERVICE_HOST"), environ.get("KUBERNETES_SERVICE_PORT", "443")
        if not server and host:
            server = f"https://[{host}]:{port}" if ":" in host else f"https://{host}:{port}"
        if not server:
            log.warning("KUBERFT_JOB_NAME is set but no API server is known (KUBERNETES_SERVICE_HOST or "
                        "KUBERFT_API_SERVER): progress is not reported")
            return None
        return cls(name, namespace, server, token_file=SERVICE_ACCOUNT_DIR / "token", ca_file=SERVICE_ACCOUNT_DIR / "ca.crt")

    def report(self, progress: ProgressReport) -> bool:
        """Merge `progress` into the ConfigMap's data; False (logged) on failure."""
        body = json.dumps({"data": progress.to_data()}).encode()
        headers = {"Content-Type": MERGE_PATCH, "Accept": "application/json"}
        try:
            if self.token_file is not None and self.token_file.is_file():
                headers["Authorization"] = f"Bearer {self.token_file.read_text().strip()}"
            request = urllib.request.Request(self.url, data=body, method="PATCH", headers=headers)
            with self._opener.open(request, timeout=self.timeout) as response:
                response.read()
            return True
        except urllib.error.HTTPError as error:
            detail = error.read(300).decode(errors="replace").strip()
            log.warning("cannot report progress to ConfigMap %s/%s: HTTP %d %s", self.namespace, self.config_map, error.code, detail)
        except (OSError, ValueError) as error:  # the API server being away must not stop training
            log.warning("cannot report progress to ConfigMap %s/%s: %s", self.namespace, self.config_map, error)
        return False

    def running(self, total_steps: int, step: int) -> bool:
        """At a start or a resume: where training stands."""
        return self.report(ProgressReport(step=step, total_steps=total_steps))

    def step(self, step: int, total_steps: int, rewards: dict[str, float], mean_reward: Optional[float]) -> bool:
        return self.report(ProgressReport(step=step, total_steps=total_steps, rewards=rewards, mean_reward=mean_reward))

    def finished(self) -> bool:
        """The final adapter is written (where the operator said: `<output>/adapter`)."""
        return self.report(ProgressReport(adapter_written=True))
