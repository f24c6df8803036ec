"""Fixtures for the operator's end-to-end tests: a real control plane (session scope), the
operator as a real `kuberft operator` process, and a fresh namespace per test."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any, Callable, Optional

import pytest

from tests.cluster.controlplane import ControlPlane, die_with_parent, free_port

REPO = Path(__file__).resolve().parents[2]


def wait_for(check: Callable[[], Any], timeout: float, what: str, interval: float = 0.25) -> Any:
    """Poll `check` until it returns something truthy; fail naming `what` and the last value."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(interval)
    pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}; last value: {last!r}")


@pytest.fixture(scope="session")
def cluster(tmp_path_factory: pytest.TempPathFactory):
    plane = ControlPlane.start(tmp_path_factory.mktemp("cluster"))
    try:
        _prepare(plane)
    except BaseException:
        plane.stop()
        raise
    yield plane
    plane.stop()


def _prepare(plane: ControlPlane) -> None:
    # Volumes for checkpoint claims (no provisioner in the test cluster): claims bind to these,
    # a multi-node trainer's ReadWriteMany claim too (kwok mounts nothing).
    volumes = [
        {
            "apiVersion": "v1",
            "kind": "PersistentVolume",
            "metadata": {"name": f"test-volume-{i}"},
            "spec": {"capacity": {"storage": "100Gi"}, "accessModes": ["ReadWriteOnce", "ReadWriteMany"], "hostPath": {"path": f"/tmp/test-volume-{i}"}},
        }
        for i in range(12)
    ]
    plane.apply_objects(volumes)
    plane.start_jobset()  # queued RFTJobs run as JobSets


class OperatorProcess:
    """`kuberft operator` run as its own process against the test cluster."""

    def __init__(self, cluster: ControlPlane, log: Path, identity: str, lease_name: str, extra: tuple[str, ...] = (), kubeconfig: Optional[Path] = None):
        self.cluster = cluster
        self.kubeconfig = kubeconfig  # whose credentials it uses: the cluster admin's by default
        self.log = log
        self.identity = identity
        self.lease_name = lease_name
        self.metrics_port = free_port()
        self.extra = extra
        self.popen: Optional[subprocess.Popen] = None

    def start(self) -> "OperatorProcess":
        handle = self.log.open("ab")
        self.popen = subprocess.Popen(
            [
                sys.executable, "-m", "kuberft_operator.cli", "operator",
                "--metrics-port", str(self.metrics_port),
                "--lease-namespace", "default", "--lease-name", self.lease_name,
                "--lease-duration", "4", "--renew-period", "1",
                "--identity", self.identity,
                "--image-registry", "registry.test/kuberft", "--image-tag", "e2e",
                *self.extra,
            ],
            stdout=handle, stderr=subprocess.STDOUT, env=self._env(), cwd=REPO, preexec_fn=die_with_parent,
        )
        handle.close()
        return self

    def _env(self) -> dict[str, str]:
        env = self.cluster.env()
        if self.kubeconfig:
            env["KUBECONFIG"] = str(self.kubeconfig)
        return env

    def metrics(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5) as response:
            return response.read().decode()

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/healthz", timeout=1) as response:
                return response.status == 200
        except OSError:
            return False

    def kill(self) -> None:
        """SIGKILL: no clean-up, no lease release (a crash)."""
        if self.popen and self.popen.poll() is None:
            self.popen.send_signal(signal.SIGKILL)
            self.popen.wait()

    def stop(self) -> int:
        if self.popen is None:
            return 0
        if self.popen.poll() is None:
            self.popen.terminate()
            try:
                self.popen.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
        return self.popen.returncode

    def tail(self, lines: int = 40) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])


@pytest.fixture
def start_operator(cluster: ControlPlane, tmp_path: Path):
    """Start operator processes (each test gets its own Lease, so tests do not share a leader)."""
    started: list[OperatorProcess] = []
    lease = f"kuberft-e2e-{uuid.uuid4().hex[:8]}"

    def start(identity: str = "op-a", *extra: str, kubeconfig: Optional[Path] = None) -> OperatorProcess:
        process = OperatorProcess(cluster, tmp_path / f"operator-{identity}.log", identity, lease, extra, kubeconfig).start()
        started.append(process)
        wait_for(lambda: process.healthy() or process.popen.poll() is not None, 30, f"operator {identity} to serve /healthz")
        if process.popen.poll() is not None:
            pytest.fail(f"operator {identity} exited with {process.popen.returncode}:\n{process.tail()}")
        return process

    yield start
    for process in started:
        process.stop()


@pytest.fixture
def operator(start_operator):
    return start_operator("op-a")


@pytest.fixture
def namespace(cluster: ControlPlane):
    name = f"e2e-{uuid.uuid4().hex[:8]}"
    cluster.kubectl("create", "namespace", name)
    # The default ServiceAccount appears through the controller-manager; pods need it.
    wait_for(lambda: cluster.kubectl("get", "serviceaccount", "default", "-n", name, check=False).returncode == 0, 30, "the default ServiceAccount")
    yield name
    cluster.kubectl("delete", "namespace", name, "--wait=false", check=False)


KUEUE = "sigs.k8s.io/kueue@v0.17.0"


def install_kueue_crds(cluster: ControlPlane) -> None:
    """Kueue's LocalQueue CRD, from its Go module (no Kueue controller runs here)."""
    result = subprocess.run(["go", "mod", "download", "-json", KUEUE], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"go mod download {KUEUE} failed:\n{result.stdout}{result.stderr}"
    crd = Path(json.loads(result.stdout)["Dir"]) / "config" / "components" / "crd" / "bases" / "kueue.x-k8s.io_localqueues.yaml"
    cluster.kubectl("apply", "--server-side", "-f", str(crd))
    cluster.kubectl("wait", "--for=condition=Established", "--timeout=60s", "crd/localqueues.kueue.x-k8s.io")


def kueue_local_queue(cluster: ControlPlane, namespace: str, name: str) -> None:
    """A LocalQueue named `name` in `namespace`."""
    install_kueue_crds(cluster)
    queue = {"apiVersion": "kueue.x-k8s.io/v1beta2", "kind": "LocalQueue", "metadata": {"name": name, "namespace": namespace},
             "spec": {"clusterQueue": "cluster-gpus"}}
    cluster.kubectl("apply", "-f", "-", input=json.dumps(queue))
