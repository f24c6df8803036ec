"""Every dashboard panel returns data from a real Prometheus scraping real kuberft processes.

The test starts, on loopback: a reward pool (`kuberft reward serve`), a local training run
(`kuberft train` against that pool), a server (`kuberft serve` with n-gram speculation) and the
operator (`kuberft operator` on the test control plane, reconciling an RFTJob and a
TurboDeployment), plus Debian's Prometheus scraping all four every second. It keeps traffic
flowing (reward batches with timeouts, reward hacks and malformed requests; completions) and
then runs every PromQL expression of every panel of every dashboard through Prometheus's HTTP
API, the way Grafana sends it, asserting each returns at least one finite sample.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from contextlib import ExitStack
from pathlib import Path
from typing import Any, Optional

import pytest
import yaml

from tests.cluster.controlplane import free_port
from tests.operator.conftest import OperatorProcess, cluster, wait_for  # noqa: F401 - the session control plane

from .dashboards import REPO, panel_queries, variable_queries
from .promql import label_values_query, metric_names, substitute_grafana_variables

pytestmark = [pytest.mark.slow, pytest.mark.cluster]

JOB_NAME = "dashboards-e2e"
# Grafana's $__rate_interval is at least four scrape intervals; one minute also covers the
# slowest traffic below (a reward batch every few seconds).
RATE_INTERVAL = "1m"
TRAINING_JOB = {
    "apiVersion": "kuberft.io/v1alpha1",
    "kind": "RFTJob",
    "metadata": {"name": JOB_NAME},
    "spec": {
        "model": {"name": "tiny:random"},
        "lora": {"r": 4, "alpha": 8},
        "dataset": {"builtin": {"name": "countdown", "size": 64, "seed": 0}, "useChatTemplate": False},
        "rewards": [{"kind": "countdown"}],
        "grpo": {"steps": 10000, "promptsPerStep": 2, "numGenerations": 4, "maxCompletionLength": 12, "seed": 0},
        "checkpoint": {"everySteps": 10000},
    },
}
OPERATOR_JOB = {
    "apiVersion": "kuberft.io/v1alpha1",
    "kind": "RFTJob",
    "metadata": {"name": "observed"},
    "spec": {
        "model": {"name": "tiny:countdown"},
        "dataset": {"builtin": {"name": "countdown", "size": 16}},
        "rewards": [{"kind": "countdown"}],
        "grpo": {"steps": 10},
    },
}
OPERATOR_TURBO = {
    "apiVersion": "kuberft.io/v1alpha1",
    "kind": "TurboDeployment",
    "metadata": {"name": "observed"},
    "spec": {"model": {"name": "tiny:countdown"}, "adapter": {"fromRFTJob": "observed"}, "speculator": {"type": "ngram"}},
}
# Reward batches that end in every way the Reward pool dashboard shows.
HACK = "<triton>\nimport os\nos.system('true')\n</triton>"
SPIN = "<triton>\nimport triton\nwhile True:\n    pass\n</triton>"
REWARD_BATCH = {
    "items": [
        {"completion": "<answer>(25 - 7) * 3 - 8</answer>", "row": {"numbers": [3, 7, 25], "target": 46}},
        {"completion": "<answer>25 + 7 + 3</answer>", "row": {"numbers": [3, 7, 25], "target": 35}},
    ],
    "rewards": [{"kind": "countdown"}],
}
KERNEL_BATCH = {
    "items": [{"completion": HACK, "row": {"task": "relu"}}, {"completion": SPIN, "row": {"task": "relu"}}],
    "rewards": [{"kind": "triton.format"}, {"kind": "triton.compile"}],
}


def _kuberft(*args: str) -> list[str]:
    return [sys.executable, "-m", "kuberft_operator.cli", *args]


def _http(url: str, body: Optional[dict] = None, timeout: float = 30) -> tuple[int, Any]:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            text = response.read().decode()
            return response.status, json.loads(text) if text.startswith(("{", "[")) else text
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()
    except OSError as error:
        return 0, str(error)


class Processes:
    """Background processes of one test module, each logging to its own file."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.running: list[tuple[str, subprocess.Popen]] = []

    def start(self, name: str, command: list[str], env: Optional[dict[str, str]] = None) -> subprocess.Popen:
        with (self.folder / f"{name}.log").open("wb") as log:
            popen = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=REPO, env=env)
        self.running.append((name, popen))
        return popen

    def log(self, name: str) -> str:
        return (self.folder / f"{name}.log").read_text(errors="replace")[-4000:]

    def check_alive(self) -> None:
        for name, popen in self.running:
            if popen.poll() is not None:
                pytest.fail(f"{name} exited with {popen.returncode}:\n{self.log(name)}")

    def stop(self) -> None:
        for _, popen in reversed(self.running):
            if popen.poll() is None:
                popen.terminate()
        for _, popen in reversed(self.running):
            try:
                popen.wait(timeout=30)
            except subprocess.TimeoutExpired:
                popen.kill()
                popen.wait()


