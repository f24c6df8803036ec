"""The chart on a real kube-apiserver (tests/cluster): every rendered object passes the API
server's own validation, `helm install` works, the operator's ServiceAccount can do exactly
what the chart grants, and `kuberft operator` reconciles an RFTJob with nothing more."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from kuberft_operator.builders import Owner, trainer_role, trainer_role_binding
from kuberft_operator.cli import build_parser
from kuberft_operator.controller import RBAC_RULES
from tests.cluster.controlplane import free_port
from tests.operator.conftest import cluster, install_kueue_crds, wait_for  # noqa: F401 - the session control plane

from .chart import ALL_ON, CHART, REPO, helm, normalized_rules, one, render, template_text

pytestmark = [pytest.mark.slow, pytest.mark.cluster]

PROMETHEUS_OPERATOR = "github.com/prometheus-operator/prometheus-operator@v0.85.0"
WATCHED = ["team-a", "team-b"]
RELEASE_NAMESPACE = "kuberft-system"
FULL_NAMESPACE = "kuberft-full"


def prometheus_operator_crds() -> list[Path]:
    """ServiceMonitor and PodMonitor CRDs, from the prometheus-operator Go module (Go module proxy)."""
    result = subprocess.run(
        ["go", "mod", "download", "-json", PROMETHEUS_OPERATOR],
        capture_output=True, text=True, env=dict(os.environ, GOFLAGS="", GOWORK="off"), cwd="/", timeout=600,
    )
    assert result.returncode == 0, f"go mod download {PROMETHEUS_OPERATOR} failed:\n{result.stdout}{result.stderr}"
    folder = Path(json.loads(result.stdout)["Dir"]) / "example" / "prometheus-operator-crd"
    return [folder / "monitoring.coreos.com_servicemonitors.yaml", folder / "monitoring.coreos.com_podmonitors.yaml"]


@pytest.fixture(scope="module")
def chart_cluster(cluster):  # noqa: F811 - the fixture imported above
    for path in prometheus_operator_crds():
        cluster.kubectl("apply", "--server-side", "-f", str(path))
    install_kueue_crds(cluster)  # the operator reads LocalQueues
    for namespace in [RELEASE_NAMESPACE, FULL_NAMESPACE, "monitoring", *WATCHED]:
        cluster.kubectl("create", "namespace", namespace, check=False)
    cluster.kubectl("wait", "--for=condition=Established", "--timeout=60s", "crd/servicemonitors.monitoring.coreos.com", "crd/podmonitors.monitoring.coreos.com")
    return cluster


def _helm(cluster, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    return helm(*args, "--kubeconfig", str(cluster.kubeconfig), check=check)


# ------------------------------------------------------------------ validation by the API server


@pytest.mark.parametrize("values", [[], [ALL_ON]], ids=["defaults", "all-toggles-on"])
def test_api_server_accepts_every_rendered_object(chart_cluster, tmp_path, values):
    rendered = tmp_path / "rendered.yaml"
    rendered.write_text(template_text(values).stdout)
    objects = render(values)
    result = chart_cluster.kubectl("apply", "--dry-run=server", "--validate=strict", "-f", str(rendered), check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("(server dry run)") == len(objects)


def test_api_server_dry_run_rejects_an_unknown_field(chart_cluster, tmp_path):
    """The check above has teeth: a misspelt field in a rendered object is refused."""
    objects = render()
    deployment = one(objects, "Deployment")
    deployment["spec"]["template"]["spec"]["containers"][0]["readinessprobe"] = {"periodSeconds": 5}
    rendered = tmp_path / "typo.yaml"
    rendered.write_text(yaml.safe_dump(deployment))
    result = chart_cluster.kubectl("apply", "--dry-run=server", "--validate=strict", "-f", str(rendered), check=False)
    assert result.returncode != 0
    assert 'unknown field "spec.template.spec.containers[0].readinessprobe"' in result.stderr


# ------------------------------------------------------------------ helm install


@pytest.fixture(scope="module")
def installed(chart_cluster):
    """The chart installed twice: cluster-wide (`watchAllNamespaces`, with the CRDs) and every
    toggle on (two namespaces, `crds.install=false`: one release per cluster owns the CRDs). The
    test cluster applied the CRDs by hand before, so the first release adopts them the README's way."""
    adopt_crds(chart_cluster, "kuberft", RELEASE_NAMESPACE)
    _helm(chart_cluster, "install", "kuberft", str(CHART), "--namespace", RELEASE_NAMESPACE, "--set", "watchAllNamespaces=true", "--wait=false")
    _helm(chart_cluster, "install", "full", str(CHART), "--namespace", FULL_NAMESPACE, "--values", str(ALL_ON),
          "--set", "crds.install=false", "--wait=false")
    return chart_cluster


