"""The operator process: kopf watches, a work queue, reconcile workers, /metrics and leader election.

kopf streams watch events for RFTJobs, TurboDeployments and every child the operator labels
(`app.kubernetes.io/managed-by=kuberft-operator`, filtered by the API server). Each event
updates a local cache of children and queues the owner's key; workers take keys off the
queue (one reconcile per key at a time, events collapsed), read the parent fresh from the API
server, plan with the pure functions of `reconcile` and carry the plan out:

- children are server-side applied with force on the fields the operator sets, so a restart or
  a repeated event creates nothing twice and a hand edit of one of those fields is reverted on the
  next reconcile (drift). The apply is skipped only when the cached child carries the desired
  content hash AND its owned view (labels, annotations, owner references and spec/data/rules, as
  the API server returned them after our last apply) is unchanged; any other change (an edit, an
  HPA's new replica count, a claim getting bound) costs one apply, which leaves fields others own
  alone. After an operator restart each child is applied once;
- the trainer Job is created once (a second create finds it and does nothing);
- the status is written with the parent's resourceVersion as a precondition, so a stale
  reconcile (or a second replica) fails with a conflict instead of overwriting newer status;
- Events are posted after the status write that records the transition.

The operator is the only writer of RFTJob and TurboDeployment status. A trainer reports into
its job's progress ConfigMap (a labelled child, so its updates arrive here like any child's);
the cache keeps only the report's known keys, each cut just past the longest value the
operator reads, so a trainer cannot make the operator hold a megabyte per job.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Optional

import kopf
from aiohttp import web
from pydantic import ValidationError

from kuberft_core.api import API_VERSION, GROUP, VERSION, RFTJobSpec, TurboDeploymentSpec
from kuberft_core.job_progress import FIELDS as PROGRESS_FIELDS
from kuberft_core.job_progress import MAX_VALUE_CHARS as PROGRESS_MAX_CHARS
from kuberft_core.job_progress import PROGRESS_SUFFIX
from kuberft_core.metrics import component_metrics
from kuberft_core.probes import metrics_routes

from .builders import (
    ANNOTATION_HASH,
    JOBSET_API_VERSION,
    LABEL_MANAGED_BY,
    LABEL_RFTJOB,
    LABEL_ROLE,
    LABEL_TURBO,
    MANAGED_BY,
    Images,
    RFTJobNames,
    content_hash,
    runs_as_jobset,
)
from .conditions import parse_time
from .kube import ApiError, Credentials, KubeClient
from .leader import LeaderElector
from .reconcile import ChildRef, Plan, RFTJobObserved, TurboObserved, parse_spec, plan_rftjob, plan_turbo, status_changes
from .workqueue import WorkQueue

log = logging.getLogger("kuberft.operator")

# (group, version, plural, kind) of every child kind the operator creates and watches.
CHILD_KINDS = (
    ("", "v1", "configmaps", "ConfigMap"),
    ("", "v1", "services", "Service"),
    ("", "v1", "serviceaccounts", "ServiceAccount"),
    ("", "v1", "persistentvolumeclaims", "PersistentVolumeClaim"),
    ("apps", "v1", "deployments", "Deployment"),
    ("batch", "v1", "jobs", "Job"),
    ("networking.k8s.io", "v1", "networkpolicies", "NetworkPolicy"),
    ("rbac.authorization.k8s.io", "v1", "roles", "Role"),
    ("rbac.authorization.k8s.io", "v1", "rolebindings", "RoleBinding"),
    ("autoscaling", "v2", "horizontalpodautoscalers", "HorizontalPodAutoscaler"),
    # A queued or multi-node job's trainer and reward pool (watched only where JobSet is installed).
    ("jobset.x-k8s.io", "v1alpha2", "jobsets", "JobSet"),
)
CHILD_EVENT_DELAY = 0.25
_REFERENCED_KINDS = ("ServiceAccount", "Role", "ConfigMap")
LOCAL_QUEUE_CACHE_SECONDS = 30.0
KUEUE_VERSIONS = ("v1beta2", "v1beta1")
# A trainer Job without a pod this long after its creation has its events read: a refused pod
# (admission, quota) is reported only there.
TRAINER_POD_GRACE_SECONDS = 3.0


def _age_seconds(obj: dict[str, Any], now: datetime) -> float:
    created = parse_time((obj.get("metadata") or {}).get("creationTimestamp"))
    return (now - created).total_seconds() if created else 0.0
PARENT_KINDS = {"RFTJob": "rftjobs", "TurboDeployment": "turbodeployments"}

# What the operator's ServiceAccount needs (the Helm chart grants exactly this), and nothing it
# does not use: tests/operator/test_rbac_usage.py runs every path and compares the API server's
# audit log of the account with these rules. Children are watched, created, applied (patch) and
# deleted, never read one by one; the trainer Job is created once and never patched.
RBAC_RULES = (
    {"apiGroups": [GROUP], "resources": ["rftjobs", "turbodeployments"], "verbs": ["get", "list", "watch"]},
    {"apiGroups": [GROUP], "resources": ["rftjobs/status", "turbodeployments/status"], "verbs": ["patch"]},
    # `get` on configmaps only so the operator may grant it to the trainer (on its progress
    # ConfigMap): the API server refuses a Role granting more than its creator holds.
    {"apiGroups": [""], "resources": ["configmaps"], "verbs": ["get", "list", "watch", "create", "patch", "delete"]},
    {"apiGroups": [""], "resources": ["services", "serviceaccounts"], "verbs": ["list", "watch", "create", "patch", "delete"]},
    # Checkpoint claims outlive the job's other children: never deleted.
    {"apiGroups": [""], "resources": ["persistentvolumeclaims"], "verbs": ["list", "watch", "create", "patch"]},
    {"apiGroups": [""], "resources": ["pods"], "verbs": ["list", "watch"]},
    {"apiGroups": [""], "resources": ["events"], "verbs": ["create", "list"]},
    {"apiGroups": ["apps"], "resources": ["deployments"], "verbs": ["list", "watch", "create", "patch", "delete"]},
    {"apiGroups": ["batch"], "resources": ["jobs"], "verbs": ["list", "watch", "create", "delete"]},
    {"apiGroups": ["networking.k8s.io"], "resources": ["networkpolicies"], "verbs": ["list", "watch", "create", "patch", "delete"]},
    {"apiGroups": ["rbac.authorization.k8s.io"], "resources": ["roles", "rolebindings"], "verbs": ["list", "watch", "create", "patch", "delete"]},
    {"apiGroups": ["autoscaling"], "resources": ["horizontalpodautoscalers"], "verbs": ["list", "watch", "create", "patch", "delete"]},
    # A queued or multi-node job's trainer and reward pool, created once (so never patched).
    {"apiGroups": ["jobset.x-k8s.io"], "resources": ["jobsets"], "verbs": ["list", "watch", "create", "delete"]},
    {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "verbs": ["get", "create", "update", "patch"]},
    # Whether the LocalQueue a job names exists (a job waits for Kueue; a typo would wait forever).
    {"apiGroups": ["kueue.x-k8s.io"], "resources": ["localqueues"], "verbs": ["get"]},
)

Key = tuple[str, str, str]  # (kind, namespace, name)


def _adapter_rftjobs(body: dict[str, Any]) -> set[str]:
    """The RFTJobs a TurboDeployment's adapters come from (`fromRFTJob`); none while its spec is
    invalid (the plan reports that)."""
    try:
        spec = parse_spec(TurboDeploymentSpec, body.get("spec") or {})
    except ValidationError:
        return set()
    return {a.from_rft_job for a in spec.adapter_list if a.from_rft_job}


@dataclass
class OperatorConfig:
    """How `kuberft operator` runs (all from command-line options)."""

    namespaces: tuple[str, ...] = ()
    """Namespaces to watch; empty watches the whole cluster."""
    images: Images = field(default_factory=Images.for_version)
    workers: int = 16
    """Reconciles running at the same time."""
    metrics_port: int = 8080
    """Port of /metrics and /healthz (0 disables the server)."""
    leader_election: bool = True
    lease_namespace: str = "default"
    lease_name: str = "kuberft-operator"
    lease_seconds: float = 15.0
    renew_seconds: float = 5.0
    identity: str = field(default_factory=lambda: f"{socket.gethostname()}-{os.getpid()}")


def _spec_or_none(body: dict[str, Any]) -> Optional[RFTJobSpec]:
    """An RFTJob's spec, or None when it is invalid (the plan reports that)."""
    try:
        return parse_spec(RFTJobSpec, body.get("spec") or {})
    except ValidationError:
        return None


