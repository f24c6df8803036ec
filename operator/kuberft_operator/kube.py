"""A small asynchronous Kubernetes API client (aiohttp) for the operator's writes.

kopf watches; this client applies children (server-side apply, so applying twice changes
nothing), creates, patches, deletes, writes status with optimistic concurrency and posts
Events. It uses the same credentials as kopf (`kopf.login_with_kubeconfig` or the pod's
service account), so there is one way to log in.
"""

from __future__ import annotations

import base64
import json
import ssl
import tempfile
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Callable, Optional
from urllib.parse import urlencode

import aiohttp

FIELD_MANAGER = "kuberft-operator"

# Resource plurals of every kind the operator touches.
PLURALS = {
    "ConfigMap": "configmaps",
    "Service": "services",
    "ServiceAccount": "serviceaccounts",
    "PersistentVolumeClaim": "persistentvolumeclaims",
    "Pod": "pods",
    "Event": "events",
    "Deployment": "deployments",
    "Job": "jobs",
    "NetworkPolicy": "networkpolicies",
    "Role": "roles",
    "RoleBinding": "rolebindings",
    "HorizontalPodAutoscaler": "horizontalpodautoscalers",
    "JobSet": "jobsets",
    "Lease": "leases",
    "RFTJob": "rftjobs",
    "TurboDeployment": "turbodeployments",
}


class ApiError(Exception):
    """A non-2xx answer of the API server, with its status code and message."""

    def __init__(self, status: int, reason: str, message: str):
        self.status = status
        self.reason = reason
        super().__init__(f"{status} {reason}: {message}")

    @property
    def conflict(self) -> bool:
        return self.status == 409

    @property
    def not_found(self) -> bool:
        return self.status == 404


def resource_path(api_version: str, kind: str, namespace: Optional[str], name: Optional[str] = None, subresource: Optional[str] = None) -> str:
    base = f"/api/{api_version}" if "/" not in api_version else f"/apis/{api_version}"
    path = f"{base}/namespaces/{namespace}/{PLURALS[kind]}" if namespace else f"{base}/{PLURALS[kind]}"
    if name:
        path += f"/{name}"
    if subresource:
        path += f"/{subresource}"
    return path


@dataclass
class Credentials:
    """Where the API server is and how to authenticate, taken from a kopf ConnectionInfo."""

    server: str
    token: Optional[str] = None
    ca_data: Optional[bytes] = None
    ca_path: Optional[str] = None
    insecure: bool = False
    cert_data: Optional[bytes] = None
    cert_path: Optional[str] = None
    key_data: Optional[bytes] = None
    key_path: Optional[str] = None
    default_namespace: Optional[str] = None

    @classmethod
    def from_connection_info(cls, info: Any) -> "Credentials":
        def data(value: Any) -> Optional[bytes]:
            if value is None:
                return None
            raw = value.encode() if isinstance(value, str) else value
            # kubeconfig *-data fields are base64; decoded PEM starts with "-----".
            return raw if raw.lstrip().startswith(b"-----") else base64.b64decode(raw)

        return cls(
            server=info.server.rstrip("/"),
            token=info.token,
            ca_data=data(info.ca_data),
            ca_path=str(info.ca_path) if info.ca_path else None,
            insecure=bool(info.insecure),
            cert_data=data(info.certificate_data),
            cert_path=str(info.certificate_path) if info.certificate_path else None,
            key_data=data(info.private_key_data),
            key_path=str(info.private_key_path) if info.private_key_path else None,
            default_namespace=info.default_namespace,
        )

    def ssl_context(self) -> ssl.SSLContext | bool:
        if not self.server.startswith("https"):
            return False
        context = ssl.create_default_context(cafile=self.ca_path, cadata=self.ca_data.decode() if self.ca_data else None)
        if self.insecure:
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        if self.cert_data or self.cert_path:
            with tempfile.NamedTemporaryFile("wb", suffix=".pem") as cert, tempfile.NamedTemporaryFile("wb", suffix=".pem") as key:
                if self.cert_data:
                    cert.write(self.cert_data)
                    cert.flush()
                if self.key_data:
                    key.write(self.key_data)
                    key.flush()
                context.load_cert_chain(self.cert_path or cert.name, self.key_path or key.name)
        return context


