"""The operator against a real kube-apiserver (+ controller-manager, scheduler, kwok fake nodes).

kwok runs no containers: it moves pods through their phases. Trainer pods finish the way their
KUBERFT_TEST_OUTCOME env var says (tests/cluster/kwok-stages.yaml), or stay Running until a test
patches their status the way a kubelet would.
"""

from __future__ import annotations

import copy
import json
import ssl
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml

from kuberft_trainer.report import ProgressReporter

from .conftest import kueue_local_queue, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.cluster]

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"

SMALL_JOB = {
    "apiVersion": "kuberft.io/v1alpha1",
    "kind": "RFTJob",
    "metadata": {"name": "countdown"},
    "spec": {
        "model": {"name": "tiny:countdown"},
        "dataset": {"builtin": {"name": "countdown", "size": 64}},
        "rewards": [{"kind": "countdown"}],
        "grpo": {"steps": 40},
        "rewardPool": {"replicas": 1, "workers": 2, "placement": {"resources": {"requests": {"cpu": "500m", "memory": "1Gi"}}}},
        "trainer": {
            "resources": {"limits": {"nvidia.com/gpu": 1}},
            "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
        },
        "backoffLimit": 1,
    },
}


def job_manifest(name: str = "countdown", outcome: str | None = None, **spec: Any) -> dict[str, Any]:
    manifest = copy.deepcopy(SMALL_JOB)
    manifest["metadata"]["name"] = name
    manifest["spec"].update(spec)
    if outcome:
        manifest["spec"]["trainer"]["env"] = [{"name": "KUBERFT_TEST_OUTCOME", "value": outcome}]
    return manifest


def apply(cluster, namespace: str, manifest: dict[str, Any] | str) -> None:
    text = manifest if isinstance(manifest, str) else json.dumps(manifest)
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=text)


def get(cluster, namespace: str, kind: str, name: str) -> dict[str, Any] | None:
    result = cluster.kubectl("get", kind, name, "-n", namespace, "-o", "json", check=False)
    return json.loads(result.stdout) if result.returncode == 0 else None


def status(cluster, namespace: str, name: str) -> dict[str, Any]:
    return (get(cluster, namespace, "rftjob", name) or {}).get("status") or {}


def condition(cluster, namespace: str, name: str, type_: str) -> dict[str, Any]:
    return next((c for c in status(cluster, namespace, name).get("conditions") or [] if c["type"] == type_), {})


def wait_phase(cluster, namespace: str, name: str, phase: str, timeout: float = 60) -> dict[str, Any]:
    return wait_for(lambda: (s := status(cluster, namespace, name)).get("phase") == phase and s, timeout, f"RFTJob {name} to be {phase}")


def events(cluster, namespace: str, name: str) -> list[dict[str, Any]]:
    items = cluster.get_json("events", "-n", namespace, "--field-selector", f"involvedObject.name={name}")["items"]
    return sorted(items, key=lambda e: e.get("firstTimestamp") or e["metadata"]["creationTimestamp"])


def trainer_pods(cluster, namespace: str, name: str) -> list[dict[str, Any]]:
    return cluster.get_json("pods", "-n", namespace, "-l", f"kuberft.io/rftjob={name},kuberft.io/role=trainer")["items"]


def set_pod_phase(cluster, namespace: str, pod: str, phase: str, exit_code: int) -> None:
    """What a kubelet reports when the trainer container exits."""
    terminated = {"exitCode": exit_code, "reason": "Completed" if exit_code == 0 else "Error", "startedAt": None, "finishedAt": None}
    patch = {"status": {"phase": phase, "containerStatuses": [{"name": "trainer", "image": "x", "imageID": "", "ready": False, "restartCount": 0, "state": {"terminated": terminated}}]}}
    cluster.kubectl("patch", "pod", pod, "-n", namespace, "--subresource=status", "--type=merge", "-p", json.dumps(patch))


