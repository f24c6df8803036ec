"""A real Kubernetes control plane on loopback for the operator's end-to-end tests and benchmark.

etcd + kube-apiserver + kube-controller-manager (Jobs make Pods, Deployments make ReplicaSets,
garbage collection, namespace deletion) + kube-scheduler + kwok (fake nodes whose pods move
through Running to Succeeded/Failed), all built from Go modules by `tests/cluster/build.sh`.
Authentication is a static admin token; the API server serves a self-signed certificate.

    with ControlPlane.start(workdir) as cluster:
        cluster.kubectl("get", "nodes")

If a binary cannot be built or a component does not come up, `start` raises with the tail of
that component's log: the tests that need a cluster fail loudly, they never skip.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import os
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
BUILD_SCRIPT = HERE / "build.sh"
JOBSET_BUILD_SCRIPT = HERE / "build-jobset.sh"
STAGES = HERE / "kwok-stages.yaml"
AUDIT_POLICY = """\
apiVersion: audit.k8s.io/v1
kind: Policy
omitStages: [RequestReceived]
rules:
  - level: Metadata
    userGroups: ["system:serviceaccounts"]
  - level: None
"""

# Fake nodes: CPU nodes for reward and serving pods, tainted GPU nodes for trainers.
CPU_NODES = 2
GPU_NODES = 2
GPUS_PER_NODE = 8


class ControlPlaneError(RuntimeError):
    pass


def build_binaries(script: Path = BUILD_SCRIPT) -> Path:
    """The directory of the built binaries, building them first if they are missing (cached)."""
    result = subprocess.run(["bash", str(script)], capture_output=True, text=True)
    if result.returncode != 0:
        raise ControlPlaneError(f"tests/cluster/{script.name} failed (exit {result.returncode}):\n{result.stderr[-4000:]}")
    return Path(result.stdout.strip().splitlines()[-1])


def die_with_parent() -> None:
    """Runs in the child before exec: SIGTERM it when the test process dies, even by SIGKILL,
    so a killed test run leaves no control plane behind."""
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


PR_SET_PDEATHSIG = 1


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def kubectl_binary() -> str:
    # The repository's kubectl (scripts/install-tools.sh) first: its version is the one we test with.
    repo_tool = REPO / ".tools" / "bin" / "kubectl"
    found = str(repo_tool) if repo_tool.exists() else shutil.which("kubectl")
    if not found:
        raise ControlPlaneError("kubectl not found: run `make tools` (scripts/install-tools.sh)")
    return found


@dataclass
class Process:
    name: str
    popen: subprocess.Popen
    log: Path

    def tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


@dataclass
class ControlPlane:
    workdir: Path
    bin_dir: Path
    server: str = ""
    token: str = ""
    kubeconfig: Path = field(init=False)
    audit_log: Path = field(init=False)
    processes: list[Process] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.kubeconfig = self.workdir / "kubeconfig"
        self.audit_log = self.workdir / "audit.log"

    # ------------------------------------------------------------------ lifecycle

    @classmethod
    def start(cls, workdir: Path, bin_dir: Optional[Path] = None) -> "ControlPlane":
        workdir.mkdir(parents=True, exist_ok=True)
        plane = cls(workdir=workdir, bin_dir=bin_dir or build_binaries())
        try:
            plane._start()
        except BaseException:
            plane.stop()
            raise
        return plane

    def __enter__(self) -> "ControlPlane":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def _spawn(self, name: str, args: list[str], env: Optional[dict[str, str]] = None) -> Process:
        log = self.workdir / f"{name}.log"
        handle = log.open("wb")
        popen = subprocess.Popen(
            args, stdout=handle, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True, preexec_fn=die_with_parent, env=env,
        )
        handle.close()
        process = Process(name, popen, log)
        self.processes.append(process)
        return process

    def _start(self) -> None:
        pki = self.workdir / "pki"
        pki.mkdir(exist_ok=True)
        if shutil.which("openssl") is None:
            raise ControlPlaneError("openssl is needed to make the service-account signing key")
        sa_key, sa_pub = pki / "sa.key", pki / "sa.pub"
        subprocess.run(["openssl", "genrsa", "-out", str(sa_key), "2048"], check=True, capture_output=True)
        subprocess.run(["openssl", "rsa", "-in", str(sa_key), "-pubout", "-out", str(sa_pub)], check=True, capture_output=True)
        self.token = secrets.token_hex(16)
        tokens = pki / "tokens.csv"
        tokens.write_text(f'{self.token},kuberft-admin,kuberft-admin,"system:masters"\n')

        # What every ServiceAccount asks of the API server (verb, resource, user), one JSON line per
        # request: tests compare what the operator's account used with what its RBAC grants.
        audit_policy = self.workdir / "audit-policy.yaml"
        audit_policy.write_text(AUDIT_POLICY)

        etcd_port, etcd_peer, api_port = free_port(), free_port(), free_port()
        etcd = self._spawn(
            "etcd",
            [
                str(self.bin_dir / "etcd"),
                "--name=default",
                f"--data-dir={self.workdir / 'etcd'}",
                f"--listen-client-urls=http://127.0.0.1:{etcd_port}",
                f"--advertise-client-urls=http://127.0.0.1:{etcd_port}",
                f"--listen-peer-urls=http://127.0.0.1:{etcd_peer}",
                f"--initial-advertise-peer-urls=http://127.0.0.1:{etcd_peer}",
                f"--initial-cluster=default=http://127.0.0.1:{etcd_peer}",
                "--unsafe-no-fsync=true",
                "--quota-backend-bytes=4294967296",
                "--log-level=warn",
            ],
        )
        self._wait(etcd, lambda: self._http_ok(f"http://127.0.0.1:{etcd_port}/health"), 30)

        self.server = f"https://127.0.0.1:{api_port}"
        apiserver = self._spawn(
            "kube-apiserver",
            [
                str(self.bin_dir / "kube-apiserver"),
                f"--etcd-servers=http://127.0.0.1:{etcd_port}",
                f"--cert-dir={pki}",
                f"--secure-port={api_port}",
                "--bind-address=127.0.0.1",
                "--advertise-address=127.0.0.1",
                "--service-cluster-ip-range=10.96.0.0/16",
                "--authorization-mode=RBAC",
                f"--token-auth-file={tokens}",
                "--allow-privileged=true",
                "--service-account-issuer=https://kubernetes.default.svc",
                f"--service-account-key-file={sa_pub}",
                f"--service-account-signing-key-file={sa_key}",
                "--max-requests-inflight=2000",
                "--max-mutating-requests-inflight=1000",
                "--enable-priority-and-fairness=false",
                "--event-ttl=1h",
                f"--audit-policy-file={audit_policy}",
                f"--audit-log-path={self.audit_log}",
                "--audit-log-mode=batch",
                "--audit-log-batch-max-wait=1s",
                "--v=1",
            ],
        )
        self._wait(apiserver, lambda: self._http_ok(f"{self.server}/readyz", token=self.token), 120)
        self._write_kubeconfig()

        root_ca = pki / "apiserver.crt"
        self._spawn(
            "kube-controller-manager",
            [
                str(self.bin_dir / "kube-controller-manager"),
                f"--kubeconfig={self.kubeconfig}",
                f"--authentication-kubeconfig={self.kubeconfig}",
                f"--authorization-kubeconfig={self.kubeconfig}",
                "--leader-elect=false",
                "--bind-address=127.0.0.1",
                f"--secure-port={free_port()}",
                f"--service-account-private-key-file={sa_key}",
                f"--root-ca-file={root_ca}",
                "--use-service-account-credentials=false",
                "--kube-api-qps=500",
                "--kube-api-burst=1000",
                "--concurrent-deployment-syncs=20",
                "--concurrent-replicaset-syncs=20",
                "--concurrent-job-syncs=20",
                "--concurrent-gc-syncs=40",
                "--concurrent-namespace-syncs=10",
                "--v=1",
            ],
        )
        scheduler_config = self.workdir / "scheduler.yaml"
        scheduler_config.write_text(
            "apiVersion: kubescheduler.config.k8s.io/v1\nkind: KubeSchedulerConfiguration\n"
            f"clientConnection:\n  kubeconfig: {self.kubeconfig}\n  qps: 500\n  burst: 1000\n"
            "leaderElection:\n  leaderElect: false\n"
        )
        self._spawn(
            "kube-scheduler",
            [
                str(self.bin_dir / "kube-scheduler"),
                f"--config={scheduler_config}",
                f"--authentication-kubeconfig={self.kubeconfig}",
                f"--authorization-kubeconfig={self.kubeconfig}",
                "--bind-address=127.0.0.1",
                f"--secure-port={free_port()}",
                "--v=1",
            ],
        )
        self._spawn(
            "kwok",
            [
                str(self.bin_dir / "kwok"),
                f"--kubeconfig={self.kubeconfig}",
                "--manage-all-nodes=false",
                "--manage-nodes-with-annotation-selector=kwok.x-k8s.io/node=fake",
                "--cidr=10.244.0.0/16",
                "--node-ip=10.0.0.1",
                f"--server-address=127.0.0.1:{free_port()}",
                f"--config={STAGES}",
            ],
        )
        self._create_nodes()
        self.kubectl("apply", "--server-side", "-f", str(REPO / "crds"))
        self.kubectl("wait", "--for=condition=Established", "--timeout=60s", "crd/rftjobs.kuberft.io", "crd/turbodeployments.kuberft.io")
        self._wait_kinds_served(("rftjob", "turbodeployment"), 60)
        self._wait_nodes_ready(60)
        self._check_alive()

    def stop(self) -> None:
        for process in reversed(self.processes):
            if process.popen.poll() is None:
                process.popen.terminate()
        deadline = time.monotonic() + 15
        for process in reversed(self.processes):
            try:
                process.popen.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.popen.kill()
                process.popen.wait()
        self.processes.clear()

    def start_jobset(self) -> None:
        """The JobSet CRD and controller (sigs.k8s.io/jobset, built by build-jobset.sh), which a
        queued RFTJob's trainer and reward pool run under. Its admission webhooks are not
        registered: the operator states every field they would default."""
        bin_dir = build_binaries(JOBSET_BUILD_SCRIPT)
        self.kubectl("apply", "--server-side", "-f", str(bin_dir / "jobset-crd.yaml"))
        self._wait_established("jobsets.jobset.x-k8s.io")
        certs = self.workdir / "jobset-certs"  # its webhook server starts with the manager, so it needs a certificate
        certs.mkdir(exist_ok=True)
        subprocess.run(
            ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=jobset-webhook",
             "-keyout", str(certs / "tls.key"), "-out", str(certs / "tls.crt")],
            check=True, capture_output=True,
        )
        health = free_port()
        config = self.workdir / "jobset-config.yaml"
        config.write_text(json.dumps({
            "apiVersion": "config.jobset.x-k8s.io/v1alpha1",
            "kind": "Configuration",
            "internalCertManagement": {"enable": False},
            "leaderElection": {"leaderElect": False},
            "webhook": {"port": free_port(), "host": "127.0.0.1", "certDir": str(certs)},
            "clientConnection": {"qps": 200, "burst": 400},
        }))
        env = dict(os.environ, KUBECONFIG=str(self.kubeconfig))
        controller = self._spawn(
            "jobset-controller",
            [str(bin_dir / "jobset-controller"), f"--config={config}", "--metrics-bind-address=0", f"--health-probe-bind-address=127.0.0.1:{health}"],
            env=env,
        )
        self._wait(controller, lambda: self._http_ok(f"http://127.0.0.1:{health}/readyz"), 60)

    # ------------------------------------------------------------------ helpers

    def _wait_established(self, crd: str, timeout: float = 60) -> None:
        """`kubectl wait` fails outright on a CRD that has no conditions yet; this waits."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            conditions = (self.get_json("crd", crd).get("status") or {}).get("conditions") or []
            if any(c["type"] == "Established" and c["status"] == "True" for c in conditions):
                return
            time.sleep(0.2)
        raise ControlPlaneError(f"CRD {crd} was not Established within {timeout:.0f}s")

    def _http_ok(self, url: str, token: Optional[str] = None) -> bool:
        request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
        context = ssl._create_unverified_context() if url.startswith("https") else None
        try:
            with urllib.request.urlopen(request, timeout=2, context=context) as response:
                return response.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def _wait(self, process: Process, ready, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if process.popen.poll() is not None:
                raise ControlPlaneError(f"{process.name} exited with {process.popen.returncode}:\n{process.tail()}")
            if ready():
                return
            time.sleep(0.2)
        raise ControlPlaneError(f"{process.name} was not ready after {timeout:.0f}s:\n{process.tail()}")

    def _check_alive(self) -> None:
        for process in self.processes:
            if process.popen.poll() is not None:
                raise ControlPlaneError(f"{process.name} exited with {process.popen.returncode}:\n{process.tail()}")

    def _write_kubeconfig(self) -> None:
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "kuberft-test", "cluster": {"server": self.server, "insecure-skip-tls-verify": True}}],
            "users": [{"name": "admin", "user": {"token": self.token}}],
            "contexts": [{"name": "kuberft-test", "context": {"cluster": "kuberft-test", "user": "admin", "namespace": "default"}}],
            "current-context": "kuberft-test",
        }
        self.kubeconfig.write_text(json.dumps(config, indent=2))

    def env(self) -> dict[str, str]:
        """Environment for a process that should talk to this cluster (kubectl, the operator)."""
        env = dict(os.environ)
        env["KUBECONFIG"] = str(self.kubeconfig)
        tools = str(REPO / ".tools" / "bin")
        env["PATH"] = f"{tools}:{env.get('PATH', '')}"
        return env

    def kubectl(self, *args: str, input: Optional[str] = None, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
        result = subprocess.run([kubectl_binary(), *args], input=input, capture_output=True, text=True, env=self.env(), timeout=timeout)
        if check and result.returncode != 0:
            raise ControlPlaneError(f"kubectl {' '.join(args)} failed ({result.returncode}): {result.stderr.strip()}")
        return result

    def apply_objects(self, objects: list[dict[str, Any]], *args: str) -> None:
        """`kubectl apply` of several objects at once (as one v1 List)."""
        self.kubectl("apply", *args, "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "List", "items": objects}))

    def service_account_kubeconfig(self, namespace: str, account: str, path: Path) -> Path:
        """A kubeconfig holding a one-hour token of ServiceAccount `namespace/account`."""
        token = self.kubectl("create", "token", account, "-n", namespace, "--duration=1h").stdout.strip()
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "kuberft-test", "cluster": {"server": self.server, "insecure-skip-tls-verify": True}}],
            "users": [{"name": account, "user": {"token": token}}],
            "contexts": [{"name": "kuberft-test", "context": {"cluster": "kuberft-test", "user": account, "namespace": namespace}}],
            "current-context": "kuberft-test",
        }
        path.write_text(json.dumps(config, indent=2))
        return path

    def audit_events(self, username: str) -> list[dict[str, Any]]:
        """The API server's audit events of one ServiceAccount user (`system:serviceaccount:NS:NAME`),
        one per request: its last stage so far (a watch is only ResponseStarted until it ends).
        The log is written in batches, at most a second apart."""
        if not self.audit_log.exists():
            return []
        requests: dict[str, dict[str, Any]] = {}
        for line in self.audit_log.read_text().splitlines():
            event = json.loads(line)
            if event.get("user", {}).get("username") == username:
                requests[event["auditID"]] = event
        return list(requests.values())

    def get_json(self, *args: str) -> Any:
        return json.loads(self.kubectl("get", "-o", "json", *args).stdout)

    def _create_nodes(self) -> None:
        nodes = []
        for i in range(CPU_NODES):
            nodes.append(self._node(f"kwok-cpu-{i}", {"kuberft.io/pool": "cpu"}, {}, []))
        for i in range(GPU_NODES):
            nodes.append(
                self._node(
                    f"kwok-gpu-{i}",
                    {"kuberft.io/pool": "gpu", "nvidia.com/gpu.present": "true"},
                    {"nvidia.com/gpu": str(GPUS_PER_NODE)},
                    # One tainted GPU node (trainers tolerate it), one open to any GPU pod.
                    [{"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"}] if i == 0 else [],
                )
            )
        self.apply_objects(nodes)

    @staticmethod
    def _node(name: str, labels: dict[str, str], extra: dict[str, str], taints: list[dict[str, str]]) -> dict[str, Any]:
        capacity = {"cpu": "256", "memory": "2Ti", "pods": "2000", **extra}
        return {
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {
                "name": name,
                "annotations": {"kwok.x-k8s.io/node": "fake", "node.alpha.kubernetes.io/ttl": "0"},
                "labels": {"kubernetes.io/hostname": name, "kubernetes.io/os": "linux", "kubernetes.io/arch": "amd64", "type": "kwok", **labels},
            },
            "spec": {"taints": taints},
            "status": {"capacity": capacity, "allocatable": capacity},
        }

    def _wait_kinds_served(self, kinds: tuple[str, ...], timeout: float) -> None:
        """Established CRDs reach discovery and the OpenAPI document a moment later; until then
        `kubectl explain` and kind lookups fail with "couldn't find resource"."""
        deadline = time.monotonic() + timeout
        while True:
            pending = [k for k in kinds if self.kubectl("explain", k, check=False).returncode != 0]
            if not pending:
                return
            if time.monotonic() > deadline:
                raise ControlPlaneError(f"the API server did not serve {', '.join(pending)} within {timeout:.0f}s of Established")
            self._check_alive()
            time.sleep(0.5)

    def _wait_nodes_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            nodes = self.get_json("nodes")["items"]
            ready = [
                n for n in nodes if any(c["type"] == "Ready" and c["status"] == "True" for c in (n.get("status") or {}).get("conditions") or [])
            ]
            if nodes and len(ready) == len(nodes):
                return
            self._check_alive()
            time.sleep(0.5)
        raise ControlPlaneError(f"kwok did not make the fake nodes Ready in {timeout:.0f}s:\n{self.processes[-1].tail()}")
