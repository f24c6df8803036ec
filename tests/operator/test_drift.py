"""Children converge to what the operator wants: a hand edit to a field the operator sets is
reverted on the next reconcile (also when the edit happened while no operator ran), while fields
others own (an annotation someone adds) are left alone."""

from __future__ import annotations

import json

import pytest

from .conftest import wait_for
from .test_e2e import apply, get, job_manifest

pytestmark = [pytest.mark.slow, pytest.mark.cluster]


def patch(cluster, namespace: str, kind: str, name: str, body: dict, patch_type: str = "merge") -> None:
    cluster.kubectl("patch", kind, name, "-n", namespace, f"--type={patch_type}", "-p", json.dumps(body))


def reward_pod_spec(cluster, namespace: str, name: str) -> dict:
    return get(cluster, namespace, "deployment", f"{name}-reward")["spec"]["template"]["spec"]


def weaken_the_reward_pool(cluster, namespace: str, name: str) -> None:
    """The three edits a platform review made by hand: allow-all egress from the sandbox, a
    writable root and a service account token in the reward pods, a NodePort in front of them."""
    patch(cluster, namespace, "networkpolicy", f"{name}-reward", {"spec": {"egress": [{}]}})
    patch(cluster, namespace, "deployment", f"{name}-reward", {"spec": {"template": {"spec": {
        "automountServiceAccountToken": True,
        "containers": [{"name": "reward", "securityContext": {"readOnlyRootFilesystem": False}}],
    }}}}, patch_type="strategic")
    patch(cluster, namespace, "service", f"{name}-reward", {"spec": {"type": "NodePort"}})
    patch(cluster, namespace, "service", f"{name}-reward", {"metadata": {"annotations": {"team.example/owner": "ml-platform"}}})


def hardened(cluster, namespace: str, name: str) -> bool:
    policy = get(cluster, namespace, "networkpolicy", f"{name}-reward")["spec"]
    pod = reward_pod_spec(cluster, namespace, name)
    service = get(cluster, namespace, "service", f"{name}-reward")
    return (
        not policy.get("egress")
        and pod.get("automountServiceAccountToken") is False
        and pod["containers"][0]["securityContext"]["readOnlyRootFilesystem"] is True
        and service["spec"]["type"] == "ClusterIP"
        and all("nodePort" not in port for port in service["spec"]["ports"])
    )


def drift_corrections(metrics: str, kind: str) -> float:
    prefix = f'kuberft_operator_drift_corrections_total{{kind="{kind}"}} '
    return next((float(line[len(prefix):]) for line in metrics.splitlines() if line.startswith(prefix)), 0.0)


def test_hand_edits_to_the_reward_pool_are_reverted_and_foreign_fields_kept(cluster, operator, namespace):
    name = "drift"
    apply(cluster, namespace, job_manifest(name))
    wait_for(lambda: get(cluster, namespace, "networkpolicy", f"{name}-reward") and get(cluster, namespace, "service", f"{name}-reward"),
             60, "the reward pool's children")
    assert hardened(cluster, namespace, name)

    weaken_the_reward_pool(cluster, namespace, name)
    wait_for(lambda: hardened(cluster, namespace, name), 20, "the operator to revert the three edits")
    corrections = {kind: drift_corrections(operator.metrics(), kind) for kind in ("NetworkPolicy", "Deployment", "Service")}
    assert all(count >= 1 for count in corrections.values()), corrections  # the edits landed, and were undone
    service = get(cluster, namespace, "service", f"{name}-reward")
    assert service["metadata"]["annotations"]["team.example/owner"] == "ml-platform"  # not ours: kept


def test_edits_made_while_the_operator_was_down_are_reverted_when_it_returns(cluster, start_operator, namespace):
    name = "drift-restart"
    first = start_operator("op-a")
    apply(cluster, namespace, job_manifest(name))
    wait_for(lambda: get(cluster, namespace, "networkpolicy", f"{name}-reward") and get(cluster, namespace, "service", f"{name}-reward"),
             60, "the reward pool's children")
    first.stop()
    weaken_the_reward_pool(cluster, namespace, name)
    assert not hardened(cluster, namespace, name)
    start_operator("op-b")
    wait_for(lambda: hardened(cluster, namespace, name), 30, "the restarted operator to revert the three edits")
