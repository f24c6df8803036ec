"""The OpenAI-compatible HTTP server (aiohttp) around the engine.

Routes: `POST /v1/completions`, `POST /v1/chat/completions` (both with `stream: true` as
server-sent events), `GET /v1/models` (the base model and every adapter; a request's `model`
field picks one), `GET /healthz`, `GET /metrics` (Prometheus, `kuberft_serve_*`).

The engine decodes in a background thread; each request becomes one `Sequence` per prompt
whose text pieces come back to the request's event loop through an asyncio queue.

Starting it in-process (the local runner, tests):

    from kuberft_core.api import ModelSpec
    from kuberft_serve.config import ServeConfig
    from kuberft_serve.server import run_server, start_server

    run_server(ServeConfig(model=ModelSpec(name="tiny:countdown"), adapters={"countdown": "runs/x/adapter"}))  # blocks
    server = start_server(config)   # or: in a background thread; server.url, server.stop()

`create_app(engine, config, metrics)` returns the aiohttp application for an engine built with
`loading.build_engine(config, metrics)`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import threading
import time
import uuid
from typing import Any

from aiohttp import web
from pydantic import ValidationError

from kuberft_core.metrics import component_metrics
from kuberft_core.probes import metrics_routes

from .config import ServeConfig
from .engine import Engine, Sequence
from .protocol import ApiError, ChatCompletionRequest, CompletionRequest, validation_error
from .sampling import SamplingParams

log = logging.getLogger(__name__)

ENGINE = web.AppKey("engine", Engine)
CONFIG = web.AppKey("config", ServeConfig)
METRICS = web.AppKey("metrics", object)
STARTED = web.AppKey("started", float)


def _json_error(err: ApiError) -> web.Response:
    return web.json_response(err.body(), status=err.status)


@web.middleware
async def openai_errors(request: web.Request, handler):
    """Every failure answers in the OpenAI error shape."""
    try:
        return await handler(request)
    except ApiError as err:
        return _json_error(err)
    except web.HTTPException as err:
        if err.status < 400:
            raise
        return _json_error(ApiError(err.status, err.reason, type="invalid_request_error" if err.status < 500 else "server_error"))


class Served:
    """What one HTTP request asks the engine for, and how its answer is reported."""

    def __init__(self, app: web.Application, model: str, prompts: list[list[int]], params: SamplingParams):
        self.app = app
        self.engine: Engine = app[ENGINE]
        self.model = model
        config: ServeConfig = app[CONFIG]
        adapter = None if model == config.base_name else model
        loop = asyncio.get_running_loop()
        self.events: asyncio.Queue = asyncio.Queue()
        self.started = time.monotonic()

        def on_update(seq: Sequence, delta: str) -> None:  # engine thread: snapshot the finish reason now
            loop.call_soon_threadsafe(self.events.put_nowait, (seq, delta, seq.finish_reason))

        self.seqs = [Sequence(ids, params, adapter, on_update) for ids in prompts]
        self.index = {id(seq): i for i, seq in enumerate(self.seqs)}

    def submit(self) -> None:
        for seq in self.seqs:
            self.engine.submit(seq)

    def cancel(self) -> None:
        for seq in self.seqs:
            if not seq.finished:
                self.engine.cancel(seq)

    async def updates(self):
        """(choice index, text delta, finish reason or None) until every sequence finished."""
        remaining = len(self.seqs)
        while remaining:
            seq, delta, reason = await self.events.get()
            if reason is not None:
                remaining -= 1
                self._record(seq)
                if reason == "error":
                    raise ApiError(500, "the engine failed while decoding this request", type="server_error")
            yield self.index[id(seq)], delta, reason

    def usage(self) -> dict[str, int]:
        prompt = sum(len(s.prompt_ids) for s in self.seqs)
        completion = sum(len(s.output_ids) for s in self.seqs)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def _record(self, seq: Sequence) -> None:
        metrics = self.app[METRICS]
        status = "ok" if seq.finish_reason in ("stop", "length") else seq.finish_reason
        metrics.requests.labels(self.model, status).inc()
        metrics.prompt_tokens.labels(self.model).inc(len(seq.prompt_ids))
        metrics.generated_tokens.labels(self.model).inc(len(seq.output_ids))
        if seq.first_token_time is not None:
            metrics.time_to_first_token_seconds.labels(self.model).observe(seq.first_token_time - seq.arrival)
            if len(seq.output_ids) > 1 and seq.finish_time is not None:
                per_token = (seq.finish_time - seq.first_token_time) / (len(seq.output_ids) - 1)
                metrics.time_per_output_token_seconds.labels(self.model).observe(per_token)


# --------------------------------------------------------------------------- helpers
async def _read_json(request: web.Request) -> dict[str, Any]:
    try:
        body = await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ApiError(400, "the request body is not valid JSON") from None
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    return body


def _parse(model_class, body: dict):
    try:
        return model_class.model_validate(body)
    except ValidationError as err:
        raise validation_error(err) from None


def _check_model(app: web.Application, model: str) -> None:
    names = _model_names(app)
    if model not in names:
        raise ApiError(
            404, f"The model `{model}` does not exist; served models: {', '.join(names)}", param="model", code="model_not_found"
        )


def _model_names(app: web.Application) -> list[str]:
    config = app[CONFIG]
    return [config.base_name, *config.adapters]


def _sampling(app: web.Application, req, prompts: list[list[int]], default_max: int | None) -> SamplingParams:
    engine = app[ENGINE]
    limit = engine.max_positions
    longest = max(len(p) for p in prompts)
    if any(not p for p in prompts):
        raise ApiError(400, "prompt: the prompt is empty", param="prompt")
    max_tokens = req.token_limit if isinstance(req, ChatCompletionRequest) else req.max_tokens
    if max_tokens is None:
        max_tokens = default_max if default_max is not None else (limit - longest if limit else 256)
    if limit is not None and longest + max_tokens > limit:
        raise ApiError(
            400,
            f"This model's maximum context length is {limit} tokens; the prompt has {longest} and max_tokens asks "
            f"for {max_tokens} more. Shorten the prompt or lower max_tokens.",
            param="max_tokens",
            code="context_length_exceeded",
        )
    vocab = engine.target_runner.config.get_text_config().vocab_size
    for prompt in prompts:
        if any(not 0 <= t < vocab for t in prompt):
            raise ApiError(400, f"prompt: token ids must lie in [0, {vocab})", param="prompt")
    config = app[CONFIG]
    seed = req.seed if req.seed is not None else (config.seed if config.seed is not None else random.getrandbits(63))
    return SamplingParams(max_tokens=max_tokens, temperature=req.temperature, top_p=req.top_p, seed=seed, stop=req.stop_list)


def _sse(data) -> bytes:
    return f"data: {json.dumps(data) if not isinstance(data, str) else data}\n\n".encode()


# --------------------------------------------------------------------------- routes
async def completions(request: web.Request) -> web.StreamResponse:
    app = request.app
    req = _parse(CompletionRequest, await _read_json(request))
    _check_model(app, req.model)
    tokenizer = app[ENGINE].tokenizer
    prompts = [tokenizer.encode(p) if isinstance(p, str) else list(p) for p in req.prompts()]
    params = _sampling(app, req, prompts, default_max=16)
    served = Served(app, req.model, prompts, params)
    head = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()), "model": req.model}

    if req.stream:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)

        def chunk(index, text, reason):
            return {**head, "choices": [{"index": index, "text": text, "logprobs": None, "finish_reason": reason}]}

        return await _stream(request, served, chunk, [], include_usage, head)

    texts = ["" for _ in prompts]
    reasons: list[str | None] = [None for _ in prompts]
    served.submit()
    try:
        async for index, delta, reason in served.updates():
            texts[index] += delta
            reasons[index] = reason or reasons[index]
    finally:
        served.cancel()
    choices = [{"index": i, "text": t, "logprobs": None, "finish_reason": r} for i, (t, r) in enumerate(zip(texts, reasons))]
    return web.json_response({**head, "choices": choices, "usage": served.usage()})


async def chat_completions(request: web.Request) -> web.StreamResponse:
    app = request.app
    req = _parse(ChatCompletionRequest, await _read_json(request))
    _check_model(app, req.model)
    tokenizer = app[ENGINE].tokenizer
    if not getattr(tokenizer, "chat_template", None):
        raise ApiError(400, f"model `{req.model}` has no chat template; use /v1/completions", param="messages")
    prompt = list(tokenizer.apply_chat_template(req.chat(), add_generation_prompt=True, tokenize=True, return_dict=False))
    params = _sampling(app, req, [prompt], default_max=None)
    served = Served(app, req.model, [prompt], params)
    head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": req.model}

    if req.stream:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        head["object"] = "chat.completion.chunk"

        def chunk(index, text, reason):
            delta = {"content": text} if text or reason is None else {}
            return {**head, "choices": [{"index": index, "delta": delta, "logprobs": None, "finish_reason": reason}]}

        opening = [{**head, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}]}]
        return await _stream(request, served, chunk, opening, include_usage, head)

    text, finish = "", None
    served.submit()
    try:
        async for _, delta, reason in served.updates():
            text += delta
            finish = reason or finish
    finally:
        served.cancel()
    message = {"role": "assistant", "content": text}
    choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": finish}
    return web.json_response({**head, "object": "chat.completion", "choices": [choice], "usage": served.usage()})


async def _stream(request, served: Served, chunk, opening: list, include_usage: bool, head: dict) -> web.StreamResponse:
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    await response.prepare(request)
    served.submit()
    try:
        for event in opening:
            await response.write(_sse(event))
        async for index, delta, reason in served.updates():
            if delta:
                await response.write(_sse(chunk(index, delta, None)))
            if reason is not None:
                await response.write(_sse(chunk(index, "", reason)))
        if include_usage:
            await response.write(_sse({**head, "choices": [], "usage": served.usage()}))
        await response.write(_sse("[DONE]"))
    except ApiError as err:
        await response.write(_sse(err.body()))
    finally:
        served.cancel()  # a client that went away stops its decoding
    await response.write_eof()
    return response


async def models(request: web.Request) -> web.Response:
    config = request.app[CONFIG]
    created = int(request.app[STARTED])
    data = [{"id": config.base_name, "object": "model", "created": created, "owned_by": "kuberft", "root": config.model.name, "parent": None}]
    for name, path in config.adapters.items():
        data.append({"id": name, "object": "model", "created": created, "owned_by": "kuberft", "root": path, "parent": config.base_name})
    return web.json_response({"object": "list", "data": data})


def engine_health(engine: Engine) -> dict[str, Any]:
    if not engine.alive:
        return {"status": "engine not running"}
    return {"status": "ok", "running": engine.running}


def create_app(engine: Engine, config: ServeConfig, metrics=None) -> web.Application:
    """The aiohttp application; the engine's thread starts and stops with it."""
    app = web.Application(middlewares=[openai_errors], client_max_size=16 * 1024 * 1024)
    app[ENGINE] = engine
    app[CONFIG] = config
    if engine.metrics is None:
        engine.metrics = metrics if metrics is not None else component_metrics("serve")
    app[METRICS] = engine.metrics
    app[STARTED] = time.time()
    app.router.add_post("/v1/completions", completions)
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_get("/v1/models", models)
    app.add_routes(metrics_routes(engine.metrics, lambda: engine_health(engine)))

    async def start_engine(_app):
        engine.start()

    async def stop_engine(_app):
        await asyncio.get_running_loop().run_in_executor(None, engine.stop)

    app.on_startup.append(start_engine)
    app.on_cleanup.append(stop_engine)
    return app



