"""Leader election on a coordination.k8s.io/v1 Lease, the way client-go does it.

kopf's peering pauses operators of lower priority but does not elect a leader among equals, so
two replicas of the operator would both reconcile. Instead each replica tries to hold a Lease;
only the holder runs the controller, the others wait. Every write to the Lease carries its
resourceVersion, so two candidates can never both win. A holder that cannot renew before the
lease runs out stops at once (the pod restarts and becomes a candidate again): it must not keep
acting once another replica may have taken over. A holder that shuts down cleanly releases the
Lease so a standby takes over immediately.
"""

from __future__ import annotations

import asyncio
import logging
from datetime import datetime, timedelta, timezone
from typing import Any, Optional

from .kube import ApiError, KubeClient, resource_path

log = logging.getLogger("kuberft.operator.leader")


def _micro_time(moment: datetime) -> str:
    return moment.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _parse(value: Optional[str]) -> Optional[datetime]:
    return datetime.fromisoformat(value.replace("Z", "+00:00")) if value else None


class LeaderElector:
    def __init__(self, client: KubeClient, namespace: str, name: str, identity: str, lease_seconds: float = 15.0, renew_seconds: float = 5.0):
        if renew_seconds >= lease_seconds:
            raise ValueError("the renew period must be shorter than the lease duration")
        self.client = client
        self.namespace = namespace
        self.name = name
        self.identity = identity
        self.lease_seconds = lease_seconds
        self.renew_seconds = renew_seconds
        self._last_renew: Optional[datetime] = None

    async def try_acquire_or_renew(self) -> bool:
        now = datetime.now(timezone.utc)
        lease = await self.client.get("coordination.k8s.io/v1", "Lease", self.namespace, self.name)
        spec: dict[str, Any] = {
            "holderIdentity": self.identity,
            "leaseDurationSeconds": max(1, int(round(self.lease_seconds))),
            "renewTime": _micro_time(now),
        }
        try:
            if lease is None:
                spec.update(acquireTime=_micro_time(now), leaseTransitions=0)
                created = await self.client.create(
                    {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease", "metadata": {"name": self.name, "namespace": self.namespace}, "spec": spec}
                )
                won = created is not None
            else:
                current = lease.get("spec") or {}
                holder = current.get("holderIdentity")
                renewed = _parse(current.get("renewTime")) or _parse(current.get("acquireTime"))
                duration = float(current.get("leaseDurationSeconds") or self.lease_seconds)
                expired = renewed is None or renewed + timedelta(seconds=duration) < now
                if holder and holder != self.identity and not expired:
                    return False
                if holder == self.identity:
                    spec["acquireTime"] = current.get("acquireTime") or _micro_time(now)
                    spec["leaseTransitions"] = current.get("leaseTransitions") or 0
                else:
                    spec["acquireTime"] = _micro_time(now)
                    spec["leaseTransitions"] = int(current.get("leaseTransitions") or 0) + 1
                body = {
                    "apiVersion": "coordination.k8s.io/v1",
                    "kind": "Lease",
                    "metadata": {"name": self.name, "namespace": self.namespace, "resourceVersion": lease["metadata"]["resourceVersion"]},
                    "spec": spec,
                }
                await self.client.request("PUT", resource_path("coordination.k8s.io/v1", "Lease", self.namespace, self.name), body)
                won = True
        except ApiError as error:
            if error.conflict:
                return False
            raise
        if won:
            self._last_renew = now
        return won

    async def acquire(self) -> None:
        """Wait until this replica holds the Lease."""
        announced = False
        while True:
            try:
                if await self.try_acquire_or_renew():
                    log.info("leader election: %s holds lease %s/%s", self.identity, self.namespace, self.name)
                    return
            except (ApiError, OSError, asyncio.TimeoutError) as error:
                log.warning("leader election: cannot reach the lease: %s", error)
            if not announced:
                log.info("leader election: another replica holds lease %s/%s; standing by", self.namespace, self.name)
                announced = True
            await asyncio.sleep(self.renew_seconds)

    async def hold(self) -> None:
        """Renew the Lease until it is lost; returns when leadership is lost."""
        while True:
            await asyncio.sleep(self.renew_seconds)
            try:
                if await self.try_acquire_or_renew():
                    continue
                log.error("leader election: lease %s/%s was taken over", self.namespace, self.name)
                return
            except (ApiError, OSError, asyncio.TimeoutError) as error:
                log.warning("leader election: renewing failed: %s", error)
            last = self._last_renew or datetime.now(timezone.utc)
            if datetime.now(timezone.utc) - last > timedelta(seconds=self.lease_seconds - self.renew_seconds / 2):
                log.error("leader election: could not renew lease %s/%s in time", self.namespace, self.name)
                return

    async def release(self) -> None:
        """Give the Lease up on a clean shutdown so a standby takes over without waiting."""
        try:
            lease = await self.client.get("coordination.k8s.io/v1", "Lease", self.namespace, self.name)
            if lease and (lease.get("spec") or {}).get("holderIdentity") == self.identity:
                patch = {"metadata": {"resourceVersion": lease["metadata"]["resourceVersion"]}, "spec": {"holderIdentity": None, "renewTime": None}}
                await self.client.merge_patch("coordination.k8s.io/v1", "Lease", self.namespace, self.name, patch)
        except (ApiError, OSError, asyncio.TimeoutError) as error:
            log.warning("leader election: releasing the lease failed: %s", error)
