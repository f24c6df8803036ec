"""Least privilege, measured: the operator runs with a ServiceAccount granted exactly
`RBAC_RULES` (what the Helm chart grants) through every path that needs a permission, and the
API server's audit log of that account must show every granted verb used and none refused. A
grant the code never uses fails this test as surely as a missing one."""

from __future__ import annotations

import json
import subprocess
import time
import uuid
from pathlib import Path

import pytest

from kuberft_operator.builders import Owner, trainer_role
from kuberft_operator.controller import RBAC_RULES
from tests.cluster.controlplane import kubectl_binary
from tests.helm.chart import normalized_rules

from .conftest import kueue_local_queue, wait_for
from .test_drift import drift_corrections
from .test_e2e import apply, condition, get, job_manifest, wait_phase

pytestmark = [pytest.mark.slow, pytest.mark.cluster]


def _operator_account(cluster, tmp_path: Path) -> tuple[str, Path]:
    """A ServiceAccount bound to a ClusterRole holding exactly RBAC_RULES; its kubeconfig."""
    home = f"rbac-{uuid.uuid4().hex[:8]}"
    cluster.kubectl("create", "namespace", home)
    role = {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole", "metadata": {"name": home}, "rules": list(RBAC_RULES)}
    binding = {
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding", "metadata": {"name": home},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": home},
        "subjects": [{"kind": "ServiceAccount", "name": "kuberft-operator", "namespace": home}],
    }
    account = {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "kuberft-operator", "namespace": home}}
    cluster.apply_objects([account, role, binding])
    return f"system:serviceaccount:{home}:kuberft-operator", cluster.service_account_kubeconfig(home, "kuberft-operator", tmp_path / "operator.kubeconfig")


def _requests(cluster, user: str) -> tuple[set[tuple[str, str, str]], list[str]]:
    """The (apiGroup, resource[/subresource], verb) of every request `user` made, and the
    requests the API server refused (403), as `verb URI`."""
    used, refused = set(), []
    for event in cluster.audit_events(user):
        ref = event.get("objectRef") or {}
        if (event.get("responseStatus") or {}).get("code") == 403:
            refused.append(f"{event['verb']} {event['requestURI']}")
        elif ref.get("resource"):  # not discovery (/api, /apis, /version), which every user may read
            resource = (ref.get("apiGroup", ""), ref["resource"] + (f"/{ref['subresource']}" if ref.get("subresource") else ""))
            used.add((*resource, event["verb"]))
            if event["verb"] == "patch" and (event.get("responseStatus") or {}).get("code") == 201:
                used.add((*resource, "create"))  # a server-side apply that created the object: authorized as create too
    return used, refused