class Traffic:
    """Keeps requests flowing to the reward pool and the server, and changes to the operator's
    RFTJob (each one a reconcile), until stopped."""

    def __init__(self, reward_url: str, serve_url: str, model: str, touch_rftjob):
        self.reward_url, self.serve_url, self.model = reward_url, serve_url, model
        self.touch_rftjob = touch_rftjob
        self.stopping = threading.Event()
        self.errors: list[str] = []
        self.threads = [threading.Thread(target=target, daemon=True) for target in (self._reward, self._serve, self._operator)]

    def _reward(self) -> None:
        while not self.stopping.is_set():
            for body in (REWARD_BATCH, KERNEL_BATCH, {"items": []}):  # the last one is a 400
                _http(f"{self.reward_url}/v1/evaluate", body, timeout=120)
            self.stopping.wait(1)

    def _serve(self) -> None:
        prompts = ["abcabcabcabcabc", "a b a b a b a b", "hello hello hello hello"]
        while not self.stopping.is_set():
            for prompt in prompts:
                status, answer = _http(f"{self.serve_url}/v1/completions", {"model": self.model, "prompt": prompt, "max_tokens": 24, "temperature": 0})
                if status != 200:
                    self.errors.append(f"completion {status}: {answer}")
            self.stopping.wait(0.5)

    def _operator(self) -> None:
        count = 0
        while not self.stopping.is_set():
            count += 1
            self.touch_rftjob(count)
            self.stopping.wait(2)

    def __enter__(self) -> "Traffic":
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stopping.set()
        for thread in self.threads:
            thread.join(timeout=150)


class Prometheus:
    def __init__(self, url: str):
        self.url = url

    def query(self, expr: str) -> list[dict[str, Any]]:
        status, answer = _http(f"{self.url}/api/v1/query?{urllib.parse.urlencode({'query': expr})}")
        assert status == 200 and answer["status"] == "success", f"Prometheus refused {expr!r}: {answer}"
        return answer["data"]["result"]

    def label_values(self, label: str, series: str) -> list[str]:
        params = urllib.parse.urlencode({"match[]": series})
        status, answer = _http(f"{self.url}/api/v1/label/{label}/values?{params}")
        assert status == 200, answer
        return answer["data"]

    def targets(self) -> dict[str, str]:
        status, answer = _http(f"{self.url}/api/v1/targets")
        assert status == 200, answer
        return {t["labels"]["job"]: t["health"] for t in answer["data"]["activeTargets"]}


def _finite(result: list[dict[str, Any]]) -> bool:
    return any(math.isfinite(float(sample["value"][1])) for sample in result)


