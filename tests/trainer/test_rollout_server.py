"""The rollout server's HTTP API and the trainer's client (`rollout_server.py`), with an engine
that stands in for vLLM (the real engine runs in tests/trainer/vllm_rollouts.py): prompts split
among the servers in order, the adapter sent once per server and version, a server that lost it
or died, requests refused with a reason."""

from __future__ import annotations

import asyncio
import io
import json
import tarfile
import threading
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from kuberft_trainer.rollout_server import (
    RolloutServerError,
    RolloutServers,
    RolloutService,
    adapter_digest,
    adapter_tar,
    build_app,
)

EOS, PAD = 2, 0


class EchoEngine:
    """Completes a prompt with its tokens reversed (seed + generation added), then the stop
    token; records each call's prompts and the adapter folder's weights."""

    def __init__(self):
        self.calls: list[dict] = []

    def complete(self, prompts, adapter, *, num_generations, max_new_tokens, eos_token_id, temperature, top_p, seeds=None):
        weights = (Path(adapter[2]) / "adapter_model.safetensors").read_bytes()
        self.calls.append({"prompts": prompts, "weights": weights, "seeds": seeds})
        completions, logprobs = [], []
        for index, prompt in enumerate(prompts):
            for g in range(num_generations):
                shift = (seeds[index] if seeds else 0) + g
                tokens = ([t + shift for t in reversed(prompt)] + [eos_token_id])[:max_new_tokens]
                completions.append(tokens)
                logprobs.append([-0.5] * len(tokens))
        return completions, logprobs


class FakePolicy(torch.nn.Module):
    """What the client needs of a peft model: save_pretrained and a parameter's device."""

    def __init__(self, weights: bytes = b"weights-1"):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.weights = weights

    def save_pretrained(self, folder, state_dict=None):
        Path(folder, "adapter_config.json").write_text(json.dumps({"r": 8}))
        Path(folder, "adapter_model.safetensors").write_bytes(self.weights)


class Server:
    """A rollout server on a free port of 127.0.0.1, in a thread."""

    def __init__(self, tmp_path: Path):
        self.engine = EchoEngine()
        self.service = RolloutService(self.engine, tmp_path)
        self.puts = 0
        self._loop = asyncio.new_event_loop()
        self._runner = None
        self.url = ""

    def start(self) -> "Server":
        from aiohttp import web

        app = build_app(self.service)

        @web.middleware
        async def count_puts(request, handler):
            self.puts += request.method == "PUT"
            return await handler(request)

        app.middlewares.append(count_puts)
        self._runner = web.AppRunner(app)
        self._loop.run_until_complete(self._runner.setup())
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        self._loop.run_until_complete(site.start())
        self.url = f"http://127.0.0.1:{self._runner.addresses[0][1]}"
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.run_until_complete(self._runner.cleanup())


@contextmanager
def servers(tmp_path: Path, count: int):
    running = [Server(tmp_path / f"s{i}").start() for i in range(count)]
    try:
        yield running
    finally:
        for server in running:
            if server._loop.is_running():
                server.stop()


OPTIONS = dict(num_generations=2, max_new_tokens=8, eos_token_id=EOS, pad_token_id=PAD, temperature=1.0, top_p=1.0)
PROMPTS = [[5, 6], [7], [8, 9, 10], [11], [12, 13]]


def expected_rows(prompts, seeds):
    return [[t + s + g for t in reversed(p)] + [EOS] for p, s in zip(prompts, seeds) for g in range(2)]


