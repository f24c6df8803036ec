"""A reward pool double speaking the real HTTP contract (`POST /v1/evaluate`), run in a
background thread: scores with the toy task and can be told to fail first."""

from __future__ import annotations

import asyncio
import threading

from aiohttp import web

from kuberft_core.reward_protocol import EvaluateRequest

from .toy import ToyRewardBackend


class RewardServer:
    def __init__(self):
        self.backend = ToyRewardBackend()
        self.failures: list[tuple[int, dict]] = []  # (status, headers) answered before succeeding
        self.delay = 0.0
        self.requests = 0
        self.batch_sizes: list[int] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self._loop = asyncio.new_event_loop()
        self._started = threading.Event()
        self.url = ""

    async def _evaluate(self, request: web.Request) -> web.Response:
        self.requests += 1
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            if self.delay:
                await asyncio.sleep(self.delay)
            if self.failures:
                status, headers = self.failures.pop(0)
                return web.json_response({"error": "injected failure"}, status=status, headers=headers)
            body = EvaluateRequest.model_validate(await request.json())
            self.batch_sizes.append(len(body.items))
            response = await self.backend.evaluate(body)
            return web.json_response(response.model_dump(mode="json"))
        finally:
            self.in_flight -= 1

    def _serve(self):
        asyncio.set_event_loop(self._loop)
        app = web.Application()
        app.router.add_post("/v1/evaluate", self._evaluate)
        app.router.add_get("/healthz", lambda _: web.Response(text="ok\n"))
        self._runner = web.AppRunner(app)
        self._loop.run_until_complete(self._runner.setup())
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        self._loop.run_until_complete(site.start())
        port = site._server.sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        self._started.set()
        self._loop.run_forever()

    def __enter__(self) -> "RewardServer":
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()
        self._started.wait(10)
        return self

    def __exit__(self, *exc):
        asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