def _key_of(kind: str, body: dict[str, Any]) -> Key:
    meta = body["metadata"]
    return (kind, meta.get("namespace") or "", meta["name"])


def _slim(kind: str, body: dict[str, Any]) -> dict[str, Any]:
    """What the cache keeps of a child: the metadata the reconciler reads (no managedFields, which
    are most of an object's size) and only the spec and status fields it looks at."""
    meta = body.get("metadata") or {}
    slim: dict[str, Any] = {"metadata": {k: meta[k] for k in _KEPT_METADATA if k in meta}}
    if kind in ("Pod", "Job", "JobSet", "Deployment", "HorizontalPodAutoscaler"):
        slim["status"] = body.get("status") or {}
    if kind in ("Job", "JobSet"):
        slim["spec"] = {k: (body.get("spec") or {}).get(k) for k in ("suspend", "parallelism")}
    elif kind == "Deployment":
        slim["spec"] = {"replicas": (body.get("spec") or {}).get("replicas")}
    progress_report = kind == "ConfigMap" and str(meta.get("name", "")).endswith(PROGRESS_SUFFIX)
    if progress_report:
        # A trainer's report (by name: the trainer may patch its labels, never its name). Untrusted:
        # one character past the limit is enough for the reconciler to refuse a value.
        data = body.get("data") or {}
        slim["data"] = {k: v[: PROGRESS_MAX_CHARS + 1] if isinstance(v, str) else v for k, v in data.items() if k in PROGRESS_FIELDS}
    elif kind == "ConfigMap":
        slim["data"] = body.get("data") or {}
    if kind not in _NEVER_APPLIED:
        slim["view"] = _owned_view_hash(body, ours_data=not progress_report)
    return slim


