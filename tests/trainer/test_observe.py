"""What the trainer shows the outside: /metrics and /healthz, and the RFTJob status patches."""

from __future__ import annotations

import urllib.error
import urllib.request

import pytest

from kuberft_core.metrics import component_metrics
from kuberft_trainer.observe import JobStatusReporter, MetricsServer


def test_metrics_and_healthz_are_served():
    metrics = component_metrics("trainer")
    metrics.step.labels("demo").set(7)
    server = MetricsServer(metrics, 0, host="127.0.0.1").start()
    try:
        base = f"http://127.0.0.1:{server.port}"
        body = urllib.request.urlopen(f"{base}/metrics", timeout=5).read().decode()
        assert 'kuberft_trainer_step{rftjob="demo"} 7.0' in body
        assert urllib.request.urlopen(f"{base}/healthz", timeout=5).read() == b"ok\n"
        with pytest.raises(urllib.error.HTTPError) as error:
            urllib.request.urlopen(f"{base}/nope", timeout=5)
        assert error.value.code == 404
    finally:
        server.close()


class FakeCustomObjects:
    def __init__(self, fail: bool = False):
        self.calls = []
        self.fail = fail

    def patch_namespaced_custom_object_status(self, group, version, namespace, plural, name, body):
        if self.fail:
            raise RuntimeError("forbidden")
        self.calls.append((group, version, namespace, plural, name, body))


def test_status_patches_name_the_job_and_carry_progress_and_rewards():
    api = FakeCustomObjects()
    reporter = JobStatusReporter("countdown", "team-a", api)
    reporter.running(total_steps=60, step=0)
    reporter.step(12, 60, {"countdown": 0.41234567}, 0.41234567)
    reporter.finished("/checkpoints/countdown/adapter")
    group, version, namespace, plural, name, body = api.calls[1]
    assert (group, version, namespace, plural, name) == ("kuberft.io", "v1alpha1", "team-a", "rftjobs", "countdown")
    assert body == {"status": {"step": 12, "totalSteps": 60, "progress": "12/60", "rewards": {"countdown": 0.412346}, "meanReward": 0.412346}}
    first = api.calls[0][-1]["status"]
    assert first["phase"] == "Running" and first["progress"] == "0/60" and first["startTime"].endswith("Z")
    assert api.calls[2][-1] == {"status": {"adapter": "/checkpoints/countdown/adapter"}}


def test_a_restart_keeps_the_first_start_time():
    api = FakeCustomObjects()
    JobStatusReporter("j", "ns", api).running(total_steps=60, step=20)
    assert "startTime" not in api.calls[0][-1]["status"]


def test_a_failed_status_patch_is_logged_and_training_goes_on(caplog):
    reporter = JobStatusReporter("j", "ns", FakeCustomObjects(fail=True))
    assert reporter.step(1, 2, {}, None) is False
    assert "cannot patch the status of RFTJob ns/j: forbidden" in caplog.text


def test_no_reporter_outside_a_cluster(monkeypatch):
    monkeypatch.delenv("KUBERFT_JOB_NAME", raising=False)
    assert JobStatusReporter.from_environment() is None
