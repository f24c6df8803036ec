"""What the trainer shows the outside: /metrics and /healthz (its progress report: test_report.py)."""

from __future__ import annotations

import urllib.error
import urllib.request

import pytest

from kuberft_core.metrics import component_metrics
from kuberft_core.probes import MetricsServer


def test_metrics_and_healthz_are_served():
    metrics = component_metrics("trainer")
    metrics.step.labels("demo").set(7)
    server = MetricsServer(metrics, 0, host="127.0.0.1").start()
    try:
        base = f"http://127.0.0.1:{server.port}"
        body = urllib.request.urlopen(f"{base}/metrics", timeout=5).read().decode()
        assert 'kuberft_trainer_step{rftjob="demo"} 7.0' in body
        assert urllib.request.urlopen(f"{base}/healthz", timeout=5).read() == b'{"status": "ok"}\n'
        with pytest.raises(urllib.error.HTTPError) as error:
            urllib.request.urlopen(f"{base}/nope", timeout=5)
        assert error.value.code == 404
    finally:
        server.close()