def patch_as(cluster, user: str, path: str, body: dict[str, Any]) -> int:
    """A JSON merge PATCH impersonating `user`; returns the HTTP status."""
    request = urllib.request.Request(
        cluster.server + path, data=json.dumps(body).encode(), method="PATCH",
        headers={"Authorization": f"Bearer {cluster.token}", "Impersonate-User": user, "Content-Type": "application/merge-patch+json"},
    )
    try:
        with urllib.request.urlopen(request, context=ssl._create_unverified_context(), timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code


def owned_by(obj: dict[str, Any], kind: str, name: str) -> bool:
    return any(o["kind"] == kind and o["name"] == name and o.get("controller") for o in obj["metadata"].get("ownerReferences") or [])


# --------------------------------------------------------------------------- the examples


def test_the_example_job_gets_its_children_runs_and_succeeds(cluster, operator, namespace):
    cluster.kubectl("apply", "-n", namespace, "-f", str(EXAMPLES / "rftjob-triton.yaml"))
    name = "triton-kernels"
    job = wait_for(lambda: get(cluster, namespace, "job", f"{name}-trainer"), 60, "the trainer Job (after the reward pool is ready)")

    config = get(cluster, namespace, "configmap", f"{name}-config")
    assert json.loads(config["data"]["job.json"])["grpo"]["epsilonHigh"] == 0.28
    reward = get(cluster, namespace, "deployment", f"{name}-reward")
    assert reward["spec"]["replicas"] == 2
    pod = reward["spec"]["template"]["spec"]
    assert pod["automountServiceAccountToken"] is False
    assert pod["containers"][0]["securityContext"]["readOnlyRootFilesystem"] is True
    assert pod["containers"][0]["command"] == [
        "kuberft", "reward", "serve", "--port", "8080", "--workers", "4", "--timeout", "120", "--memory-mib", "8192", "--max-queue", "1024",
    ]
    policy = get(cluster, namespace, "networkpolicy", f"{name}-reward")
    assert policy["spec"]["policyTypes"] == ["Ingress", "Egress"] and "egress" not in policy["spec"] or policy["spec"]["egress"] == []
    assert get(cluster, namespace, "service", f"{name}-reward")["spec"]["ports"][0]["port"] == 8080
    claim = get(cluster, namespace, "pvc", f"{name}-checkpoints")
    assert claim["spec"]["resources"]["requests"]["storage"] == "50Gi"
    trainer = job["spec"]["template"]["spec"]
    assert trainer["containers"][0]["image"] == "registry.test/kuberft/trainer:e2e"
    assert trainer["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert trainer["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    for kind, child in (("configmap", f"{name}-config"), ("deployment", f"{name}-reward"), ("service", f"{name}-reward"),
                        ("networkpolicy", f"{name}-reward"), ("pvc", f"{name}-checkpoints"), ("job", f"{name}-trainer"),
                        ("serviceaccount", f"{name}-trainer"), ("role", f"{name}-trainer"), ("rolebinding", f"{name}-trainer"),
                        ("configmap", f"{name}-progress")):
        assert owned_by(get(cluster, namespace, kind, child), "RFTJob", name), f"{kind}/{child} has no owner reference"

    # The trainer's ServiceAccount may read and patch its progress ConfigMap and nothing else:
    # the operator alone writes the RFTJob's status.
    trainer_sa = f"system:serviceaccount:{namespace}:{name}-trainer"
    can = lambda *args: cluster.kubectl("auth", "can-i", *args, "-n", namespace, f"--as={trainer_sa}", check=False).stdout.strip()
    assert can("patch", f"configmaps/{name}-progress") == "yes"
    assert can("get", f"configmaps/{name}-progress") == "yes"
    assert can("patch", f"configmaps/{name}-config") == "no"
    assert can("patch", f"rftjobs.kuberft.io/{name}", "--subresource=status") == "no"
    assert can("get", "pods") == "no"

    wait_phase(cluster, namespace, name, "Running")
    status_path = f"/apis/kuberft.io/v1alpha1/namespaces/{namespace}/rftjobs/{name}/status"
    assert patch_as(cluster, trainer_sa, status_path, {"status": {"phase": "Succeeded"}}) == 403
    assert patch_as(cluster, trainer_sa, f"/apis/kuberft.io/v1alpha1/namespaces/{namespace}/rftjobs/{name}", {"spec": {"suspend": True}}) == 403
    # A hostile report changes neither the phase nor the adapter; the operator says what it ignored.
    progress_path = f"/api/v1/namespaces/{namespace}/configmaps/{name}-progress"
    hostile = {"data": {"phase": "Succeeded", "adapter": "pvc://other-team-checkpoints/their-job/adapter", "meanReward": "NaN", "step": "9999"}}
    assert patch_as(cluster, trainer_sa, progress_path, hostile) == 200
    refused = wait_for(lambda: condition(cluster, namespace, name, "ProgressAccepted").get("status") == "False"
                       and condition(cluster, namespace, name, "ProgressAccepted"), 30, "ProgressAccepted=False")
    assert refused["message"] == (f"ignored in ConfigMap {name}-progress: step: 9999 is more than the job's 500 steps; "
                                  'meanReward: "NaN" is not a finite number')
    running = status(cluster, namespace, name)
    assert running["phase"] == "Running" and "adapter" not in running and "meanReward" not in running
    # The trainer's own client, with the ServiceAccount's token over HTTPS, as in its pod.
    token = cluster.workdir / f"{namespace}-trainer-token"
    token.write_text(cluster.kubectl("create", "token", f"{name}-trainer", "-n", namespace).stdout.strip())
    reporter = ProgressReporter(name, namespace, cluster.server, token_file=token, ca_file=cluster.workdir / "pki" / "apiserver.crt")
    assert reporter.step(250, 500, {"triton.format": 1.0, "triton.compile": 0.75, "triton.correctness": 0.5}, 0.625)
    wait_for(lambda: condition(cluster, namespace, name, "ProgressAccepted").get("status") == "True", 30, "ProgressAccepted=True")
    table = cluster.kubectl("get", "rftjobs", "-n", namespace).stdout
    assert table.split("\n")[0].split() == ["NAME", "PHASE", "STEP", "REWARD", "AGE"]
    assert table.split("\n")[1].split()[:4] == [name, "Running", "250/500", "0.625"]

    pod_name = wait_for(lambda: trainer_pods(cluster, namespace, name), 30, "the trainer pod")[0]["metadata"]["name"]
    set_pod_phase(cluster, namespace, pod_name, "Succeeded", 0)
    done = wait_phase(cluster, namespace, name, "Succeeded")
    # kopf only watches: it leaves no finalizers or bookkeeping annotations on the user's object.
    meta = get(cluster, namespace, "rftjob", name)["metadata"]
    assert not meta.get("finalizers")
    assert not [a for a in meta.get("annotations") or {} if "kopf" in a]
    assert done["adapter"] == f"pvc://{name}-checkpoints/{name}/adapter"
    assert done["step"] == 250 and done["totalSteps"] == 500
    assert done["rewards"] == {"triton.format": 1.0, "triton.compile": 0.75, "triton.correctness": 0.5}
    assert done["observedGeneration"] == 1
    assert done["startTime"] <= done["completionTime"]
    types = {c["type"]: (c["status"], c["reason"]) for c in done["conditions"]}
    assert types["Succeeded"] == ("True", "TrainerSucceeded")
    assert types["Created"] == ("True", "ChildrenCreated")
    assert types["RewardPoolReady"][0] == "True"
    assert types["Running"] == ("False", "Completed")
    reasons = [e["reason"] for e in events(cluster, namespace, name)]
    for reason in ("ChildrenCreated", "PodsReady", "TrainerCreated", "TrainerRunning", "InvalidProgressReport", "TrainerSucceeded"):
        assert reason in reasons, reasons
    # The reward pool is not needed any more.
    wait_for(lambda: get(cluster, namespace, "deployment", f"{name}-reward")["spec"]["replicas"] == 0, 20, "the reward pool to scale to 0")


def test_kwok_completes_the_trainer_and_the_turbo_deployment_serves_its_adapter(cluster, operator, namespace):
    apply(cluster, namespace, job_manifest("kernels", outcome="succeed", checkpoint={"storageSize": "1Gi"}))
    td = yaml.safe_load((EXAMPLES / "turbodeployment.yaml").read_text())
    td["spec"]["adapter"]["fromRFTJob"] = "kernels"
    td["spec"]["placement"]["resources"]["requests"] = {"cpu": "1", "memory": "1Gi"}
    apply(cluster, namespace, td)
    name = td["metadata"]["name"]
    waiting = wait_for(lambda: (get(cluster, namespace, "turbodeployment", name) or {}).get("status", {}).get("phase") == "Pending"
                       and get(cluster, namespace, "turbodeployment", name)["status"], 30, "the TurboDeployment to wait")
    assert waiting["conditions"][0]["reason"] == "WaitingForRFTJob"
    assert get(cluster, namespace, "deployment", name) is None

    wait_phase(cluster, namespace, "kernels", "Succeeded", timeout=90)
    ready = wait_for(lambda: (s := (get(cluster, namespace, "turbodeployment", name) or {}).get("status") or {}).get("phase") == "Ready" and s,
                     60, "the TurboDeployment to be Ready")
    assert ready["readyReplicas"] == 1
    assert ready["url"] == f"http://{name}.{namespace}.svc:8000/v1"
    assert ready["adapter"] == "pvc://kernels-checkpoints/kernels/adapter"
    deployment = get(cluster, namespace, "deployment", name)
    assert deployment["spec"]["template"]["spec"]["containers"][0]["command"] == ["kuberft", "serve", "--config", "/etc/kuberft/serve.json"]
    config = get(cluster, namespace, "configmap", f"{name}-serve")
    document = json.loads(config["data"]["serve.json"])
    assert (document["model"]["name"], document["adapters"]) == ("Qwen/Qwen2.5-Coder-7B-Instruct", [{"name": "triton-kernels", "uri": "/adapters/kernels-checkpoints/kernels/adapter"}])
    assert owned_by(config, "TurboDeployment", name)
    assert owned_by(deployment, "TurboDeployment", name)
    assert owned_by(get(cluster, namespace, "service", name), "TurboDeployment", name)
    table = cluster.kubectl("get", "turbodeployments", "-n", namespace).stdout.split("\n")
    assert table[0].split() == ["NAME", "PHASE", "READY", "URL", "AGE"]


def test_a_turbo_deployment_of_several_adapters_serves_each_once_its_rftjob_succeeds(cluster, operator, namespace):
    apply(cluster, namespace, job_manifest("sql", outcome="succeed", checkpoint={"storageSize": "1Gi"}))
    td = yaml.safe_load((EXAMPLES / "turbodeployment.yaml").read_text())
    del td["spec"]["adapter"], td["spec"]["speculator"]
    td["metadata"]["name"] = "many"
    td["spec"]["adapters"] = [{"name": "sql", "fromRFTJob": "sql"}, {"name": "math", "fromRFTJob": "math"}, {"name": "local", "uri": "/models/local"}]
    td["spec"]["maxLoadedAdapters"] = 2
    td["spec"]["placement"]["resources"]["requests"] = {"cpu": "1", "memory": "1Gi"}
    duplicate = json.loads(json.dumps(td))
    duplicate["spec"]["adapters"][1]["name"] = "sql"
    refused = cluster.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(duplicate), check=False)
    assert refused.returncode != 0 and "adapter names must be unique" in refused.stderr, refused.stderr
    apply(cluster, namespace, td)

    def served():
        document = json.loads((get(cluster, namespace, "configmap", "many-serve") or {"data": {"serve.json": "{}"}})["data"]["serve.json"])
        return [a["name"] for a in document.get("adapters", [])]

    wait_phase(cluster, namespace, "sql", "Succeeded", timeout=90)
    partial = wait_for(lambda: served() == ["sql", "local"] and get(cluster, namespace, "turbodeployment", "many")["status"], 60,
                       "the ready adapters to be served")
    assert partial["phase"] == "Pending"
    assert [(a["name"], a["state"]) for a in partial["adapters"]] == [("sql", "Serving"), ("math", "Pending"), ("local", "Serving")]
    assert next(c for c in partial["conditions"] if c["type"] == "AdapterReady")["message"] == (
        f"adapter math: RFTJob math does not exist in namespace {namespace}")

    apply(cluster, namespace, job_manifest("math", outcome="succeed", checkpoint={"storageSize": "1Gi"}))
    ready = wait_for(lambda: (s := get(cluster, namespace, "turbodeployment", "many")["status"]).get("phase") == "Ready" and s, 120,
                     "every adapter to be served")
    assert served() == ["sql", "math", "local"]
    assert [a["location"] for a in ready["adapters"]] == ["pvc://sql-checkpoints/sql/adapter", "pvc://math-checkpoints/math/adapter", "/models/local"]
    pod = get(cluster, namespace, "deployment", "many")["spec"]["template"]["spec"]
    assert sorted(v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"] if "persistentVolumeClaim" in v) == ["math-checkpoints", "sql-checkpoints"]
    document = json.loads(get(cluster, namespace, "configmap", "many-serve")["data"]["serve.json"])
    assert document["maxLoadedAdapters"] == 2


# --------------------------------------------------------------------------- failures and lifecycle


def test_a_failing_trainer_is_retried_then_the_job_fails_with_the_reason(cluster, operator, namespace):
    apply(cluster, namespace, job_manifest("flaky", outcome="fail", backoffLimit=1))
    failed = wait_phase(cluster, namespace, "flaky", "Failed", timeout=120)
    cond = next(c for c in failed["conditions"] if c["type"] == "Failed")
    assert cond["reason"] == "BackoffLimitExceeded"
    assert cond["message"].startswith("the trainer failed 2 time(s); backoffLimit 1 allows 1 restart(s); last: pod flaky-trainer-")
    assert cond["message"].endswith("exit code 1 (Error): CUDA error: out of memory (simulated by kwok)")
    assert failed["restarts"] == 1
    recorded = events(cluster, namespace, "flaky")
    restarted = [e for e in recorded if e["reason"] == "TrainerRestarted"]
    assert len(restarted) == 1 and restarted[0]["type"] == "Warning"
    assert "restart 1 of 1 resumes from the latest checkpoint" in restarted[0]["message"]
    assert any(e["reason"] == "BackoffLimitExceeded" and e["type"] == "Warning" for e in recorded)


def test_suspend_deletes_the_trainer_and_resume_starts_a_new_one(cluster, operator, namespace):
    apply(cluster, namespace, job_manifest("pausable", checkpoint={"storageSize": "1Gi"}))
    wait_phase(cluster, namespace, "pausable", "Running")
    first = get(cluster, namespace, "job", "pausable-trainer")["metadata"]["uid"]

    cluster.kubectl("patch", "rftjob", "pausable", "-n", namespace, "--type=merge", "-p", '{"spec": {"suspend": true}}')
    suspended = wait_phase(cluster, namespace, "pausable", "Suspended")
    assert next(c for c in suspended["conditions"] if c["type"] == "Suspended")["message"] == (
        "the trainer is stopped; checkpoints are kept in pvc://pausable-checkpoints/pausable"
    )
    wait_for(lambda: get(cluster, namespace, "job", "pausable-trainer") is None, 30, "the trainer Job to be deleted")
    wait_for(lambda: not trainer_pods(cluster, namespace, "pausable"), 30, "the trainer pod to be deleted")
    assert get(cluster, namespace, "pvc", "pausable-checkpoints") is not None
    assert get(cluster, namespace, "deployment", "pausable-reward")["spec"]["replicas"] == 0

    cluster.kubectl("patch", "rftjob", "pausable", "-n", namespace, "--type=merge", "-p", '{"spec": {"suspend": false}}')
    wait_phase(cluster, namespace, "pausable", "Running")
    second = get(cluster, namespace, "job", "pausable-trainer")
    assert second["metadata"]["uid"] != first
    assert second["spec"]["template"]["spec"]["volumes"][1] == {"name": "checkpoints", "persistentVolumeClaim": {"claimName": "pausable-checkpoints"}}
    assert condition(cluster, namespace, "pausable", "Suspended")["reason"] == "Resumed"
    reasons = [e["reason"] for e in events(cluster, namespace, "pausable")]
    assert "Suspended" in reasons and "Resumed" in reasons


def test_deleting_the_job_deletes_every_child(cluster, operator, namespace):
    def children() -> list[dict[str, Any]]:
        kinds = "configmaps,deployments,services,networkpolicies,jobs,serviceaccounts,roles,rolebindings,pods"
        return cluster.get_json(kinds, "-n", namespace, "-l", "kuberft.io/rftjob=doomed")["items"]

    apply(cluster, namespace, job_manifest("doomed"))
    wait_phase(cluster, namespace, "doomed", "Running")
    wait_for(lambda: any(c["kind"] == "Pod" for c in children()), 30, "the job's pods")
    before = children()
    # Something to delete: every kind of child exists, and each one the operator made is owned by the job.
    assert {c["kind"] for c in before} == {
        "ConfigMap", "Deployment", "Service", "NetworkPolicy", "Job", "ServiceAccount", "Role", "RoleBinding", "Pod",
    }
    assert [c["metadata"]["name"] for c in before if c["kind"] != "Pod" and not owned_by(c, "RFTJob", "doomed")] == []

    cluster.kubectl("delete", "rftjob", "doomed", "-n", namespace, "--wait=true", "--timeout=60s")
    assert get(cluster, namespace, "rftjob", "doomed") is None
    wait_for(lambda: children() == [] or None, 60, "garbage collection of the children")
    assert [f"{c['kind']}/{c['metadata']['name']}" for c in children()] == []


def test_the_deadline_fails_a_job_that_runs_too_long(cluster, operator, namespace):
    apply(cluster, namespace, job_manifest("slow", activeDeadlineSeconds=4))
    failed = wait_phase(cluster, namespace, "slow", "Failed", timeout=60)
    cond = next(c for c in failed["conditions"] if c["type"] == "Failed")
    assert (cond["reason"], cond["message"]) == ("DeadlineExceeded", "the job ran longer than activeDeadlineSeconds (4s)")


def test_ttl_after_finished_removes_children_but_keeps_the_job_and_its_outputs(cluster, operator, namespace):
    apply(cluster, namespace, job_manifest("brief", outcome="succeed", ttlSecondsAfterFinished=2, checkpoint={"storageSize": "1Gi"}))
    wait_phase(cluster, namespace, "brief", "Succeeded", timeout=60)
    wait_for(lambda: get(cluster, namespace, "job", "brief-trainer") is None and get(cluster, namespace, "deployment", "brief-reward") is None, 30, "the TTL clean-up")
    assert get(cluster, namespace, "configmap", "brief-config") is None
    assert get(cluster, namespace, "pvc", "brief-checkpoints") is not None
    assert status(cluster, namespace, "brief")["phase"] == "Succeeded"
    assert "ChildrenDeleted" in [e["reason"] for e in events(cluster, namespace, "brief")]


def test_a_queued_job_is_one_jobset_kueue_admits_whole_and_jobset_runs_it_to_success(cluster, operator, namespace):
    """The real JobSet controller runs here (no Kueue controller: the test admits the workload
    the way Kueue does, by unsuspending the JobSet)."""
    kueue_local_queue(cluster, namespace, "gpu-queue")
    apply(cluster, namespace, job_manifest("queued", outcome="succeed", queueName="gpu-queue"))
    jobset = wait_for(lambda: get(cluster, namespace, "jobset", "queued"), 60, "the JobSet")
    assert jobset["spec"]["suspend"] is True and jobset["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "gpu-queue"
    assert [r["name"] for r in jobset["spec"]["replicatedJobs"]] == ["reward", "trainer"]  # one workload, two pod sets
    assert owned_by(jobset, "RFTJob", "queued")
    assert get(cluster, namespace, "deployment", "queued-reward") is None  # no pool outside the workload
    waiting = wait_for(lambda: (c := condition(cluster, namespace, "queued", "Running")).get("reason") == "WaitingForQueue" and c, 30,
                       f"WaitingForQueue (status: {status(cluster, namespace, 'queued')}; operator: {operator.tail()})")
    assert "JobSet queued (trainer and reward pool)" in waiting["message"]
    # Nothing runs before admission (JobSet makes its Jobs suspended).
    assert (get(cluster, namespace, "job", "queued-reward-0") or {"spec": {"suspend": True}})["spec"]["suspend"] is True
    assert not cluster.get_json("pods", "-n", namespace, "-l", "kuberft.io/rftjob=queued")["items"]

    cluster.kubectl("patch", "jobset", "queued", "-n", namespace, "--type=merge", "-p", '{"spec": {"suspend": false}}')
    pool = wait_for(lambda: get(cluster, namespace, "job", "queued-reward-0"), 60, "the reward pool's Job")
    assert pool["spec"]["parallelism"] == 1
    # The trainer starts once the pool is ready (dependsOn), then succeeds; JobSet removes the pool.
    done = wait_phase(cluster, namespace, "queued", "Succeeded", timeout=120)
    assert done["conditions"] and condition(cluster, namespace, "queued", "Succeeded")["reason"] == "TrainerSucceeded"
    assert get(cluster, namespace, "job", "queued-trainer-0")["status"]["succeeded"] == 1
    wait_for(lambda: get(cluster, namespace, "job", "queued-reward-0") is None, 60, "JobSet to remove the reward pool")
    # The operator does not suspend the admitted JobSet again.
    assert get(cluster, namespace, "jobset", "queued")["spec"]["suspend"] is False


def test_a_rollout_server_jobs_trainer_starts_once_its_rollout_servers_are_ready_and_suspend_scales_them_to_zero(cluster, operator, namespace):
    # First on no node at all: the job says why its rollout servers do not come up, and waits.
    nowhere = {"nodeSelector": {"kuberft.io/pool": "none"}}
    apply(cluster, namespace, job_manifest("served", rollout={"mode": "server", "replicas": 2, "placement": nowhere}))
    deployment = wait_for(lambda: get(cluster, namespace, "deployment", "served-rollout"), 30, "the rollout Deployment")
    assert deployment["spec"]["replicas"] == 2
    assert deployment["spec"]["template"]["spec"]["containers"][0]["command"][:2] == ["kuberft", "rollout-server"]
    assert get(cluster, namespace, "service", "served-rollout")["spec"]["clusterIP"] == "None"  # headless: the trainer finds every pod
    policy = get(cluster, namespace, "networkpolicy", "served-rollout")["spec"]
    assert policy["ingress"] == [{"from": [{"podSelector": {"matchLabels": {"kuberft.io/rftjob": "served", "kuberft.io/role": "trainer"}}}],
                                  "ports": [{"protocol": "TCP", "port": 8300}]}]
    for kind in ("deployment", "service", "networkpolicy", "serviceaccount"):
        assert owned_by(get(cluster, namespace, kind, "served-rollout"), "RFTJob", "served"), kind
    stuck = wait_for(lambda: (c := condition(cluster, namespace, "served", "RolloutReady")).get("reason") == "RolloutPodsCannotStart" and c,
                     60, "RolloutPodsCannotStart")
    assert stuck["message"].startswith("0/2 rollout pods ready; pod served-rollout-") and "cannot be scheduled" in stuck["message"]
    assert any(e["type"] == "Warning" and e["reason"] == "RolloutPodsCannotStart" for e in events(cluster, namespace, "served"))
    wait_for(lambda: condition(cluster, namespace, "served", "Running").get("reason") == "WaitingForRolloutServers", 30, "WaitingForRolloutServers")
    assert get(cluster, namespace, "job", "served-trainer") is None

    # Then without the selector, on any node, where kwok makes them ready: only then is the trainer
    # created. (Taking the selector out of the spec must take it off the Deployment too.)
    cluster.kubectl("patch", "rftjob", "served", "-n", namespace, "--type=merge", "-p",
                    json.dumps({"spec": {"rollout": {"placement": {"nodeSelector": None}}}}))
    wait_for(lambda: "nodeSelector" not in get(cluster, namespace, "deployment", "served-rollout")["spec"]["template"]["spec"],
             30, "the node selector to leave the rollout Deployment")
    ready = wait_for(lambda: (c := condition(cluster, namespace, "served", "RolloutReady")).get("status") == "True" and c, 60, "RolloutReady=True")
    assert ready["message"] == "2/2 rollout pods ready"
    job = wait_for(lambda: get(cluster, namespace, "job", "served-trainer"), 30, "the trainer Job")
    assert job["metadata"]["creationTimestamp"] >= ready["lastTransitionTime"]
    command = job["spec"]["template"]["spec"]["containers"][0]["command"]
    assert command[-4:] == ["--rollout-service", f"served-rollout.{namespace}.svc:8300", "--rollout-replicas", "2"]
    wait_phase(cluster, namespace, "served", "Running")

    cluster.kubectl("patch", "rftjob", "served", "-n", namespace, "--type=merge", "-p", '{"spec": {"suspend": true}}')
    wait_phase(cluster, namespace, "served", "Suspended")
    wait_for(lambda: get(cluster, namespace, "deployment", "served-rollout")["spec"]["replicas"] == 0, 30, "the rollout servers to scale to 0")
    assert condition(cluster, namespace, "served", "RolloutReady")["reason"] == "Suspended"


def multi_node_job(name: str, **spec: Any) -> dict[str, Any]:
    """A trainer on two nodes (one GPU each), checkpointing to a claim both mount."""
    return job_manifest(name, trainer={**SMALL_JOB["spec"]["trainer"], "nodes": 2}, checkpoint={"storageSize": "1Gi"}, **spec)


def running_trainer_pods(cluster, namespace: str, name: str, count: int) -> list[dict[str, Any]]:
    pods = [p for p in trainer_pods(cluster, namespace, name) if p["status"].get("phase") == "Running" and not p["metadata"].get("deletionTimestamp")]
    return pods if len(pods) == count else []


def test_a_multi_node_job_is_one_jobset_whose_pods_restart_together_until_backoff_limit(cluster, operator, namespace):
    """The real JobSet controller runs the set; kwok plays the pods, and the test fails one the
    way a kubelet reports a crashed trainer."""
    apply(cluster, namespace, multi_node_job("multi", backoffLimit=1))
    jobset = wait_for(lambda: get(cluster, namespace, "jobset", "multi"), 60, "the JobSet")
    assert jobset["spec"]["suspend"] is False and "kueue.x-k8s.io/queue-name" not in jobset["metadata"]["labels"]  # no queue: it starts
    assert jobset["spec"]["network"] == {"enableDNSHostnames": True, "subdomain": "multi-trainer", "publishNotReadyAddresses": True}
    assert get(cluster, namespace, "deployment", "multi-reward") is None  # the pool is the JobSet's
    assert get(cluster, namespace, "pvc", "multi-checkpoints")["spec"]["accessModes"] == ["ReadWriteMany"]

    pods = wait_for(lambda: running_trainer_pods(cluster, namespace, "multi", 2), 90,
                    f"2 running trainer pods (status: {status(cluster, namespace, 'multi')})")
    job = get(cluster, namespace, "job", "multi-trainer-0")
    assert (job["spec"]["completionMode"], job["spec"]["parallelism"], job["spec"]["completions"], job["spec"]["backoffLimit"]) == ("Indexed", 2, 2, 0)
    # Each pod is <job>-<index>.multi-trainer (a headless Service), and knows its index for torchrun's --node-rank.
    assert sorted((p["spec"]["hostname"], p["spec"]["subdomain"]) for p in pods) == [("multi-trainer-0-0", "multi-trainer"), ("multi-trainer-0-1", "multi-trainer")]
    assert all("JOB_COMPLETION_INDEX" in [e["name"] for e in p["spec"]["containers"][0]["env"]] for p in pods)
    assert get(cluster, namespace, "service", "multi-trainer")["spec"]["clusterIP"] == "None"
    running = wait_for(lambda: (c := condition(cluster, namespace, "multi", "Running")).get("reason") == "TrainerRunning" and c, 30, "TrainerRunning")
    assert running["message"] == "all 2 trainer pods are running"

    # One pod fails: JobSet recreates the whole set (every pod anew), one restart of the job.
    first = {p["metadata"]["uid"] for p in pods}
    set_pod_phase(cluster, namespace, pods[1]["metadata"]["name"], "Failed", 1)
    wait_for(lambda: status(cluster, namespace, "multi").get("restarts") == 1, 60, "restarts 1 in the RFTJob's status")
    assert get(cluster, namespace, "jobset", "multi")["status"]["restarts"] == 1
    pods = wait_for(lambda: (new := running_trainer_pods(cluster, namespace, "multi", 2)) and not {p["metadata"]["uid"] for p in new} & first and new,
                    90, "2 new trainer pods")
    wait_for(lambda: condition(cluster, namespace, "multi", "Running").get("message") == "all 2 trainer pods are running (restart 1)", 30,
             "TrainerRunning after the restart")
    restarted = [e for e in events(cluster, namespace, "multi") if e["reason"] == "TrainerRestarted"]
    assert len(restarted) == 1 and restarted[0]["type"] == "Warning"
    assert restarted[0]["message"].endswith("restart 1 of 1 resumes from the latest checkpoint")

    # backoffLimit allowed that one restart: the next failure fails the job.
    set_pod_phase(cluster, namespace, pods[0]["metadata"]["name"], "Failed", 1)
    failed = wait_phase(cluster, namespace, "multi", "Failed", timeout=60)
    cond = next(c for c in failed["conditions"] if c["type"] == "Failed")
    assert cond["reason"] == "BackoffLimitExceeded"
    assert cond["message"].startswith(f"the trainer failed 2 time(s); backoffLimit 1 allows 1 restart(s); last: pod {pods[0]['metadata']['name']} failed: exit code 1 (Error)")
    assert failed["restarts"] == 1
    assert next(c for c in get(cluster, namespace, "jobset", "multi")["status"]["conditions"] if c["type"] == "Failed")["reason"] == "ReachedMaxRestarts"


def test_suspending_a_multi_node_job_removes_every_trainer_pod_and_resuming_starts_them_again(cluster, operator, namespace):
    apply(cluster, namespace, multi_node_job("paused"))
    wait_for(lambda: running_trainer_pods(cluster, namespace, "paused", 2), 90, "2 running trainer pods")

    cluster.kubectl("patch", "rftjob", "paused", "-n", namespace, "--type=merge", "-p", '{"spec": {"suspend": true}}')
    wait_phase(cluster, namespace, "paused", "Suspended")
    wait_for(lambda: get(cluster, namespace, "jobset", "paused") is None, 30, "the JobSet to be deleted")
    wait_for(lambda: not cluster.get_json("pods", "-n", namespace, "-l", "kuberft.io/rftjob=paused")["items"], 60,
             "every pod (trainers and reward pool) to be deleted")
    assert get(cluster, namespace, "pvc", "paused-checkpoints") is not None

    cluster.kubectl("patch", "rftjob", "paused", "-n", namespace, "--type=merge", "-p", '{"spec": {"suspend": false}}')
    wait_for(lambda: running_trainer_pods(cluster, namespace, "paused", 2), 90, "2 running trainer pods again")
    wait_phase(cluster, namespace, "paused", "Running")


def test_changing_a_training_field_of_a_running_job_is_refused_with_a_condition(cluster, operator, namespace):
    apply(cluster, namespace, job_manifest("steady"))
    wait_phase(cluster, namespace, "steady", "Running")
    cluster.kubectl("patch", "rftjob", "steady", "-n", namespace, "--type=merge", "-p", '{"spec": {"grpo": {"learningRate": 0.5}, "rewardPool": {"replicas": 2}}}')
    refused = wait_for(lambda: condition(cluster, namespace, "steady", "SpecAccepted").get("status") == "False" and condition(cluster, namespace, "steady", "SpecAccepted"), 30, "SpecAccepted=False")
    assert refused["reason"] == "ImmutableFieldChanged"
    assert refused["message"].startswith("spec.grpo.learningRate cannot change once training has started")
    config = json.loads(get(cluster, namespace, "configmap", "steady-config")["data"]["job.json"])
    assert config["grpo"]["learningRate"] == 1e-05
    assert status(cluster, namespace, "steady")["phase"] == "Running"
    # Reverting the training field lets the reward pool change roll out.
    cluster.kubectl("patch", "rftjob", "steady", "-n", namespace, "--type=merge", "-p", '{"spec": {"grpo": {"learningRate": 0.00001}}}')
    wait_for(lambda: condition(cluster, namespace, "steady", "SpecAccepted").get("status") == "True", 30, "SpecAccepted=True")
    wait_for(lambda: get(cluster, namespace, "deployment", "steady-reward")["spec"]["replicas"] == 2, 30, "the reward pool change to roll out")


# --------------------------------------------------------------------------- robustness


def _jobs_per_owner(cluster, namespace: str) -> dict[str, int]:
    counts: dict[str, int] = {}
    for job in cluster.get_json("jobs", "-n", namespace)["items"]:
        owner = job["metadata"]["labels"]["kuberft.io/rftjob"]
        counts[owner] = counts.get(owner, 0) + 1
    return counts


def test_killing_the_operator_mid_reconcile_creates_no_duplicates_and_loses_no_status(cluster, start_operator, namespace):
    first = start_operator("op-a")
    cluster.apply_objects([job_manifest(f"job-{i}") for i in range(12)], "-n", namespace)
    wait_for(lambda: len(cluster.get_json("configmaps", "-n", namespace, "-l", "kuberft.io/role=config")["items"]) >= 3, 30, "the first children")
    first.kill()
    second = start_operator("op-a")
    for i in range(12):
        wait_phase(cluster, namespace, f"job-{i}", "Running", timeout=90)
    second.kill()
    start_operator("op-a")  # and once more, with everything already in place
    counts = _jobs_per_owner(cluster, namespace)
    assert counts == {f"job-{i}": 1 for i in range(12)}
    replica_sets = cluster.get_json("replicasets", "-n", namespace)["items"]
    assert len(replica_sets) == 12  # the reward pool template never changed, so no rollout happened
    for i in range(12):
        current = status(cluster, namespace, f"job-{i}")
        assert sorted(c["type"] for c in current["conditions"]) == ["Created", "RewardPoolReady", "Running"]
        created = [e for e in events(cluster, namespace, f"job-{i}") if e["reason"] == "ChildrenCreated"]
        assert len(created) <= 1


def test_two_replicas_elect_one_leader_and_the_standby_takes_over(cluster, start_operator, namespace):
    leader = start_operator("op-a")
    lease_name = leader.lease_name
    wait_for(lambda: (get(cluster, "default", "lease", lease_name) or {}).get("spec", {}).get("holderIdentity") == "op-a", 20, "op-a to hold the lease")
    standby = start_operator("op-b")
    apply(cluster, namespace, job_manifest("first"))
    wait_phase(cluster, namespace, "first", "Running")
    assert "kuberft_operator_reconciles_total" not in standby.metrics() or 'kind="RFTJob"' not in standby.metrics()
    assert get(cluster, "default", "lease", lease_name)["spec"]["holderIdentity"] == "op-a"

    leader.kill()
    wait_for(lambda: get(cluster, "default", "lease", lease_name)["spec"]["holderIdentity"] == "op-b", 30, "op-b to take the lease over")
    apply(cluster, namespace, job_manifest("second"))
    wait_phase(cluster, namespace, "second", "Running")
    assert 'kuberft_operator_reconciles_total{kind="RFTJob",result="success"}' in standby.metrics()
    assert _jobs_per_owner(cluster, namespace) == {"first": 1, "second": 1}
    # A clean shutdown hands the lease back at once.
    assert standby.stop() == 0
    assert not get(cluster, "default", "lease", lease_name)["spec"].get("holderIdentity")


def test_metrics_count_reconciles_and_jobs_by_phase(cluster, operator, namespace):
    apply(cluster, namespace, job_manifest("measured", outcome="succeed"))
    wait_phase(cluster, namespace, "measured", "Succeeded", timeout=60)
    text = wait_for(lambda: next((m for m in [operator.metrics()] if 'kuberft_operator_rftjobs{phase="Succeeded"} 1.0' in m), None), 20, "the phase gauge")
    assert 'kuberft_operator_reconciles_total{kind="RFTJob",result="success"}' in text
    assert 'kuberft_operator_reconcile_seconds_count{kind="RFTJob"}' in text


def test_an_operator_watching_one_namespace_leaves_the_others_alone(cluster, start_operator, namespace):
    other = f"{namespace}-other"
    cluster.kubectl("create", "namespace", other)
    try:
        start_operator("op-a", "--namespace", namespace)
        apply(cluster, namespace, job_manifest("watched"))
        apply(cluster, other, job_manifest("ignored"))
        wait_phase(cluster, namespace, "watched", "Running")
        assert status(cluster, other, "ignored") == {}
        assert get(cluster, other, "configmap", "ignored-config") is None
    finally:
        cluster.kubectl("delete", "namespace", other, "--wait=false", check=False)


def test_an_autoscaled_turbo_deployment_gets_an_hpa_and_keeps_its_scale(cluster, operator, namespace):
    turbo = {
        "apiVersion": "kuberft.io/v1alpha1",
        "kind": "TurboDeployment",
        "metadata": {"name": "chat"},
        "spec": {
            "model": {"name": "Qwen/Qwen2.5-0.5B-Instruct"},
            "adapter": {"uri": "/models/adapter", "name": "chat"},
            "speculator": {"type": "ngram"},
            "autoscaling": {"minReplicas": 2, "maxReplicas": 4},
            "placement": {"resources": {"requests": {"cpu": "1"}}},
        },
    }
    apply(cluster, namespace, turbo)
    hpa = wait_for(lambda: get(cluster, namespace, "hpa", "chat"), 30, "the HorizontalPodAutoscaler")
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (2, 4)
    assert owned_by(hpa, "TurboDeployment", "chat")
    # What the autoscaler decides (here: scaled by hand, as the HPA would) survives reconciles.
    wait_for(lambda: get(cluster, namespace, "deployment", "chat"), 30, "the serving Deployment")
    cluster.kubectl("scale", "deployment", "chat", "-n", namespace, "--replicas=3")
    ready = wait_for(lambda: (s := (get(cluster, namespace, "turbodeployment", "chat") or {}).get("status") or {}).get("readyReplicas") == 3 and s, 60, "3 ready serving pods")
    assert ready["phase"] == "Ready"
    assert get(cluster, namespace, "deployment", "chat")["spec"]["replicas"] == 3
    # Turning autoscaling off removes the HPA and the spec's replica count applies again.
    cluster.kubectl("patch", "turbodeployment", "chat", "-n", namespace, "--type=json", "-p", '[{"op": "remove", "path": "/spec/autoscaling"}]')
    wait_for(lambda: get(cluster, namespace, "hpa", "chat") is None, 30, "the HPA to be deleted")
    wait_for(lambda: get(cluster, namespace, "deployment", "chat")["spec"]["replicas"] == 1, 30, "spec.replicas to apply")
