"""The rollout server (`spec.rollout.mode: server`): vLLM in pods of its own, which the trainer
sends its prompts and its LoRA adapter. For models whose trainer and rollout copies do not fit
one GPU, and for more rollout throughput than the trainer's GPUs give (`rollout.replicas`
servers, each tensor-parallel over its pod's GPUs).

    kuberft rollout-server --config job.json --port 8300 --tensor-parallel-size 2

The HTTP API (JSON unless said otherwise):
- `GET /healthz`: 200 `{"adapter": <digest or null>}` once the engine is loaded.
- `PUT /v1/adapter/<digest>`: the adapter as an uncompressed tar of `adapter_config.json` and
  `adapter_model.safetensors` (peft's files); `<digest>` is `adapter_digest` of those files,
  checked on arrival. The server keeps the newest few adapters.
- `POST /v1/generate`: `{"adapter", "prompts": [[token ids]], "num_generations",
  "max_new_tokens", "eos_token_id", "temperature", "top_p", "seeds": [one per prompt] or null}`
  -> `{"completions": [[token ids]], "logprobs": [[per token]]}`, num_generations contiguous
  completions per prompt; 409 when the adapter named is not loaded (the trainer then sends it).

`RolloutServers` is the trainer's client: each step it sends the current adapter to every
server that lacks it (a few MB, never the base weights), splits the step's prompts among the
servers, and builds one `Rollout`. Each prompt carries its own seed, so the samples do not
depend on how many servers there are or which one served a prompt. In a cluster the servers
are found by resolving the job's headless Service (`<job>-rollout`) to its ready pods; a server
that fails or disappears is replaced by asking the Service again, and its prompts are retried.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import hashlib
import importlib.util
import io
import json
import logging
import shutil
import socket
import tarfile
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Optional, Sequence

from .rollout import Rollout, rollout_from_completions

log = logging.getLogger(__name__)

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
ADAPTERS_KEPT = 3
"""Adapters a server keeps: the newest, and older ones requests still in flight may name."""
MAX_ADAPTER_BYTES = 8 << 30


def adapter_digest(files: dict[str, bytes]) -> str:
    """The adapter's identity: a hash of its files' names and contents (the same weights give
    the same digest on every trainer process)."""
    digest = hashlib.sha256()
    for name in sorted(files):
        digest.update(name.encode() + b"\0" + len(files[name]).to_bytes(8, "big") + files[name])
    return digest.hexdigest()[:32]


def adapter_tar(files: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        for name in sorted(files):
            info = tarfile.TarInfo(name)
            info.size = len(files[name])
            archive.addfile(info, io.BytesIO(files[name]))
    return buffer.getvalue()


def adapter_files_from_tar(body: bytes) -> dict[str, bytes]:
    """The adapter files of a tar sent to the server; ValueError for anything else in it."""
    files: dict[str, bytes] = {}
    try:
        with tarfile.open(fileobj=io.BytesIO(body), mode="r:") as archive:
            for member in archive:
                if member.name not in ADAPTER_FILES or not member.isfile():
                    raise ValueError(f"unexpected entry {member.name!r}: the tar holds only {', '.join(ADAPTER_FILES)}")
                files[member.name] = archive.extractfile(member).read()
    except tarfile.TarError as error:
        raise ValueError(f"not an uncompressed tar: {error}") from None
    missing = [name for name in ADAPTER_FILES if name not in files]
    if missing:
        raise ValueError(f"the tar lacks {', '.join(missing)}")
    return files


# --------------------------------------------------------------------------- the server

GENERATE_FIELDS = {
    "adapter": str, "prompts": list, "num_generations": int, "max_new_tokens": int, "eos_token_id": int,
    "temperature": (int, float), "top_p": (int, float),
}


def generate_request_problem(body) -> Optional[str]:
    """What is wrong with a `/v1/generate` body, or None."""
    if not isinstance(body, dict):
        return "the body must be a JSON object"
    for name, kind in GENERATE_FIELDS.items():
        value = body.get(name)
        if not isinstance(value, kind) or isinstance(value, bool):
            return f"{name}: required, {getattr(kind, '__name__', 'a number')}"
    prompts = body["prompts"]
    if not prompts or not all(isinstance(p, list) and p and all(isinstance(t, int) and not isinstance(t, bool) for t in p) for p in prompts):
        return "prompts: a non-empty list of non-empty lists of token ids"
    seeds = body.get("seeds")
    if seeds is not None and (not isinstance(seeds, list) or len(seeds) != len(prompts)
                              or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds)):
        return "seeds: null or one integer per prompt"
    if body["num_generations"] < 1 or body["max_new_tokens"] < 1:
        return "num_generations and max_new_tokens must be at least 1"
    if body["temperature"] < 0 or not 0 < body["top_p"] <= 1:
        return "temperature must be >= 0 and top_p in (0, 1]"
    return None


class RolloutService:
    """The server's state: one vLLM engine, the adapters received, one generation at a time."""

    def __init__(self, engine, scratch: Path):
        self.engine = engine
        self.scratch = scratch
        self.adapters: dict[str, tuple[int, Path]] = {}  # digest -> (vLLM LoRA id, folder), oldest first
        self._next_id = 1
        # vLLM's LLM is not thread-safe: one generation at a time, off the event loop (so that
        # /healthz answers during a long generation).
        self.executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="kuberft-vllm")

    def add_adapter(self, digest: str, files: dict[str, bytes]) -> None:
        if adapter_digest(files) != digest:
            raise ValueError("the adapter's files do not match its digest")
        if digest in self.adapters:
            return
        folder = self.scratch / digest
        folder.mkdir(parents=True, exist_ok=True)
        for name, content in files.items():
            (folder / name).write_bytes(content)
        self.adapters[digest] = (self._next_id, folder)
        self._next_id += 1
        while len(self.adapters) > ADAPTERS_KEPT:
            _, oldest = self.adapters.pop(next(iter(self.adapters)))
            shutil.rmtree(oldest, ignore_errors=True)
        log.info("adapter %s loaded (id %d)", digest, self._next_id - 1)

    def newest_adapter(self) -> Optional[str]:
        return next(reversed(self.adapters), None)

    def generate(self, body: dict) -> Optional[dict]:
        """The completions, or None when the adapter named is not (or no longer) here."""
        if body["adapter"] not in self.adapters:
            return None
        lora_id, folder = self.adapters[body["adapter"]]
        completions, logprobs = self.engine.complete(
            body["prompts"], (f"policy-{lora_id}", lora_id, str(folder)), num_generations=body["num_generations"],
            max_new_tokens=body["max_new_tokens"], eos_token_id=body["eos_token_id"], temperature=float(body["temperature"]),
            top_p=float(body["top_p"]), seeds=body.get("seeds"))
        return {"completions": completions, "logprobs": logprobs}


