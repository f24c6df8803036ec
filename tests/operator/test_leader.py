"""Lease leader election against an in-memory Lease store with the API server's optimistic
concurrency (a write carrying an old resourceVersion fails with 409)."""

from __future__ import annotations

import asyncio
import copy
import logging
from datetime import datetime, timedelta, timezone

from kuberft_operator.kube import ApiError
from kuberft_operator.leader import LeaderElector


class LeaseStore:
    def __init__(self):
        self.lease = None
        self.version = 0

    async def get(self, api_version, kind, namespace, name):
        return copy.deepcopy(self.lease)

    def _write(self, body):
        self.version += 1
        body = copy.deepcopy(body)
        body["metadata"]["resourceVersion"] = str(self.version)
        self.lease = body
        return copy.deepcopy(body)

    async def create(self, manifest):
        if self.lease is not None:
            return None
        return self._write(manifest)

    async def request(self, method, path, body=None, **_):
        assert method == "PUT"
        if body["metadata"]["resourceVersion"] != self.lease["metadata"]["resourceVersion"]:
            raise ApiError(409, "Conflict", "the object has been modified")
        return self._write(body)

    async def merge_patch(self, api_version, kind, namespace, name, patch, subresource=None):
        if patch["metadata"]["resourceVersion"] != self.lease["metadata"]["resourceVersion"]:
            raise ApiError(409, "Conflict", "the object has been modified")
        merged = copy.deepcopy(self.lease)
        merged["spec"].update(patch["spec"])
        return self._write(merged)


def elector(store, identity):
    return LeaderElector(store, "ops", "kuberft-operator", identity, lease_seconds=10, renew_seconds=2)


def test_only_one_candidate_wins_and_the_holder_renews():
    async def scenario():
        store = LeaseStore()
        a, b = elector(store, "a"), elector(store, "b")
        assert await a.try_acquire_or_renew() is True
        assert await b.try_acquire_or_renew() is False
        assert await a.try_acquire_or_renew() is True
        assert store.lease["spec"]["holderIdentity"] == "a"
        assert store.lease["spec"]["leaseTransitions"] == 0

    asyncio.run(scenario())


def test_a_silent_leader_is_replaced_once_its_lease_ran_out():
    async def scenario():
        store = LeaseStore()
        a, b = elector(store, "a"), elector(store, "b")
        await a.try_acquire_or_renew()
        stale = (datetime.now(timezone.utc) - timedelta(seconds=11)).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        store.lease["spec"]["renewTime"] = stale
        assert await b.try_acquire_or_renew() is True
        assert store.lease["spec"]["holderIdentity"] == "b"
        assert store.lease["spec"]["leaseTransitions"] == 1
        assert await a.try_acquire_or_renew() is False  # the old leader sees it lost

    asyncio.run(scenario())


def test_two_candidates_racing_for_an_expired_lease_cannot_both_win():
    async def scenario():
        store = LeaseStore()
        await elector(store, "old").try_acquire_or_renew()
        store.lease["spec"]["renewTime"] = "2020-01-01T00:00:00.000000Z"
        a, b = elector(store, "a"), elector(store, "b")
        # Both read the same expired lease before either writes.
        real_get = store.get
        snapshot = await real_get("", "", "", "")

        async def same_snapshot(*args):
            return copy.deepcopy(snapshot)

        store.get = same_snapshot
        results = await asyncio.gather(a.try_acquire_or_renew(), b.try_acquire_or_renew())
        assert sorted(results) == [False, True]

    asyncio.run(scenario())


def test_a_clean_shutdown_releases_the_lease_for_the_standby():
    async def scenario():
        store = LeaseStore()
        a, b = elector(store, "a"), elector(store, "b")
        await a.try_acquire_or_renew()
        await a.release()
        assert store.lease["spec"]["holderIdentity"] is None
        assert await b.try_acquire_or_renew() is True

    asyncio.run(scenario())


def test_hold_renews_while_leading_and_returns_when_another_replica_took_the_lease(caplog):
    async def scenario():
        store = LeaseStore()
        a = LeaderElector(store, "ops", "kuberft-operator", "a", lease_seconds=1.0, renew_seconds=0.05)
        await a.try_acquire_or_renew()
        acquired = store.lease["spec"]["renewTime"]
        holding = asyncio.create_task(a.hold())
        await asyncio.sleep(0.3)
        assert not holding.done()  # still the leader: hold keeps renewing
        assert store.lease["spec"]["holderIdentity"] == "a" and store.lease["spec"]["renewTime"] > acquired
        store.lease["spec"]["holderIdentity"] = "intruder"
        store.lease["spec"]["renewTime"] = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        writes = store.version
        await asyncio.wait_for(holding, timeout=2)
        assert store.lease["spec"]["holderIdentity"] == "intruder"  # the new leader's lease is left alone
        assert store.version == writes

    with caplog.at_level(logging.ERROR, logger="kuberft.operator.leader"):
        asyncio.run(scenario())
    # It returned because it saw the takeover, not because it failed to renew in time.
    assert [r.getMessage() for r in caplog.records] == ["leader election: lease ops/kuberft-operator was taken over"]