# Pods are the controllers' and the trainer Job is created once (Kueue owns its suspend flag):
# the operator never re-applies them, so their owned view is never compared.
_NEVER_APPLIED = ("Pod", "Job")


# The parts of a child the operator sets (besides status, which it never sets on children).
_VIEW_FIELDS = ("spec", "data", "rules", "roleRef", "subjects", "automountServiceAccountToken", "imagePullSecrets")


def _owned_view_hash(body: dict[str, Any], ours_data: bool) -> str:
    """A hash of what an edit to the operator's fields would change: a status update leaves it
    alone. `ours_data` is False for a progress ConfigMap, whose data is the trainer's."""
    meta = body.get("metadata") or {}
    # Only our annotations: controllers annotate children too (a Deployment's revision, a bound
    # claim's binder flags), and each such change would cost an apply that changes nothing.
    ours = {k: v for k, v in (meta.get("annotations") or {}).items() if k.startswith("kuberft.io/")}
    view: dict[str, Any] = {"labels": meta.get("labels"), "annotations": ours, "ownerReferences": meta.get("ownerReferences")}
    for name in _VIEW_FIELDS:
        if name in body and (ours_data or name != "data"):
            view[name] = body[name]
    return content_hash(view)


_KEPT_METADATA = ("name", "namespace", "uid", "resourceVersion", "creationTimestamp", "labels", "annotations", "ownerReferences", "deletionTimestamp")


