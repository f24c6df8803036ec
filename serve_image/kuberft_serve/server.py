"""The OpenAI-compatible HTTP server (aiohttp) around the engine.

Routes: `POST /v1/completions`, `POST /v1/chat/completions` (both with `stream: true` as
server-sent events), `GET /v1/models` (the base model and every adapter; a request's `model`
field picks one), `GET /v1/models/{model}`, `POST /v1/load_lora_adapter` {"lora_name",
"lora_path"} and `POST /v1/unload_lora_adapter` {"lora_name"} (vLLM's: adapters served from
then on, or no longer; only with `runtime_lora_updating=True`), `GET /health` (vLLM's: 200 with
an empty body while the engine runs), `GET /healthz`, `GET /metrics` (Prometheus, `kuberft_serve_*`).

The engine decodes in a background thread; each request becomes `n` (or `best_of`) `Sequence`s
per prompt whose text pieces come back to the request's event loop through an asyncio queue.
When the client hangs up, aiohttp cancels the request's handler (`handler_cancellation`), which
cancels its sequences: the engine drops them at its next step, streamed or not.

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
import contextlib
import json
import logging
import random
import threading
import time
import uuid
from dataclasses import replace
from typing import Any, Callable

from aiohttp import web
from pydantic import ValidationError
from xgrammar import CompiledGrammar

from kuberft_core.metrics import component_metrics
from kuberft_core.probes import metrics_routes

from .adapter_pool import AdapterNameTaken
from .config import ServeConfig
from .engine import Engine, Sequence
from .lora import AdapterError
from .protocol import ApiError, ChatCompletionRequest, CompletionRequest, FieldError, validation_error
from .responses import chat_logprobs, completion_logprobs, prompt_logprobs
from .sampling import SamplingParams
from .structured import Grammars, GrammarState

log = logging.getLogger(__name__)

ENGINE = web.AppKey("engine", Engine)
CONFIG = web.AppKey("config", ServeConfig)
METRICS = web.AppKey("metrics", object)
GRAMMARS = web.AppKey("grammars", Grammars)
STARTED = web.AppKey("started", float)


def _json_error(err: ApiError) -> web.Response:
    return web.json_response(err.body(), status=err.status)


@web.middleware
async def openai_errors(request: web.Request, handler):
    """Every failure answers in the OpenAI error shape, a bug included (never a plain-text 500)."""
    try:
        return await handler(request)
    except ApiError as err:
        return _json_error(err)
    except web.HTTPException as err:
        if err.status < 400:
            raise
        return _json_error(ApiError(err.status, err.reason, type="invalid_request_error" if err.status < 500 else "server_error"))
    except Exception as err:
        log.exception("%s %s failed", request.method, request.path)
        return _json_error(ApiError(500, f"internal error: {type(err).__name__}", type="server_error"))


class Served:
    """What one HTTP request asks the engine for, and how its answer comes back: `samples`
    sequences per prompt (`best_of`, else `n`) seeded seed, seed + 1, ... (as vLLM seeds the
    samples of a request), of which the `n` best are reported. With a `grammar` (the request's
    response_format), each sequence follows it on its own."""

    def __init__(self, app: web.Application, kind: str, model: str, prompts: list[list[int]], params: SamplingParams,
                 n: int = 1, samples: int = 1, grammar: CompiledGrammar | None = None, stream: bool = True):
        self.app = app
        self.engine: Engine = app[ENGINE]
        self.id = f"{kind}-{uuid.uuid4().hex}"
        self.model = model
        self.prompts = prompts
        self.n = n
        self.samples = samples
        config: ServeConfig = app[CONFIG]
        adapter = None if model == config.base_name else model
        loop = asyncio.get_running_loop()
        self.events: asyncio.Queue = asyncio.Queue()
        if samples > n and params.logprobs is None:
            params = replace(params, logprobs=0)  # ranking by cumulative logprob needs every token's

        def on_update(seq: Sequence, delta: str) -> None:  # engine thread: snapshot the finish reason and token count now
            if seq.finished:
                self._record(seq)
            loop.call_soon_threadsafe(self.events.put_nowait, (seq, delta, seq.finish_reason, len(seq.output_ids)))

        self.seqs = [
            Sequence(ids, replace(params, seed=params.seed + i), adapter, on_update, None if grammar is None else GrammarState(grammar),
                     stream=stream)
            for ids in prompts
            for i in range(samples)
        ]
        self.position = {id(seq): i for i, seq in enumerate(self.seqs)}

    def prompt_index(self, seq: Sequence) -> int:
        return self.position[id(seq)] // self.samples

    @contextlib.asynccontextmanager
    async def decoding(self):
        """Submit the sequences; on leaving (done, failed, or the client hung up: logged as one
        line) cancel those still decoding, which frees their batch slots."""
        adapter = self.seqs[0].adapter
        if adapter is not None and adapter not in self.engine.adapters:  # unloaded since the model was checked
            raise ApiError(404, f"The model `{self.model}` does not exist (unloaded)", param="model", code="model_not_found")
        for seq in self.seqs:
            self.engine.submit(seq)
        try:
            yield
        except (asyncio.CancelledError, ConnectionResetError):
            tokens = sum(len(seq.output_ids) for seq in self.seqs)
            log.info("%s: the client hung up; decoding cancelled after %d tokens", self.id, tokens)
            raise
        finally:
            for seq in self.seqs:
                if not seq.finished:
                    self.engine.cancel(seq)

    async def updates(self):
        """(sequence, text delta, finish reason or None, its token count then) until every
        sequence finished; a sequence's choice index is its position (streams have samples == n)."""
        remaining = len(self.seqs)
        while remaining:
            seq, delta, reason, count = await self.events.get()
            if reason is not None:
                remaining -= 1
                if reason == "error":
                    raise ApiError(500, "the engine failed while decoding this request", type="server_error")
            yield seq, delta, reason, count

    async def results(self) -> list[Sequence]:
        """Wait for every sequence; returns the reported ones in choice order: per prompt, its
        samples, or with best_of > n the n of highest cumulative logprob, best first."""
        async for _ in self.updates():
            pass
        chosen = []
        for start in range(0, len(self.seqs), self.samples):
            samples = self.seqs[start : start + self.samples]
            if self.samples > self.n:
                samples = sorted(samples, key=lambda seq: seq.cumulative_logprob, reverse=True)[: self.n]
            chosen.extend(samples)
        return chosen

    def usage(self) -> dict[str, int]:
        """Each prompt counted once, every generated token (best_of's unreported samples too)."""
        prompt = sum(len(p) for p in self.prompts)
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
def _is_json(content_type: str) -> bool:
    return content_type == "application/json" or (content_type.startswith("application/") and content_type.endswith("+json"))


