"""The operator's decisions (`plan_rftjob`, `plan_turbo`) for each situation a job goes through,
checked without a cluster: the plan is a pure function of what the operator observes."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone

import pytest

from kuberft_core.api import RFTJobSpec
from kuberft_operator.builders import Images, Owner, reward_deployment, rftjob_jobset, rollout_deployment, trainer_job
from kuberft_operator.reconcile import ChildRef, RFTJobObserved, TurboObserved, parse_spec, plan_rftjob, plan_turbo, status_changes

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


def applied(plan, kind):
    return next(c for c in plan.apply if c["kind"] == kind)


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


RUNNING_POD = [{"metadata": {"name": "demo-trainer-x"}, "status": {"phase": "Running"}}]


def progress(**data):
    """The trainer's progress ConfigMap as the controller's cache holds it."""
    return {"metadata": {"name": "demo-progress"}, "data": data}


def running(status=None, report=None, **observed):
    status = {"startTime": "2026-11-25T11:00:00Z", **(status or {})}
    return run(rftjob(status=status), reward_deployment=ready_pool(), trainer_job=created_job(active=1), trainer_pods=RUNNING_POD,
               progress=report, **observed)


def test_the_trainers_progress_report_is_copied_into_the_status():
    plan = running(report=progress(step="12", totalSteps="20", rewards='{"countdown":0.41234}', meanReward="0.41234"))
    assert (plan.status["step"], plan.status["progress"], plan.status["totalSteps"]) == (12, "12/20", 20)
    assert plan.status["rewards"] == {"countdown": 0.41234}
    assert plan.status["meanReward"] == 0.41234
    assert "adapter" not in plan.status  # not written yet
    assert [c["type"] for c in plan.status["conditions"] if c["type"] == "ProgressAccepted"] == []


def test_the_adapter_location_is_the_operators_once_the_trainer_says_it_is_written():
    plan = running(report=progress(step="20", adapterWritten="true"))
    assert plan.status["adapter"] == "pvc://demo-checkpoints/demo/adapter"
    # A location nobody but the operator could have computed (an older trainer wrote status) goes.
    stale = running(status={"adapter": "pvc://other-team-checkpoints/their-job/adapter"}, report=progress(step="3"))
    assert stale.status["adapter"] is None
    assert status_changes({"adapter": "pvc://other-team-checkpoints/their-job/adapter"}, stale.status)["adapter"] is None


def test_a_hostile_progress_report_cannot_change_phase_adapter_or_inject_status():
    before = {"step": 5, "rewards": {"countdown": 0.25}, "meanReward": 0.25}
    hostile = progress(
        phase="Succeeded",
        adapter="pvc://other-team-checkpoints/their-job/adapter",
        conditions='[{"type": "Succeeded", "status": "True"}]',
        step="999999",
        totalSteps="-1",
        rewards=json.dumps({f"r{i}": 1.0 for i in range(100)}),
        meanReward="NaN",
        adapterWritten="/etc/passwd",
    )
    plan = running(status=before, report=hostile)
    assert plan.status["phase"] == "Running"
    assert condition(plan, "Running")["reason"] == "TrainerRunning"
    assert "Succeeded" not in [c["type"] for c in plan.status["conditions"]]
    assert "adapter" not in plan.status
    # Every bad value is ignored: the status keeps what the operator accepted before.
    assert (plan.status["step"], plan.status["progress"]) == (5, "5/20")
    assert plan.status["rewards"] == {"countdown": 0.25} and plan.status["meanReward"] == 0.25
    assert not set(plan.status) - {"observedGeneration", "startTime", "restarts", "step", "rewards", "meanReward", "totalSteps", "progress", "conditions", "phase"}
    refused = condition(plan, "ProgressAccepted")
    assert (refused["status"], refused["reason"]) == ("False", "InvalidProgressReport")
    message = refused["message"]
    assert message.startswith("ignored in ConfigMap demo-progress: step: 999999 is more than the job's 20 steps; ")
    assert 'totalSteps: "-1" is not a whole number' in message
    assert '"r0", "r1", "r10" and 97 more not among the job\'s rewards (countdown)' in message
    assert 'meanReward: "NaN" is not a finite number' in message
    assert 'adapterWritten: "/etc/passwd" is neither true nor false' in message
    assert len(message) < 1000
    warning = next(e for e in plan.events if e.reason == "InvalidProgressReport")
    assert warning.type == "Warning"


def test_huge_and_infinite_progress_values_are_refused_and_a_valid_report_is_accepted_again():
    plan = running(report=progress(rewards="{" + " " * 1_000_000 + "}", meanReward="1e400", step="7"))
    assert plan.status["step"] == 7
    assert "rewards" not in plan.status and "meanReward" not in plan.status
    assert condition(plan, "ProgressAccepted")["message"] == (
        "ignored in ConfigMap demo-progress: rewards: longer than 2048 characters; meanReward: \"1e400\" is not a finite number"
    )
    later = running(status=plan.status, report=progress(step="8", rewards='{"countdown":0.5}', meanReward="0.5"))
    assert (later.status["step"], later.status["rewards"], later.status["meanReward"]) == (8, {"countdown": 0.5}, 0.5)
    assert (condition(later, "ProgressAccepted")["status"], condition(later, "ProgressAccepted")["reason"]) == ("True", "Accepted")


def test_a_turbo_deployment_serves_the_operators_adapter_whatever_the_trainer_claims():
    hostile = progress(adapter="pvc://other-team-checkpoints/their-job/adapter", adapterWritten="true")
    finished = run(rftjob(status={"startTime": "2026-11-25T11:00:00Z"}), reward_deployment=ready_pool(),
                   trainer_job=created_job(conditions=[("Complete", "", "")]), progress=hostile)
    assert finished.status["phase"] == "Succeeded"
    assert finished.status["adapter"] == "pvc://demo-checkpoints/demo/adapter"
    turbo = {
        "apiVersion": "kuberft.io/v1alpha1",
        "kind": "TurboDeployment",
        "metadata": {"name": "chat", "namespace": "ns", "uid": "t1", "generation": 1},
        "spec": {"model": {"name": "tiny:countdown"}, "adapter": {"fromRFTJob": "demo"}},
    }
    serving = plan_turbo(TurboObserved(body=turbo, rftjobs={"demo": rftjob(status=finished.status)}), IMAGES, NOW)
    volumes = applied(serving, "Deployment")["spec"]["template"]["spec"]["volumes"]
    assert {"name": "adapters-0", "persistentVolumeClaim": {"claimName": "demo-checkpoints", "readOnly": True}} in volumes


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
    early = run(rftjob(spec=spec, status={"startTime": "2026-11-25T11:55:00Z"}), reward_deployment=ready_pool(), trainer_job=created_job(active=1, spec=spec),
                trainer_pods=RUNNING_POD)
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


def created_jobset(spec, suspend=True, failed_condition=None, restarts=0, restarts_before=0):
    jobset = rftjob_jobset(RFTJobSpec.model_validate(spec), Owner("RFTJob", "demo", "ns", "u1"), IMAGES, restarts_before=restarts_before)
    jobset["metadata"]["uid"] = "jobset-uid"
    jobset["spec"]["suspend"] = suspend
    jobset["status"] = {"restarts": restarts}
    if failed_condition:
        jobset["status"]["conditions"] = [{"type": "Failed", "status": "True", **failed_condition}]
    return jobset


def test_a_queued_job_is_one_jobset_that_kueue_admits_whole():
    spec = dict(SPEC, queueName="gpus")
    plan = run(rftjob(spec=spec), local_queue="found")
    [jobset] = plan.create
    assert jobset["kind"] == "JobSet" and jobset["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "gpus"
    assert jobset["spec"]["suspend"] is True
    assert [r["name"] for r in jobset["spec"]["replicatedJobs"]] == ["reward", "trainer"]
    # No reward Deployment outside the JobSet: the pool's pods are in the same workload.
    assert not [c for c in plan.apply if c["kind"] == "Deployment"]
    assert {c["kind"] for c in plan.apply} >= {"Service", "NetworkPolicy", "ServiceAccount"}
    assert condition(plan, "Running")["reason"] == "WaitingForQueue" and plan.status["phase"] == "Pending"

    waiting = run(rftjob(spec=spec, status={"startTime": "2026-11-25T11:00:00Z"}), local_queue="found", jobset=created_jobset(spec))
    assert not waiting.create and not waiting.delete
    assert condition(waiting, "Running")["reason"] == "WaitingForQueue"
    assert "JobSet demo" in condition(waiting, "Running")["message"]

    admitted = run(rftjob(spec=spec, status={"startTime": "2026-11-25T11:00:00Z"}), local_queue="found", jobset=created_jobset(spec, suspend=False))
    assert condition(admitted, "Running")["reason"] == "WaitingForRewardPool"
    assert condition(admitted, "RewardPoolReady")["status"] == "False"


def test_a_queued_jobs_trainer_is_the_jobsets_and_its_failure_fails_the_job():
    spec = dict(SPEC, queueName="gpus")
    status = {"startTime": "2026-11-25T11:00:00Z"}
    reward_job = {"metadata": {"name": "demo-reward-0", "uid": "r"}, "status": {"ready": 2}}
    running_plan = run(rftjob(spec=spec, status=status), local_queue="found", jobset=created_jobset(spec, suspend=False),
                       reward_job=reward_job, trainer_job=created_job(active=1, spec=spec), trainer_pods=RUNNING_POD)
    assert condition(running_plan, "Running")["reason"] == "TrainerRunning"
    assert condition(running_plan, "RewardPoolReady")["reason"] == "PodsReady"
    assert not running_plan.delete and not running_plan.create

    done = run(rftjob(spec=spec, status=status), local_queue="found", jobset=created_jobset(spec, suspend=False),
               trainer_job=created_job(conditions=[("Complete", "", "")], spec=spec))
    assert done.status["phase"] == "Succeeded"
    pool = run(rftjob(spec=spec, status=status), local_queue="found",
               jobset=created_jobset(spec, suspend=False, failed_condition={"reason": "FailedJobs", "message": "jobset failed due to reward"}))
    assert pool.status["phase"] == "Failed" and condition(pool, "Failed")["reason"] == "JobSetFailed"


def test_a_queued_jobs_reward_pods_refused_by_admission_are_reported():
    spec = dict(SPEC, queueName="gpus")
    reward_job = {"metadata": {"name": "demo-reward-0", "uid": "r"}, "spec": {"parallelism": 2}, "status": {"ready": 0}}
    refusal = {"reason": "FailedCreate", "type": "Warning", "lastTimestamp": "2026-11-25T11:59:00Z",
               "message": 'Error creating: pods "demo-reward-0-0" is forbidden: violates PodSecurity "restricted:latest"'}
    plan = run(rftjob(spec=spec, status={"startTime": "2026-11-25T11:00:00Z"}), local_queue="found", jobset=created_jobset(spec, suspend=False),
               reward_job=reward_job, reward_job_events=[refusal])
    pool = condition(plan, "RewardPoolReady")
    assert pool["reason"] == "RewardPodsCannotStart" and "violates PodSecurity" in pool["message"]
    assert ("Warning", "RewardPodsCannotStart") in [(e.type, e.reason) for e in plan.events]
    starting = run(rftjob(spec=spec, status={"startTime": "2026-11-25T11:00:00Z"}), local_queue="found", jobset=created_jobset(spec, suspend=False),
                   reward_job=reward_job)
    assert condition(starting, "RewardPoolReady")["reason"] == "PodsNotReady" and starting.requeue_after == 5


def test_suspending_a_queued_job_deletes_its_jobset():
    spec = dict(SPEC, queueName="gpus", suspend=True)
    plan = run(rftjob(spec=spec, status={"startTime": "2026-11-25T11:00:00Z"}), local_queue="found", jobset=created_jobset(spec, suspend=False))
    assert [(c.kind, c.name) for c in plan.delete] == [("JobSet", "demo")]


# --------------------------------------------------------------------------- multi-node trainers

MULTI_NODE = dict(SPEC, trainer={"nodes": 2, "resources": {"limits": {"nvidia.com/gpu": 8}}})
STARTED_AT = {"startTime": "2026-11-25T11:00:00Z"}
TWO_RUNNING_PODS = [{"metadata": {"name": f"demo-trainer-0-{i}-x"}, "status": {"phase": "Running"}} for i in range(2)]
READY_REWARD_JOB = {"metadata": {"name": "demo-reward-0", "uid": "r"}, "spec": {"parallelism": 2}, "status": {"ready": 2}}


def multi_node(status=None, **observed):
    return run(rftjob(spec=MULTI_NODE, status={**STARTED_AT, **(status or {})}), local_queue="found", **observed)


def test_a_multi_node_job_is_one_jobset_started_at_once_without_a_queue():
    plan = run(rftjob(spec=MULTI_NODE), local_queue="found")
    [jobset] = plan.create
    assert jobset["kind"] == "JobSet" and jobset["spec"]["suspend"] is False
    assert "kueue.x-k8s.io/queue-name" not in jobset["metadata"]["labels"]
    assert jobset["spec"]["replicatedJobs"][1]["template"]["spec"]["parallelism"] == 2
    assert not [c for c in plan.apply if c["kind"] == "Deployment"]  # the pool is the JobSet's
    assert condition(plan, "Running")["reason"] == "WaitingForRewardPool"
    assert ("TrainerCreated", "created the JobSet demo (trainer on 2 nodes and reward pool)") in [(e.reason, e.message) for e in plan.events]
    assert plan.status["startTime"] == "2026-11-25T12:00:00Z"

    pool = multi_node(jobset=created_jobset(MULTI_NODE, suspend=False), reward_job=READY_REWARD_JOB)
    assert condition(pool, "RewardPoolReady")["reason"] == "PodsReady"
    assert condition(pool, "Running")["message"] == "the trainer starts once the reward pool is ready"  # no Kueue mentioned
    one_pod = multi_node(jobset=created_jobset(MULTI_NODE, suspend=False), reward_job=READY_REWARD_JOB,
                         trainer_job=created_job(active=2, spec=MULTI_NODE), trainer_pods=TWO_RUNNING_PODS[:1])
    assert condition(one_pod, "Running")["status"] == "False"  # one node alone does not train
    both = multi_node(jobset=created_jobset(MULTI_NODE, suspend=False), reward_job=READY_REWARD_JOB,
                      trainer_job=created_job(active=2, spec=MULTI_NODE), trainer_pods=TWO_RUNNING_PODS)
    assert (condition(both, "Running")["reason"], condition(both, "Running")["message"]) == ("TrainerRunning", "all 2 trainer pods are running")
    assert not both.create and not both.delete


def test_a_multi_node_job_needs_jobset_installed():
    plan = run(rftjob(spec=MULTI_NODE), local_queue="no-jobset")
    running = condition(plan, "Running")
    assert running["reason"] == "JobSetNotInstalled" and running["message"].startswith("spec.trainer.nodes is 2: a multi-node trainer runs as a JobSet")
    assert ("Warning", "JobSetNotInstalled") in [(e.type, e.reason) for e in plan.events]
    assert not plan.create and plan.requeue_after == 30


def test_jobset_restarts_are_the_jobs_restarts_and_the_job_fails_when_backoff_limit_is_spent():
    # JobSet restarted the whole set once (every pod anew): counted and announced.
    restarted = multi_node(status={"restarts": 0}, jobset=created_jobset(MULTI_NODE, suspend=False, restarts=1), reward_job=READY_REWARD_JOB,
                           trainer_job=created_job(active=2, spec=MULTI_NODE), trainer_pods=TWO_RUNNING_PODS)
    assert restarted.status["restarts"] == 1
    assert condition(restarted, "Running")["message"] == "all 2 trainer pods are running (restart 1)"
    event = next(e for e in restarted.events if e.reason == "TrainerRestarted")
    assert (event.type, event.message) == ("Warning", "a trainer pod failed; restart 1 of 2 resumes from the latest checkpoint")
    # Restarts before a suspend count too (the JobSet was recreated with what was left).
    resumed = multi_node(status={"restarts": 1}, jobset=created_jobset(MULTI_NODE, suspend=False, restarts=1, restarts_before=1))
    assert resumed.status["restarts"] == 2

    # A failed trainer Job is not the end while JobSet still has a restart for it.
    failed_pod = [{"metadata": {"name": "demo-trainer-0-1-x", "creationTimestamp": "2026-11-25T11:50:00Z"},
                   "status": {"phase": "Failed", "containerStatuses": [{"state": {"terminated": {"exitCode": 1, "reason": "Error", "message": "NCCL timeout"}}}]}}]
    trainer_failed = created_job(failed=2, spec=MULTI_NODE, conditions=[("Failed", "BackoffLimitExceeded", "Job has reached the specified backoff limit")])
    restarting = multi_node(status={"restarts": 1}, jobset=created_jobset(MULTI_NODE, suspend=False, restarts=1), reward_job=READY_REWARD_JOB,
                            trainer_job=trainer_failed, trainer_pods=failed_pod)
    assert restarting.status["phase"] != "Failed" and restarting.status["restarts"] == 1

    # JobSet used its last restart: the RFTJob fails, saying why.
    spent = multi_node(status={"restarts": 2}, trainer_job=trainer_failed, trainer_pods=failed_pod,
                       jobset=created_jobset(MULTI_NODE, suspend=False, restarts=2, failed_condition={
                           "reason": "ReachedMaxRestarts", "message": "jobset failed due to reaching max number of restarts"}))
    assert spent.status["phase"] == "Failed" and spent.status["restarts"] == 2
    failed = condition(spent, "Failed")
    assert failed["reason"] == "BackoffLimitExceeded"
    assert failed["message"] == ("the trainer failed 3 time(s); backoffLimit 2 allows 2 restart(s); "
                                 "last: pod demo-trainer-0-1-x failed: exit code 1 (Error): NCCL timeout")


def test_suspend_and_the_deadline_delete_a_multi_node_jobs_jobset():
    suspended = run(rftjob(spec=dict(MULTI_NODE, suspend=True), status=STARTED_AT), local_queue="found",
                    jobset=created_jobset(MULTI_NODE, suspend=False), trainer_job=created_job(active=2, spec=MULTI_NODE))
    assert [(c.kind, c.name) for c in suspended.delete] == [("JobSet", "demo")]  # JobSet's Jobs and pods go with it
    assert suspended.status["phase"] == "Suspended"
    late = run(rftjob(spec=dict(MULTI_NODE, activeDeadlineSeconds=600), status={"startTime": "2026-11-25T11:49:00Z"}), local_queue="found",
               jobset=created_jobset(MULTI_NODE, suspend=False), trainer_job=created_job(active=2, spec=MULTI_NODE))
    assert condition(late, "Failed")["reason"] == "DeadlineExceeded"
    assert [(c.kind, c.name) for c in late.delete] == [("JobSet", "demo")]


def test_a_multi_node_job_without_a_checkpoint_volume_is_refused_until_it_has_one():
    bare = {k: v for k, v in MULTI_NODE.items() if k != "checkpoint"}
    plan = run(rftjob(spec=bare), local_queue="found")
    running = condition(plan, "Running")
    assert running["reason"] == "CheckpointVolumeRequired" and plan.status["phase"] == "Pending"
    assert running["message"].startswith("spec.trainer.nodes is 2, but the job has no checkpoint volume")
    assert "checkpoint.storageSize" in running["message"] and "ReadWriteMany" in running["message"]
    assert ("Warning", "CheckpointVolumeRequired") in [(e.type, e.reason) for e in plan.events]
    assert not plan.create and "startTime" not in plan.status  # not started: checkpoint may still change
    claimed = run(rftjob(spec=dict(bare, checkpoint={"volumeClaimName": "shared"}), generation=2), local_queue="found")
    assert [c["kind"] for c in claimed.create] == ["JobSet"]


def test_a_jobset_jobs_name_must_leave_jobsets_pod_names_dns_labels():
    body = rftjob(spec=MULTI_NODE)
    body["metadata"]["name"] = "a" * 46  # aaa...-trainer-0-1-xxxxx is 64 characters
    plan = run(body, local_queue="found")
    assert condition(plan, "Running")["reason"] == "InvalidJobSetName" and not plan.create
    assert f"'{'a' * 46}-trainer-0-1-xxxxx'" in condition(plan, "Running")["message"]
    body["metadata"]["name"] = "a" * 45
    assert [c["kind"] for c in run(body, local_queue="found").create] == ["JobSet"]
    body["spec"] = SPEC  # one node, no queue: a trainer Job, whose pod names are the Job controller's
    assert condition(run(body, reward_deployment=ready_pool()), "Running")["reason"] == "TrainerStarting"


def test_a_started_job_cannot_move_between_one_and_more_trainer_nodes_but_can_change_how_many():
    more = run(rftjob(spec=MULTI_NODE, generation=2, status=STARTED_AT), config_map=config_map_for(SPEC), reward_deployment=ready_pool(),
               trainer_job=created_job(active=1), trainer_pods=RUNNING_POD)
    refused = condition(more, "SpecAccepted")
    assert refused["reason"] == "ImmutableFieldChanged" and refused["message"].startswith("spec.trainer.nodes cannot change once training has started")
    assert not more.delete and not more.create and condition(more, "Running")["reason"] == "TrainerRunning"  # the Job keeps running
    four = dict(MULTI_NODE, trainer={"nodes": 4, "resources": {"limits": {"nvidia.com/gpu": 8}}})
    grown = run(rftjob(spec=four, generation=2, status=STARTED_AT), config_map=config_map_for(MULTI_NODE), local_queue="found",
                jobset=created_jobset(MULTI_NODE, suspend=False), trainer_job=created_job(active=2, spec=MULTI_NODE))
    assert all(c["type"] != "SpecAccepted" for c in grown.status["conditions"])
    assert [(c.kind, c.name) for c in grown.delete] == [("JobSet", "demo")]  # replaced; the new one resumes from the checkpoint


def test_a_turbo_deployment_waits_for_its_rftjob_then_serves_its_adapter():
    turbo = {
        "apiVersion": "kuberft.io/v1alpha1",
        "kind": "TurboDeployment",
        "metadata": {"name": "chat", "namespace": "ns", "uid": "t1", "generation": 1},
        "spec": {"model": {"name": "tiny:countdown"}, "adapter": {"fromRFTJob": "demo"}},
    }
    waiting = plan_turbo(TurboObserved(body=turbo, rftjobs={"demo": rftjob(status={"phase": "Running"})}), IMAGES, NOW)
    assert waiting.apply == []
    assert waiting.status["phase"] == "Pending"
    assert waiting.status["conditions"][0]["message"] == "RFTJob demo is Running; serving starts when it has Succeeded"
    done = rftjob(status={"phase": "Succeeded", "adapter": "pvc://demo-checkpoints/demo"})
    serving = plan_turbo(TurboObserved(body=turbo, rftjobs={"demo": done}), IMAGES, NOW)
    assert [c["kind"] for c in serving.apply] == ["ConfigMap", "Deployment", "Service", "NetworkPolicy"]
    document = json.loads(applied(serving, "ConfigMap")["data"]["serve.json"])
    assert document["adapters"] == [{"name": "default", "uri": "/adapters/demo-checkpoints/demo"}]
    assert serving.status["adapter"] == "pvc://demo-checkpoints/demo"
    assert serving.status["adapters"] == [{"name": "default", "state": "Serving", "location": "pvc://demo-checkpoints/demo",
                                           "message": "serving the adapter of RFTJob demo: pvc://demo-checkpoints/demo"}]
    assert serving.status["url"] == "http://chat.ns.svc:8000/v1"
    assert serving.status["phase"] == "Progressing"
    failed = plan_turbo(TurboObserved(body=turbo, rftjobs={"demo": rftjob(status={"phase": "Failed"})}), IMAGES, NOW)
    assert failed.status["phase"] == "Failed"


def _turbo(adapters, status=None):
    return {
        "apiVersion": "kuberft.io/v1alpha1",
        "kind": "TurboDeployment",
        "metadata": {"name": "chat", "namespace": "ns", "uid": "t1", "generation": 1},
        "spec": {"model": {"name": "base"}, "adapters": adapters},
        **({"status": status} if status else {}),
    }


SEVERAL = [{"name": "sql", "fromRFTJob": "sql-job"}, {"name": "triton", "uri": "/models/triton"}, {"name": "math", "fromRFTJob": "math-job"}]
RUNNING_DEPLOYMENT = {"spec": {"replicas": 1}, "status": {"replicas": 1, "readyReplicas": 1}}


def test_several_adapters_serve_once_one_is_ready_and_the_status_names_each_one_still_waited_for():
    jobs = {"sql-job": rftjob(status={"phase": "Running"}), "math-job": None}
    plan = plan_turbo(TurboObserved(body=_turbo(SEVERAL), rftjobs=jobs), IMAGES, NOW)
    document = json.loads(applied(plan, "ConfigMap")["data"]["serve.json"])
    assert document["adapters"] == [{"name": "triton", "uri": "/models/triton"}]  # the ready one is served now
    assert [(a["name"], a["state"]) for a in plan.status["adapters"]] == [("sql", "Pending"), ("triton", "Serving"), ("math", "Pending")]
    ready = condition(plan, "AdapterReady")
    assert (ready["status"], ready["reason"]) == ("False", "RFTJobNotFound")
    assert ready["message"] == ("adapter sql: RFTJob sql-job is Running; serving starts when it has Succeeded; "
                                "adapter math: RFTJob math-job does not exist in namespace ns")
    assert plan.status["phase"] == "Pending"  # not everything asked for is served yet
    assert "adapter" not in plan.status

    jobs = {"sql-job": rftjob(status={"phase": "Succeeded", "adapter": "pvc://ckpt/sql-job/adapter"}),
            "math-job": rftjob(status={"phase": "Succeeded", "adapter": "pvc://ckpt/math-job/adapter"})}
    plan = plan_turbo(TurboObserved(body=_turbo(SEVERAL, plan.status), rftjobs=jobs, deployment=RUNNING_DEPLOYMENT), IMAGES, NOW)
    document = json.loads(applied(plan, "ConfigMap")["data"]["serve.json"])
    assert [a["name"] for a in document["adapters"]] == ["sql", "triton", "math"]
    pod = applied(plan, "Deployment")["spec"]["template"]["spec"]
    assert [v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"] if "persistentVolumeClaim" in v] == ["ckpt"]  # one claim, mounted once
    ready = condition(plan, "AdapterReady")
    assert (ready["status"], ready["reason"], ready["message"]) == ("True", "AdaptersReady", "serving 3 adapters: sql, triton, math")
    assert plan.status["phase"] == "Ready"


def test_a_failed_adapter_fails_the_deployment_but_the_others_keep_serving():
    jobs = {"sql-job": rftjob(status={"phase": "Failed"}), "math-job": rftjob(status={"phase": "Succeeded"})}
    plan = plan_turbo(TurboObserved(body=_turbo(SEVERAL), rftjobs=jobs, deployment=RUNNING_DEPLOYMENT), IMAGES, NOW)
    assert plan.status["phase"] == "Failed"
    again = plan_turbo(TurboObserved(body=_turbo(SEVERAL, plan.status), rftjobs=jobs, deployment=RUNNING_DEPLOYMENT), IMAGES, NOW)
    assert not [e for e in again.events if e.type == "Warning"]  # announced once
    ready = condition(plan, "AdapterReady")
    assert (ready["status"], ready["reason"]) == ("False", "RFTJobFailed")  # the failure is named first
    assert "adapter math: RFTJob math-job succeeded but reports no adapter location" in ready["message"]
    assert [(a["name"], a["state"]) for a in plan.status["adapters"]] == [("sql", "Failed"), ("triton", "Serving"), ("math", "Failed")]
    assert condition(plan, "Available")["status"] == "True"
    assert [e.reason for e in plan.events if e.type == "Warning"] == ["RFTJobFailed"]
    assert json.loads(applied(plan, "ConfigMap")["data"]["serve.json"])["adapters"] == [{"name": "triton", "uri": "/models/triton"}]


def test_an_adapter_whose_rftjob_is_run_again_keeps_serving_what_was_deployed():
    before = {"adapters": [{"name": "sql", "state": "Serving", "location": "pvc://ckpt/sql-job/adapter"}]}
    spec = [{"name": "sql", "fromRFTJob": "sql-job"}]
    plan = plan_turbo(TurboObserved(body=_turbo(spec, before), rftjobs={"sql-job": rftjob(status={"phase": "Running"})},
                                    deployment=RUNNING_DEPLOYMENT), IMAGES, NOW)
    assert json.loads(applied(plan, "ConfigMap")["data"]["serve.json"])["adapters"] == [{"name": "sql", "uri": "/adapters/ckpt/sql-job/adapter"}]
    [sql] = plan.status["adapters"]
    assert (sql["state"], sql["location"]) == ("Serving", "pvc://ckpt/sql-job/adapter")
    assert sql["message"].endswith("still serving the adapter deployed before (pvc://ckpt/sql-job/adapter)")
    assert condition(plan, "AdapterReady")["status"] == "False"


def test_adapter_lists_are_checked_names_unique_and_not_the_base_models():
    for adapters, words in (
        ([{"name": "a", "uri": "/x"}, {"name": "a", "uri": "/y"}], "adapter names must be unique"),
        ([{"name": "base", "uri": "/x"}], "may not be named after the base model"),
        ([], "at least 1 item"),
    ):
        plan = plan_turbo(TurboObserved(body=_turbo(adapters)), IMAGES, NOW)
        failed = condition(plan, "Failed")
        assert (failed["reason"], plan.status["phase"]) == ("InvalidSpec", "Failed") and words in failed["message"], failed
    both = _turbo([{"name": "a", "uri": "/x"}])
    both["spec"]["adapter"] = {"uri": "/y"}
    assert "set adapter (one) or adapters (several), not both" in condition(plan_turbo(TurboObserved(body=both), IMAGES, NOW), "Failed")["message"]


def test_each_distinct_spec_is_validated_once_and_a_broken_rule_still_fails_the_job():
    first = parse_spec(RFTJobSpec, json.loads(json.dumps(SPEC)))
    assert parse_spec(RFTJobSpec, dict(reversed(list(SPEC.items())))) is first  # same content, another key order
    broken = {**SPEC, "rewards": [{"kind": "countdown"}, {"kind": "countdown"}]}
    plan = run(rftjob(broken))
    failed = condition(plan, "Failed")
    assert failed["status"] == "True" and failed["reason"] == "InvalidSpec"
    assert "reward names must be unique" in failed["message"]
    assert run(rftjob(broken)).status == plan.status  # the refusal is not cached away


# --------------------------------------------------------------------------- failures surface

STARTED = {"startTime": "2026-11-25T11:59:00Z"}
REFUSED = {"type": "Warning", "reason": "FailedCreate", "lastTimestamp": "2026-11-25T11:59:30Z",
           "message": 'Error creating: pods "demo-trainer-x" is forbidden: violates PodSecurity "restricted:latest": runAsNonRoot != true'}


def pending_pod(waiting=None, unschedulable=None):
    status = {"phase": "Pending"}
    if waiting:
        status["containerStatuses"] = [{"name": "trainer", "state": {"waiting": {"reason": waiting[0], "message": waiting[1]}}}]
    if unschedulable:
        status["conditions"] = [{"type": "PodScheduled", "status": "False", "reason": "Unschedulable", "message": unschedulable}]
    return [{"metadata": {"name": "demo-trainer-x"}, "status": status}]


@pytest.mark.parametrize("observed,reason,words", [
    ({"trainer_job_events": [REFUSED]}, "TrainerPodRefused", "violates PodSecurity"),
    ({"trainer_pods": pending_pod(unschedulable='persistentvolumeclaim "does-not-exist" not found')}, "TrainerUnschedulable", '"does-not-exist" not found'),
    ({"trainer_pods": pending_pod(waiting=("ImagePullBackOff", 'Back-off pulling image "registry.test/kuberft/trainer:typo"'))}, "TrainerCannotStart", "trainer:typo"),
    ({"trainer_pods": pending_pod(waiting=("CreateContainerConfigError", 'secret "hf-token" not found'))}, "TrainerCannotStart", "hf-token"),
])
def test_a_trainer_that_cannot_start_says_why_warns_once_and_parks_the_reward_pool(observed, reason, words):
    plan = run(rftjob(status=STARTED), reward_deployment=ready_pool(), trainer_job=created_job(), **observed)
    running = condition(plan, "Running")
    assert (running["status"], running["reason"]) == ("False", reason) and words in running["message"]
    assert [(e.type, e.reason) for e in plan.events if e.type == "Warning"] == [("Warning", reason)]
    assert applied(plan, "Deployment")["spec"]["replicas"] == 0
    assert condition(plan, "RewardPoolReady")["reason"] == "WaitingForTrainer"

    again = run(rftjob(status={**STARTED, "conditions": plan.status["conditions"]}), reward_deployment=ready_pool(), trainer_job=created_job(), **observed)
    assert not [e for e in again.events if e.type == "Warning"]  # the same problem is announced once

    fixed = run(rftjob(status={**STARTED, "conditions": plan.status["conditions"]}), reward_deployment=ready_pool(), trainer_job=created_job(active=1),
                trainer_pods=[{"metadata": {"name": "demo-trainer-x"}, "status": {"phase": "Running"}}])
    assert condition(fixed, "Running")["reason"] == "TrainerRunning"
    assert applied(fixed, "Deployment")["spec"]["replicas"] == 2  # the pool comes back with the trainer


def test_waiting_for_a_gpu_is_reported_but_keeps_the_reward_pool():
    plan = run(rftjob(status=STARTED), reward_deployment=ready_pool(), trainer_job=created_job(),
               trainer_pods=pending_pod(unschedulable="0/3 nodes are available: 3 Insufficient nvidia.com/gpu."))
    assert condition(plan, "Running")["reason"] == "TrainerUnschedulable"
    assert applied(plan, "Deployment")["spec"]["replicas"] == 2


def test_reward_pods_refused_by_admission_are_reported_on_the_job():
    pool = ready_pool()
    pool["status"] = {"readyReplicas": 0, "conditions": [{"type": "ReplicaFailure", "status": "True", "reason": "FailedCreate",
                                                          "message": 'pods "demo-reward-abc" is forbidden: exceeded quota: team-a, requested: cpu=4'}]}
    plan = run(rftjob(), reward_deployment=pool)
    pool_condition = condition(plan, "RewardPoolReady")
    assert pool_condition["reason"] == "RewardPodsCannotStart" and "exceeded quota: team-a" in pool_condition["message"]
    assert ("Warning", "RewardPodsCannotStart") in [(e.type, e.reason) for e in plan.events]
    assert not plan.create  # no trainer without a pool


def test_a_trainer_job_without_a_pod_is_looked_at_again():
    plan = run(rftjob(status=STARTED), reward_deployment=ready_pool(), trainer_job=created_job())
    assert condition(plan, "Running")["reason"] == "TrainerStarting" and plan.requeue_after is not None


@pytest.mark.parametrize("found,reason", [("missing", "LocalQueueNotFound"), ("no-kueue", "KueueNotInstalled"), ("no-jobset", "JobSetNotInstalled")])
def test_a_queue_kueue_cannot_admit_from_is_reported_and_nothing_is_started(found, reason):
    spec = dict(SPEC, queueName="gpus")
    plan = run(rftjob(spec=spec), reward_deployment=ready_pool(), local_queue=found)
    running = condition(plan, "Running")
    assert running["reason"] == reason and "'gpus'" in running["message"]
    assert ("Warning", reason) in [(e.type, e.reason) for e in plan.events]
    assert not plan.create and plan.requeue_after == 30
    found_plan = run(rftjob(spec=spec), local_queue="found")
    assert [c["kind"] for c in found_plan.create] == ["JobSet"]


def test_serve_pods_refused_by_admission_are_reported_at_once_not_after_the_progress_deadline():
    turbo = {"apiVersion": "kuberft.io/v1alpha1", "kind": "TurboDeployment",
             "metadata": {"name": "chat", "namespace": "ns", "uid": "t1", "generation": 1},
             "spec": {"model": {"name": "tiny:countdown"}}}
    refused = {"spec": {"replicas": 1}, "status": {"conditions": [
        {"type": "Progressing", "status": "True", "reason": "ReplicaSetUpdated"},
        {"type": "ReplicaFailure", "status": "True", "reason": "FailedCreate",
         "message": 'pods "chat-abc" is forbidden: violates PodSecurity "restricted:latest": seccompProfile'}]}}
    plan = plan_turbo(TurboObserved(body=turbo, deployment=refused), IMAGES, NOW)
    available = next(c for c in plan.status["conditions"] if c["type"] == "Available")
    assert available["reason"] == "ServePodsCannotStart" and "violates PodSecurity" in available["message"]
    assert [(e.type, e.reason) for e in plan.events if e.type == "Warning"] == [("Warning", "ServePodsCannotStart")]
    turbo["status"] = {"conditions": plan.status["conditions"]}
    again = plan_turbo(TurboObserved(body=turbo, deployment=refused), IMAGES, NOW)
    assert not [e for e in again.events if e.type == "Warning"]


# --------------------------------------------------------------------------- rollout servers

ROLLOUT = dict(SPEC, rollout={"mode": "server", "replicas": 2})


def rollout_servers(ready=2, spec=ROLLOUT):
    """The rollout Deployment of a job in rollout server mode, `ready` of its pods ready."""
    deployment = rollout_deployment(RFTJobSpec.model_validate(spec), Owner("RFTJob", "demo", "ns", "u1"), IMAGES, spec["rollout"]["replicas"])
    deployment["status"] = {"readyReplicas": ready}
    return deployment


def named(plan, kind, name):
    return next(c for c in plan.apply if c["kind"] == kind and c["metadata"]["name"] == name)


def test_a_rollout_server_jobs_trainer_starts_once_the_pool_and_every_rollout_server_are_ready():
    new = run(rftjob(spec=ROLLOUT))
    assert named(new, "Deployment", "demo-rollout")["spec"]["replicas"] == 2
    assert condition(new, "Created")["message"] == "job config, reward pool, rollout servers and trainer permissions created"
    assert (condition(new, "RolloutReady")["status"], condition(new, "RolloutReady")["message"]) == ("False", "0/2 rollout pods ready")

    one_server = run(rftjob(spec=ROLLOUT), reward_deployment=ready_pool(), rollout_deployment=rollout_servers(ready=1))
    assert not one_server.create
    assert condition(one_server, "RolloutReady")["reason"] == "PodsNotReady"
    running = condition(one_server, "Running")
    assert (running["reason"], running["message"]) == ("WaitingForRolloutServers", "the trainer starts once the rollout servers are ready")

    both = run(rftjob(spec=ROLLOUT), reward_deployment=ready_pool(), rollout_deployment=rollout_servers())
    [job] = both.create
    assert job["spec"]["template"]["spec"]["containers"][0]["command"][-4:] == ["--rollout-service", "demo-rollout.ns.svc:8300", "--rollout-replicas", "2"]
    assert (condition(both, "RolloutReady")["status"], condition(both, "RolloutReady")["reason"]) == ("True", "PodsReady")
    assert ("PodsReady", "2/2 rollout pods ready") in [(e.reason, e.message) for e in both.events]


def test_a_colocated_job_has_no_rollout_ready_condition():
    plan = run(rftjob(), reward_deployment=ready_pool())
    assert "RolloutReady" not in [c["type"] for c in plan.status["conditions"]]
    assert not [c for c in plan.apply if c["metadata"]["name"] == "demo-rollout"]


def test_suspending_a_rollout_server_job_scales_its_rollout_servers_to_zero():
    spec = dict(ROLLOUT, suspend=True)
    plan = run(rftjob(spec=spec, status=STARTED_AT), reward_deployment=ready_pool(), rollout_deployment=rollout_servers(spec=spec),
               trainer_job=created_job(active=1, spec=spec))
    assert named(plan, "Deployment", "demo-rollout")["spec"]["replicas"] == 0
    rollout = condition(plan, "RolloutReady")
    assert (rollout["status"], rollout["reason"], rollout["message"]) == ("False", "Suspended", "the rollout servers are scaled to zero while the job is suspended")
    assert [(d.kind, d.name) for d in plan.delete] == [("Job", "demo-trainer")]
    assert plan.status["phase"] == "Suspended"


def rollout_pod(**status):
    return {"metadata": {"name": "demo-rollout-x"}, "status": {"phase": "Pending", **status}}


@pytest.mark.parametrize("pod,problem", [
    (rollout_pod(containerStatuses=[{"name": "rollout", "ready": False, "state": {"waiting": {
        "reason": "ImagePullBackOff", "message": 'Back-off pulling image "registry.test/kuberft/trainer:typo"'}}}]),
     'pod demo-rollout-x: ImagePullBackOff: Back-off pulling image "registry.test/kuberft/trainer:typo"'),
    # The trainer image built without vLLM: the server exits at start, again and again.
    (rollout_pod(phase="Running", containerStatuses=[{
        "name": "rollout", "ready": False, "restartCount": 3, "state": {"waiting": {"reason": "CrashLoopBackOff", "message": "back-off 40s"}},
        "lastState": {"terminated": {"exitCode": 1, "reason": "Error", "message": "ModuleNotFoundError: No module named 'vllm'\n"}}}]),
     "pod demo-rollout-x: container rollout restarted after exit code 1 (Error): ModuleNotFoundError: No module named 'vllm'"),
    (rollout_pod(conditions=[{"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
                              "message": "0/3 nodes are available: 3 Insufficient nvidia.com/gpu."}]),
     "pod demo-rollout-x cannot be scheduled: 0/3 nodes are available: 3 Insufficient nvidia.com/gpu."),
])
def test_rollout_pods_that_cannot_start_say_why_on_the_job_with_one_warning(pod, problem):
    observed = {"reward_deployment": ready_pool(), "rollout_deployment": rollout_servers(ready=1), "rollout_pods": [pod]}
    plan = run(rftjob(spec=ROLLOUT), **observed)
    rollout = condition(plan, "RolloutReady")
    assert (rollout["status"], rollout["reason"], rollout["message"]) == ("False", "RolloutPodsCannotStart", f"1/2 rollout pods ready; {problem}")
    assert [(e.type, e.reason) for e in plan.events if e.type == "Warning"] == [("Warning", "RolloutPodsCannotStart")]
    assert not plan.create  # no trainer without its rollout servers
    again = run(rftjob(spec=ROLLOUT, status={"conditions": plan.status["conditions"]}), **observed)
    assert not [e for e in again.events if e.type == "Warning"]
    # A pod on its way out (a rollout's old pod, a deleted job's) is no news.
    leaving = {**pod, "metadata": {**pod["metadata"], "deletionTimestamp": "2026-11-25T11:59:00Z"}}
    assert condition(run(rftjob(spec=ROLLOUT), **{**observed, "rollout_pods": [leaving]}), "RolloutReady")["reason"] == "PodsNotReady"


def test_a_trainer_that_cannot_start_parks_the_rollout_servers_with_the_pool():
    plan = run(rftjob(spec=ROLLOUT, status=STARTED), reward_deployment=ready_pool(), rollout_deployment=rollout_servers(),
               trainer_job=created_job(spec=ROLLOUT), trainer_job_events=[REFUSED])
    assert condition(plan, "Running")["reason"] == "TrainerPodRefused"
    assert named(plan, "Deployment", "demo-rollout")["spec"]["replicas"] == 0
    assert condition(plan, "RolloutReady")["reason"] == "WaitingForTrainer"


def test_a_finished_rollout_server_job_scales_its_rollout_servers_to_zero():
    observed = {"reward_deployment": ready_pool(), "rollout_deployment": rollout_servers()}
    done = run(rftjob(spec=ROLLOUT, status=STARTED_AT), trainer_job=created_job(conditions=[("Complete", "", "")], spec=ROLLOUT), **observed)
    assert done.status["phase"] == "Succeeded"
    assert named(done, "Deployment", "demo-rollout")["spec"]["replicas"] == 0
    later = run(rftjob(spec=ROLLOUT, status=done.status), **observed)
    assert [(ref.name, patch) for ref, patch in later.patch] == [("demo-reward", {"spec": {"replicas": 0}}), ("demo-rollout", {"spec": {"replicas": 0}})]


def test_switching_a_running_job_to_colocated_restarts_its_trainer_and_removes_the_rollout_servers():
    observed = {"reward_deployment": ready_pool(), "rollout_deployment": rollout_servers(), "trainer_job": created_job(active=1, spec=ROLLOUT),
                "trainer_pods": RUNNING_POD}
    first = run(rftjob(spec=ROLLOUT, status=STARTED_AT), **observed)
    assert condition(first, "Running")["reason"] == "TrainerRunning"
    rollout_children = [ChildRef("v1", "ServiceAccount", "demo-rollout"), ChildRef("apps/v1", "Deployment", "demo-rollout"),
                        ChildRef("v1", "Service", "demo-rollout"), ChildRef("networking.k8s.io/v1", "NetworkPolicy", "demo-rollout")]
    children = [ChildRef("apps/v1", "Deployment", "demo-reward"), *rollout_children]
    switched = run(rftjob(spec=SPEC, generation=2, status=first.status), config_map=config_map_for(ROLLOUT), children=children, **observed)
    assert "SpecAccepted" not in [c["type"] for c in switched.status["conditions"]]  # the checkpoints do not care who samples
    assert switched.delete == [*rollout_children, ChildRef("batch/v1", "Job", "demo-trainer")]
    assert condition(switched, "Running")["reason"] == "TrainerRestarting"
    assert (condition(switched, "RolloutReady")["status"], condition(switched, "RolloutReady")["reason"]) == ("True", "Colocated")
    assert not [c for c in switched.apply if c["metadata"]["name"] == "demo-rollout"]


def test_a_queued_rollout_server_jobs_trainer_waits_for_its_rollout_job():
    spec = dict(ROLLOUT, queueName="gpus")
    created = run(rftjob(spec=spec), local_queue="found")
    [jobset] = created.create
    assert [r["name"] for r in jobset["spec"]["replicatedJobs"]] == ["reward", "rollout", "trainer"]
    assert condition(created, "Running")["message"] == (
        "the JobSet demo (trainer, reward pool and rollout servers) is created; it waits for admission by Kueue LocalQueue gpus")
    assert not [c for c in created.apply if c["kind"] == "Deployment"]  # the pool and the servers are the JobSet's

    rollout_job = {"metadata": {"name": "demo-rollout-0", "uid": "o"}, "spec": {"parallelism": 2}, "status": {"ready": 1}}
    admitted = {"local_queue": "found", "jobset": created_jobset(spec, suspend=False), "reward_job": READY_REWARD_JOB}
    loading = run(rftjob(spec=spec, status=STARTED_AT), rollout_job=rollout_job, **admitted)
    running = condition(loading, "Running")
    assert (running["reason"], running["message"]) == ("WaitingForRolloutServers", "admitted by Kueue; the trainer starts once the rollout servers are ready")
    assert condition(loading, "RolloutReady")["message"] == "1/2 rollout pods ready"
    assert loading.requeue_after == 5  # a refused pod shows only in the Job's events: look again
    refused = {**REFUSED, "message": 'pods "demo-rollout-0-1" is forbidden: exceeded quota: gpus, requested: nvidia.com/gpu=1'}
    starved = run(rftjob(spec=spec, status=STARTED_AT), rollout_job=rollout_job, rollout_job_events=[refused], **admitted)
    assert condition(starved, "RolloutReady")["message"] == (
        '1/2 rollout pods ready; the rollout Job cannot create its pods: pods "demo-rollout-0-1" is forbidden: exceeded quota: gpus, requested: nvidia.com/gpu=1')
