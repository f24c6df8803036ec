"""The trainer's progress report: one JSON merge PATCH of its job's progress ConfigMap, with its
service-account token, sent to a local stand-in for the API server."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from kuberft_trainer.report import ProgressReporter


class FakeApiServer:
    """Records every request; answers `status` (200 with the object, or an error)."""

    def __init__(self, status: int = 200):
        self.requests: list[dict] = []
        self.status = status
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_PATCH(self):  # noqa: N802 - http.server's naming
                body = self.rfile.read(int(self.headers["Content-Length"]))
                fake.requests.append({"method": "PATCH", "path": self.path, "headers": dict(self.headers), "body": json.loads(body)})
                answer = json.dumps({"kind": "ConfigMap"} if fake.status == 200 else {"kind": "Status", "message": "configmaps is forbidden"}).encode()
                self.send_response(fake.status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def api():
    server = FakeApiServer()
    yield server
    server.close()


@pytest.fixture
def token(tmp_path):
    path = tmp_path / "token"
    path.write_text("trainer-token\n")
    return path


def test_each_report_is_a_merge_patch_of_the_jobs_progress_config_map_with_the_token(api, token):
    reporter = ProgressReporter("countdown", "team-a", api.url, token_file=token)
    assert reporter.running(total_steps=60, step=0)
    assert reporter.step(12, 60, {"countdown": 0.41234567, "format": float("nan")}, 0.41234567)
    assert reporter.finished()
    first, step, end = api.requests
    assert step["method"] == "PATCH"
    assert step["path"] == "/api/v1/namespaces/team-a/configmaps/countdown-progress"
    assert step["headers"]["Content-Type"] == "application/merge-patch+json"
    assert step["headers"]["Authorization"] == "Bearer trainer-token"
    # Strings (ConfigMap data); a reward with no finite mean is left out, never sent as NaN.
    assert step["body"] == {"data": {"step": "12", "totalSteps": "60", "rewards": '{"countdown":0.412346}', "meanReward": "0.412346"}}
    assert first["body"] == {"data": {"step": "0", "totalSteps": "60"}}
    # The end says only that the adapter is written; where it is, is the operator's to say.
    assert end["body"] == {"data": {"adapterWritten": "true"}}


def test_the_token_is_read_again_for_every_report(api, token):
    reporter = ProgressReporter("j", "ns", api.url, token_file=token)
    reporter.running(total_steps=2, step=0)
    token.write_text("rotated-token")
    reporter.step(1, 2, {}, None)
    assert [r["headers"]["Authorization"] for r in api.requests] == ["Bearer trainer-token", "Bearer rotated-token"]
    assert api.requests[1]["body"] == {"data": {"step": "1", "totalSteps": "2"}}


def test_a_refused_report_is_logged_and_training_goes_on(token, caplog):
    server = FakeApiServer(status=403)
    try:
        reporter = ProgressReporter("j", "ns", server.url, token_file=token)
        assert reporter.step(1, 2, {}, None) is False
    finally:
        server.close()
    assert "cannot report progress to ConfigMap ns/j-progress: HTTP 403" in caplog.text
    assert "configmaps is forbidden" in caplog.text


def test_an_unreachable_api_server_is_logged_and_training_goes_on(token, caplog):
    server = FakeApiServer()
    url = server.url
    server.close()
    assert ProgressReporter("j", "ns", url, token_file=token, timeout=2).finished() is False
    assert "cannot report progress to ConfigMap ns/j-progress" in caplog.text


def test_the_environment_names_the_job_and_the_api_server():
    assert ProgressReporter.from_environment({}) is None  # outside a cluster: no reports
    in_cluster = ProgressReporter.from_environment(
        {"KUBERFT_JOB_NAME": "countdown", "KUBERFT_JOB_NAMESPACE": "team-a", "KUBERNETES_SERVICE_HOST": "10.0.0.1", "KUBERNETES_SERVICE_PORT": "443"}
    )
    assert in_cluster.url == "https://10.0.0.1:443/api/v1/namespaces/team-a/configmaps/countdown-progress"
    ipv6 = ProgressReporter.from_environment({"KUBERFT_JOB_NAME": "j", "KUBERFT_JOB_NAMESPACE": "ns", "KUBERNETES_SERVICE_HOST": "fd00::1", "KUBERNETES_SERVICE_PORT": "6443"})
    assert ipv6.url == "https://[fd00::1]:6443/api/v1/namespaces/ns/configmaps/j-progress"
    pointed = ProgressReporter.from_environment({"KUBERFT_JOB_NAME": "j", "KUBERFT_JOB_NAMESPACE": "ns", "KUBERFT_API_SERVER": "http://127.0.0.1:9/"})
    assert pointed.url == "http://127.0.0.1:9/api/v1/namespaces/ns/configmaps/j-progress"
    assert ProgressReporter.from_environment({"KUBERFT_JOB_NAME": "j", "KUBERFT_JOB_NAMESPACE": "ns"}) is None


def test_a_trainer_pointed_at_the_api_server_by_environment_reports_there(api, token, monkeypatch):
    monkeypatch.setattr("kuberft_trainer.report.SERVICE_ACCOUNT_DIR", token.parent)
    reporter = ProgressReporter.from_environment({"KUBERFT_JOB_NAME": "j", "KUBERFT_JOB_NAMESPACE": "ns", "KUBERFT_API_SERVER": api.url})
    assert reporter.step(2, 4, {"countdown": 1.0}, 1.0)
    assert api.requests[0]["path"] == "/api/v1/namespaces/ns/configmaps/j-progress"
    assert api.requests[0]["headers"]["Authorization"] == "Bearer trainer-token"