async def _read_json(request: web.Request) -> dict[str, Any]:
    """The body as a JSON object. A body sent as another type (a form) is refused, as by vLLM;
    one without a Content-Type is read as JSON."""
    if "Content-Type" in request.headers and not _is_json(request.content_type):
        raise ApiError(400, f"the request body must be JSON (Content-Type: application/json), not {request.content_type}")
    try:
        body = json.loads(await request.read())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ApiError(400, "the request body is not valid JSON") from None
    except RecursionError:
        raise ApiError(400, "the request body is nested too deeply") from None
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
    return [app[CONFIG].base_name, *app[ENGINE].adapters.names]


def _sampling(app: web.Application, req, prompts: list[list[int]], default_max: int | None, logprobs: int | None) -> SamplingParams:
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
    stop_token_ids = req.stop_token_ids or []
    if any(not 0 <= t < vocab for t in stop_token_ids):
        raise ApiError(400, f"stop_token_ids: token ids must lie in [0, {vocab})", param="stop_token_ids")
    config = app[CONFIG]
    seed = req.seed if req.seed is not None else (config.seed if config.seed is not None else random.getrandbits(63))
    return SamplingParams(max_tokens=max_tokens, temperature=req.temperature, top_p=req.top_p, seed=seed, stop=req.stop_list,
                          stop_token_ids=stop_token_ids, ignore_eos=req.ignore_eos, logprobs=logprobs,
                          prompt_logprobs=req.prompt_logprobs)