def adopt_crds(cluster, release: str, namespace: str) -> None:
    for crd in ("crd/rftjobs.kuberft.io", "crd/turbodeployments.kuberft.io"):
        cluster.kubectl("label", crd, "app.kubernetes.io/managed-by=Helm", "--overwrite")
        cluster.kubectl("annotate", crd, f"meta.helm.sh/release-name={release}", f"meta.helm.sh/release-namespace={namespace}", "--overwrite")


def crd_annotations(cluster) -> dict:
    return cluster.get_json("crd", "rftjobs.kuberft.io")["metadata"].get("annotations") or {}


def test_helm_upgrade_upgrades_the_crds(installed):
    assert crd_annotations(installed)["helm.sh/resource-policy"] == "keep"
    _helm(installed, "upgrade", "kuberft", str(CHART), "--namespace", RELEASE_NAMESPACE, "--set", "crds.keep=false", "--set", "watchAllNamespaces=true", "--wait=false")
    assert "helm.sh/resource-policy" not in crd_annotations(installed)  # the upgrade reached the CRD
    # Without values Helm would reuse the last release's (crds.keep=false): back to the defaults.
    _helm(installed, "upgrade", "kuberft", str(CHART), "--namespace", RELEASE_NAMESPACE, "--reset-values", "--set", "watchAllNamespaces=true", "--wait=false")
    assert crd_annotations(installed)["helm.sh/resource-policy"] == "keep"
    assert crd_annotations(installed)["meta.helm.sh/release-name"] == "kuberft"


def test_helm_install_creates_the_operator(installed):
    deployment = installed.get_json("deployment", "kuberft", "-n", RELEASE_NAMESPACE)
    assert deployment["spec"]["template"]["spec"]["serviceAccountName"] == "kuberft"
    releases = json.loads(_helm(installed, "list", "--all-namespaces", "--output", "json").stdout)
    assert sorted((r["name"], r["namespace"], r["status"]) for r in releases) == [
        ("full", FULL_NAMESPACE, "deployed"),
        ("kuberft", RELEASE_NAMESPACE, "deployed"),
    ]
    dashboards = installed.get_json("configmaps", "-n", "monitoring", "-l", "grafana_dashboard=1")["items"]
    assert sorted(d["metadata"]["name"] for d in dashboards) == [
        f"full-kuberft-dashboard-{n}" for n in ("operator", "reward-pool", "serving", "training")
    ]


