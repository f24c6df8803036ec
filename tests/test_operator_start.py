"""`kuberft operator` started where it cannot work (no credentials, no API server, no RBAC) ends at
once with one sentence that says why and exit status 1: no traceback, and no replica standing
by forever on a Lease it may not read."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

from tests.support.refusing_apiserver import USER, refusing_apiserver


def operator(tmp_path: Path, *args: str, kubeconfig: Path | None = None) -> tuple[subprocess.CompletedProcess, float]:
    env = {k: v for k, v in os.environ.items() if k not in ("KUBECONFIG", "KUBERNETES_SERVICE_HOST", "KUBERNETES_SERVICE_PORT")}
    env["HOME"] = str(tmp_path)  # no ~/.kube/config
    if kubeconfig is not None:
        env["KUBECONFIG"] = str(kubeconfig)
    start = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "kuberft_operator.cli", "operator", "--metrics-port", "0", *args],
        check=False, capture_output=True, text=True, env=env, timeout=120,
    )
    return done, time.monotonic() - start


def test_without_credentials_it_says_so(tmp_path):
    done, _ = operator(tmp_path)
    assert done.returncode == 1
    assert done.stderr.strip() == (
        "kuberft operator: cannot log in to Kubernetes: no credentials: not in a pod and neither KUBECONFIG nor ~/.kube/config is set"
    )


def test_without_rbac_it_names_the_refused_request_and_the_charts_rbac(tmp_path):
    with refusing_apiserver(tmp_path) as (kubeconfig, refused):
        done, seconds = operator(tmp_path, "-n", "team-a", kubeconfig=kubeconfig)
    assert done.returncode == 1 and seconds < 60
    assert "Traceback" not in done.stderr
    message = done.stderr.strip()
    assert message.startswith("kuberft operator: the Kubernetes API server at http://127.0.0.1:")
    assert (
        f"refuses the operator's requests (403 Forbidden: /apis/kuberft.io/v1alpha1/namespaces/team-a/rftjobs is forbidden: "
        f'User "{USER}" cannot get this resource). The operator needs the RBAC its Helm chart grants'
    ) in message
    assert refused == ["GET /apis/kuberft.io/v1alpha1/namespaces/team-a/rftjobs"], "one request, then it stops"


def test_a_lease_it_may_not_read_ends_the_start_instead_of_standing_by(tmp_path):
    """Before, a replica that could not read its Lease logged 'standing by' every 5 s forever."""
    with refusing_apiserver(tmp_path) as (kubeconfig, _):
        done, _ = operator(tmp_path, kubeconfig=kubeconfig)
    assert done.returncode == 1 and "standing by" not in done.stderr
    assert "403 Forbidden: /apis/kuberft.io/v1alpha1/rftjobs is forbidden" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


def test_an_api_server_that_does_not_answer_is_named(tmp_path):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # closed again when the operator connects
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(
        "apiVersion: v1\nkind: Config\n"
        f"clusters: [{{name: c, cluster: {{server: 'http://127.0.0.1:{port}'}}}}]\n"
        "users: [{name: u, user: {token: t}}]\ncontexts: [{name: c, context: {cluster: c, user: u}}]\ncurrent-context: c\n"
    )
    done, _ = operator(tmp_path, kubeconfig=kubeconfig)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert done.stderr.startswith(f"kuberft operator: cannot reach the Kubernetes API server at http://127.0.0.1:{port} (")


def test_crds_not_installed_are_named_instead_of_watching_nothing(tmp_path):
    with refusing_apiserver(tmp_path, not_served=True) as (kubeconfig, _):
        done, _ = operator(tmp_path, "-n", "team-a", kubeconfig=kubeconfig)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert "does not serve kuberft.io/v1alpha1 RFTJobs and TurboDeployments (the CRDs are not installed)" in done.stderr