async def _grammar(app: web.Application, req) -> CompiledGrammar | None:
    """The compiled grammar of the request's response_format (None for text), compiled off the
    event loop: up to a few hundred ms for a large vocabulary, then cached (the first request
    also has the vocabulary described to xgrammar: seconds for 128k tokens)."""
    if not req.constrained:
        return None
    try:
        return await asyncio.get_running_loop().run_in_executor(None, app[GRAMMARS].compile, req.response_format)
    except FieldError as err:
        raise ApiError(400, str(err), param=err.param) from None


def _prompt_logprobs(tokenizer, seq: Sequence) -> list | None:
    return None if seq.prompt_logprobs is None else prompt_logprobs(tokenizer, seq.prompt_ids, seq.prompt_logprobs)


def _sse(data) -> bytes:
    return f"data: {json.dumps(data) if not isinstance(data, str) else data}\n\n".encode()


# --------------------------------------------------------------------------- routes
async def completions(request: web.Request) -> web.StreamResponse:
    app = request.app
    req = _parse(CompletionRequest, await _read_json(request))
    _check_model(app, req.model)
    tokenizer = app[ENGINE].tokenizer
    texts = req.prompts()
    prompts = [tokenizer.encode(p) if isinstance(p, str) else list(p) for p in texts]
    params = _sampling(app, req, prompts, default_max=16, logprobs=req.logprobs)
    if req.echo and req.logprobs is not None and params.prompt_logprobs is None:
        params = replace(params, prompt_logprobs=req.logprobs)  # echoed prompt tokens get their logprobs too (vLLM)
    echoes = [p if isinstance(p, str) else tokenizer.decode(p) for p in texts]
    served = Served(app, "cmpl", req.model, prompts, params, req.n, req.samples, await _grammar(app, req), stream=req.stream)
    head = {"id": served.id, "object": "text_completion", "created": int(time.time()), "model": req.model}

    def logprobs(seq: Sequence, start: int, end: int, echo: bool, offset: int = 0) -> dict | None:
        """Of the output tokens [start, end), after the prompt's when echoing."""
        if req.logprobs is None:
            return None
        ids, entries = seq.output_ids[start:end], seq.logprobs[start:end]
        if echo:
            ids, entries = seq.prompt_ids + ids, [None, *seq.prompt_logprobs, *entries]
        return completion_logprobs(tokenizer, ids, entries, offset)

    if req.stream:
        offsets = [0 for _ in served.seqs]  # per choice, the text offset of its next token

        def chunk(index: int, seq: Sequence, delta: str, reason: str | None, start: int, end: int) -> dict:
            echo = req.echo and start == 0  # the first chunk of a choice carries the prompt
            choice_logprobs = logprobs(seq, start, end, echo, offsets[index])
            if choice_logprobs and choice_logprobs["tokens"]:
                offsets[index] = choice_logprobs["text_offset"][-1] + len(choice_logprobs["tokens"][-1])
            text = echoes[served.prompt_index(seq)] + delta if echo else delta
            choice = {"index": index, "text": text, "logprobs": choice_logprobs, "finish_reason": reason,
                      "stop_reason": seq.stop_reason if reason else None}
            return {**head, "choices": [choice]}

        return await _stream(request, served, chunk, [], req.stream_options, head)

    async with served.decoding():
        seqs = await served.results()
    choices = []
    for index, seq in enumerate(seqs):
        text = echoes[served.prompt_index(seq)] + seq.output_text if req.echo else seq.output_text
        choices.append({
            "index": index,
            "text": text,
            "logprobs": logprobs(seq, 0, len(seq.output_ids), req.echo),
            "finish_reason": seq.finish_reason,
            "stop_reason": seq.stop_reason,
            "prompt_logprobs": _prompt_logprobs(tokenizer, seq),
        })
    return web.json_response({**head, "choices": choices, "usage": served.usage()})