class Controller:
    def __init__(self, client: KubeClient, config: OperatorConfig):
        self.client = client
        self.config = config
        self.metrics = component_metrics("operator")
        self.queue: WorkQueue[Key] = WorkQueue()
        self.children: dict[Key, dict[str, Any]] = {}
        self.phases: dict[Key, str] = {}
        self._written_versions: dict[Key, str] = {}
        self._queues: dict[tuple[str, str], tuple[str, float]] = {}
        # Per child: the owned view the API server returned after our last apply (see _apply).
        self._applied_views: dict[Key, str] = {}
        self._turbo_by_rftjob: dict[tuple[str, str], set[str]] = {}
        self.parents: dict[Key, dict[str, Any]] = {}
        self._by_owner: dict[tuple[str, str, str], set[Key]] = {}
        self._event_tasks: set[asyncio.Task[None]] = set()
        self._event_slots = asyncio.Semaphore(8)

    # ------------------------------------------------------------------ events from kopf

    def on_parent_event(self, kind: str, event_type: Optional[str], body: dict[str, Any]) -> None:
        key = _key_of(kind, body)
        log.debug("event %s %s %s/%s", event_type, kind, key[1], key[2])
        if event_type == "DELETED":
            self.phases.pop(key, None)
            self._written_versions.pop(key, None)
            self.parents.pop(key, None)
            self._update_phase_gauges()
            return
        self.parents[key] = {**body, "metadata": {k: v for k, v in body["metadata"].items() if k != "managedFields"}}
        phase = (body.get("status") or {}).get("phase") or "Pending"
        self.phases[key] = phase
        self._update_phase_gauges()
        if kind == "RFTJob":
            for turbo in self._turbo_by_rftjob.get((key[1], key[2]), ()):
                self.queue.add(("TurboDeployment", key[1], turbo))
        # Our own status write comes back as an event: nothing new to reconcile.
        if self._written_versions.get(key) == body["metadata"].get("resourceVersion"):
            return
        self.queue.add(key)

    def on_child_event(self, kind: str, event_type: Optional[str], body: dict[str, Any]) -> None:
        key = _key_of(kind, body)
        if event_type == "DELETED":
            self._forget(key)
        else:
            self._remember(key, _slim(kind, body))
        # Children change in bursts (a Deployment's status moves several times in a second):
        # a short delay lets those events collapse into one reconcile of the owner.
        labels = body["metadata"].get("labels") or {}
        if LABEL_RFTJOB in labels:
            self.queue.add_after(("RFTJob", key[1], labels[LABEL_RFTJOB]), CHILD_EVENT_DELAY)
        elif LABEL_TURBO in labels:
            self.queue.add_after(("TurboDeployment", key[1], labels[LABEL_TURBO]), CHILD_EVENT_DELAY)

    def _update_phase_gauges(self) -> None:
        counts: dict[tuple[str, str], int] = {}
        for (kind, _, _), phase in self.phases.items():
            counts[(kind, phase)] = counts.get((kind, phase), 0) + 1
        for kind, gauge, phases in (
            ("RFTJob", self.metrics.rftjobs, ("Pending", "Running", "Suspended", "Succeeded", "Failed")),
            ("TurboDeployment", self.metrics.turbodeployments, ("Pending", "Progressing", "Ready", "Failed")),
        ):
            for phase in phases:
                gauge.labels(phase=phase).set(counts.get((kind, phase), 0))

    # ------------------------------------------------------------------ the cache

    def _cached(self, kind: str, namespace: str, name: str, owner_uid: str) -> Optional[dict[str, Any]]:
        body = self.children.get((kind, namespace, name))
        if body is None:
            return None
        owners = body["metadata"].get("ownerReferences") or []
        return body if any(o.get("uid") == owner_uid for o in owners) else None

    def _remember(self, key: Key, body: dict[str, Any]) -> None:
        self.children[key] = body
        labels = body["metadata"].get("labels") or {}
        for label in (LABEL_RFTJOB, LABEL_TURBO):
            if label in labels:
                self._by_owner.setdefault((label, key[1], labels[label]), set()).add(key)

    def _forget(self, key: Key) -> None:
        body = self.children.pop(key, None)
        self._applied_views.pop(key, None)
        labels = (body or {}).get("metadata", {}).get("labels") or {}
        for label in (LABEL_RFTJOB, LABEL_TURBO):
            owned = self._by_owner.get((label, key[1], labels.get(label, "")))
            if owned is not None:
                owned.discard(key)
                if not owned:
                    del self._by_owner[(label, key[1], labels[label])]

    def _owned(self, label: str, namespace: str, name: str, owner_uid: str) -> list[tuple[str, dict[str, Any]]]:
        """(kind, body) of every cached child of one parent (pods included)."""
        found = []
        for key in list(self._by_owner.get((label, namespace, name), ())):
            body = self.children.get(key)
            if body is not None and any(o.get("uid") == owner_uid for o in body["metadata"].get("ownerReferences") or []):
                found.append((key[0], body))
        return found

    # ------------------------------------------------------------------ reconcile

    async def worker(self) -> None:
        while True:
            key = await self.queue.get()
            kind = key[0]
            started = time.perf_counter()
            result = "success"
            try:
                requeue = await self.reconcile(key)
                self.queue.forget(key)
                if requeue is not None:
                    self.queue.add_after(key, requeue)
            except ApiError as error:
                result = "conflict" if error.conflict else "error"
                delay = self.queue.retry(key, base=0.05 if error.conflict else 0.5)
                if not error.conflict:
                    log.warning("reconciling %s %s/%s failed: %s (retry in %.1fs)", kind, key[1], key[2], error, delay)
            except (OSError, asyncio.TimeoutError) as error:
                result = "error"
                delay = self.queue.retry(key, base=0.5)
                log.warning("reconciling %s %s/%s failed: %s (retry in %.1fs)", kind, key[1], key[2], error, delay)
            except Exception:  # a bug must not kill the worker; it is logged with its traceback and retried
                result = "error"
                self.queue.retry(key, base=1.0)
                log.exception("reconciling %s %s/%s failed", kind, key[1], key[2])
            finally:
                self.queue.done(key)
                self.metrics.reconciles.labels(kind=kind, result=result).inc()
                self.metrics.reconcile_seconds.labels(kind=kind).observe(time.perf_counter() - started)

    async def reconcile(self, key: Key) -> Optional[float]:
        kind, namespace, name = key
        # The watched copy is good enough to plan with: a stale one fails the status write with a
        # conflict (resourceVersion precondition) and the retry reads the object fresh.
        body = self.parents.get(key) or await self.client.get(API_VERSION, kind, namespace, name)
        if body is None or body["metadata"].get("deletionTimestamp"):
            return None  # garbage collection removes the children through their owner references
        now = datetime.now(timezone.utc)
        uid = body["metadata"]["uid"]
        if kind == "RFTJob":
            names = RFTJobNames(name)
            # What exists decides where the trainer Job is (a started job keeps its kind of children);
            # the spec decides what the cluster must offer before one is created.
            jobset = self._cached("JobSet", namespace, names.jobset, uid)
            reward_job = rollout_job = None
            if jobset is not None:  # the trainer, reward and rollout Jobs are the JobSet's
                jobset_uid = jobset["metadata"].get("uid")
                job = self._cached("Job", namespace, names.jobset_trainer, jobset_uid)
                reward_job = self._cached("Job", namespace, names.jobset_reward, jobset_uid)
                rollout_job = self._cached("Job", namespace, names.jobset_rollout, jobset_uid)
            else:
                job = self._cached("Job", namespace, names.trainer, uid)
            job_uid = (job or {}).get("metadata", {}).get("uid")
            pods = [b for k, b in self._owned(LABEL_RFTJOB, namespace, name, job_uid) if k == "Pod"] if job_uid else []
            spec = _spec_or_none(body)
            queue = await self._local_queue(namespace, spec.queue_name) if spec is not None and runs_as_jobset(spec) else None
            job_events: list[dict[str, Any]] = []
            if job is not None and not pods and not (job.get("spec") or {}).get("suspend") and _age_seconds(job, now) >= TRAINER_POD_GRACE_SECONDS:
                job_events = await self._warning_events(namespace, job_uid)
            reward_job_events = await self._server_job_events(namespace, reward_job, now)
            rollout_job_events = await self._server_job_events(namespace, rollout_job, now)
            observed = RFTJobObserved(
                body=body,
                config_map=self._cached("ConfigMap", namespace, names.config, uid),
                progress=self._cached("ConfigMap", namespace, names.progress, uid),
                reward_deployment=self._cached("Deployment", namespace, names.reward, uid),
                jobset=jobset,
                reward_job=reward_job,
                reward_job_events=reward_job_events,
                rollout_deployment=self._cached("Deployment", namespace, names.rollout, uid),
                rollout_job=rollout_job,
                rollout_job_events=rollout_job_events,
                rollout_pods=self._rollout_pods(namespace, name),
                trainer_job=job,
                trainer_pods=pods,
                trainer_job_events=job_events,
                local_queue=queue,
                children=[ChildRef(_API_VERSIONS[k], k, b["metadata"]["name"]) for k, b in self._owned(LABEL_RFTJOB, namespace, name, uid) if k != "Pod"],
            )
            plan = plan_rftjob(observed, self.config.images, now)
        else:
            for (ref_namespace, _), refs in self._turbo_by_rftjob.items():
                if ref_namespace == namespace:
                    refs.discard(name)
            sources = sorted(_adapter_rftjobs(body))
            for source in sources:
                self._turbo_by_rftjob.setdefault((namespace, source), set()).add(name)
            found = await asyncio.gather(*(self.client.get(API_VERSION, "RFTJob", namespace, source) for source in sources))
            observed = TurboObserved(
                body=body,
                rftjobs=dict(zip(sources, found)),
                deployment=self._cached("Deployment", namespace, name, uid),
                autoscaler=self._cached("HorizontalPodAutoscaler", namespace, name, uid),
            )
            plan = plan_turbo(observed, self.config.images, now)
        await self.execute(key, body, plan)
        log.debug("reconciled %s %s/%s: phase %s, %d applied/created/deleted", kind, namespace, name, plan.status.get("phase"), len(plan.apply) + len(plan.create) + len(plan.delete))
        return plan.requeue_after

    async def execute(self, key: Key, body: dict[str, Any], plan: Plan) -> None:
        namespace = key[1]
        # What others refer to goes first: a RoleBinding applied before its Role fails once (404).
        first = [m for m in plan.apply if m["kind"] in _REFERENCED_KINDS]
        await asyncio.gather(*(self._apply(namespace, manifest) for manifest in first))
        await asyncio.gather(*(self._apply(namespace, manifest) for manifest in plan.apply if manifest["kind"] not in _REFERENCED_KINDS))
        for manifest in plan.create:
            await self.client.create(manifest)
        for ref, patch in plan.patch:
            await self.client.merge_patch(ref.api_version, ref.kind, namespace, ref.name, patch)
        for ref in plan.delete:
            await self.client.delete(ref.api_version, ref.kind, namespace, ref.name)
        changes = status_changes(body.get("status") or {}, plan.status)
        if changes:
            patch = {"metadata": {"resourceVersion": body["metadata"]["resourceVersion"]}, "status": changes}
            try:
                written = await self.client.merge_patch(API_VERSION, key[0], namespace, key[2], patch, subresource="status")
            except ApiError as error:
                if error.conflict:
                    self.parents.pop(key, None)
                raise
            if written is None:
                return
            self.parents[key] = written
            self._written_versions[key] = written["metadata"]["resourceVersion"]
            self.phases[key] = (written.get("status") or {}).get("phase") or "Pending"
            self._update_phase_gauges()
        for event in plan.events:
            task = asyncio.create_task(self._post_event(body, event))
            self._event_tasks.add(task)
            task.add_done_callback(self._event_tasks.discard)

    async def _local_queue(self, namespace: str, name: Optional[str]) -> str:
        """For a job that runs as a JobSet: `no-jobset` when the cluster has no JobSet API, else
        `found`, `missing` or `no-kueue` for the LocalQueue it names (`found` without one);
        cached a while, as a queue is created once and every reconcile of the job asks."""
        key = (namespace, name or "")
        cached = self._queues.get(key)
        if cached is not None and time.monotonic() - cached[1] < LOCAL_QUEUE_CACHE_SECONDS:
            return cached[0]
        answer = "no-kueue"
        if not await self._served(JOBSET_API_VERSION):
            self._queues[key] = ("no-jobset", time.monotonic())
            return "no-jobset"
        if not name:  # a multi-node job without a queue needs JobSet only
            self._queues[key] = ("found", time.monotonic())
            return "found"
        for version in KUEUE_VERSIONS:
            try:
                await self.client.request("GET", f"/apis/kueue.x-k8s.io/{version}/namespaces/{namespace}/localqueues/{name}")
                answer = "found"
                break
            except ApiError as error:
                if error.status != 404:
                    log.warning("reading LocalQueue %s/%s failed: %s", namespace, name, error)
                    return cached[0] if cached else "found"  # unknown: do not cry wolf
                # A missing LocalQueue is a NotFound Status; a version not served, a bare 404 page.
                if error.reason == "NotFound":
                    answer = "missing"
                    break
            except (OSError, asyncio.TimeoutError) as error:
                log.warning("reading LocalQueue %s/%s failed: %s", namespace, name, error)
                return cached[0] if cached else "found"
        self._queues[key] = (answer, time.monotonic())
        return answer

    async def _served(self, api_version: str) -> bool:
        """Whether the API server serves an API group version (discovery, open to every user)."""
        try:
            await self.client.request("GET", f"/apis/{api_version}")
            return True
        except ApiError as error:
            if error.status == 404:
                return False
            raise

    def _rollout_pods(self, namespace: str, job_name: str) -> list[dict[str, Any]]:
        """A job's rollout server pods, by their labels: they are owned by a ReplicaSet (or a
        JobSet's Job), not by the RFTJob. A same-named job's pods left from before are being
        deleted, and the reconciler passes over those."""
        keys = self._by_owner.get((LABEL_RFTJOB, namespace, job_name), ())
        bodies = [self.children.get(key) for key in keys if key[0] == "Pod"]
        return [b for b in bodies if b is not None and (b["metadata"].get("labels") or {}).get(LABEL_ROLE) == "rollout"]

    async def _server_job_events(self, namespace: str, job: Optional[dict[str, Any]], now: datetime) -> list[dict[str, Any]]:
        """The Warning events of a JobSet's reward or rollout Job whose pods are not all ready (a
        refused pod shows only there)."""
        if job is None or (job.get("spec") or {}).get("suspend") or _age_seconds(job, now) < TRAINER_POD_GRACE_SECONDS:
            return []
        if int((job.get("status") or {}).get("ready") or 0) >= int((job.get("spec") or {}).get("parallelism") or 0):
            return []
        return await self._warning_events(namespace, job["metadata"].get("uid"))

    async def _warning_events(self, namespace: str, uid: Optional[str]) -> list[dict[str, Any]]:
        """The Warning events about one object (by uid): how a Job says its pod was refused."""
        if not uid:
            return []
        try:
            listed = await self.client.request(
                "GET", f"/api/v1/namespaces/{namespace}/events",
                params={"fieldSelector": f"involvedObject.uid={uid},type=Warning", "limit": "20"},
            )
        except (ApiError, OSError, asyncio.TimeoutError) as error:
            log.warning("listing the events of %s in %s failed: %s", uid, namespace, error)
            return []
        return listed.get("items") or []

    async def _post_event(self, body: dict[str, Any], event: Any) -> None:
        """Events are posted in the background: a reconcile does not wait for its announcements."""
        async with self._event_slots:
            try:
                await self.client.post_event(body, event.type, event.reason, event.message)
            except (ApiError, OSError, asyncio.TimeoutError) as error:
                log.warning("posting event %s for %s failed: %s", event.reason, body["metadata"]["name"], error)

    async def _apply(self, namespace: str, manifest: dict[str, Any]) -> None:
        digest = content_hash(manifest)
        manifest["metadata"].setdefault("annotations", {})[ANNOTATION_HASH] = digest
        key = (manifest["kind"], namespace, manifest["metadata"]["name"])
        cached = self.children.get(key)
        if (cached is not None and (cached["metadata"].get("annotations") or {}).get(ANNOTATION_HASH) == digest
                and cached.get("view") == self._applied_views.get(key)):
            return
        if cached is not None and key in self._applied_views and cached.get("view") != self._applied_views[key]:
            log.info("%s %s/%s changed since the operator applied it: applying again", *key)
            self.metrics.drift_corrections.labels(kind=key[0]).inc()
        # Always a server-side apply, creation included: a child created with a plain POST has its
        # fields owned by an Update entry, and a later apply that leaves a field out (a node
        # selector taken out of the spec) would not remove it.
        applied = await self.client.apply(manifest)
        # Remember what we wrote at once, so the next reconcile skips it even before the watch event.
        slim = _slim(manifest["kind"], applied)
        self._applied_views[key] = slim["view"]
        self._remember(key, slim)