def test_prompts_are_split_among_the_servers_in_order_and_each_gets_the_adapter_once(tmp_path):
    with servers(tmp_path, 2) as (first, second):
        client = RolloutServers([first.url, second.url])
        assert client.wait_until_ready(10)
        seeds = [100, 200, 300, 400, 500]
        rollout = client.generate(FakePolicy(), PROMPTS, seeds=seeds, **OPTIONS)
        rows = [ids[:int(length)] for ids, length in zip(rollout.completion_ids.tolist(), rollout.lengths.tolist())]
        assert rows == expected_rows(PROMPTS, seeds)
        assert rollout.truncated.tolist() == [False] * 10
        assert torch.equal(rollout.sampling_logprobs[rollout.completion_mask.bool()], torch.full((int(rollout.lengths.sum()),), -0.5))
        # Contiguous parts, each with its prompts' own seeds.
        assert [c["prompts"] for c in first.engine.calls] == [PROMPTS[:2]]
        assert [c["seeds"] for c in second.engine.calls] == [seeds[2:]]

        client.generate(FakePolicy(), PROMPTS, seeds=seeds, **OPTIONS)  # same adapter: not sent again
        assert (first.puts, second.puts) == (1, 1)
        client.generate(FakePolicy(b"weights-2"), PROMPTS, seeds=seeds, **OPTIONS)  # the adapter changed
        assert (first.puts, second.puts) == (2, 2)
        assert first.engine.calls[-1]["weights"] == b"weights-2"

        # The same samples whatever the number of servers.
        alone = RolloutServers([first.url]).generate(FakePolicy(), PROMPTS, seeds=seeds, **OPTIONS)
        assert torch.equal(alone.completion_ids, rollout.completion_ids)


def test_a_server_that_lost_the_adapter_gets_it_again(tmp_path):
    with servers(tmp_path, 1) as (server,):
        client = RolloutServers([server.url])
        client.generate(FakePolicy(), PROMPTS, **OPTIONS)
        server.service.adapters.clear()  # as after a restart
        rollout = client.generate(FakePolicy(), PROMPTS, **OPTIONS)
        assert rollout.completion_ids.shape[0] == 10 and server.puts == 2


def test_a_dead_server_is_replaced_by_the_ones_still_answering(tmp_path):
    with servers(tmp_path, 2) as (first, second):
        client = RolloutServers([first.url, second.url], wait_seconds=2, retry_delay=0.1)
        client.generate(FakePolicy(), PROMPTS, **OPTIONS)
        second.stop()
        rollout = client.generate(FakePolicy(), PROMPTS, seeds=[1, 2, 3, 4, 5], **OPTIONS)
        rows = [ids[:int(length)] for ids, length in zip(rollout.completion_ids.tolist(), rollout.lengths.tolist())]
        assert rows == expected_rows(PROMPTS, [1, 2, 3, 4, 5])
        first.stop()
        with pytest.raises(RolloutServerError, match="no rollout server answers"):
            client.generate(FakePolicy(), PROMPTS, **OPTIONS)


def test_a_headless_service_name_resolves_to_its_servers(tmp_path):
    with servers(tmp_path, 1) as (server,):
        port = server.url.rsplit(":", 1)[1]
        client = RolloutServers(service=f"localhost:{port}", replicas=1)
        assert client.wait_until_ready(10)
        assert client.generate(FakePolicy(), PROMPTS[:1], **OPTIONS).completion_ids.shape[0] == 2
        assert not RolloutServers(service=f"localhost:{port}", replicas=2).wait_until_ready(0.5, poll_seconds=0.1)
        assert not RolloutServers(service="no-such-host.invalid:8300").wait_until_ready(0.2, poll_seconds=0.1)


def _request(url: str, body: bytes, method: str = "POST") -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, data=body, method=method)) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


