"""The operator's decisions (`plan_rftjob`, `plan_turbo`) for each situation a job goes through,
checked without a cluster: the plan is a pure function of what the operator observes."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone

from kuberft_operator.builders import Images, Owner, content_hash, reward_deployment, trainer_job, trainer_pod_template
from kuberft_operator.reconcile import RFTJobObserved, TurboObserved, parse_spec, plan_rftjob, plan_turbo, status_changes
from kuberft_core.api import RFTJobSpec

IMAGES = Images.for_version("registry.test/kuberft", "1.0.0")
NOW = datetime(2026, 11, 25, 12, 0, 0, tzinfo=timezone.utc)
SPEC = {
    "model": {"name": "tiny:countdown"},
    "dataset": {"builtin": {"name": "countdown"}},
    "rewards": [{"kind": "countdown"}],
    "grpo": {"steps": 20},
    "rewardPool": {"replicas": 2},
    "checkpoint": {"storageSize": "1Gi"},
    "backoffLimit": 2,
}


def rftjob(spec=None, status=None, generation=1):
    return {
        "apiVersion": "kuberft.io/v1alpha1",
        "kind": "RFTJob",
        "metadata": {"name": "demo", "namespace": "ns", "uid": "u1", "generation": generation, "resourceVersion": "7"},
        "spec": spec or SPEC,
        "status": status or {},
    }


def run(body, now=NOW, **observed):
    return plan_rftjob(RFTJobObserved(body=body, **observed), IMAGES, now)


def ready_pool(replicas=2):
    spec = RFTJobSpec.model_validate(SPEC)
    dep = reward_deployment(spec, Owner("RFTJob", "demo", "ns", "u1"), IMAGES, replicas)
    dep["status"] = {"readyReplicas": replicas}
    return dep


def created_job(conditions=(), failed=0, active=0, restarts_before=0, spec=None):
    spec = RFTJobSpec.model_validate(spec or SPEC)
    job = trainer_job(spec, Owner("RFTJob", "demo", "ns", "u1"), IMAGES, restarts_before=restarts_before)
    job["metadata"]["uid"] = "job-uid"
    job["status"] = {"failed": failed, "active": active, "conditions": [{"type": t, "status": "True", "reason": r, "message": m} for t, r, m in conditions]}
    return job


def config_map_for(spec, generation=1):
    return {"metadata": {"annotations": {"kuberft.io/spec-generation": str(generation)}}, "data": {"job.json": json.dumps(RFTJobSpec.model_validate(spec).to_wire())}}


def condition(plan, type_):
    return next(c for c in plan.status["conditions"] if c["type"] == type_)


def test_a_new_job_gets_its_children_but_no_trainer_until_the_pool_is_ready():
    plan = run(rftjob())
    assert [c["kind"] for c in plan.apply][:2] == ["ConfigMap", "PersistentVolumeClaim"]
    assert plan.create == []
    assert plan.status["phase"] == "Pending"
    assert condition(plan, "Created")["status"] == "True"
    assert condition(plan, "RewardPoolReady") | {"lastTransitionTime": None} == {
        "type": "RewardPoolReady", "status": "False", "reason": "PodsNotReady", "message": "0/2 reward pods ready",
        "lastTransitionTime": None, "observedGeneration": 1,
    }
    assert condition(plan, "Running")["reason"] == "WaitingForRewardPool"
    assert plan.status["progress"] == "0/20"
    # Conditions that start out False are not announced; Created is.
    assert [e.reason for e in plan.events] == ["ChildrenCreated"]


def test_the_trainer_job_is_created_once_the_pool_is_ready_and_start_time_is_recorded():
    plan = run(rftjob(), reward_deployment=ready_pool())
    assert [j["metadata"]["name"] for j in plan.create] == ["demo-trainer"]
    assert plan.status["startTime"] == "2026-11-25T12:00:00Z"
    assert condition(plan, "RewardPoolReady")["status"] == "True"
    assert [(e.reason, e.message) for e in plan.events] == [("ChildrenCreated", "job config, reward pool and trainer permissions created"), ("PodsReady", "2/2 reward pods ready"), ("TrainerCreated", "created the trainer Job demo-trainer")]


def test_planning_the_same_observation_twice_changes_nothing():
    first = run(rftjob(), reward_deployment=ready_pool())
    body = rftjob(status=first.status)
    second = run(body, now=NOW + timedelta(seconds=5), reward_deployment=ready_pool(), trainer_job=created_job())
    again = run(body, now=NOW + timedelta(seconds=9), reward_deployment=ready_pool(), trainer_job=created_job())
    assert second.create == [] and again.create == []
    assert second.status == again.status
    assert status_changes(rftjob(status=second.status)["status"], again.status) == {}


def test_a_running_trainer_pod_makes_the_job_running():
    pods = [{"metadata": {"name": "demo-trainer-x"}, "status": {"phase": "Running"}}]
    plan = run(rftjob(status={"startTime": "2026-11-25T11:00:00Z"}), reward_deployment=ready_pool(), trainer_job=created_job(active=1), trainer_pods=pods)
    assert plan.status["phase"] == "Running"
    assert condition(plan, "Running")["reason"] == "TrainerRunning"


def test_a_completed_trainer_job_makes_the_job_succeeded_and_scales_the_pool_down():
    plan = run(
        rftjob(status={"startTime": "2026-11-25T11:00:00Z"}),
        reward_deployment=ready_pool(),
        trainer_job=created_job(conditions=[("Complete", "", "")]),
    )
    assert plan.status["phase"] == "Succeeded"
    assert plan.status["completionTime"] == "2026-11-25T12:00:00Z"
    assert plan.status["adapter"] == "pvc://demo-checkpoints/demo/adapter"
    deployment = next(c for c in plan.apply if c["kind"] == "Deployment")
    assert deployment["spec"]["replicas"] == 0


def test_the_adapter_path_the_trainer_reports_becomes_a_claim_location():
    status = {"startTime": "2026-11-25T11:00:00Z", "adapter": "/checkpoints/demo/adapter"}
    plan = run(rftjob(status=status), reward_deployment=ready_pool(), trainer_job=created_job(conditions=[("Complete", "", "")]))
    assert plan.status["adapter"] == "pvc://demo-checkpoints/demo/adapter"


def test_a_failed_trainer_restart_is_counted_and_announced():
    pods = [
        {"metadata": {"name": "demo-trainer-a", "creationTimestamp": "2026-11-25T11:00:00Z"}, "status": {"phase": "Failed", "containerStatuses": [{"state": {"terminated": {"exitCode": 137, "reason": "OOMKilled"}}}]}},
        {"metadata": {"name": "demo-trainer-b", "creationTimestamp": "2026-11-25T11:05:00Z"}, "status": {"phase": "Running"}},
    ]
    plan = run(rftjob(status={"startTime": "2026-11-25T11:00:00Z", "restarts": 0}), reward_deployment=ready_pool(), trainer_job=created_job(failed=1, active=1), trainer_pods=pods)
    assert plan.status["restarts"] == 1
    restarted = next(e for e in plan.events if e.reason == "TrainerRestarted")
    assert restarted.type == "Warning"
    assert restarted.message == "pod demo-trainer-a failed: exit code 137 (OOMKilled); restart 1 of 2 resumes from the latest checkpoint"


def test_a_job_whose_trainer_exhausted_its_retries_fails_with_the_pod_reason():
    pods = [{"metadata": {"name": "demo-trainer-c", "creationTimestamp": "2026-11-25T11:09:00Z"}, "status": {"phase": "Failed", "containerStatuses": [{"state": {"terminated": {"exitCode": 1, "reason": "Error", "message": "CUDA error: out of memory"}}}]}}]
    plan = run(
        rftjob(status={"startTime": "2026-11-25T11:00:00Z", "restarts": 2}),
        reward_deployment=ready_pool(),
        trainer_job=created_job(failed=3, conditions=[("Failed", "BackoffLimitExceeded", "Job has reached the specified backoff limit")]),
        trainer_pods=pods,
    )
    failed = condition(plan, "Failed")
    assert plan.status["phase"] == "Failed"
    assert failed["reason"] == "BackoffLimitExceeded"
    assert failed["message"] == (
        "the trainer failed 3 time(s); backoffLimit 2 allows 2 restart(s); last: pod demo-trainer-c failed: exit code 1 (Error): CUDA error: out of memory"
    )
    assert plan.status["restarts"] == 2
    assert any(e.type == "Warning" and e.reason == "BackoffLimitExceeded" for e in plan.events)


def test_suspending_deletes_the_trainer_keeps_checkpoints_and_scales_the_pool_to_zero():
    spec = dict(SPEC, suspend=True)
    plan = run(rftjob(spec=spec, status={"startTime": "2026-11-25T11:00:00Z"}), reward_deployment=ready_pool(), trainer_job=created_job(failed=1, spec=spec))
    assert [(d.kind, d.name) for d in plan.delete] == [("Job", "demo-trainer")]
    assert not any(c["kind"] == "PersistentVolumeClaim" for c in [] + [{"kind": d.kind} for d in plan.delete])
    assert next(c for c in plan.apply if c["kind"] == "Deployment")["spec"]["replicas"] == 0
    assert plan.status["phase"] == "Suspended"
    assert plan.status["restarts"] == 1
    assert condition(plan, "Suspended")["message"] == "the trainer is stopped; checkpoints are kept in pvc://demo-checkpoints/demo"


def test_resuming_recreates_the_trainer_counting_earlier_restarts():
    status = {"startTime": "2026-11-25T11:00:00Z", "restarts": 1, "conditions": [{"type": "Suspended", "status": "True", "reason": "Suspended", "message": "", "lastTransitionTime": "2026-11-25T11:30:00Z"}]}
    plan = run(rftjob(status=status), reward_deployment=ready_pool())
    assert condition(plan, "Suspended")["reason"] == "Resumed"
    job = plan.create[0]
    assert job["metadata"]["annotations"]["kuberft.io/restarts-before"] == "1"
    assert job["spec"]["backoffLimit"] == 1


def test_changing_a_training_field_of_a_running_job_is_refused_and_the_old_spec_stays():
    changed = dict(SPEC, grpo={"steps": 20, "learningRate": 0.001}, model={"name": "other"})
    plan = run(
        rftjob(spec=changed, generation=2, status={"startTime": "2026-11-25T11:00:00Z"}),
        config_map=config_map_for(SPEC, generation=1),
        reward_deployment=ready_pool(),
        trainer_job=created_job(active=1),
    )
    refused = condition(plan, "SpecAccepted")
    assert refused["status"] == "False" and refused["reason"] == "ImmutableFieldChanged"
    assert refused["message"].startswith("spec.model.name, spec.grpo.learningRate cannot change once training has started")
    config = next(c for c in plan.apply if c["kind"] == "ConfigMap")
    assert json.loads(config["data"]["job.json"])["model"]["name"] == "tiny:countdown"
    assert plan.delete == []  # the running trainer is left alone
    assert any(e.type == "Warning" and e.reason == "ImmutableFieldChanged" for e in plan.events)


def test_changing_the_reward_pool_of_a_running_job_rolls_out():
    changed = dict(SPEC, rewardPool={"replicas": 3})
    plan = run(rftjob(spec=changed, generation=2, status={"startTime": "2026-11-25T11:00:00Z"}), config_map=config_map_for(SPEC), reward_deployment=ready_pool(), trainer_job=created_job(active=1, spec=SPEC))
    assert all(c["type"] != "SpecAccepted" for c in plan.status["conditions"])
    assert next(c for c in plan.apply if c["kind"] == "Deployment")["spec"]["replicas"] == 3


def test_changing_trainer_placement_replaces_the_trainer_job():
    changed = dict(SPEC, trainer={"nodeSelector": {"pool": "a100"}})
    plan = run(rftjob(spec=changed, generation=2, status={"startTime": "2026-11-25T11:00:00Z"}), config_map=config_map_for(SPEC), reward_deployment=ready_pool(), trainer_job=created_job(active=1, spec=SPEC))
    assert [(d.kind, d.name) for d in plan.delete] == [("Job", "demo-trainer")]
    assert condition(plan, "Running")["reason"] == "TrainerRestarting"


def test_the_deadline_fails_the_job_and_stops_the_trainer():
    spec = dict(SPEC, activeDeadlineSeconds=600)
    plan = run(rftjob(spec=spec, status={"startTime": "2026-11-25T11:49:00Z"}), reward_deployment=ready_pool(), trainer_job=created_job(active=1, spec=spec))
    assert condition(plan, "Failed")["reason"] == "DeadlineExceeded"
    assert [(d.kind, d.name) for d in plan.delete] == [("Job", "demo-trainer")]
    early = run(rftjob(spec=spec, status={"startTime": "2026-11-25T11:55:00Z"}), reward_deployment=ready_pool(), trainer_job=created_job(active=1, spec=spec))
    assert early.requeue_after == 300


def test_ttl_after_finished_deletes_children_but_keeps_the_checkpoint_claim():
    from kuberft_operator.reconcile import ChildRef

    spec = dict(SPEC, ttlSecondsAfterFinished=60)
    status = {"completionTime": "2026-11-25T11:58:00Z", "conditions": [{"type": "Succeeded", "status": "True", "reason": "TrainerSucceeded", "message": "", "lastTransitionTime": "2026-11-25T11:58:00Z"}]}
    children = [ChildRef("v1", "ConfigMap", "demo-config"), ChildRef("v1", "PersistentVolumeClaim", "demo-checkpoints"), ChildRef("batch/v1", "Job", "demo-trainer")]
    plan = run(rftjob(spec=spec, status=status), children=children)
    assert [c.kind for c in plan.delete] == ["ConfigMap", "Job"]
    assert plan.apply == [] and plan.create == []
    assert plan.status["phase"] == "Succeeded"
    assert plan.events[0].reason == "ChildrenDeleted"
    waiting = run(rftjob(spec=spec, status=status), now=NOW - timedelta(seconds=90), children=children)
    assert waiting.delete == [] and waiting.requeue_after == 30


def test_kueue_holds_the_trainer_until_admission():
    spec = dict(SPEC, queueName="gpus")
    job = created_job(spec=spec)
    job["spec"]["suspend"] = True
    plan = run(rftjob(spec=spec, status={"startTime": "2026-11-25T11:00:00Z"}), reward_deployment=ready_pool(), trainer_job=job)
    assert condition(plan, "Running")["reason"] == "WaitingForQueue"
    assert plan.status["phase"] == "Pending"


def test_a_turbo_deployment_waits_for_its_rftjob_then_serves_its_adapter():
    turbo = {
        "apiVersion": "kuberft.io/v1alpha1",
        "kind": "TurboDeployment",
        "metadata": {"name": "chat", "namespace": "ns", "uid": "t1", "generation": 1},
        "spec": {"model": {"name": "tiny:countdown"}, "adapter": {"fromRFTJob": "demo"}},
    }
    waiting = plan_turbo(TurboObserved(body=turbo, rftjob=rftjob(status={"phase": "Running"})), IMAGES, NOW)
    assert waiting.apply == []
    assert waiting.status["phase"] == "Pending"
    assert waiting.status["conditions"][0]["message"] == "RFTJob demo is Running; serving starts when it has Succeeded"
    done = rftjob(status={"phase": "Succeeded", "adapter": "pvc://demo-checkpoints/demo"})
    serving = plan_turbo(TurboObserved(body=turbo, rftjob=done), IMAGES, NOW)
    command = serving.apply[0]["spec"]["template"]["spec"]["containers"][0]["command"]
    assert command[command.index("--adapter") + 1] == "default=/adapters/demo"
    assert serving.status["url"] == "http://chat.ns.svc:8000/v1"
    assert serving.status["phase"] == "Progressing"
    failed = plan_turbo(TurboObserved(body=turbo, rftjob=rftjob(status={"phase": "Failed"})), IMAGES, NOW)
    assert failed.status["phase"] == "Failed"


def test_each_distinct_spec_is_validated_once_and_a_broken_rule_still_fails_the_job():
    first = parse_spec(RFTJobSpec, json.loads(json.dumps(SPEC)))
    assert parse_spec(RFTJobSpec, dict(reversed(list(SPEC.items())))) is first  # same content, another key order
    broken = {**SPEC, "rewards": [{"kind": "countdown"}, {"kind": "countdown"}]}
    plan = run(rftjob(broken))
    failed = condition(plan, "Failed")
    assert failed["status"] == "True" and failed["reason"] == "InvalidSpec"
    assert "reward names must be unique" in failed["message"]
    assert run(rftjob(broken)).status == plan.status  # the refusal is not cached away