def test_helm_install_refuses_bad_values(chart_cluster, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("operator:\n  replicas: 2\n  leaderElection: {enabled: false}\n")
    result = _helm(chart_cluster, "install", "bad", str(CHART), "--namespace", "monitoring", "--values", str(bad), check=False)
    assert result.returncode != 0
    assert "at '/operator/leaderElection/enabled': value must be true" in result.stderr
    assert "bad" not in _helm(chart_cluster, "list", "--namespace", "monitoring", "--short").stdout.split()


# ------------------------------------------------------------------ RBAC, as the API server enforces it


def _can_i(cluster, service_account: str, verb: str, resource: str, namespace: str, name: str = "") -> bool:
    """`resource` as `plural[.group][/subresource]`."""
    resource, _, subresource = resource.partition("/")
    target = f"{resource}/{name}" if name else resource
    extra = [f"--subresource={subresource}"] if subresource else []
    result = cluster.kubectl("auth", "can-i", verb, target, *extra, "-n", namespace, f"--as={service_account}", check=False)
    return result.stdout.strip() == "yes"


def _resource(group: str, resource: str) -> str:
    plural, _, subresource = resource.partition("/")
    qualified = f"{plural}.{group}" if group else plural
    return f"{qualified}/{subresource}" if subresource else qualified


def test_operator_service_account_holds_every_grant_the_operator_uses(installed):
    account = f"system:serviceaccount:{RELEASE_NAMESPACE}:kuberft"
    for group, resource, _, verb in sorted(normalized_rules(RBAC_RULES)):
        if resource == "leases":
            assert _can_i(installed, account, verb, _resource(group, resource), RELEASE_NAMESPACE, "kuberft"), (resource, verb)
        else:
            assert _can_i(installed, account, verb, _resource(group, resource), "team-a"), (group, resource, verb)


@pytest.mark.parametrize(
    "verb, resource, namespace, name",
    [
        ("get", "secrets", "team-a", ""),
        ("create", "pods", "team-a", ""),
        ("delete", "rftjobs.kuberft.io", "team-a", ""),
        ("update", "rftjobs.kuberft.io", "team-a", ""),
        ("create", "clusterroles.rbac.authorization.k8s.io", "", ""),
        ("update", "leases.coordination.k8s.io", RELEASE_NAMESPACE, "someone-elses-lease"),
        ("create", "leases.coordination.k8s.io", "team-a", ""),
    ],
)
def test_operator_service_account_can_do_nothing_else(installed, verb, resource, namespace, name):
    assert not _can_i(installed, f"system:serviceaccount:{RELEASE_NAMESPACE}:kuberft", verb, resource, namespace or "default", name)


def test_namespaced_install_grants_only_the_watched_namespaces(installed):
    account = f"system:serviceaccount:{FULL_NAMESPACE}:kuberft-operator"
    assert _can_i(installed, account, "create", "deployments.apps", "team-b")
    assert not _can_i(installed, account, "create", "deployments.apps", "default")
    assert not _can_i(installed, account, "list", "rftjobs.kuberft.io", "default")


def test_operator_may_grant_the_trainer_role_but_no_more(installed, tmp_path):
    """Creating a Role needs every permission it grants: the API server checks it (escalation)."""
    account = f"system:serviceaccount:{RELEASE_NAMESPACE}:kuberft"
    owner = Owner("RFTJob", "job", "team-a", "0d6b1c9e-0000-4000-8000-000000000000")
    for manifest in (trainer_role(owner), trainer_role_binding(owner)):  # the binding needs the Role to exist
        manifest["metadata"].pop("ownerReferences")
        result = installed.kubectl("create", f"--as={account}", "-f", "-", input=json.dumps(manifest), check=False)
        assert result.returncode == 0, result.stderr
    installed.kubectl("delete", "rolebinding,role", "job-trainer", "-n", "team-a", f"--as={account}")
    greedy = trainer_role(owner)
    greedy["metadata"].pop("ownerReferences")
    greedy["rules"] = [{"apiGroups": [""], "resources": ["secrets"], "verbs": ["get"]}]
    result = installed.kubectl("create", "--dry-run=server", f"--as={account}", "-f", "-", input=json.dumps(greedy), check=False)
    assert result.returncode != 0
    assert "attempting to grant RBAC permissions not currently held" in result.stderr


# ------------------------------------------------------------------ the operator with only the chart's RBAC


def test_operator_reconciles_with_only_the_charts_namespaced_rbac(installed, tmp_path):
    """`kuberft operator`, with the arguments the chart gives it and the token of the chart's
    ServiceAccount, creates an RFTJob's children (including the trainer's Role) and writes
    its status: the least-privilege RBAC is enough."""
    deployment = installed.get_json("deployment", "full-kuberft", "-n", FULL_NAMESPACE)
    [container] = deployment["spec"]["template"]["spec"]["containers"]
    args = [*container["args"], f"--metrics-port={free_port()}", "--identity=chart-test"]
    parsed = build_parser().parse_args(["operator", *args])
    assert parsed.namespaces == WATCHED and parsed.lease_namespace == FULL_NAMESPACE
    kubeconfig = installed.service_account_kubeconfig(FULL_NAMESPACE, "kuberft-operator", tmp_path / "sa.kubeconfig")
    env = dict(installed.env(), KUBECONFIG=str(kubeconfig), POD_NAMESPACE=FULL_NAMESPACE)
    log = tmp_path / "operator.log"
    with log.open("wb") as handle:
        process = subprocess.Popen([sys.executable, "-m", "kuberft_operator.cli", "operator", *args], stdout=handle, stderr=subprocess.STDOUT, env=env, cwd=REPO)
    try:
        job = yaml.safe_load((REPO / "examples" / "local-countdown.yaml").read_text())
        job["metadata"]["name"] = "chart-rbac"
        installed.kubectl("apply", "-n", "team-b", "-f", "-", input=json.dumps(job))

        def children():
            if process.poll() is not None:
                pytest.fail(f"the operator exited with {process.returncode}:\n{log.read_text()[-3000:]}")
            found = {
                kind: installed.kubectl("get", kind, name, "-n", "team-b", check=False).returncode == 0
                for kind, name in [
                    ("configmap", "chart-rbac-config"),
                    ("deployment", "chart-rbac-reward"),
                    ("networkpolicy", "chart-rbac-reward"),
                    ("role", "chart-rbac-trainer"),
                    ("rolebinding", "chart-rbac-trainer"),
                ]
            }
            return all(found.values()) and found

        wait_for(children, 60, "the RFTJob's children")
        status = wait_for(lambda: installed.get_json("rftjob", "chart-rbac", "-n", "team-b").get("status", {}).get("phase"), 30, "the RFTJob's status")
        assert status in ("Pending", "Running")
        lease = installed.get_json("lease", parsed.lease_name, "-n", FULL_NAMESPACE)
        assert lease["spec"]["holderIdentity"] == "chart-test"
        time.sleep(1)
        text = log.read_text()
        # an HTTP 403 anywhere, but not the milliseconds of a timestamp ("03:49:58,403")
        assert "Forbidden" not in text and not re.search(r"(?<![,\d])403\b", text), text[-3000:]
    finally:
        process.terminate()
        process.wait(timeout=30)