def test_the_operator_uses_every_verb_it_is_granted_and_no_other(cluster, start_operator, namespace, tmp_path):
    user, kubeconfig = _operator_account(cluster, tmp_path)
    operator = start_operator("least-privilege", "--namespace", namespace, kubeconfig=kubeconfig)

    # A queued job: the operator reads the LocalQueue and creates one JobSet, which is admitted
    # (as Kueue would) and succeeds; after the TTL every child but the checkpoint claim is deleted.
    kueue_local_queue(cluster, namespace, "gpu-queue")
    apply(cluster, namespace, job_manifest("queued", outcome="succeed", queueName="gpu-queue", ttlSecondsAfterFinished=3, checkpoint={"storageSize": "1Gi"}))
    wait_for(lambda: condition(cluster, namespace, "queued", "Running").get("reason") == "WaitingForQueue", 60, "WaitingForQueue")
    # Hand edits to every child the operator applies: it applies them again (drift correction).
    children = [f"{kind}/queued-{suffix}" for kind, suffix in [
        ("configmap", "config"), ("service", "reward"), ("serviceaccount", "trainer"), ("networkpolicy", "reward"),
        ("role", "trainer"), ("rolebinding", "trainer"), ("pvc", "checkpoints"),
    ]]
    cluster.kubectl("label", "-n", namespace, *children, "edited-by=hand")
    cluster.kubectl("patch", "jobset", "queued", "-n", namespace, "--type=merge", "-p", '{"spec": {"suspend": false}}')

    # A TurboDeployment serving that job's adapter (the operator reads the RFTJob), autoscaled,
    # then not: the HPA is created and deleted.
    turbo = {
        "apiVersion": "kuberft.io/v1alpha1", "kind": "TurboDeployment", "metadata": {"name": "chat"},
        "spec": {
            "model": {"name": "Qwen/Qwen2.5-0.5B-Instruct"}, "adapter": {"fromRFTJob": "queued", "name": "chat"},
            "autoscaling": {"minReplicas": 1, "maxReplicas": 2}, "placement": {"resources": {"requests": {"cpu": "1"}}},
        },
    }
    apply(cluster, namespace, turbo)
    wait_phase(cluster, namespace, "queued", "Succeeded", timeout=90)
    wait_for(lambda: get(cluster, namespace, "hpa", "chat"), 60, "the HorizontalPodAutoscaler")
    cluster.kubectl("label", "-n", namespace, "hpa/chat", "deployment/chat", "edited-by=hand")
    wait_for(lambda: drift_corrections(operator.metrics(), "HorizontalPodAutoscaler") and drift_corrections(operator.metrics(), "Deployment"),
             30, "the HPA's and Deployment's drift corrected")
    cluster.kubectl("patch", "turbodeployment", "chat", "-n", namespace, "--type=json", "-p", '[{"op": "remove", "path": "/spec/autoscaling"}]')
    wait_for(lambda: get(cluster, namespace, "hpa", "chat") is None, 30, "the HPA to be deleted")
    wait_for(lambda: get(cluster, namespace, "jobset", "queued") is None and get(cluster, namespace, "service", "queued-reward") is None,
             60, "the TTL clean-up")

    # A job without a queue (its own trainer Job and reward Deployment) whose trainer pod is
    # refused by quota: the operator reads the Job's events to say why; past its deadline it
    # deletes the trainer Job, and after the TTL the reward Deployment.
    quota = {"apiVersion": "v1", "kind": "ResourceQuota", "metadata": {"name": "no-gpus"}, "spec": {"hard": {"requests.nvidia.com/gpu": "0"}}}
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(quota))
    apply(cluster, namespace, job_manifest("refused", activeDeadlineSeconds=12, ttlSecondsAfterFinished=1))
    wait_for(lambda: condition(cluster, namespace, "refused", "Running").get("reason") == "TrainerPodRefused", 90, "TrainerPodRefused")
    wait_phase(cluster, namespace, "refused", "Failed", timeout=60)
    wait_for(lambda: get(cluster, namespace, "deployment", "refused-reward") is None, 60, "the TTL clean-up")

    # Deleting parents: the reconciles their children's deletions cause read them afresh (gone).
    cluster.kubectl("delete", "-n", namespace, "turbodeployment/chat", "rftjob/refused")
    wait_for(lambda: get(cluster, namespace, "deployment", "chat") is None, 30, "garbage collection")
    assert operator.stop() == 0  # a clean stop hands the Lease back

    granted = {(group, resource, verb) for group, resource, _, verb in normalized_rules(RBAC_RULES)}
    # What the operator grants the trainer, it must hold itself (RBAC's escalation check).
    delegated = {(group, resource, verb) for group, resource, _, verb in normalized_rules(trainer_role(Owner("RFTJob", "x", "x", "x"))["rules"])}
    time.sleep(2)  # the audit log is written in batches, at most a second apart
    used, refused = _requests(cluster, user)
    report = {
        "granted, never used": sorted(map(":".join, granted - used - delegated)),
        "used, not granted": sorted(map(":".join, used - granted)),
        "refused": sorted(set(refused)),
    }
    assert not any(report.values()), json.dumps(report, indent=1)


def test_the_audit_log_tells_a_used_grant_from_a_refused_request(cluster, namespace, tmp_path):
    """The check above is only as good as the log it reads: a request made with the account
    shows up keyed by group, resource and verb, a refused one as forbidden."""
    user, kubeconfig = _operator_account(cluster, tmp_path)
    env = dict(cluster.env(), KUBECONFIG=str(kubeconfig))
    for resource in ("pods", "secrets"):
        subprocess.run([kubectl_binary(), "get", resource, "-n", namespace], env=env, capture_output=True, timeout=60)
    used, refused = wait_for(lambda: (r := _requests(cluster, user))[0] and r[1] and r, 10, "both requests in the audit log")
    assert used == {("", "pods", "list")}
    assert refused == [f"list /api/v1/namespaces/{namespace}/secrets?limit=500"]