def build_app(service: RolloutService):
    import asyncio

    from aiohttp import web

    def error(status: int, message: str):
        return web.json_response({"error": message}, status=status)

    async def healthz(request):
        return web.json_response({"adapter": service.newest_adapter()})

    async def put_adapter(request):
        if request.content_length is not None and request.content_length > MAX_ADAPTER_BYTES:
            return error(413, f"an adapter of at most {MAX_ADAPTER_BYTES} bytes")
        try:
            service.add_adapter(request.match_info["digest"], adapter_files_from_tar(await request.read()))
        except ValueError as problem:
            return error(400, f"adapter: {problem}")
        return web.json_response({"adapter": request.match_info["digest"]})

    async def generate(request):
        try:
            body = await request.json()
        except ValueError:
            return error(400, "the body is not JSON")
        problem = generate_request_problem(body)
        if problem:
            return error(400, problem)
        answer = await asyncio.get_running_loop().run_in_executor(service.executor, service.generate, body)
        if answer is None:
            return error(409, f"adapter {body['adapter']} is not loaded: PUT it to /v1/adapter/{body['adapter']}")
        return web.json_response(answer)

    app = web.Application(client_max_size=MAX_ADAPTER_BYTES)
    app.router.add_get("/healthz", healthz)
    app.router.add_put("/v1/adapter/{digest}", put_adapter)
    app.router.add_post("/v1/generate", generate)
    return app