async def chat_completions(request: web.Request) -> web.StreamResponse:
    app = request.app
    req = _parse(ChatCompletionRequest, await _read_json(request))
    _check_model(app, req.model)
    tokenizer = app[ENGINE].tokenizer
    if not getattr(tokenizer, "chat_template", None):
        raise ApiError(400, f"model `{req.model}` has no chat template; use /v1/completions", param="messages")
    prompt = list(tokenizer.apply_chat_template(req.chat(), add_generation_prompt=True, tokenize=True, return_dict=False))
    params = _sampling(app, req, [prompt], default_max=None, logprobs=(req.top_logprobs or 0) if req.logprobs else None)
    served = Served(app, "chatcmpl", req.model, [prompt], params, req.n, req.samples, await _grammar(app, req), stream=req.stream)
    head = {"id": served.id, "created": int(time.time()), "model": req.model}

    def logprobs(seq: Sequence, start: int, end: int) -> dict | None:
        return chat_logprobs(tokenizer, seq.output_ids[start:end], seq.logprobs[start:end]) if req.logprobs else None

    if req.stream:
        head["object"] = "chat.completion.chunk"

        def chunk(index: int, seq: Sequence, delta: str, reason: str | None, start: int, end: int) -> dict:
            content = {"content": delta} if delta or reason is None else {}
            choice = {"index": index, "delta": content, "logprobs": logprobs(seq, start, end), "finish_reason": reason,
                      "stop_reason": seq.stop_reason if reason else None}
            return {**head, "choices": [choice]}

        opening = [
            {**head, "choices": [{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}]}
            for i in range(len(served.seqs))
        ]
        return await _stream(request, served, chunk, opening, req.stream_options, head)

    async with served.decoding():
        seqs = await served.results()
    choices = [
        {
            "index": index,
            "message": {"role": "assistant", "content": seq.output_text},
            "logprobs": logprobs(seq, 0, len(seq.output_ids)),
            "finish_reason": seq.finish_reason,
            "stop_reason": seq.stop_reason,
        }
        for index, seq in enumerate(seqs)
    ]
    body = {**head, "object": "chat.completion", "choices": choices, "usage": served.usage(),
            "prompt_logprobs": _prompt_logprobs(tokenizer, served.seqs[0])}
    return web.json_response(body)


async def _stream(request: web.Request, served: Served, chunk: Callable[..., dict], opening: list, stream_options, head: dict) -> web.StreamResponse:
    """Server-sent events: the opening chunks, then one chunk per text piece of a choice, the
    last one carrying its finish reason (as vLLM sends it), then the usage chunk when asked
    (empty `choices`), then `[DONE]`."""
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    await response.prepare(request)
    counts = [0 for _ in served.seqs]  # per choice, the tokens reported so far
    try:
        async with served.decoding():
            for event in opening:
                await response.write(_sse(event))
            try:
                async for seq, delta, reason, count in served.updates():
                    index = served.position[id(seq)]
                    await response.write(_sse(chunk(index, seq, delta, reason, counts[index], count)))
                    counts[index] = count
                if stream_options is not None and stream_options.include_usage:
                    await response.write(_sse({**head, "choices": [], "usage": served.usage()}))
                await response.write(_sse("[DONE]"))
            except ApiError as err:
                await response.write(_sse(err.body()))
        await response.write_eof()
    except ConnectionResetError:  # the client hung up (logged by `decoding` if it was still decoding)
        pass
    return response


def _model_cards(app: web.Application) -> list[dict[str, Any]]:
    config = app[CONFIG]
    created = int(app[STARTED])
    cards = [{"id": config.base_name, "object": "model", "created": created, "owned_by": "kuberft", "root": config.model.name, "parent": None}]
    for name, path in dict(app[ENGINE].adapters.paths).items():
        cards.append({"id": name, "object": "model", "created": created, "owned_by": "kuberft", "root": path, "parent": config.base_name})
    return cards


async def models(request: web.Request) -> web.Response:
    return web.json_response({"object": "list", "data": _model_cards(request.app)})


async def model_card(request: web.Request) -> web.Response:
    name = request.match_info["model"]
    _check_model(request.app, name)
    return web.json_response(next(card for card in _model_cards(request.app) if card["id"] == name))


def _lora_name(body: dict) -> str:
    name = body.get("lora_name")
    if not isinstance(name, str) or not name:
        raise ApiError(400, "lora_name: give the adapter's served name (a non-empty string)", param="lora_name")
    return name


