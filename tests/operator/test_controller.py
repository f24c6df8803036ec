"""The controller's I/O rules, against an in-memory API server: reconciling twice writes
nothing the second time, a stale status write fails instead of overwriting, and Events are
posted only for a recorded transition."""

from __future__ import annotations

import asyncio
import copy

import pytest

from kuberft_operator.builders import Images
from kuberft_operator.controller import Controller, OperatorConfig
from kuberft_operator.kube import ApiError

JOB = {
    "apiVersion": "kuberft.io/v1alpha1",
    "kind": "RFTJob",
    "metadata": {"name": "demo", "namespace": "ns", "uid": "u1", "generation": 1, "resourceVersion": "1"},
    "spec": {"model": {"name": "m"}, "dataset": {"rows": [{"prompt": "p"}]}, "rewards": [{"kind": "exact_match"}]},
}


class FakeKube:
    def __init__(self):
        self.objects = {("RFTJob", "ns", "demo"): copy.deepcopy(JOB)}
        self.writes: list[tuple[str, str, str]] = []
        self.events: list[tuple[str, str]] = []
        self.version = 1
        self.served: set[str] = set()
        """API discovery paths that answer (`/apis/<group>/<version>`); any other GET is a 404."""

    def _store(self, kind, ns, name, body):
        self.version += 1
        body = copy.deepcopy(body)
        body.setdefault("metadata", {})["resourceVersion"] = str(self.version)
        body["metadata"].setdefault("uid", f"uid-{kind}-{name}")
        self.objects[(kind, ns, name)] = body
        return copy.deepcopy(body)

    async def get(self, api_version, kind, namespace, name):
        return copy.deepcopy(self.objects.get((kind, namespace, name)))

    async def create(self, manifest):
        key = (manifest["kind"], manifest["metadata"]["namespace"], manifest["metadata"]["name"])
        if key in self.objects:
            return None
        self.writes.append(("create",) + key[::2])
        return self._store(*key, manifest)

    async def apply(self, manifest):
        key = (manifest["kind"], manifest["metadata"]["namespace"], manifest["metadata"]["name"])
        self.writes.append(("apply",) + key[::2])
        return self._store(*key, manifest)

    async def merge_patch(self, api_version, kind, namespace, name, patch, subresource=None):
        current = self.objects.get((kind, namespace, name))
        if current is None:
            return None
        expected = (patch.get("metadata") or {}).get("resourceVersion")
        if expected and expected != current["metadata"]["resourceVersion"]:
            raise ApiError(409, "Conflict", "the object has been modified")
        self.writes.append(("patch", kind, name))
        merged = copy.deepcopy(current)
        for field, value in patch.items():
            if field != "metadata":
                merged.setdefault(field, {}).update(value)
        return self._store(kind, namespace, name, merged)

    async def delete(self, api_version, kind, namespace, name, propagation="Background"):
        self.writes.append(("delete", kind, name))
        return self.objects.pop((kind, namespace, name), None) is not None

    async def post_event(self, involved, type_, reason, message, component="x"):
        self.events.append((type_, reason))

    async def request(self, method, path, body=None, content_type="application/json", params=None):
        if path in self.served:
            return {}
        raise ApiError(404, "", "404 page not found")


def controller(kube):
    return Controller(kube, OperatorConfig(images=Images.for_version("r", "t"), leader_election=False, metrics_port=0))


def test_a_second_reconcile_of_an_unchanged_job_writes_nothing():
    async def scenario():
        kube = FakeKube()
        ctl = controller(kube)
        key = ("RFTJob", "ns", "demo")
        await ctl.reconcile(key)
        await asyncio.sleep(0)  # background Events
        first = list(kube.writes)
        assert ("apply", "ConfigMap", "demo-config") in first
        assert ("patch", "RFTJob", "demo") in first
        assert kube.events == [("Normal", "ChildrenCreated")]
        kube.writes.clear()
        ctl.parents.pop(key)  # read the job fresh, as after a restart of the watch
        await ctl.reconcile(key)
        await asyncio.sleep(0)
        assert kube.writes == []
        assert kube.events == [("Normal", "ChildrenCreated")]

    asyncio.run(scenario())


def test_a_status_write_from_a_stale_copy_fails_and_announces_nothing():
    async def scenario():
        kube = FakeKube()
        ctl = controller(kube)
        key = ("RFTJob", "ns", "demo")
        ctl.parents[key] = copy.deepcopy(JOB)
        kube.objects[key]["metadata"]["resourceVersion"] = "99"  # someone (a user's edit) wrote since
        with pytest.raises(ApiError) as raised:
            await ctl.reconcile(key)
        assert raised.value.conflict
        await asyncio.sleep(0)
        assert kube.events == []
        assert key not in ctl.parents  # the retry reads the object fresh
        await ctl.reconcile(key)
        assert kube.objects[key]["status"]["phase"] == "Pending"

    asyncio.run(scenario())