_API_VERSIONS = {kind: (f"{group}/{version}" if group else version) for group, version, _, kind in CHILD_KINDS}
_API_VERSIONS["Pod"] = "v1"


class _NoDiffBase(kopf.DiffBaseStorage):
    """Stores and builds nothing. kopf keeps a "last handled" essence of every watched object to
    detect changes for on.create/on.update handlers; we have only event handlers, and building
    that essence deep-copies every object of every watch event (a tenth of the operator's CPU
    time when 200 RFTJobs arrive at once)."""

    def build(self, *, body: Any, extra_fields: Any = None) -> Any:
        return kopf.BodyEssence()

    def fetch(self, *, body: Any) -> None:
        return None

    def store(self, *, body: Any, patch: Any, essence: Any) -> None:
        pass


def build_registry(controller: Controller, settings: kopf.OperatorSettings) -> kopf.OperatorRegistry:
    """kopf handlers: every event only updates the cache and queues a key. They are coroutines
    so kopf runs them on the event loop (plain functions would run in threads)."""
    registry = kopf.OperatorRegistry()

    for kind, plural in PARENT_KINDS.items():

        async def parent_handler(event: dict[str, Any], _kind: str = kind, **_: Any) -> None:
            controller.on_parent_event(_kind, event.get("type"), event["object"])

        kopf.on.event(GROUP, VERSION, plural, registry=registry, id=f"{plural}-events")(parent_handler)

    managed = f"{LABEL_MANAGED_BY}={MANAGED_BY}"
    for group, version, plural, kind in CHILD_KINDS:
        settings.watching.label_selectors[group, version, plural] = managed

        async def child_handler(event: dict[str, Any], _kind: str = kind, **_: Any) -> None:
            controller.on_child_event(_kind, event.get("type"), event["object"])

        kopf.on.event(group, version, plural, registry=registry, id=f"{plural}-events")(child_handler)

    # Trainer and rollout pods carry our labels through their pod templates: a trainer pod's failure
    # explains a Failed job, a rollout pod's container state why the rollout servers are not ready.
    settings.watching.label_selectors["", "v1", "pods"] = f"{managed},{LABEL_ROLE} in (trainer,rollout)"

    async def pod_handler(event: dict[str, Any], **_: Any) -> None:
        controller.on_child_event("Pod", event.get("type"), event["object"])

    kopf.on.event("", "v1", "pods", registry=registry, id="pods-events")(pod_handler)

    @kopf.on.login(registry=registry)
    def login(**_: Any) -> kopf.ConnectionInfo:
        # Read afresh each time: kopf logs in again after a 401 (a rotated token).
        return connection_info()

    return registry


