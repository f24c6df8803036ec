"""The generated CRDs on a real kube-apiserver (no operator needed): the server accepts them,
rejects bad manifests naming the field, and documents every field for `kubectl explain`.
Fast (the control plane starts in seconds once built), so it runs in the default suite."""

from __future__ import annotations

import json

import pytest

from .test_e2e import get, job_manifest

pytestmark = pytest.mark.cluster


def test_the_crds_are_established_with_their_printer_columns(cluster):
    crd = cluster.get_json("crd", "rftjobs.kuberft.io")
    assert any(c["type"] == "Established" and c["status"] == "True" for c in crd["status"]["conditions"])
    columns = [c["name"] for c in crd["spec"]["versions"][0]["additionalPrinterColumns"]]
    assert columns == ["Phase", "Step", "Reward", "Age"]
    assert cluster.kubectl("version", "-o", "json").stdout and json.loads(cluster.kubectl("version", "-o", "json").stdout)["serverVersion"]["gitVersion"] == "v1.36.3"


def test_kubectl_explain_teaches_the_fields(cluster):
    text = cluster.kubectl("explain", "rftjob.spec.grpo.epsilonHigh").stdout
    assert "Upper clipping bound" in text


def test_invalid_manifests_are_rejected_by_the_api_server_naming_the_field(cluster, namespace):
    bad = job_manifest("bad")
    bad["spec"]["grpo"] = {"epsilon": 0.3, "epsilonHigh": 0.2, "stepz": 3}
    result = cluster.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(bad), check=False)
    assert result.returncode != 0
    assert 'unknown field "spec.grpo.stepz"' in result.stderr
    bad["spec"]["grpo"] = {"epsilon": 0.3, "epsilonHigh": 0.2}
    result = cluster.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(bad), check=False)
    assert "spec.grpo.epsilonHigh: Invalid value" in result.stderr
    assert "epsilonHigh must be at least epsilon" in result.stderr
    bad["spec"]["grpo"] = {}
    bad["spec"]["rewards"] = []
    result = cluster.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(bad), check=False)
    assert "spec.rewards" in result.stderr
    assert get(cluster, namespace, "rftjob", "bad") is None


