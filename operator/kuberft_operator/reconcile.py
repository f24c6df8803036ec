"""What the operator should do for one RFTJob or TurboDeployment, decided from what it observes.

`plan_rftjob` and `plan_turbo` are pure: given the parent object, its observed children and the
current time, they return a `Plan` (children to apply, create, patch or delete; the status the
operator owns; Events). The controller performs the plan and writes the status with optimistic
concurrency, so the same observation always yields the same plan: reconciling twice, after a
restart or from two replicas, creates nothing twice and loses no status.

The operator is the only writer of an RFTJob's status. The trainer reports its step and
rewards into the job's progress ConfigMap (`kuberft_core.job_progress`); the plan copies what
passes `read_progress` into the status and names what it ignored in the `ProgressAccepted`
condition. Phase, conditions, times and the adapter location are the operator's own: the
adapter is `<output location>/adapter`, computed from the job's checkpoint settings, never
a path the trainer supplies.
"""

from __future__ import annotations

import functools
import json
import re
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Optional, TypeVar, cast

from pydantic import ValidationError

from kuberft_core.api import AdapterSource, ApiModel, RFTJobSpec, ServedAdapter, TurboDeploymentSpec
from kuberft_core.job_progress import read_progress
from kuberft_core.manifests import problems_from
from kuberft_core.paths import ADAPTER_DIR as TRAINER_ADAPTER_DIR  # where the trainer writes the final adapter in its output

from .builders import (
    ANNOTATION_GENERATION,
    ANNOTATION_POD_TEMPLATE_HASH,
    ANNOTATION_RESTARTS_BEFORE,
    CONFIG_KEY,
    JOBSET_API_VERSION,
    Images,
    Owner,
    RFTJobNames,
    checkpoint_claim_name,
    ingress_only_on,
    longest_jobset_pod_name,
    output_location,
    rftjob_children,
    rftjob_jobset,
    runs_as_jobset,
    serve_autoscaler,
    serve_config_map,
    serve_deployment,
    serve_selector,
    serve_service,
    serve_url,
    trainer_job,
    trainer_restart_hash,
)
from .conditions import Conditions, Transition, event_type, find, parse_time, timestamp

# Fields of a running job that cannot change: the trainer's checkpoints depend on them.
IMMUTABLE_WHILE_RUNNING = ("model", "lora", "dataset", "rewards", "grpo", "checkpoint", "queueName")


Spec = TypeVar("Spec", bound=ApiModel)


def parse_spec(model: type[Spec], wire: dict[str, Any]) -> Spec:
    """`model.model_validate(wire)`, once per distinct spec. Checking the CEL rules in Python
    was a fifth of the operator's CPU time when every reconcile re-validated an unchanged spec
    (measured with benchmarks/operator_scale.py). The model is shared: never change it."""
    return cast(Spec, _validated(model, json.dumps(wire, sort_keys=True)))


@functools.lru_cache(maxsize=1024)
def _validated(model: type[ApiModel], canonical: str) -> ApiModel:
    return model.model_validate(json.loads(canonical))


@dataclass(frozen=True)
class ChildRef:
    api_version: str
    kind: str
    name: str

    @classmethod
    def of(cls, manifest: dict[str, Any]) -> "ChildRef":
        return cls(manifest["apiVersion"], manifest["kind"], manifest["metadata"]["name"])


@dataclass(frozen=True)
class Event:
    type: str
    reason: str
    message: str


@dataclass
class Plan:
    apply: list[dict[str, Any]] = field(default_factory=list)
    """Children kept in the desired state with server-side apply."""
    create: list[dict[str, Any]] = field(default_factory=list)
    """Children created once and never re-applied (the trainer Job: Kueue owns its suspend flag)."""
    patch: list[tuple[ChildRef, dict[str, Any]]] = field(default_factory=list)
    """Merge patches to existing children (a missing child is left missing)."""
    delete: list[ChildRef] = field(default_factory=list)
    status: dict[str, Any] = field(default_factory=dict)
    """The status fields the operator owns, complete (compared with the stored status)."""
    events: list[Event] = field(default_factory=list)
    requeue_after: Optional[float] = None

    def requeue(self, seconds: float) -> None:
        seconds = max(0.5, seconds)
        self.requeue_after = seconds if self.requeue_after is None else min(self.requeue_after, seconds)


@dataclass
class RFTJobObserved:
    body: dict[str, Any]
    """The RFTJob as read from the API server."""
    config_map: Optional[dict[str, Any]] = None
    progress: Optional[dict[str, Any]] = None
    """The trainer's progress ConfigMap (untrusted: only its checked values reach the status)."""
    reward_deployment: Optional[dict[str, Any]] = None
    jobset: Optional[dict[str, Any]] = None
    """The JobSet of a job that `runs_as_jobset` (trainer and reward pool)."""
    reward_job: Optional[dict[str, Any]] = None
    """A JobSet job's reward pool: the JobSet's reward Job."""
    reward_job_events: list[dict[str, Any]] = field(default_factory=list)
    """Warning events of that reward Job while its pods are not all ready (how a refused pod shows)."""
    rollout_deployment: Optional[dict[str, Any]] = None
    rollout_job: Optional[dict[str, Any]] = None
    """A JobSet job's rollout servers: the JobSet's rollout Job."""
    rollout_job_events: list[dict[str, Any]] = field(default_factory=list)
    """Warning events of that rollout Job while its pods are not all ready."""
    rollout_pods: list[dict[str, Any]] = field(default_factory=list)
    """The rollout server pods (their containers' states say why one does not come up)."""
    trainer_job: Optional[dict[str, Any]] = None
    """The trainer Job: the RFTJob's own, or its JobSet's."""
    trainer_pods: list[dict[str, Any]] = field(default_factory=list)
    trainer_job_events: list[dict[str, Any]] = field(default_factory=list)
    """Warning events of a trainer Job that has no pod (the controller lists them only then):
    a Job whose pod is refused (admission, quota) says why only there."""
    local_queue: Optional[str] = None
    """For a job that runs as a JobSet: `no-jobset` (the cluster has no JobSet API), else `found`;
    with `queueName` also `missing` (no such LocalQueue in the namespace) or `no-kueue` (the
    cluster has no Kueue API)."""
    children: list[ChildRef] = field(default_factory=list)
    """Every child that exists now (used when the TTL deletes them)."""