@pytest.fixture(scope="module")
def stack(cluster, tmp_path_factory):  # noqa: F811 - the fixture imported above
    prometheus_binary = shutil.which("prometheus") or str(REPO / ".tools" / "bin" / "prometheus")
    assert Path(prometheus_binary).exists(), "prometheus not found: run `make tools` (scripts/install-tools.sh)"
    folder = tmp_path_factory.mktemp("observability")
    processes = Processes(folder)
    ports = {name: free_port() for name in ("reward-pool", "trainer", "serve", "prometheus")}
    with ExitStack() as stack:
        stack.callback(processes.stop)
        reward_url = f"http://127.0.0.1:{ports['reward-pool']}"
        processes.start("reward-pool", _kuberft("reward", "serve", "--host", "127.0.0.1", "--port", str(ports["reward-pool"]), "--workers", "2", "--timeout", "3"))
        serve_url = f"http://127.0.0.1:{ports['serve']}"
        processes.start("serve", _kuberft("serve", "--model", "tiny:random", "--speculator", "ngram", "--num-speculative-tokens", "3", "--host", "127.0.0.1", "--port", str(ports["serve"])))

        operator = OperatorProcess(cluster, folder / "operator.log", "dashboards", f"kuberft-dashboards-{ports['prometheus']}")
        operator.start()
        stack.callback(operator.stop)
        namespace = f"dashboards-{ports['prometheus']}"
        cluster.kubectl("create", "namespace", namespace)
        for manifest in (OPERATOR_JOB, OPERATOR_TURBO):
            cluster.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(manifest))
        stack.callback(lambda: cluster.kubectl("delete", "namespace", namespace, "--wait=false", check=False))

        config = folder / "prometheus.yml"
        config.write_text(
            yaml.safe_dump(
                {
                    "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
                    "scrape_configs": [
                        {"job_name": job, "static_configs": [{"targets": [f"127.0.0.1:{port}"]}]}
                        for job, port in [
                            ("reward-pool", ports["reward-pool"]),
                            ("trainer", ports["trainer"]),
                            ("serve", ports["serve"]),
                            ("operator", operator.metrics_port),
                        ]
                    ],
                }
            )
        )
        processes.start(
            "prometheus",
            [
                prometheus_binary, f"--config.file={config}", f"--storage.tsdb.path={folder / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{ports['prometheus']}", "--log.level=warn",
            ],
        )
        prometheus = Prometheus(f"http://127.0.0.1:{ports['prometheus']}")

        def healthy(url: str) -> bool:
            processes.check_alive()
            return _http(url, timeout=2)[0] == 200

        wait_for(lambda: healthy(f"{reward_url}/healthz"), 180, "the reward pool")
        job_file = folder / "job.yaml"
        job_file.write_text(yaml.safe_dump(TRAINING_JOB))
        processes.start(
            "trainer",
            _kuberft("train", "--config", str(job_file), "--output", str(folder / "run"), "--reward-url", reward_url,
                     "--metrics-port", str(ports["trainer"]), "--no-progress"),
        )
        wait_for(lambda: healthy(f"{serve_url}/healthz"), 300, "the server")
        wait_for(lambda: healthy(f"{prometheus.url}/-/ready"), 60, "Prometheus")
        [model] = [m["id"] for m in _http(f"{serve_url}/v1/models")[1]["data"]][:1]
        def touch_rftjob(count: int) -> None:
            cluster.kubectl("annotate", "rftjob", "observed", "-n", namespace, f"example.com/touched={count}", "--overwrite", check=False)

        with Traffic(reward_url, serve_url, model, touch_rftjob) as traffic:
            wait_for(lambda: processes.check_alive() or set(prometheus.targets().values()) == {"up"}, 300, "every target up")
            # Optimizer steps scraped, so rates and the job variable have something to show.
            wait_for(
                lambda: processes.check_alive() or [r for r in prometheus.query(f'kuberft_trainer_step{{rftjob="{JOB_NAME}"}} >= 2')],
                600, "two training steps in Prometheus",
            )
            yield prometheus, processes
            assert not traffic.errors, traffic.errors[:3]


def test_the_training_job_variable_lists_the_running_job(stack):
    prometheus, _ = stack
    [(dashboard, name, query)] = variable_queries()
    series, label = label_values_query(query)
    assert (dashboard, name) == ("training.json", "job")
    assert JOB_NAME in prometheus.label_values(label, series)


def test_every_dashboard_panel_returns_data(stack):
    prometheus, processes = stack
    values = {"job": JOB_NAME, "__rate_interval": RATE_INTERVAL}
    pending = {q.where(): substitute_grafana_variables(q.expr, values) for q in panel_queries()}
    assert len(pending) >= 40
    deadline = time.monotonic() + 120
    while pending and time.monotonic() < deadline:
        processes.check_alive()
        for where, expr in list(pending.items()):
            if _finite(prometheus.query(expr)):
                del pending[where]
        if pending:
            time.sleep(2)
    empty = {where: {m: len(prometheus.query(m)) for m in sorted(metric_names(expr))} for where, expr in pending.items()}
    assert not empty, "panels without data (series -> samples now):\n" + "\n".join(f"{w}\n    {s}" for w, s in empty.items())