def serve(args: argparse.Namespace) -> int:
    from aiohttp import web

    from kuberft_core.api import RFTJob
    from kuberft_core.manifests import ManifestError, load_spec
    from kuberft_core.models import resolve_model_path

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        _, spec = load_spec(args.config, RFTJob)
    except ManifestError as problem:
        for line in problem.problems:
            log.error("%s", line)
        return 2
    if importlib.util.find_spec("vllm") is None:
        log.error("vLLM is not installed: the rollout server runs vLLM; use an image built with "
                  "`--build-arg EXTRA_PIP=vllm` (spec.rollout.placement.image), or `pip install vllm` here")
        return 2
    from .rollout import VllmEngine

    engine = VllmEngine(
        resolve_model_path(spec.model.name), lora_rank=spec.lora.r, dtype=spec.model.dtype,
        max_model_len=spec.grpo.max_prompt_length + spec.grpo.max_completion_length,
        gpu_memory_utilization=spec.rollout.gpu_memory_utilization, seed=spec.grpo.seed,
        tensor_parallel_size=args.tensor_parallel_size)
    with tempfile.TemporaryDirectory(prefix="kuberft-rollout-adapters-") as scratch:
        log.info("rollout server for %s on %s:%d (tensor parallel %d)", spec.model.name, args.host, args.port, args.tensor_parallel_size)
        web.run_app(build_app(RolloutService(engine, Path(scratch))), host=args.host, port=args.port, access_log=None, print=None)
    return 0


# --------------------------------------------------------------------------- the trainer's client


class RolloutServerError(RuntimeError):
    pass


class _AdapterMissing(Exception):
    pass


