"""The operator as a platform team runs it: every example admitted in a namespace that enforces
Pod Security `restricted`, and a child that cannot start pods reported on its parent within
seconds, with a Warning event, without leaving a reward pool running for nothing."""

from __future__ import annotations

import json
import time

import pytest

from .conftest import kueue_local_queue, wait_for
from .test_e2e import EXAMPLES, apply, condition, events, get, job_manifest

pytestmark = [pytest.mark.slow, pytest.mark.cluster]


def restrict(cluster, namespace: str) -> None:
    for mode in ("enforce", "warn", "audit"):
        cluster.kubectl("label", "namespace", namespace, f"pod-security.kubernetes.io/{mode}=restricted", "--overwrite")


def pods(cluster, namespace: str) -> list[dict]:
    return cluster.get_json("pods", "-n", namespace)["items"]


def refusals(cluster, namespace: str) -> list[str]:
    items = cluster.get_json("events", "-n", namespace, "--field-selector", "reason=FailedCreate")["items"]
    return [e["message"] for e in items]


def test_every_example_is_admitted_under_pod_security_restricted(cluster, operator, namespace):
    restrict(cluster, namespace)
    warnings = []
    for example in sorted(EXAMPLES.glob("*.yaml")):
        result = cluster.kubectl("apply", "-n", namespace, "-f", str(example))
        warnings += [line for line in result.stderr.splitlines() if "Warning" in line]
    assert warnings == []

    # The cluster examples' reward pools and every job's trainer (after its pool) get pods; the
    # TurboDeployment's serve pods wait for the RFTJob's adapter, so check their template by a dry run.
    def started() -> bool:
        roles = {(p["metadata"].get("labels") or {}).get("kuberft.io/role") for p in pods(cluster, namespace)}
        return {"reward-pool", "trainer"} <= roles
    wait_for(started, 90, "reward and trainer pods in the restricted namespace")
    assert refusals(cluster, namespace) == []

    turbo = get(cluster, namespace, "turbodeployment", "triton-kernels")
    assert turbo is not None
    job_status = get(cluster, namespace, "rftjob", "triton-kernels")
    assert (job_status.get("status") or {}).get("phase") in ("Pending", "Running")


def test_a_trainer_pod_refused_by_quota_is_reported_within_seconds_and_parks_the_pool(cluster, operator, namespace):
    quota = {"apiVersion": "v1", "kind": "ResourceQuota", "metadata": {"name": "no-gpus"},
             "spec": {"hard": {"requests.nvidia.com/gpu": "0"}}}
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(quota))
    apply(cluster, namespace, job_manifest("quota"))
    wait_for(lambda: get(cluster, namespace, "job", "quota-trainer"), 60, "the trainer Job (after the reward pool is ready)")
    created = time.monotonic()
    running = wait_for(lambda: (c := condition(cluster, namespace, "quota", "Running")).get("reason") == "TrainerPodRefused" and c,
                       30, "the refusal on the RFTJob")
    assert time.monotonic() - created < 20
    assert "exceeded quota: no-gpus" in running["message"]
    assert any(e["type"] == "Warning" and e["reason"] == "TrainerPodRefused" for e in events(cluster, namespace, "quota"))
    wait_for(lambda: get(cluster, namespace, "deployment", "quota-reward")["spec"]["replicas"] == 0, 20, "the reward pool to be parked")
    assert condition(cluster, namespace, "quota", "RewardPoolReady")["reason"] == "WaitingForTrainer"


def test_a_missing_checkpoint_claim_is_reported_on_the_job(cluster, operator, namespace):
    apply(cluster, namespace, job_manifest("claimless", checkpoint={"volumeClaimName": "does-not-exist"}))
    running = wait_for(lambda: (c := condition(cluster, namespace, "claimless", "Running")).get("reason") == "TrainerUnschedulable" and c,
                       90, "the missing claim on the RFTJob")
    assert '"does-not-exist" not found' in running["message"]
    assert any(e["type"] == "Warning" and e["reason"] == "TrainerUnschedulable" for e in events(cluster, namespace, "claimless"))


def test_a_queue_that_does_not_exist_is_reported_instead_of_waiting_forever(cluster, operator, namespace):
    kueue_local_queue(cluster, namespace, "real-queue")  # Kueue's API exists; this name does not
    apply(cluster, namespace, job_manifest("typo", queueName="gpu-qeueu"))
    running = wait_for(lambda: (c := condition(cluster, namespace, "typo", "Running")).get("reason") == "LocalQueueNotFound" and c,
                       30, "the missing LocalQueue on the RFTJob")
    assert "no LocalQueue 'gpu-qeueu'" in running["message"]
    assert any(e["type"] == "Warning" and e["reason"] == "LocalQueueNotFound" for e in events(cluster, namespace, "typo"))
    assert get(cluster, namespace, "job", "typo-trainer") is None


def test_a_queued_jobs_reward_pods_refused_by_quota_are_reported_within_seconds(cluster, operator, namespace):
    """A queued job's pool is a Job of its JobSet (run by the real JobSet controller here): a
    refused pod shows only in that Job's events, and the RFTJob says so."""
    kueue_local_queue(cluster, namespace, "gpu-queue")
    quota = {"apiVersion": "v1", "kind": "ResourceQuota", "metadata": {"name": "little-cpu"}, "spec": {"hard": {"requests.cpu": "100m"}}}
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(quota))
    apply(cluster, namespace, job_manifest("starved", queueName="gpu-queue"))
    wait_for(lambda: get(cluster, namespace, "jobset", "starved"), 60, "the JobSet")
    cluster.kubectl("patch", "jobset", "starved", "-n", namespace, "--type=merge", "-p", '{"spec": {"suspend": false}}')  # admitted
    pool = wait_for(lambda: (c := condition(cluster, namespace, "starved", "RewardPoolReady")).get("reason") == "RewardPodsCannotStart" and c,
                    60, "RewardPodsCannotStart on the RFTJob")
    assert "exceeded quota: little-cpu" in pool["message"]
    assert any(e["type"] == "Warning" and e["reason"] == "RewardPodsCannotStart" for e in events(cluster, namespace, "starved"))
    assert condition(cluster, namespace, "starved", "Running")["reason"] == "WaitingForRewardPool"