@dataclass
class TurboObserved:
    body: dict[str, Any]
    rftjobs: dict[str, Optional[dict[str, Any]]] = field(default_factory=dict)
    """The RFTJobs the adapters name (`fromRFTJob`) by name; None where none exists."""
    deployment: Optional[dict[str, Any]] = None
    autoscaler: Optional[dict[str, Any]] = None


def _owner(body: dict[str, Any]) -> Owner:
    meta = body["metadata"]
    return Owner(body["kind"], meta["name"], meta["namespace"], meta["uid"])


def changed_paths(old: Any, new: Any, prefix: str) -> list[str]:
    """Dotted paths (e.g. `spec.grpo.learningRate`) where two wire values differ."""
    if isinstance(old, dict) and isinstance(new, dict):
        paths = []
        for key in sorted(set(old) | set(new)):
            paths += changed_paths(old.get(key), new.get(key), f"{prefix}.{key}")
        return paths
    return [] if old == new else [prefix]


def immutable_changes(accepted: dict[str, Any], requested: dict[str, Any]) -> list[str]:
    paths: list[str] = []
    for key in IMMUTABLE_WHILE_RUNNING:
        paths += changed_paths(accepted.get(key), requested.get(key), f"spec.{key}")
    old_url = (accepted.get("rewardPool") or {}).get("url")
    new_url = (requested.get("rewardPool") or {}).get("url")
    if old_url != new_url:
        paths.append("spec.rewardPool.url")
    # A started job keeps the kind of children it runs as (trainer Job and reward Deployment, or a
    # JobSet): more than one trainer node needs a JobSet. Between 2 and more nodes is a change of
    # the JobSet, which is replaced like any other trainer change.
    if "spec.queueName" not in paths and runs_as_jobset(parse_spec(RFTJobSpec, accepted)) != runs_as_jobset(parse_spec(RFTJobSpec, requested)):
        paths.append("spec.trainer.nodes")
    return paths


def _phase(conds: Conditions) -> str:
    for type_, phase in (("Failed", "Failed"), ("Succeeded", "Succeeded"), ("Suspended", "Suspended"), ("Running", "Running")):
        if conds.is_true(type_):
            return phase
    return "Pending"