def build(config: ServeConfig) -> web.Application:
    """Load the models `config` names and return the application (metrics included)."""
    from .loading import build_engine

    serve_metrics = component_metrics("serve")
    return create_app(build_engine(config, serve_metrics), config, serve_metrics)


def run_server(config: ServeConfig) -> None:
    """Serve until interrupted (the `kuberft serve` command)."""
    app = build(config)
    log.info("serving %s on http://%s:%d (speculator %s)", ", ".join(_model_names(app)), config.host, config.port, config.speculator.type)
    web.run_app(app, host=config.host, port=config.port, print=None)


class BackgroundServer:
    """The server running in a thread of this process, with its own event loop."""

    def __init__(self, app: web.Application, host: str, port: int):
        self.app = app
        self.host = host
        self._ready = threading.Event()
        self._loop = asyncio.new_event_loop()
        self._runner = web.AppRunner(app)
        self._error: BaseException | None = None
        self.port = port
        self._thread = threading.Thread(target=self._serve, name="kuberft-serve-http", daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._error is not None:
            raise self._error

    @property
    def url(self) -> str:
        return f"http://{'127.0.0.1' if self.host in ('0.0.0.0', '') else self.host}:{self.port}"

    def _serve(self) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self._loop.run_until_complete(self._runner.setup())
            site = web.TCPSite(self._runner, self.host, self.port)
            self._loop.run_until_complete(site.start())
            self.port = site._server.sockets[0].getsockname()[1]  # the bound port when 0 was asked for
        except BaseException as err:  # reported to the starting thread
            self._error = err
            self._ready.set()
            return
        self._ready.set()
        self._loop.run_forever()
        self._loop.run_until_complete(self._runner.cleanup())
        self._loop.close()

    def stop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()


def start_server(config: ServeConfig, app: web.Application | None = None) -> BackgroundServer:
    """Load and serve in a background thread; port 0 picks a free port (see `.url`)."""
    return BackgroundServer(app or build(config), config.host, config.port)