def connection_info() -> kopf.ConnectionInfo:
    """Credentials from the pod's service account, else from KUBECONFIG / ~/.kube/config."""
    settings = kopf.OperatorSettings()
    info = kopf.login_with_service_account(settings=settings) or kopf.login_with_kubeconfig(settings=settings)
    if info is None:
        raise kopf.LoginError("no credentials: not in a pod and neither KUBECONFIG nor ~/.kube/config is set")
    return info


async def _serve_metrics(controller: Controller, port: int) -> web.AppRunner:
    app = web.Application()
    app.add_routes(metrics_routes(controller.metrics))
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "0.0.0.0", port).start()
    return runner


async def run(config: OperatorConfig) -> int:
    """Run until SIGTERM/SIGINT (exit 0) or until leadership is lost (exit 1)."""
    info = connection_info()
    client = KubeClient(
        Credentials.from_connection_info(info),
        max_connections=max(16, config.workers * 8),
        reload=lambda: Credentials.from_connection_info(connection_info()),
    )
    controller = Controller(client, config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)

    runner = await _serve_metrics(controller, config.metrics_port) if config.metrics_port else None
    elector = None
    exit_code = 0
    tasks: list[asyncio.Task[Any]] = []
    try:
        if config.leader_election:
            elector = LeaderElector(client, config.lease_namespace, config.lease_name, config.identity, config.lease_seconds, config.renew_seconds)
            acquiring = asyncio.create_task(elector.acquire())
            stopping = asyncio.create_task(stop.wait())
            await asyncio.wait({acquiring, stopping}, return_when=asyncio.FIRST_COMPLETED)
            if not acquiring.done():
                acquiring.cancel()
                return 0
            stopping.cancel()

        settings = kopf.OperatorSettings()
        settings.persistence.diffbase_storage = _NoDiffBase()
        settings.posting.enabled = False  # our Events are posted by the reconciler, one per transition
        # Watched namespaces are exact names (or all) and the CRDs come with the chart: listing
        # every namespace and CRD to match patterns would need grants we do not otherwise use.
        settings.scanning.disabled = True
        settings.watching.server_timeout = 300
        settings.watching.client_timeout = 330
        # Our handlers only queue keys, so there is nothing to gain from waiting for more events.
        settings.batching.batch_window = 0.01
        registry = build_registry(controller, settings)
        kopf_stop = asyncio.Event()
        tasks.append(
            asyncio.create_task(
                kopf.operator(
                    registry=registry,
                    settings=settings,
                    standalone=True,
                    clusterwide=not config.namespaces,
                    namespaces=list(config.namespaces),
                    stop_flag=kopf_stop,
                )
            )
        )
        tasks += [asyncio.create_task(controller.worker()) for _ in range(config.workers)]
        kopf_task = tasks[0]
        stop_task = asyncio.create_task(stop.wait())
        hold_task = asyncio.create_task(elector.hold()) if elector is not None else None
        log.info(
            "kuberft operator %s started (%s, %d workers)",
            config.identity,
            "namespaces " + ",".join(config.namespaces) if config.namespaces else "all namespaces",
            config.workers,
        )
        watched = {stop_task, kopf_task} | ({hold_task} if hold_task else set())
        done, _ = await asyncio.wait(watched, return_when=asyncio.FIRST_COMPLETED)
        if hold_task is not None and hold_task in done:
            exit_code = 1  # leadership lost: stop acting at once, the pod restarts as a candidate
        elif kopf_task in done and not kopf_task.cancelled() and kopf_task.exception() is not None:
            exit_code = 1
            log.error("kopf stopped: %s", kopf_task.exception())
        # Otherwise a signal stopped us (kopf handles SIGTERM/SIGINT itself once it runs).
        for task in (stop_task, hold_task):
            if task is not None:
                task.cancel()
        kopf_stop.set()
        with contextlib.suppress(asyncio.TimeoutError, asyncio.CancelledError):
            await asyncio.wait_for(kopf_task, timeout=10)
    finally:
        for task in tasks[1:]:
            task.cancel()
        await asyncio.gather(*tasks[1:], return_exceptions=True)
        controller.queue.close()
        if elector is not None and exit_code == 0:
            await elector.release()
        if runner is not None:
            await runner.cleanup()
        await client.close()
    return exit_code