def _true_conditions(obj: Optional[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    if not obj:
        return {}
    return {c["type"]: c for c in (obj.get("status") or {}).get("conditions") or [] if c.get("status") == "True"}


def pod_failure(pods: list[dict[str, Any]]) -> Optional[str]:
    """A one-line account of the latest failed trainer pod (exit code, reason, message)."""
    failed = [p for p in pods if (p.get("status") or {}).get("phase") == "Failed"]
    if not failed:
        return None
    pod = max(failed, key=lambda p: p["metadata"].get("creationTimestamp") or "")
    status = pod.get("status") or {}
    for container in status.get("containerStatuses") or []:
        terminated = (container.get("state") or {}).get("terminated")
        if terminated:
            return f"pod {pod['metadata']['name']} failed: {_exit(terminated)}"
    detail = status.get("message") or status.get("reason") or "no container status"
    return f"pod {pod['metadata']['name']} failed: {detail}"


def _exit(terminated: dict[str, Any]) -> str:
    """`exit code N (reason): message`, from a container's terminated state."""
    text = f"exit code {terminated.get('exitCode')}"
    if terminated.get("reason"):
        text += f" ({terminated['reason']})"
    if terminated.get("message"):
        text += f": {terminated['message'].strip()}"
    return text


# Container waiting reasons that no amount of waiting fixes: a person must act.
_STUCK_WAITING = {"ErrImagePull", "ImagePullBackOff", "InvalidImageName", "CreateContainerConfigError", "CreateContainerError", "RunContainerError"}


@dataclass(frozen=True)
class StartProblem:
    reason: str
    message: str
    needs_a_person: bool
    """False for waiting that resolves itself (no free GPU yet: the autoscaler or a finishing
    job may bring one)."""


def pod_refusal(job_events: list[dict[str, Any]]) -> Optional[str]:
    """The latest reason a Job gave for not creating a pod (admission, quota), from its events."""
    refused = [e for e in job_events if e.get("reason") == "FailedCreate"]
    if not refused:
        return None
    return max(refused, key=lambda e: e.get("lastTimestamp") or e.get("eventTime") or "").get("message", "").strip()


def trainer_start_problem(job: Optional[dict[str, Any]], pods: list[dict[str, Any]], job_events: list[dict[str, Any]]) -> Optional[StartProblem]:
    """Why the trainer has not started, when the cluster says so: its pod refused (admission,
    quota: only the Job's events say it), unschedulable (a missing claim, no free GPU), or its
    container stuck (image pull, a missing Secret or ConfigMap key)."""
    if job is None or (job.get("spec") or {}).get("suspend"):
        return None
    live = [p for p in pods if (p.get("status") or {}).get("phase") in (None, "Pending")]
    if not pods:
        refused = pod_refusal(job_events)
        return StartProblem("TrainerPodRefused", f"the trainer Job cannot create its pod: {refused}", True) if refused else None
    for pod in live:
        stuck = _stuck_container(pod)
        if stuck is not None:
            return StartProblem("TrainerCannotStart", stuck, True)
        message = _unschedulable(pod)
        if message is not None:
            missing = "not found" in message and ("persistentvolumeclaim" in message or "secret" in message or "configmap" in message)
            return StartProblem("TrainerUnschedulable", f"pod {pod['metadata']['name']} cannot be scheduled: {message}", missing)
    return None


def _containers(pod: dict[str, Any]) -> list[dict[str, Any]]:
    status = pod.get("status") or {}
    return (status.get("initContainerStatuses") or []) + (status.get("containerStatuses") or [])


def _stuck_container(pod: dict[str, Any]) -> Optional[str]:
    """`pod <name>: <reason>: <message>` for a container waiting for something only a person can fix."""
    for container in _containers(pod):
        waiting = (container.get("state") or {}).get("waiting") or {}
        if waiting.get("reason") in _STUCK_WAITING:
            detail = f": {waiting['message'].strip()}" if waiting.get("message") else ""
            return f"pod {pod['metadata']['name']}: {waiting['reason']}{detail}"
    return None


def _unschedulable(pod: dict[str, Any]) -> Optional[str]:
    """The scheduler's message for a pod it cannot place."""
    scheduled = find((pod.get("status") or {}).get("conditions") or [], "PodScheduled")
    if scheduled and scheduled.get("status") == "False" and scheduled.get("reason") == "Unschedulable":
        return (scheduled.get("message") or "").strip()
    return None


def server_pods_problem(pods: list[dict[str, Any]]) -> Optional[str]:
    """Why a server pod the trainer calls (a rollout server) is not coming up, when its status
    says so: a container stuck (image pull, a missing Secret or ConfigMap key), one restarted
    after failing (with its exit code and last log lines: vLLM missing from the image, a model
    not found), or a pod the scheduler cannot place."""
    for pod in pods:
        if pod["metadata"].get("deletionTimestamp"):
            continue
        stuck = _stuck_container(pod)
        if stuck is not None:
            return stuck
        for container in _containers(pod):
            last = (container.get("lastState") or {}).get("terminated") or {}
            if not container.get("ready") and last.get("exitCode"):
                return f"pod {pod['metadata']['name']}: container {container['name']} restarted after {_exit(last)}"
        message = _unschedulable(pod)
        if message is not None:
            return f"pod {pod['metadata']['name']} cannot be scheduled: {message}"
    return None


def deployment_problem(deployment: Optional[dict[str, Any]]) -> Optional[str]:
    """Why a Deployment's pods do not come up, when the Deployment says so: a ReplicaSet whose
    pods are refused (admission, quota) or a rollout past its progress deadline."""
    conditions = ((deployment or {}).get("status") or {}).get("conditions") or []
    failure = find(conditions, "ReplicaFailure")
    if failure and failure.get("status") == "True":
        return f"{failure.get('reason', 'ReplicaFailure')}: {(failure.get('message') or '').strip()}"
    progressing = find(conditions, "Progressing")
    if progressing and progressing.get("status") == "False":
        return f"{progressing.get('reason', 'NotProgressing')}: {(progressing.get('message') or '').strip()}"
    return None


def _jobset_problem(spec: RFTJobSpec, found: Optional[str]) -> Optional[tuple[str, str]]:
    """Why the cluster cannot run a JobSet job (reason, message): no JobSet, no Kueue, no such LocalQueue."""
    queue_name = spec.queue_name
    if found in (None, "found"):
        return None
    if found == "no-jobset" and not queue_name:
        return ("JobSetNotInstalled", f"spec.trainer.nodes is {spec.trainer.nodes}: a multi-node trainer runs as a JobSet (its pods "
                "start and restart together), but this cluster has no JobSet API (jobset.x-k8s.io/v1alpha2): install JobSet "
                "(https://jobset.sigs.k8s.io), then restart the operator; or set trainer.nodes to 1")
    if found == "no-jobset":
        return ("JobSetNotInstalled", f"spec.queueName is {queue_name!r}: a queued job runs its trainer and reward pool as one JobSet, "
                "which Kueue admits as one workload, but this cluster has no JobSet API (jobset.x-k8s.io/v1alpha2): install JobSet "
                "(https://jobset.sigs.k8s.io), then restart the operator; or remove queueName")
    if found == "no-kueue":
        return ("KueueNotInstalled", f"spec.queueName is {queue_name!r}, but this cluster has no Kueue (no kueue.x-k8s.io LocalQueue API): "
                "install Kueue or remove queueName")
    return ("LocalQueueNotFound", f"spec.queueName is {queue_name!r}, but there is no LocalQueue {queue_name!r} in this namespace: "
            "Kueue would never admit the job")


_DNS_LABEL = re.compile(r"[a-z]([-a-z0-9]{0,61}[a-z0-9])?")


def _spec_problem(spec: RFTJobSpec, name: str) -> Optional[tuple[str, str]]:
    """Why the trainer cannot be created from this spec (reason, message), for what the schema
    cannot check: a multi-node trainer needs a checkpoint volume every node mounts, and a JobSet
    job's name must leave JobSet's pod names DNS labels."""
    nodes = spec.trainer.nodes
    if nodes > 1 and checkpoint_claim_name(spec, name) is None:
        return ("CheckpointVolumeRequired", f"spec.trainer.nodes is {nodes}, but the job has no checkpoint volume: each pod would "
                "checkpoint into its own emptyDir, so a restart would start over and the adapter would be lost with the pods. Set "
                "checkpoint.storageSize (the operator creates a ReadWriteMany claim) or checkpoint.volumeClaimName (a ReadWriteMany "
                "claim every node can mount)")
    longest = longest_jobset_pod_name(spec, name)
    if runs_as_jobset(spec) and not _DNS_LABEL.fullmatch(longest):
        return ("InvalidJobSetName", f"metadata.name {name!r}: this job runs as a JobSet, which names its pods up to {longest!r}; "
                "a pod name must be a DNS label (at most 63 characters: lower-case letters, digits and '-', starting with a letter): "
                "use a shorter name")
    return None


def _warn_once(plan: Plan, previous: list[dict[str, Any]], type_: str, reason: str, message: str) -> None:
    """A Warning event when a condition newly carries this problem (a reason change between two
    False statuses is no transition, so Conditions would stay silent)."""
    before = find(previous, type_) or {}
    if (before.get("reason"), before.get("message")) != (reason, message):
        plan.events.append(Event("Warning", reason, message))


def _finish_status(plan: Plan, conds: Conditions, status: dict[str, Any]) -> Plan:
    plan.status["conditions"] = conds.items
    plan.status["phase"] = _phase(conds)
    # Condition transitions first, then what this reconcile did about them.
    plan.events[:0] = [Event(event_type(t), t.reason, t.message or t.type) for t in conds.transitions]
    return plan


def plan_rftjob(observed: RFTJobObserved, images: Images, now: datetime) -> Plan:
    body = observed.body
    meta = body["metadata"]
    name, generation = meta["name"], meta.get("generation")
    status = body.get("status") or {}
    owner = _owner(body)
    names = RFTJobNames(name)
    conds = Conditions(status.get("conditions"), now, generation)
    plan = Plan()
    plan.status["observedGeneration"] = generation
    for key in ("startTime", "completionTime", "restarts"):
        if status.get(key) is not None:
            plan.status[key] = status[key]

    try:
        spec = parse_spec(RFTJobSpec, body.get("spec") or {})
    except ValidationError as error:
        problems = "; ".join(str(p) for p in problems_from(error, ""))
        conds.set("Failed", True, "InvalidSpec", f"spec: {problems}")
        plan.status.setdefault("completionTime", timestamp(now))
        return _finish_status(plan, conds, status)

    # Which spec is in effect: a running job keeps the fields its checkpoints depend on.
    accepted_wire: Optional[dict[str, Any]] = None
    accepted_generation = generation
    if observed.config_map is not None:
        try:
            accepted_wire = json.loads((observed.config_map.get("data") or {}).get(CONFIG_KEY, ""))
            accepted_generation = int((observed.config_map["metadata"].get("annotations") or {}).get(ANNOTATION_GENERATION, generation))
        except (ValueError, TypeError):
            accepted_wire = None
    started = status.get("startTime") is not None
    finished = conds.is_true("Succeeded") or conds.is_true("Failed")
    effective, effective_generation = spec, generation
    requested_wire = spec.to_wire()
    refused = immutable_changes(accepted_wire, requested_wire) if accepted_wire is not None and (started or finished) else []
    if refused:
        effective = parse_spec(RFTJobSpec, accepted_wire)
        effective_generation = accepted_generation
        conds.set(
            "SpecAccepted",
            False,
            "ImmutableFieldChanged",
            f"{', '.join(refused)} cannot change once training has started; the job keeps running with "
            f"the spec of generation {accepted_generation}. Revert the change, or create a new RFTJob.",
        )
    elif conds.get("SpecAccepted") is not None:
        conds.set("SpecAccepted", True, "Accepted", f"generation {generation} is in effect")

    # The trainer's progress report: only checked values reach the status.
    report, problems = read_progress(
        ((observed.progress or {}).get("data") or {}), [r.effective_name for r in effective.rewards], effective.grpo.steps
    )
    if problems:
        conds.set("ProgressAccepted", False, "InvalidProgressReport",
                  f"ignored in ConfigMap {names.progress}: {'; '.join(problems)}")
    elif conds.get("ProgressAccepted") is not None:
        conds.set("ProgressAccepted", True, "Accepted", f"the trainer's report in ConfigMap {names.progress} is valid")
    step = report.step if report.step is not None else status.get("step")
    if step is not None:
        plan.status["step"] = step
    rewards = report.rewards or status.get("rewards")
    if rewards:
        plan.status["rewards"] = rewards
    mean_reward = report.mean_reward if report.mean_reward is not None else status.get("meanReward")
    if mean_reward is not None:
        plan.status["meanReward"] = mean_reward
    plan.status["totalSteps"] = effective.grpo.steps
    plan.status["progress"] = f"{step or 0}/{effective.grpo.steps}"

    # The adapter is where the operator told the trainer to write it (`--output` on the
    # checkpoint volume, `adapter/` inside), reachable by a serving pod through the claim.
    # The trainer only says that it is written; the job succeeding says so too.
    location = output_location(effective, name)
    adapter = f"{location}/{TRAINER_ADAPTER_DIR}" if location else None
    if adapter and (report.adapter_written or conds.is_true("Succeeded") or status.get("adapter") == adapter):
        plan.status["adapter"] = adapter
    elif status.get("adapter") is not None:
        plan.status["adapter"] = None  # a location the operator did not compute is removed

    if finished:
        return _plan_finished(plan, conds, status, observed, effective, now)

    job = observed.trainer_job
    # What the operator creates for the trainer, and deletes to stop it: the trainer Job, or the
    # JobSet (trainer and reward pool), which then carries the trainer annotations.
    jobset = runs_as_jobset(effective)
    holder = observed.jobset if jobset else job
    holder_ref = ChildRef(JOBSET_API_VERSION, "JobSet", names.jobset) if jobset else ChildRef("batch/v1", "Job", names.trainer)
    job_annotations = (holder or {}).get("metadata", {}).get("annotations") or {}
    restarts_before = int(job_annotations.get(ANNOTATION_RESTARTS_BEFORE, 0)) if holder else int(status.get("restarts") or 0)
    job_true = _true_conditions(job)
    jobset_true = _true_conditions(observed.jobset) if jobset else {}
    # Only the final conditions: with FailureTarget/SuccessCriteriaMet the counts are not final yet.
    if jobset:
        # A failed trainer Job is final only once JobSet has no restart left for it (JobSet Failed).
        restarts = restarts_before + int(((holder or {}).get("status") or {}).get("restarts") or 0)
        job_failed = "Failed" in job_true and "Failed" in jobset_true
        failures = restarts + int(job_failed)
    else:
        failures = restarts_before + int(((job or {}).get("status") or {}).get("failed") or 0) if holder else restarts_before
        job_failed = "Failed" in job_true
        # Every failure but a final one was followed by a restart from the latest checkpoint.
        restarts = failures - 1 if job_failed and failures > 0 else failures
    previous_restarts = int(status.get("restarts") or 0)
    plan.status["restarts"] = max(restarts, previous_restarts)

    outcome: Optional[tuple[str, str, str]] = None  # (condition, reason, message)
    delete_trainer = False
    start = parse_time(status.get("startTime"))
    deadline = effective.active_deadline_seconds
    remaining: Optional[float] = None
    if deadline and start:
        remaining = deadline - (now - start).total_seconds()
        if remaining <= 0:
            outcome = ("Failed", "DeadlineExceeded", f"the job ran longer than activeDeadlineSeconds ({deadline}s)")
            delete_trainer = holder is not None
        else:
            plan.requeue(remaining)

    if outcome is None and job is not None:
        if "Complete" in job_true:
            location = plan.status.get("adapter") or output_location(effective, name)
            outcome = ("Succeeded", "TrainerSucceeded", "training finished" + (f"; output in {location}" if location else ""))
        elif job_failed:
            cond = job_true["Failed"]
            reason = cond.get("reason") if cond.get("reason") in ("BackoffLimitExceeded", "DeadlineExceeded") else "TrainerFailed"
            detail = pod_failure(observed.trainer_pods)
            message = f"the trainer failed {failures} time(s); backoffLimit {effective.backoff_limit} allows {effective.backoff_limit} restart(s)"
            if reason == "DeadlineExceeded":
                message = f"the job ran longer than activeDeadlineSeconds ({deadline}s)"
            if detail:
                message += f"; last: {detail}"
            outcome = ("Failed", reason, message)
    if outcome is None and "Failed" in jobset_true:
        # The trainer Job did not fail (that is reported above): something else in the JobSet did.
        outcome = ("Failed", "JobSetFailed", f"JobSet {names.jobset} failed: {jobset_true['Failed'].get('message') or jobset_true['Failed'].get('reason')}")

    if outcome is not None:
        cond_type, reason, message = outcome
        conds.set(cond_type, True, reason, message)
        conds.set("Running", False, "Completed" if cond_type == "Succeeded" else reason, message)
        plan.status["completionTime"] = timestamp(now)
        if cond_type == "Succeeded" and adapter:
            plan.status["adapter"] = adapter
        if delete_trainer:
            plan.delete.append(holder_ref)
        plan.apply = rftjob_children(effective, owner, images, effective_generation, reward_replicas=0, rollout_replicas=0)
        if effective.ttl_seconds_after_finished is not None:
            plan.requeue(effective.ttl_seconds_after_finished)
        return _finish_status(plan, conds, status)

    suspended = effective.suspend
    previous_conditions = status.get("conditions") or []
    start_problem = trainer_start_problem(job, observed.trainer_pods, observed.trainer_job_events)
    # A trainer that cannot start until a person acts does not keep a reward pool (or rollout
    # servers) busy; they come back when the trainer's pod starts (the trainer waits for them
    # before its first step). (A JobSet job's pool and rollout servers are part of the JobSet,
    # admitted and restarted with the trainer: they are not parked.)
    pool_parked = not jobset and start_problem is not None and start_problem.needs_a_person
    scaled_down = suspended or pool_parked
    server_mode = effective.rollout.mode == "server"
    plan.apply = rftjob_children(effective, owner, images, effective_generation,
                                 reward_replicas=0 if scaled_down else effective.reward_pool.replicas,
                                 rollout_replicas=0 if scaled_down else effective.rollout.replicas)
    conds.set("Created", True, "ChildrenCreated",
              f"job config, reward pool{', rollout servers' if server_mode else ''} and trainer permissions created")
    if not server_mode:  # switched to colocated: the rollout servers go (each of their children is named `<job>-rollout`)
        plan.delete += [child for child in observed.children if child.name == names.rollout]

    # The reward pool.
    pool_ready = False
    if effective.reward_pool.url:
        pool_ready = True
        conds.set("RewardPoolReady", True, "ExternalRewardPool", f"using the reward pool at {effective.reward_pool.url}")
    elif suspended:
        conds.set("RewardPoolReady", False, "Suspended", "the reward pool is scaled to zero while the job is suspended")
    elif pool_parked:
        conds.set("RewardPoolReady", False, "WaitingForTrainer", "the reward pool is scaled to zero until the trainer can start")
    else:
        want = effective.reward_pool.replicas
        if jobset:  # the pool is the JobSet's reward Job; a refused pod shows only in its events
            ready = int(((observed.reward_job or {}).get("status") or {}).get("ready") or 0)
            pool_ready = ready >= want
            refused = None if pool_ready else pod_refusal(observed.reward_job_events)
            problem = f"the reward Job cannot create its pods: {refused}" if refused else None
        else:
            deployment = observed.reward_deployment or {}
            ready = int((deployment.get("status") or {}).get("readyReplicas") or 0)
            scaled = (deployment.get("spec") or {}).get("replicas") == want
            pool_ready = scaled and ready >= want
            problem = None if pool_ready else deployment_problem(observed.reward_deployment)
        if problem:
            message = f"{min(ready, want)}/{want} reward pods ready; {problem}"
            _warn_once(plan, previous_conditions, "RewardPoolReady", "RewardPodsCannotStart", message)
            conds.set("RewardPoolReady", False, "RewardPodsCannotStart", message)
        else:
            conds.set(
                "RewardPoolReady",
                pool_ready,
                "PodsReady" if pool_ready else "PodsNotReady",
                f"{min(ready, want)}/{want} reward pods ready",
            )
            if jobset and not pool_ready and observed.reward_job is not None:
                plan.requeue(5)  # a refused pod changes nothing we watch: look at the Job's events again

    rollout_ready = True
    if server_mode:
        rollout_ready = _rollout_readiness(plan, conds, previous_conditions, observed, effective, jobset, suspended, pool_parked)
    elif conds.get("RolloutReady") is not None:
        conds.set("RolloutReady", True, "Colocated", "the trainer samples the completions itself")

    if suspended:
        if holder is not None:
            plan.delete.append(holder_ref)
        location = output_location(effective, name)
        conds.set("Suspended", True, "Suspended", "the trainer is stopped; checkpoints are kept" + (f" in {location}" if location else ""))
        if conds.get("Running") is not None:
            conds.set("Running", False, "Suspended", "the job is suspended")
        return _finish_status(plan, conds, status)

    if conds.is_true("Suspended"):
        conds.set("Suspended", False, "Resumed", "training resumes from the latest checkpoint")

    if plan.status["restarts"] > previous_restarts:
        detail = pod_failure(observed.trainer_pods) or ("a trainer pod failed" if effective.trainer.nodes > 1 else "the trainer pod failed")
        plan.events.append(
            Event(
                "Warning",
                "TrainerRestarted",
                f"{detail}; restart {plan.status['restarts']} of {effective.backoff_limit} resumes from the latest checkpoint",
            )
        )

    if holder is None:  # what the spec and the cluster must offer before the trainer is created
        cluster_problem = _jobset_problem(effective, observed.local_queue) if jobset else None
        problem = _spec_problem(effective, name) or cluster_problem
        if problem is not None:
            reason, message = problem
            _warn_once(plan, previous_conditions, "Running", reason, message)
            conds.set("Running", False, reason, message)
            if cluster_problem:
                plan.requeue(30)  # a queue or JobSet installed later is found again
            return _finish_status(plan, conds, status)

    left = deadline if remaining is None else max(1, int(remaining))
    members = _jobset_members(effective)
    if holder is None and jobset:
        plan.create.append(rftjob_jobset(effective, owner, images, restarts_before=restarts_before, deadline_seconds=left))
        plan.status.setdefault("startTime", timestamp(now))
        counted = f" ({restarts_before} earlier restart(s) counted)" if restarts_before else ""
        if effective.queue_name:
            conds.set("Running", False, "WaitingForQueue", f"the JobSet {names.jobset} ({members}) is created; it waits for admission by Kueue LocalQueue {effective.queue_name}")
            plan.events.append(Event("Normal", "TrainerCreated", f"created the JobSet {names.jobset} ({members}, one Kueue workload){counted}"))
        else:
            ready = "the reward pool and the rollout servers are ready" if server_mode else "the reward pool is ready"
            conds.set("Running", False, "WaitingForRewardPool", f"the JobSet {names.jobset} ({members}) is created; the trainer starts once {ready}")
            plan.events.append(Event("Normal", "TrainerCreated",
                                     f"created the JobSet {names.jobset} ({_jobset_members(effective, f'trainer on {effective.trainer.nodes} nodes')}){counted}"))
        return _finish_status(plan, conds, status)
    if holder is None:
        if pool_ready and rollout_ready:
            plan.create.append(trainer_job(effective, owner, images, restarts_before=restarts_before, deadline_seconds=left))
            plan.status.setdefault("startTime", timestamp(now))
            conds.set("Running", False, "TrainerStarting", "the trainer Job is created; waiting for its pod")
            plan.events.append(Event("Normal", "TrainerCreated", f"created the trainer Job {names.trainer}" + (f" ({restarts_before} earlier restart(s) counted)" if restarts_before else "")))
        else:
            conds.set("Running", False, *_waiting_for_servers(pool_ready, rollout_ready))
        return _finish_status(plan, conds, status)

    if job_annotations.get(ANNOTATION_POD_TEMPLATE_HASH) != trainer_restart_hash(effective, owner, images):
        # A Job's pod template cannot change: replace the Job; the new pod resumes from the checkpoint.
        plan.delete.append(holder_ref)
        conds.set("Running", False, "TrainerRestarting", "the trainer settings changed; the trainer restarts from the latest checkpoint")
        plan.events.append(Event("Normal", "TrainerUpdated", "the trainer settings changed; replacing the trainer Job"))
        return _finish_status(plan, conds, status)

    if effective.queue_name and (holder.get("spec") or {}).get("suspend"):
        conds.set("Running", False, "WaitingForQueue", f"the JobSet {names.jobset} ({members}) waits for admission by Kueue LocalQueue {effective.queue_name}")
        return _finish_status(plan, conds, status)
    if job is None:  # a JobSet job (admitted, if queued): JobSet starts the trainer Job once the pool and rollout servers are ready
        reason, message = _waiting_for_servers(pool_ready, rollout_ready)
        conds.set("Running", False, reason, ("admitted by Kueue; " if effective.queue_name else "") + message)
        return _finish_status(plan, conds, status)
    job_status = job.get("status") or {}
    nodes = effective.trainer.nodes
    running_pods = sum(1 for p in observed.trainer_pods if (p.get("status") or {}).get("phase") == "Running")
    if int(job_status.get("active") or 0) >= 1 and running_pods >= nodes:
        running = "the trainer pod is running" if nodes == 1 else f"all {nodes} trainer pods are running"
        conds.set("Running", True, "TrainerRunning", running + (f" (restart {plan.status['restarts']})" if plan.status["restarts"] else ""))
    elif start_problem is not None:
        _warn_once(plan, previous_conditions, "Running", start_problem.reason, start_problem.message)
        conds.set("Running", False, start_problem.reason, start_problem.message)
    else:
        conds.set("Running", False, "TrainerStarting", "waiting for the trainer pod to start")
        if not observed.trainer_pods:
            plan.requeue(5)  # a refused pod changes nothing we watch: look at the Job's events again
    return _finish_status(plan, conds, status)


def _jobset_members(spec: RFTJobSpec, trainer: str = "trainer") -> str:
    """What a job's JobSet runs, as its messages name it."""
    return f"{trainer}, reward pool and rollout servers" if spec.rollout.mode == "server" else f"{trainer} and reward pool"


def _waiting_for_servers(pool_ready: bool, rollout_ready: bool) -> tuple[str, str]:
    """(reason, message) of a trainer not started yet: it waits for the reward pool, then for the rollout servers."""
    if pool_ready and not rollout_ready:
        return "WaitingForRolloutServers", "the trainer starts once the rollout servers are ready"
    return "WaitingForRewardPool", "the trainer starts once the reward pool is ready"


def _rollout_readiness(plan: Plan, conds: Conditions, previous: list[dict[str, Any]], observed: RFTJobObserved,
                       spec: RFTJobSpec, jobset: bool, suspended: bool, parked: bool) -> bool:
    """Sets RolloutReady for a job in rollout server mode and says whether every rollout server is
    ready: as for the reward pool, the ready pods of the Deployment (or of a JobSet job's rollout
    Job) against `rollout.replicas`. Pods that cannot start say why, with a Warning event."""
    if suspended:
        conds.set("RolloutReady", False, "Suspended", "the rollout servers are scaled to zero while the job is suspended")
        return False
    if parked:
        conds.set("RolloutReady", False, "WaitingForTrainer", "the rollout servers are scaled to zero until the trainer can start")
        return False
    want = spec.rollout.replicas
    if jobset:  # a refused pod shows only in the rollout Job's events
        ready = int(((observed.rollout_job or {}).get("status") or {}).get("ready") or 0)
        all_ready = ready >= want
        refused = None if all_ready else pod_refusal(observed.rollout_job_events)
        problem = f"the rollout Job cannot create its pods: {refused}" if refused else None
    else:
        deployment = observed.rollout_deployment or {}
        ready = int((deployment.get("status") or {}).get("readyReplicas") or 0)
        all_ready = (deployment.get("spec") or {}).get("replicas") == want and ready >= want
        problem = None if all_ready else deployment_problem(observed.rollout_deployment)
    if problem is None and not all_ready:
        problem = server_pods_problem(observed.rollout_pods)
    if problem:
        message = f"{min(ready, want)}/{want} rollout pods ready; {problem}"
        _warn_once(plan, previous, "RolloutReady", "RolloutPodsCannotStart", message)
        conds.set("RolloutReady", False, "RolloutPodsCannotStart", message)
        return False
    conds.set("RolloutReady", all_ready, "PodsReady" if all_ready else "PodsNotReady", f"{min(ready, want)}/{want} rollout pods ready")
    if jobset and not all_ready and observed.rollout_job is not None:
        plan.requeue(5)  # a refused pod changes nothing we watch: look at the Job's events again
    return all_ready


def _plan_finished(plan: Plan, conds: Conditions, status: dict[str, Any], observed: RFTJobObserved, spec: RFTJobSpec, now: datetime) -> Plan:
    """A finished job keeps its status; the reward pool and the rollout servers are scaled to zero
    and, after `ttlSecondsAfterFinished`, every child but the checkpoint claim is deleted."""
    completion = parse_time(status.get("completionTime"))
    ttl = spec.ttl_seconds_after_finished
    expired = False
    if ttl is not None and completion is not None:
        left = ttl - (now - completion).total_seconds()
        expired = left <= 0
        if not expired:
            plan.requeue(left)
    if expired:
        doomed = [c for c in observed.children if c.kind != "PersistentVolumeClaim"]
        plan.delete.extend(doomed)
        if doomed:
            plan.events.append(Event("Normal", "ChildrenDeleted", f"ttlSecondsAfterFinished ({ttl}s) passed: deleted {len(doomed)} child resources; the RFTJob and its outputs are kept"))
    else:
        names = RFTJobNames(observed.body["metadata"]["name"])
        for deployment, name in ((observed.reward_deployment, names.reward), (observed.rollout_deployment, names.rollout)):
            if deployment and (deployment.get("spec") or {}).get("replicas"):
                plan.patch.append((ChildRef("apps/v1", "Deployment", name), {"spec": {"replicas": 0}}))
    return _finish_status(plan, conds, status)


# --------------------------------------------------------------------------- TurboDeployment


def plan_turbo(observed: TurboObserved, images: Images, now: datetime) -> Plan:
    body = observed.body
    meta = body["metadata"]
    name, namespace, generation = meta["name"], meta["namespace"], meta.get("generation")
    status = body.get("status") or {}
    owner = _owner(body)
    conds = Conditions(status.get("conditions"), now, generation)
    plan = Plan()
    plan.status["observedGeneration"] = generation
    try:
        spec = parse_spec(TurboDeploymentSpec, body.get("spec") or {})
    except ValidationError as error:
        problems = "; ".join(str(p) for p in problems_from(error, ""))
        conds.set("Failed", True, "InvalidSpec", f"spec: {problems}")
        plan.status["phase"] = "Failed"
        return _finish_turbo(plan, conds)

    resolved = _resolve_adapters(spec, observed.rftjobs, namespace, status)
    waiting = _adapters_condition(resolved, conds)
    if waiting and waiting[0] == "Failed":
        _warn_once(plan, status.get("conditions") or [], "AdapterReady", waiting[1], waiting[2])
    served = [adapter for adapter, _ in resolved]
    locations = {a.name: a.location for a in served if a.state == "Serving" and a.location}
    if spec.adapter_list and not locations and observed.deployment is None:
        # Nothing of what was asked for can be served yet: no pods (they would serve the base model).
        plan.status["adapters"] = [a.to_wire() for a in served]
        plan.status["phase"] = waiting[0] if waiting else "Pending"
        return _finish_turbo(plan, conds)

    deployment_manifest = serve_deployment(spec, owner, images, locations)
    plan.apply = [serve_config_map(spec, owner, locations), deployment_manifest, serve_service(spec, owner),
                  ingress_only_on(owner.name, owner, "serve", spec.port)]
    autoscaler = serve_autoscaler(spec, owner)
    if autoscaler:
        plan.apply.append(autoscaler)
    elif observed.autoscaler is not None:
        plan.delete.append(ChildRef("autoscaling/v2", "HorizontalPodAutoscaler", name))

    deployment = observed.deployment or {}
    dep_status = deployment.get("status") or {}
    desired = spec.replicas if spec.autoscaling is None else int((deployment.get("spec") or {}).get("replicas") or spec.autoscaling.min_replicas)
    ready = int(dep_status.get("readyReplicas") or 0)
    plan.status.update(
        {
            "replicas": int(dep_status.get("replicas") or 0),
            "readyReplicas": ready,
            "selector": serve_selector(name),
            "url": serve_url(spec, name, namespace),
        }
    )
    plan.status["adapters"] = [a.to_wire() for a in served]
    if spec.adapter is not None:
        plan.status["adapter"] = locations.get(spec.adapter.name)
    elif status.get("adapter") is not None:
        plan.status["adapter"] = None
    stalled = next(
        (c for c in dep_status.get("conditions") or [] if c.get("type") == "Progressing" and c.get("reason") == "ProgressDeadlineExceeded"),
        None,
    )
    if stalled:
        conds.set("Available", False, "ProgressDeadlineExceeded", stalled.get("message") or "the serving pods did not become ready")
        plan.status["phase"] = "Failed"
    elif ready >= desired:
        conds.set("Available", True, "MinimumReplicasAvailable", f"{ready}/{desired} serving pods ready")
        plan.status["phase"] = "Ready" if waiting is None else waiting[0]
    elif (problem := deployment_problem(observed.deployment)) is not None:
        # Pods refused (admission, quota): say so now, not after the 10-minute progress deadline.
        message = f"{ready}/{desired} serving pods ready; {problem}"
        _warn_once(plan, status.get("conditions") or [], "Available", "ServePodsCannotStart", message)
        conds.set("Available", False, "ServePodsCannotStart", message)
        plan.status["phase"] = "Progressing" if waiting is None else waiting[0]
    else:
        conds.set("Available", False, "ReplicasNotReady", f"{ready}/{desired} serving pods ready")
        plan.status["phase"] = "Progressing" if waiting is None else waiting[0]
    return _finish_turbo(plan, conds)


def _resolve_adapter(source: AdapterSource, rftjobs: dict[str, Optional[dict[str, Any]]], namespace: str) -> tuple[ServedAdapter, str]:
    """Where one adapter of the spec is now, and the condition reason that says so."""
    if source.uri:
        return ServedAdapter(name=source.name, state="Serving", location=source.uri, message=f"serving the adapter at {source.uri}"), "AdapterURI"
    job_name = source.from_rft_job
    job = rftjobs.get(job_name)
    job_status = (job or {}).get("status") or {}
    phase = job_status.get("phase")
    if job is None:
        return ServedAdapter(name=source.name, state="Pending", message=f"RFTJob {job_name} does not exist in namespace {namespace}"), "RFTJobNotFound"
    if phase == "Failed":
        return ServedAdapter(name=source.name, state="Failed", message=f"RFTJob {job_name} failed, so it has no adapter to serve"), "RFTJobFailed"
    if phase == "Succeeded" and job_status.get("adapter"):
        location = job_status["adapter"]
        return ServedAdapter(name=source.name, state="Serving", location=location, message=f"serving the adapter of RFTJob {job_name}: {location}"), "RFTJobSucceeded"
    if phase == "Succeeded":
        message = f"RFTJob {job_name} succeeded but reports no adapter location (no checkpoint volume?)"
        return ServedAdapter(name=source.name, state="Failed", message=message), "AdapterNotReported"
    message = f"RFTJob {job_name} is {phase or 'Pending'}; serving starts when it has Succeeded"
    return ServedAdapter(name=source.name, state="Pending", message=message), "WaitingForRFTJob"


# Which reason the AdapterReady condition gives when several adapters are not ready: failures first.
_FAILED_ADAPTER_REASONS = ("RFTJobFailed", "AdapterNotReported")
_ADAPTER_REASON_ORDER = (*_FAILED_ADAPTER_REASONS, "RFTJobNotFound", "WaitingForRFTJob")


def _resolve_adapters(spec: TurboDeploymentSpec, rftjobs: dict[str, Optional[dict[str, Any]]], namespace: str,
                      status: dict[str, Any]) -> list[tuple[ServedAdapter, str]]:
    """Each adapter of the spec, resolved. One that is not ready now but was served before (its
    RFTJob deleted or run again since) keeps being served from where it was, and says so."""
    before = {a.get("name"): a.get("location") for a in status.get("adapters") or [] if a.get("state") == "Serving"}
    if spec.adapter is not None and status.get("adapter"):
        before.setdefault(spec.adapter.name, status["adapter"])  # a status written before `adapters` existed
    resolved = []
    for source in spec.adapter_list:
        adapter, reason = _resolve_adapter(source, rftjobs, namespace)
        if adapter.state != "Serving" and before.get(source.name):
            adapter = ServedAdapter(name=source.name, state="Serving", location=before[source.name],
                                    message=f"{adapter.message}; still serving the adapter deployed before ({before[source.name]})")
        resolved.append((adapter, reason))
    return resolved


def _adapters_condition(resolved: list[tuple[ServedAdapter, str]], conds: Conditions) -> Optional[tuple[str, str, str]]:
    """Sets AdapterReady; returns (phase, reason, message) while an adapter is not ready."""
    if not resolved:
        conds.set("AdapterReady", True, "NoAdapter", "serving the base model without an adapter")
        return None
    not_ready = [(a, r) for a, r in resolved if r not in ("AdapterURI", "RFTJobSucceeded")]
    if len(resolved) == 1:
        (adapter, reason), = resolved
        message = adapter.message or ""
    elif not not_ready:
        reason, message = "AdaptersReady", f"serving {len(resolved)} adapters: {', '.join(a.name for a, _ in resolved)}"
    else:
        reason = min((r for _, r in not_ready), key=_ADAPTER_REASON_ORDER.index)
        message = "; ".join(f"adapter {a.name}: {a.message}" for a, _ in not_ready)
    if not not_ready:
        conds.set("AdapterReady", True, reason, message)
        return None
    conds.set("AdapterReady", False, reason, message)
    failed = any(r in _FAILED_ADAPTER_REASONS for _, r in not_ready)
    return ("Failed" if failed else "Pending", reason, message)


def _finish_turbo(plan: Plan, conds: Conditions) -> Plan:
    plan.status["conditions"] = conds.items
    for transition in conds.transitions:
        if transition.type == "AdapterReady" and transition.reason in _FAILED_ADAPTER_REASONS:
            continue  # announced by _warn_once, also when only the reason changed
        kind = "Warning" if transition.status == "False" and transition.reason == "ProgressDeadlineExceeded" else event_type(transition)
        plan.events.append(Event(kind, transition.reason, transition.message or transition.type))
    return plan


def status_changes(current: dict[str, Any], owned: dict[str, Any]) -> dict[str, Any]:
    """The merge patch that brings the stored status to the operator's fields (empty: nothing to write)."""
    return {key: value for key, value in owned.items() if current.get(key) != value}


__all__ = [
    "ChildRef",
    "Event",
    "Plan",
    "RFTJobObserved",
    "TurboObserved",
    "Transition",
    "plan_rftjob",
    "plan_turbo",
    "status_changes",
    "immutable_changes",
    "pod_failure",
]
