"""The operator's API client against a small HTTP server standing in for the API server."""

from __future__ import annotations

import asyncio

import pytest
from aiohttp import web

from kuberft_operator.kube import ApiError, Credentials, KubeClient, resource_path


def test_resource_paths_for_core_and_group_kinds():
    assert resource_path("v1", "ConfigMap", "ns", "c") == "/api/v1/namespaces/ns/configmaps/c"
    assert resource_path("kuberft.io/v1alpha1", "RFTJob", "ns", "j", "status") == "/apis/kuberft.io/v1alpha1/namespaces/ns/rftjobs/j/status"
    assert resource_path("batch/v1", "Job", "ns") == "/apis/batch/v1/namespaces/ns/jobs"


async def _serve(handler):
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    return runner, f"http://127.0.0.1:{port}"


def test_a_rotated_token_is_reloaded_after_a_401_and_the_request_retried():
    async def scenario():
        seen = []

        async def handler(request):
            seen.append(request.headers.get("Authorization"))
            if request.headers.get("Authorization") != "Bearer fresh":
                return web.json_response({"kind": "Status", "reason": "Unauthorized", "message": "Unauthorized"}, status=401)
            return web.json_response({"metadata": {"name": "c"}})

        runner, url = await _serve(handler)
        client = KubeClient(Credentials(server=url, token="stale"), reload=lambda: Credentials(server=url, token="fresh"))
        try:
            assert await client.get("v1", "ConfigMap", "ns", "c") == {"metadata": {"name": "c"}}
            assert seen == ["Bearer stale", "Bearer fresh"]
        finally:
            await client.close()
            await runner.cleanup()

    asyncio.run(scenario())


def test_errors_carry_the_status_and_the_server_message():
    async def scenario():
        async def handler(request):
            if request.method == "POST":
                return web.json_response({"reason": "AlreadyExists", "message": "exists"}, status=409)
            if request.method == "DELETE":
                return web.json_response({"reason": "NotFound", "message": "gone"}, status=404)
            return web.json_response({"reason": "Invalid", "message": 'spec.grpo.epsilonHigh: Invalid value'}, status=422)

        runner, url = await _serve(handler)
        client = KubeClient(Credentials(server=url, token="t"))
        manifest = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c", "namespace": "ns"}}
        try:
            assert await client.create(manifest) is None  # already there: nothing to do
            assert await client.delete("v1", "ConfigMap", "ns", "c") is False  # already gone
            with pytest.raises(ApiError) as raised:
                await client.apply(manifest)
            assert raised.value.status == 422
            assert str(raised.value) == "422 Invalid: spec.grpo.epsilonHigh: Invalid value"
        finally:
            await client.close()
            await runner.cleanup()

    asyncio.run(scenario())