class RolloutServers:
    """The trainer's client of the rollout servers (see the module docstring): fixed `urls`, or
    `service` ("host:port" of a headless Service) resolved to `replicas` servers."""

    def __init__(self, urls: Sequence[str] = (), *, service: Optional[str] = None, replicas: int = 1,
                 timeout_seconds: float = 1800.0, retries: int = 3, wait_seconds: float = 600.0, retry_delay: float = 2.0):
        if bool(urls) == bool(service):
            raise ValueError("give the rollout servers' URLs or their Service, not both")
        self.urls = [u.rstrip("/") for u in urls]
        self.service = service
        self.replicas = len(self.urls) if urls else replicas
        self.timeout_seconds = timeout_seconds
        self.retries = retries
        self.wait_seconds = wait_seconds
        self.retry_delay = retry_delay
        self._endpoints: list[str] = list(self.urls)
        self._loaded: dict[str, str] = {}  # endpoint -> digest of the adapter it has

    # -- finding the servers

    def _resolve(self) -> list[str]:
        if not self.service:
            return list(self.urls)
        host, _, port = self.service.rpartition(":")
        try:
            answers = socket.getaddrinfo(host, int(port), type=socket.SOCK_STREAM)
        except socket.gaierror:
            return []
        addresses = sorted({answer[4][0] for answer in answers})
        return [f"http://[{a}]:{port}" if ":" in a else f"http://{a}:{port}" for a in addresses]

    @staticmethod
    def _healthy(endpoint: str) -> bool:
        try:
            with urllib.request.urlopen(f"{endpoint}/healthz", timeout=5) as answer:
                return answer.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def wait_until_ready(self, timeout_seconds: float, poll_seconds: float = 2.0) -> bool:
        """Wait until all `replicas` servers answer /healthz; False after `timeout_seconds`."""
        deadline = time.monotonic() + timeout_seconds
        next_log = time.monotonic()
        while True:
            healthy = [e for e in self._resolve() if self._healthy(e)]
            if len(healthy) >= self.replicas:
                self._endpoints = healthy
                return True
            if time.monotonic() >= deadline:
                log.warning("%d of %d rollout servers ready after %.0fs", len(healthy), self.replicas, timeout_seconds)
                return False
            if time.monotonic() >= next_log:
                log.info("waiting for the rollout servers (%d of %d ready)", len(healthy), self.replicas)
                next_log = time.monotonic() + 30
            time.sleep(poll_seconds)

    def _refresh(self) -> None:
        """The servers again after one failed: any that are healthy now, waiting for at least one."""
        deadline = time.monotonic() + self.wait_seconds
        while True:
            healthy = [e for e in self._resolve() if self._healthy(e)]
            if healthy:
                self._endpoints = healthy
                return
            if time.monotonic() >= deadline:
                raise RolloutServerError(f"no rollout server answers ({self.service or ', '.join(self.urls)}) after {self.wait_seconds:.0f}s")
            time.sleep(self.retry_delay)

    # -- one step's rollouts

    def generate(self, peft_model, prompts: list[list[int]], *, num_generations: int, max_new_tokens: int,
                 eos_token_id: int, pad_token_id: int, temperature: float, top_p: float,
                 seeds: Optional[list[int]] = None, adapter_state: Optional[dict] = None) -> Rollout:
        """Like `rollout.generate`, on the servers with `peft_model`'s current adapter;
        `adapter_state`: its full weights when the model is sharded."""
        files = _adapter_files(peft_model, adapter_state)
        digest = adapter_digest(files)
        if not self._endpoints:
            self._refresh()
        parts = min(len(self._endpoints), len(prompts))
        bounds = [len(prompts) * i // parts for i in range(parts + 1)]
        requests = [
            {"adapter": digest, "prompts": prompts[start:end], "num_generations": num_generations, "max_new_tokens": max_new_tokens,
             "eos_token_id": eos_token_id, "temperature": temperature, "top_p": top_p,
             "seeds": None if seeds is None else seeds[start:end]}
            for start, end in zip(bounds, bounds[1:])
        ]
        with concurrent.futures.ThreadPoolExecutor(len(requests), thread_name_prefix="kuberft-rollout") as pool:
            answers = list(pool.map(lambda part: self._complete(part[0], part[1], files), enumerate(requests)))
        completions = [c for answer in answers for c in answer["completions"]]
        logprobs = [lp for answer in answers for lp in answer["logprobs"]]
        if len(completions) != len(prompts) * num_generations:
            raise RolloutServerError(f"the rollout servers answered {len(completions)} completions for {len(prompts) * num_generations}")
        return rollout_from_completions(prompts, completions, logprobs, num_generations=num_generations, eos_token_id=eos_token_id,
                                        pad_token_id=pad_token_id, device=next(peft_model.parameters()).device)

    def _complete(self, index: int, request: dict, files: dict[str, bytes]) -> dict:
        last_error: Optional[BaseException] = None
        for attempt in range(self.retries + 1):
            endpoints = self._endpoints
            endpoint = endpoints[index % len(endpoints)]
            try:
                if self._loaded.get(endpoint) != request["adapter"]:
                    self._send_adapter(endpoint, request["adapter"], files)
                return self._post_json(f"{endpoint}/v1/generate", request)
            except _AdapterMissing:  # the server restarted, or dropped it: send it again
                self._loaded.pop(endpoint, None)
                last_error = RolloutServerError(f"{endpoint} lost the adapter")
            except (urllib.error.URLError, OSError, RolloutServerError) as error:
                last_error = error
                log.warning("rollout server %s failed (%s); attempt %d of %d", endpoint, error, attempt + 1, self.retries + 1)
                self._loaded.pop(endpoint, None)
                time.sleep(min(30.0, self.retry_delay * 2 ** attempt))
                self._refresh()
        raise RolloutServerError(f"rollouts failed {self.retries + 1} times; last: {last_error}")

    def _send_adapter(self, endpoint: str, digest: str, files: dict[str, bytes]) -> None:
        request = urllib.request.Request(f"{endpoint}/v1/adapter/{digest}", data=adapter_tar(files), method="PUT",
                                         headers={"Content-Type": "application/x-tar"})
        self._open(request)
        self._loaded[endpoint] = digest

    def _post_json(self, url: str, body: dict) -> dict:
        request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST", headers={"Content-Type": "application/json"})
        return json.loads(self._open(request))

    def _open(self, request: urllib.request.Request) -> bytes:
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_seconds) as answer:
                return answer.read()
        except urllib.error.HTTPError as error:
            detail = error.read().decode(errors="replace")[:500]
            if error.code == 409:
                raise _AdapterMissing() from None
            if error.code == 400:  # our request is wrong: retrying will not help
                raise ValueError(f"the rollout server refused the request: {detail}") from None
            raise RolloutServerError(f"HTTP {error.code} from {request.full_url}: {detail}") from None


def _adapter_files(peft_model, adapter_state: Optional[dict]) -> dict[str, bytes]:
    with tempfile.TemporaryDirectory(prefix="kuberft-adapter-") as folder:
        peft_model.save_pretrained(folder, state_dict=adapter_state)
        return {name: (Path(folder) / name).read_bytes() for name in ADAPTER_FILES}