async def load_lora_adapter(request: web.Request) -> web.Response:
    """vLLM's: serve the peft LoRA directory `lora_path` as model `lora_name` from now on."""
    app = request.app
    body = await _read_json(request)
    name = _lora_name(body)
    path = body.get("lora_path")
    if not isinstance(path, str) or not path:
        raise ApiError(400, "lora_path: give the adapter's directory (a non-empty string)", param="lora_path")
    if name == app[CONFIG].base_name:
        raise ApiError(400, f"lora_name: '{name}' is the base model's name", param="lora_name")
    if name in app[ENGINE].adapters:
        raise ApiError(400, f"The lora adapter '{name}' has already been loaded.", param="lora_name")
    try:
        await asyncio.get_running_loop().run_in_executor(None, app[ENGINE].load_adapter, name, path)
    except AdapterNameTaken as err:
        raise ApiError(400, str(err), param="lora_name") from None
    except AdapterError as err:
        raise ApiError(400, f"lora_path: {err}", param="lora_path") from None
    log.info("adapter %s loaded from %s", name, path)
    return web.Response(text=f"Success: LoRA adapter '{name}' added successfully.")


async def unload_lora_adapter(request: web.Request) -> web.Response:
    """vLLM's: stop serving `lora_name` (requests decoding with it finish first)."""
    app = request.app
    name = _lora_name(await _read_json(request))
    if name == app[CONFIG].base_name:
        raise ApiError(400, f"lora_name: '{name}' is the base model, not an adapter", param="lora_name")
    try:
        app[ENGINE].unload_adapter(name)
    except KeyError:
        raise ApiError(404, f"The lora adapter '{name}' cannot be found.", param="lora_name", code="model_not_found") from None
    log.info("adapter %s unloaded", name)
    return web.Response(text=f"Success: LoRA adapter '{name}' removed successfully.")


async def health(request: web.Request) -> web.Response:
    return web.Response(status=200 if request.app[ENGINE].alive else 503)


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
    app[GRAMMARS] = Grammars(engine.tokenizer, engine.vocab_size, engine.eos_ids)
    app[STARTED] = time.time()
    app.router.add_post("/v1/completions", completions)
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_get("/v1/models", models)
    app.router.add_get("/v1/models/{model:.+}", model_card)  # Hub names hold a slash
    if config.runtime_lora_updating:
        app.router.add_post("/v1/load_lora_adapter", load_lora_adapter)
        app.router.add_post("/v1/unload_lora_adapter", unload_lora_adapter)
    app.router.add_get("/health", health)
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


def compute_threads(config: ServeConfig) -> int:
    """On the CPU, the threads torch computes with: one fewer than the cores this process may
    use (at least one), the core left over running the HTTP server, tokenization and whatever
    else shares the machine, as vLLM's CPU backend reserves one for its front end. With every
    core in torch's pool, a parallel op waits for its slowest thread, and a thread preempted by
    anything else on the machine stalls each of the hundreds of ops of a step (on 2 busy cores,
    10-30x slower steps were measured). OMP_NUM_THREADS, when set, decides instead; so does any
    accelerator. Returns torch's thread count."""
    import os

    import torch

    from .loading import pick_device

    if pick_device(config.device).type == "cpu" and not os.environ.get("OMP_NUM_THREADS"):
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        torch.set_num_threads(max(1, cores - 1))
    return torch.get_num_threads()


def run_server(config: ServeConfig) -> None:
    """Serve until interrupted (the `kuberft serve` command)."""
    threads = compute_threads(config)
    app = build(config)
    log.info("serving %s on http://%s:%d (speculator %s, %d compute threads)", ", ".join(_model_names(app)), config.host,
             config.port, config.speculator.type, threads)
    web.run_app(app, host=config.host, port=config.port, print=None, handler_cancellation=True)


class BackgroundServer:
    """The server running in a thread of this process, with its own event loop."""

    def __init__(self, app: web.Application, host: str, port: int):
        self.app = app
        self.host = host
        self._ready = threading.Event()
        self._loop = asyncio.new_event_loop()
        self._runner = web.AppRunner(app, handler_cancellation=True)
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