@pytest.mark.parametrize("body, problem", [
    (b"not json", "not JSON"),
    (b"[]", "JSON object"),
    (json.dumps({"prompts": [[1]]}).encode(), "adapter: required"),
    (json.dumps({"adapter": "a", "prompts": [], "num_generations": 1, "max_new_tokens": 4, "eos_token_id": 2,
                 "temperature": 1.0, "top_p": 1.0}).encode(), "prompts: a non-empty list"),
    (json.dumps({"adapter": "a", "prompts": [[1, True]], "num_generations": 1, "max_new_tokens": 4, "eos_token_id": 2,
                 "temperature": 1.0, "top_p": 1.0}).encode(), "prompts: a non-empty list"),
    (json.dumps({"adapter": "a", "prompts": [[1]], "num_generations": "2", "max_new_tokens": 4, "eos_token_id": 2,
                 "temperature": 1.0, "top_p": 1.0}).encode(), "num_generations: required, int"),
    (json.dumps({"adapter": "a", "prompts": [[1]], "num_generations": 1, "max_new_tokens": 4, "eos_token_id": 2,
                 "temperature": 1.0, "top_p": 1.0, "seeds": [1, 2]}).encode(), "seeds: null or one integer per prompt"),
    (json.dumps({"adapter": "a", "prompts": [[1]], "num_generations": 1, "max_new_tokens": 4, "eos_token_id": 2,
                 "temperature": 1.0, "top_p": 1.5}).encode(), "top_p in (0, 1]"),
])
def test_bad_generate_requests_are_refused_with_the_reason(tmp_path, body, problem):
    with servers(tmp_path, 1) as (server,):
        status, answer = _request(f"{server.url}/v1/generate", body)
    assert status == 400 and problem in answer["error"]


def _tar(entries: dict[str, bytes], kind=tarfile.REGTYPE) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        for name, content in entries.items():
            info = tarfile.TarInfo(name)
            info.type = kind
            info.size = len(content) if kind == tarfile.REGTYPE else 0
            archive.addfile(info, io.BytesIO(content) if kind == tarfile.REGTYPE else None)
    return buffer.getvalue()


def test_only_an_adapters_own_files_matching_their_digest_are_taken(tmp_path):
    files = {"adapter_config.json": b"{}", "adapter_model.safetensors": b"w"}
    digest = adapter_digest(files)
    with servers(tmp_path, 1) as (server,):
        put = lambda body, name=digest: _request(f"{server.url}/v1/adapter/{name}", body, "PUT")  # noqa: E731
        assert put(_tar({**files, "../escape": b"x"}))[1]["error"].startswith("adapter: unexpected entry '../escape'")
        assert "unexpected entry" in put(_tar({"adapter_config.json": b""}, kind=tarfile.SYMTYPE))[1]["error"]
        assert "lacks adapter_model.safetensors" in put(_tar({"adapter_config.json": b"{}"}))[1]["error"]
        assert "do not match its digest" in put(adapter_tar(files), name="0" * 32)[1]["error"]
        assert "not an uncompressed tar" in put(b"garbage" * 100)[1]["error"]
        assert put(adapter_tar(files)) == (200, {"adapter": digest})
        assert not (tmp_path / "escape").exists() and not (tmp_path / "s0" / "escape").exists()
        # Unknown adapters are refused with 409 (the client then sends it).
        request = {"adapter": "f" * 32, "prompts": [[1]], "num_generations": 1, "max_new_tokens": 4, "eos_token_id": 2,
                   "temperature": 1.0, "top_p": 1.0}
        status, answer = _request(f"{server.url}/v1/generate", json.dumps(request).encode())
        assert status == 409 and "is not loaded" in answer["error"]


def test_the_server_keeps_only_its_newest_adapters(tmp_path):
    service = RolloutService(EchoEngine(), tmp_path)
    digests = []
    for version in range(5):
        files = {"adapter_config.json": b"{}", "adapter_model.safetensors": f"w{version}".encode()}
        digests.append(adapter_digest(files))
        service.add_adapter(digests[-1], files)
    assert list(service.adapters) == digests[-3:] and service.newest_adapter() == digests[-1]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(digests[-3:])
    assert adapter_digest({"a": b"1", "b": b"2"}) == adapter_digest({"b": b"2", "a": b"1"}) != adapter_digest({"a": b"12", "b": b""})