def test_the_trainers_report_reaches_the_status_through_the_cache_cut_to_the_keys_the_operator_reads():
    async def scenario():
        kube = FakeKube()
        ctl = controller(kube)
        key = ("RFTJob", "ns", "demo")
        await ctl.reconcile(key)
        report = copy.deepcopy(kube.objects[("ConfigMap", "ns", "demo-progress")])
        assert "data" not in report  # created empty: the trainer fills it
        report["data"] = {"step": "3", "phase": "Succeeded", "rewards": "[" * 1_000_000}  # as the trainer patched it
        ctl.on_child_event("ConfigMap", "MODIFIED", report)
        cached = ctl.children[("ConfigMap", "ns", "demo-progress")]["data"]
        assert sorted(cached) == ["rewards", "step"] and len(cached["rewards"]) == 2049
        await ctl.reconcile(key)
        return kube.objects[key]["status"]

    status = asyncio.run(scenario())
    assert status["step"] == 3 and status["progress"].startswith("3/")
    assert status["phase"] == "Pending"
    refused = next(c for c in status["conditions"] if c["type"] == "ProgressAccepted")
    assert refused["message"] == "ignored in ConfigMap demo-progress: rewards: longer than 2048 characters"


def test_our_own_status_write_coming_back_as_an_event_queues_nothing():
    async def scenario():
        kube = FakeKube()
        ctl = controller(kube)
        key = ("RFTJob", "ns", "demo")
        await ctl.reconcile(key)
        ctl.on_parent_event("RFTJob", "MODIFIED", copy.deepcopy(kube.objects[key]))
        assert len(ctl.queue) == 0
        edited = copy.deepcopy(kube.objects[key])
        edited["metadata"]["resourceVersion"] = "1000"
        ctl.on_parent_event("RFTJob", "MODIFIED", edited)
        assert len(ctl.queue) == 1

    asyncio.run(scenario())


def test_a_multi_node_job_needs_jobset_and_then_is_one_jobset():
    async def scenario():
        kube = FakeKube()
        kube.objects[("RFTJob", "ns", "demo")]["spec"] = {**JOB["spec"], "trainer": {"nodes": 2}, "checkpoint": {"storageSize": "1Gi"}}
        ctl = controller(kube)
        key = ("RFTJob", "ns", "demo")
        await ctl.reconcile(key)
        running = next(c for c in kube.objects[key]["status"]["conditions"] if c["type"] == "Running")
        assert running["reason"] == "JobSetNotInstalled" and not [w for w in kube.writes if w[1] == "JobSet"]

        kube.served.add("/apis/jobset.x-k8s.io/v1alpha2")  # JobSet installed (the answer is cached a while)
        ctl._queues.clear()
        ctl.parents.pop(key)
        await ctl.reconcile(key)
        assert ("create", "JobSet", "demo") in kube.writes
        assert not [w for w in kube.writes if w[1] in ("Deployment", "Job")]  # no reward Deployment, no trainer Job of its own

    asyncio.run(scenario())


def test_a_rollout_pods_container_state_reaches_the_status_through_the_pod_cache():
    async def scenario():
        kube = FakeKube()
        kube.objects[("RFTJob", "ns", "demo")]["spec"] = {**JOB["spec"], "rollout": {"mode": "server"}}
        ctl = controller(kube)
        key = ("RFTJob", "ns", "demo")
        await ctl.reconcile(key)
        template = kube.objects[("Deployment", "ns", "demo-rollout")]["spec"]["template"]
        # A pod of the rollout Deployment (owned by its ReplicaSet), as the watch delivers it.
        pod = {"metadata": {"name": "demo-rollout-abc", "namespace": "ns", "labels": template["metadata"]["labels"],
                            "ownerReferences": [{"kind": "ReplicaSet", "name": "demo-rollout-5d4f", "uid": "rs-1"}]},
               "status": {"phase": "Pending", "containerStatuses": [
                   {"name": "rollout", "ready": False, "state": {"waiting": {"reason": "ErrImagePull", "message": "not found"}}}]}}
        ctl.on_child_event("Pod", "ADDED", pod)
        ctl.parents.pop(key)
        await ctl.reconcile(key)
        return kube.objects[key]["status"]

    rollout = next(c for c in asyncio.run(scenario())["conditions"] if c["type"] == "RolloutReady")
    assert (rollout["reason"], rollout["message"]) == ("RolloutPodsCannotStart", "0/1 rollout pods ready; pod demo-rollout-abc: ErrImagePull: not found")