class KubeClient:
    """One aiohttp session to the API server, pooled and shared by all reconciles."""

    def __init__(self, credentials: Credentials, max_connections: int = 32, reload: Optional[Callable[[], Credentials]] = None):
        """`reload` gives fresh credentials after a 401 (a rotated service-account token)."""
        self.credentials = credentials
        self._reload = reload
        self._session = aiohttp.ClientSession(
            base_url=credentials.server,
            headers={"Accept": "application/json"},
            connector=aiohttp.TCPConnector(ssl=credentials.ssl_context(), limit=max_connections),
            timeout=aiohttp.ClientTimeout(total=30),
        )

    async def close(self) -> None:
        await self._session.close()

    async def request(self, method: str, path: str, body: Any = None, content_type: str = "application/json", params: Optional[dict[str, str]] = None) -> dict[str, Any]:
        url = path + ("?" + urlencode(params) if params else "")
        data = None if body is None else json.dumps(body)
        for attempt in (1, 2):
            headers = {"Content-Type": content_type}
            if self.credentials.token:
                headers["Authorization"] = f"Bearer {self.credentials.token}"
            async with self._session.request(method, url, data=data, headers=headers) as response:
                text = await response.text()
                payload = json.loads(text) if text.startswith("{") else {}
                if response.status == 401 and attempt == 1 and self._reload is not None:
                    self.credentials.token = self._reload().token
                    continue
                if response.status >= 400:
                    raise ApiError(response.status, payload.get("reason", response.reason or ""), payload.get("message", text))
                return payload
        raise AssertionError("unreachable")

    async def get(self, api_version: str, kind: str, namespace: Optional[str], name: str) -> Optional[dict[str, Any]]:
        try:
            return await self.request("GET", resource_path(api_version, kind, namespace, name))
        except ApiError as error:
            if error.not_found:
                return None
            raise

    async def list(self, api_version: str, kind: str, namespace: Optional[str], label_selector: Optional[str] = None) -> list[dict[str, Any]]:
        params = {"labelSelector": label_selector} if label_selector else None
        return (await self.request("GET", resource_path(api_version, kind, namespace), params=params)).get("items", [])

    async def apply(self, manifest: dict[str, Any]) -> dict[str, Any]:
        """Server-side apply: creates the object or brings the fields we manage to the manifest."""
        meta = manifest["metadata"]
        path = resource_path(manifest["apiVersion"], manifest["kind"], meta.get("namespace"), meta["name"])
        return await self.request(
            "PATCH", path, manifest, "application/apply-patch+yaml", params={"fieldManager": FIELD_MANAGER, "force": "true"}
        )

    async def create(self, manifest: dict[str, Any]) -> Optional[dict[str, Any]]:
        """Create; None when an object of that name already exists."""
        meta = manifest["metadata"]
        try:
            return await self.request(
                "POST", resource_path(manifest["apiVersion"], manifest["kind"], meta.get("namespace")), manifest, params={"fieldManager": FIELD_MANAGER}
            )
        except ApiError as error:
            if error.conflict:
                return None
            raise

    async def merge_patch(self, api_version: str, kind: str, namespace: Optional[str], name: str, patch: dict[str, Any], subresource: Optional[str] = None) -> Optional[dict[str, Any]]:
        """JSON merge patch; None when the object does not exist. With
        `metadata.resourceVersion` in the patch, a concurrent write makes it fail with 409."""
        try:
            return await self.request(
                "PATCH", resource_path(api_version, kind, namespace, name, subresource), patch, "application/merge-patch+json", params={"fieldManager": FIELD_MANAGER}
            )
        except ApiError as error:
            if error.not_found:
                return None
            raise

    async def delete(self, api_version: str, kind: str, namespace: Optional[str], name: str, propagation: str = "Background") -> bool:
        """Delete (dependents go through garbage collection); False when it was already gone."""
        try:
            await self.request("DELETE", resource_path(api_version, kind, namespace, name), {"propagationPolicy": propagation})
            return True
        except ApiError as error:
            if error.not_found:
                return False
            raise

    async def post_event(self, involved: dict[str, Any], type_: str, reason: str, message: str, component: str = FIELD_MANAGER) -> None:
        meta = involved["metadata"]
        now = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        event = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"generateName": f"{meta['name']}.", "namespace": meta["namespace"]},
            "involvedObject": {
                "apiVersion": involved["apiVersion"],
                "kind": involved["kind"],
                "name": meta["name"],
                "namespace": meta["namespace"],
                "uid": meta["uid"],
                "resourceVersion": meta.get("resourceVersion"),
            },
            "reason": reason,
            "message": message[:1024],
            "type": type_,
            "source": {"component": component},
            "reportingComponent": component,
            "reportingInstance": component,
            "firstTimestamp": now[:19] + "Z",
            "lastTimestamp": now[:19] + "Z",
            "count": 1,
        }
        await self.request("POST", resource_path("v1", "Event", meta["namespace"]), event)
