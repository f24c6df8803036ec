"""The decoding engine: continuous batching of requests, one speculative step at a time.

Requests are decoded together in one `Group` (one KV batch of the target, one speculator state)
whatever adapter they name: each row carries its adapter and one forward pass serves them all
(grouped LoRA in the lean forward, `lora.py`; peft's mixed-batch inference otherwise). New
requests join the running group after a batched prefill (equal prompts, such as the n samples of
one request, share one row of it; a prompt whose leading tokens were prefilled before takes their
KV from the `PrefixCache` and computes only the rest); finished or cancelled ones leave at the next
step.
`speculative_step` is the whole decoding algorithm:

    1. propose  k tokens per row (the speculator; k = 0 is plain decoding); a row with a
                `response_format` keeps the longest prefix its grammar accepts,
    2. verify   all of them in one forward pass of the target ([last token, proposals]); a
                row's grammar masks the target's logits at each position,
    3. accept   per row with `sampling.accept_proposals` (greedy match, or the rejection rule),
    4. roll back the target's and the speculator's KV caches to the accepted prefix,
    5. emit     the accepted tokens plus the target's own next token.

Plain decoding is the same step with no proposals, through the same KV-cache path, which is
what the losslessness tests compare against. `SpeculationController` picks k per served model
(the base, each adapter) from its observed acceptance rate and measured step costs (expected
tokens per second, Leviathan et al. eq. 1 with a measured verify cost), when adaptive. In a
group of several adapters, each row proposes up to its own adapter's k; the verify pass is as
wide as the largest (shorter rows are padded), so an adapter whose proposals are rarely accepted
keeps its own k low without holding back the others.

Adapters are known and resident through an `AdapterPool` (LRU under `max_loras` and a memory
budget); a request for an evicted adapter reloads it at admission.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

import torch

from .adapter_pool import AdapterPool
from .kv_batch import ModelRunner, SequenceBatch
from .lora import AdapterError
from .prefix_cache import PrefixCache
from .sampling import SamplingParams, TokenLogprob, accept_greedy, accept_proposals, apply_token_bitmask, select_token, token_logprobs
from .speculators import Proposal, Speculator

if TYPE_CHECKING:
    from .structured import GrammarState

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- one request
class TextTracker:
    """Incremental detokenization with stop strings: which text is safe to stream now. Without
    stop strings the text is decoded when read, not at every step (a request that does not
    stream reads it once, at the end)."""

    def __init__(self, tokenizer, stop: list[str], hidden: set[int] = frozenset()):
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.hidden = hidden
        """Token ids left out of the text (EOS)."""
        self._text = ""
        self._pending: list[int] | None = None  # token ids whose text is not decoded yet
        self.sent = 0
        self.stopped = False
        self.stop_string: str | None = None
        """The stop string that ended the text."""

    def _decode(self, token_ids: list[int]) -> str:
        if self.hidden:
            token_ids = [t for t in token_ids if t not in self.hidden]
        return self.tokenizer.decode(token_ids, skip_special_tokens=True)

    @property
    def text(self) -> str:
        if self._pending is not None:
            self._text, self._pending = self._decode(self._pending), None
        return self._text

    @text.setter
    def text(self, value: str) -> None:
        self._text, self._pending = value, None

    def update(self, token_ids: list[int]) -> None:
        if self.stopped:
            return
        if not self.stop:  # nothing to look for: decode when the text is read
            self._pending = list(token_ids)
            return
        self.text = self._decode(token_ids)
        for stop in self.stop:
            hit = self.text.find(stop, max(0, self.sent - len(stop)))
            if hit >= 0:
                self.text = self.text[:hit]
                self.stopped = True
                self.stop_string = stop

    def tokens_to_stop(self, token_ids: list[int], known: int) -> int:
        """How many of `token_ids` it takes for a stop string to appear (the first `known`
        showed none; the whole list does)."""
        for end in range(known + 1, len(token_ids)):
            if any(stop in self._decode(token_ids[:end]) for stop in self.stop):
                return end
        return len(token_ids)

    def take(self, final: bool) -> str:
        """Text not streamed yet; holds back an incomplete character or a possible stop prefix."""
        end = len(self.text)
        if not final and not self.stopped:
            if self.text.endswith("\ufffd"):
                end -= 1
            for stop in self.stop:
                for n in range(min(len(stop) - 1, end), 0, -1):
                    if self.text[:end].endswith(stop[:n]):
                        end -= n
                        break
            end = max(end, self.sent)
        delta = self.text[self.sent : end]
        self.sent = max(self.sent, end)
        return delta


@dataclass(eq=False)
class Sequence:
    """One request's prompt, sampling parameters and output as decoding goes."""

    prompt_ids: list[int]
    params: SamplingParams
    adapter: str | None = None
    on_update: Callable[["Sequence", str], None] | None = None
    """Called from the engine thread with each new piece of text (and once more when finished)."""
    grammar: GrammarState | None = None
    """The grammar the output follows (`response_format`), None for free text."""
    output_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    """Per output token, when `params.logprobs` is set."""
    prompt_logprobs: list[TokenLogprob] | None = None
    """Per prompt token after the first, when `params.prompt_logprobs` is set."""
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    """The stop token id or stop string that ended the output (None for EOS and the others)."""
    arrival: float = field(default_factory=time.monotonic)
    first_token_time: float | None = None
    finish_time: float | None = None
    cancelled: bool = False
    text: TextTracker | None = None
    done: threading.Event = field(default_factory=threading.Event)
    stream: bool = True
    """Whether `on_update` wants each piece of text as it comes; False: only the final call
    (with the whole text), which spares the server a wake-up per token of each request."""

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def output_text(self) -> str:
        return self.text.text if self.text else ""

    @property
    def cumulative_logprob(self) -> float:
        return sum(entry.logprob for entry in self.logprobs)

    def emit(self, tokens: list[int], eos_ids: set[int], logprobs: list[TokenLogprob] | None = None) -> None:
        """Append generated tokens (with their logprobs, when recorded), stopping at EOS, a stop
        token, max_tokens or a stop string: where decoding one token at a time would have, so
        speculation never changes the output."""
        params = self.params
        known = len(self.output_ids)
        for token in tokens:
            self.output_ids.append(token)
            if token in params.stop_token_ids:
                self.finish_reason, self.stop_reason = "stop", token
                break
            if token in eos_ids and not params.ignore_eos:
                self.finish_reason = "stop"
                break
            if len(self.output_ids) >= params.max_tokens:
                self.finish_reason = "length"
                break
        if logprobs is not None:
            self.logprobs.extend(logprobs[: len(self.output_ids) - known])
        if self.first_token_time is None:
            self.first_token_time = time.monotonic()
        self.text.update(self.output_ids)
        if self.text.stopped:
            self.finish_reason, self.stop_reason = "stop", self.text.stop_string
            end = self.text.tokens_to_stop(self.output_ids, known)
            del self.output_ids[end:], self.logprobs[end:]
        if self.grammar is not None and not self.finished:
            self.grammar.advance(self.output_ids[known:])
        self._notify()

    def finish(self, reason: str) -> None:
        if self.finish_reason is None:
            self.finish_reason = reason
        self._notify()

    def _notify(self) -> None:
        if self.finished and self.finish_time is None:
            self.finish_time = time.monotonic()
        if self.on_update is not None and (self.stream or self.finished):
            delta = self.text.take(final=self.finished) if self.text else ""
            if delta or self.finished:
                self.on_update(self, delta)
        if self.finished:
            self.done.set()


# --------------------------------------------------------------------------- adaptive k
class SpeculationController:
    """Chooses the number of proposed tokens k for the next step, to maximise tokens per second.

    For each k it has tried, it keeps the measured tokens emitted per row and step and the step
    time (exponential averages). For k it has not tried, it predicts them: tokens per step from
    a geometric acceptance model, E(alpha, k) = (1 - alpha^(k+1)) / (1 - alpha) (Leviathan et
    al. 2023, eq. 1) with alpha = accepted / (accepted + rejections), and the step time from the
    measured cost per proposed token and a line fitted to the measured verify times per width.
    Every `EXPLORE_EVERY` steps it tries a neighbour of the best k, so the measurements follow
    the load. Measured values capture what the model cannot: bursty acceptance, and drafts
    that stop early when unsure. Tokens per step are learned for every cap up to the k of each
    step (a cap k' < k would have emitted 1 + min(accepted, k'): the same proposals, cut), so the
    smaller caps are never judged on the few steps that tried them."""

    EXPLORE_EVERY = 16

    def __init__(self, max_k: int, adaptive: bool, decay: float = 0.9):
        self.max_k = max_k
        self.adaptive = adaptive
        self.decay = decay
        self.accepted = 1.0  # prior: alpha = 0.5 with the weight of two tokens
        self.rejected = 1.0
        self.propose_cost = 0.0  # seconds per proposed token (EMA)
        self.verify_cost: dict[int, float] = {}  # fed tokens per row -> seconds (EMA)
        self.step_seconds: dict[int, float] = {}  # k -> seconds of a step at k (EMA)
        self.tokens_at: dict[int, float] = {}  # k -> tokens per row-step a cap of k gives (EMA, also from larger caps)
        self.k = max_k
        self.steps = 0

    def next_k(self) -> int:
        """k for the next step: the best one, or now and then a neighbour of it."""
        self.steps += 1
        if not self.adaptive or self.max_k == 1 or self.steps % self.EXPLORE_EVERY:
            return self.k
        neighbour = self.k - 1 if (self.steps // self.EXPLORE_EVERY) % 2 else self.k + 1
        return min(max(neighbour, 1), self.max_k)

    @property
    def alpha(self) -> float:
        return self.accepted / (self.accepted + self.rejected)

    def observe(self, k: int, proposed: list[int], accepted: list[int], propose_s: float, verify_s: float) -> None:
        """One step: k asked for, each row's proposals and accepted counts, and the times."""
        if sum(proposed) == 0:
            return
        self.accepted = self.decay * self.accepted + sum(accepted)
        self.rejected = self.decay * self.rejected + sum(1 for p, a in zip(proposed, accepted) if a < p)
        width = max(proposed)
        per_token = propose_s / width
        self.propose_cost = 0.8 * self.propose_cost + 0.2 * per_token if self.propose_cost else per_token
        previous = self.verify_cost.get(width + 1)
        self.verify_cost[width + 1] = verify_s if previous is None else 0.8 * previous + 0.2 * verify_s
        # what a smaller cap k' would have emitted is known too: the proposals up to k' are the
        # same, so a row gets 1 + min(accepted, k'). Every step informs every k' <= k.
        for cap in range(1, k + 1):
            tokens = 1 + sum(min(a, cap) for a in accepted) / len(accepted)
            previous = self.tokens_at.get(cap)
            self.tokens_at[cap] = tokens if previous is None else 0.9 * previous + 0.1 * tokens
        seconds = propose_s + verify_s
        previous = self.step_seconds.get(k)
        self.step_seconds[k] = seconds if previous is None else 0.8 * previous + 0.2 * seconds
        if self.adaptive:
            self.k = self.best_k()

    def expected_tokens(self, k: int) -> float:
        alpha = min(self.alpha, 0.999)
        return (1 - alpha ** (k + 1)) / (1 - alpha)

    def _verify_time(self, n: int) -> float:
        """Least-squares line through the measured verify times per width, at width n."""
        points = self.verify_cost
        if len(points) == 1:
            return next(iter(points.values()))
        x_mean = sum(points) / len(points)
        y_mean = sum(points.values()) / len(points)
        slope = sum((x - x_mean) * (y - y_mean) for x, y in points.items()) / sum((x - x_mean) ** 2 for x in points)
        return max(y_mean + max(slope, 0.0) * (n - x_mean), 1e-9)

    def rate(self, k: int) -> float:
        """Tokens per second per row expected at k."""
        tokens = self.tokens_at.get(k) or self.expected_tokens(k)
        seconds = self.step_seconds.get(k) or k * self.propose_cost + self._verify_time(k + 1)
        return tokens / max(seconds, 1e-9)

    def best_k(self) -> int:
        if not self.verify_cost:
            return self.max_k
        return max(range(1, self.max_k + 1), key=self.rate)


# --------------------------------------------------------------------------- the engine
@dataclass(eq=False)
class Group:
    """Requests decoded together: their rows of the target's KV batch and the speculator's
    state, in the order of `seqs`; each row names its own adapter."""

    target: SequenceBatch
    spec_state: object
    seqs: list[Sequence] = field(default_factory=list)


MIXED = "<mixed>"
"""The key of the one group: its rows may name any adapter."""


class Engine:
    def __init__(
        self,
        target: ModelRunner,
        tokenizer,
        speculator: Speculator | None = None,
        *,
        num_speculative_tokens: int = 4,
        adaptive: bool = True,
        max_batch_size: int = 8,
        metrics=None,
        adapters: AdapterPool | None = None,
        prefix_cache: PrefixCache | None = None,
    ):
        self.target_runner = target
        self.adapters = adapters if adapters is not None else AdapterPool(target)
        """The adapters requests may name, and those resident now."""
        self.prefix_cache = prefix_cache
        """KV of prompts' leading blocks, reused by later prompts that start the same way (None: off)."""
        self.tokenizer = tokenizer
        self.speculator = speculator or Speculator()
        self.speculating = self.speculator.name != "none"
        self.max_k = self.speculator.max_tokens(num_speculative_tokens) if self.speculating else 0
        self.adaptive = adaptive
        self.max_batch_size = max_batch_size
        self.metrics = metrics
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
        self.eos_ids = self._eos_ids()
        self.max_positions = getattr(target.config.get_text_config(), "max_position_embeddings", None)
        self.vocab_size = target.config.get_text_config().vocab_size
        self.groups: dict[str | None, Group] = {}
        self.controllers: dict[str | None, SpeculationController] = {}
        self.waiting: deque[Sequence] = deque()
        self.inbox: queue.Queue[Sequence] = queue.Queue()
        self._recent = deque(maxlen=64)  # (proposed, accepted, row-steps) per step, for the gauges
        self.stats = {"proposed": 0, "accepted": 0, "spec_steps": 0, "steps": 0, "emitted": 0, "forwards": 0,
                      "prompt_tokens": 0, "cached_prompt_tokens": 0}
        """Totals since start (the benchmark reads them; Prometheus gets the same numbers);
        `forwards` counts the target's verify passes (one per group and step);
        `cached_prompt_tokens`: prompt tokens whose KV came from the prefix cache."""
        self.stats_by_model: dict[str | None, dict[str, int]] = {}
        """Speculation totals per served model (adapter name, None for the base): proposed,
        accepted, spec_steps (row-steps that proposed), emitted."""
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self.lock = threading.Lock()

    def _eos_ids(self) -> set[int]:
        ids = set()
        config = self.target_runner.config
        for source in (getattr(config, "eos_token_id", None), self.tokenizer.eos_token_id):
            if isinstance(source, int):
                ids.add(source)
            elif isinstance(source, (list, tuple)):
                ids.update(source)
        return ids

    # ------------------------------------------------------------------ requests
    def submit(self, seq: Sequence) -> Sequence:
        """Queue a request (thread-safe); `seq.on_update` and `seq.done` report progress."""
        if not seq.prompt_ids:
            raise ValueError("prompt is empty: give at least one token")
        if seq.grammar is not None and seq.params.ignore_eos:
            raise ValueError("ignore_eos cannot be used with a grammar: the output ends where the grammar does")
        if seq.adapter is not None and seq.adapter not in self.adapters:
            raise ValueError(f"adapter {seq.adapter!r} is not loaded")
        if seq.text is None:
            seq.text = TextTracker(self.tokenizer, seq.params.stop, self.eos_ids)
        self.inbox.put(seq)
        return seq

    def cancel(self, seq: Sequence) -> None:
        seq.cancelled = True

    def load_adapter(self, name: str, path: str) -> None:
        """Serve the LoRA adapter in `path` as `name` (thread-safe: its weights are read before
        taking the engine's lock). Raises `lora.AdapterError` when it cannot be served."""
        weights = self.target_runner.read_adapter(path)
        with self.lock:
            self.adapters.register(name, path, weights)
            if self.prefix_cache is not None:  # the name may have served other weights before
                self.prefix_cache.forget(name)

    def unload_adapter(self, name: str) -> None:
        """Stop serving `name` (KeyError if unknown); requests decoding with it finish first."""
        with self.lock:
            self.adapters.unregister(name, self._busy_adapters())
            if self.prefix_cache is not None:
                self.prefix_cache.forget(name)

    def _busy_adapters(self) -> set:
        return {seq.adapter for group in self.groups.values() for seq in group.seqs if seq.adapter is not None}

    @property
    def running(self) -> int:
        return sum(len(g.seqs) for g in self.groups.values())

    def generate_batch(self, prompts: list[list[int]], params: list[SamplingParams], adapter: str | None = None) -> list[list[int]]:
        """Decode prompts to completion and return the generated token ids (a final EOS excluded).
        Drives the engine itself unless its background thread is running."""
        seqs = [self.submit(Sequence(list(p), sp, adapter)) for p, sp in zip(prompts, params)]
        if self._thread is None:
            while not all(s.finished for s in seqs):
                self.step()
        for seq in seqs:
            seq.done.wait()
        return [s.output_ids[:-1] if s.finish_reason == "stop" and s.output_ids[-1] in self.eos_ids else s.output_ids for s in seqs]

    def generate(self, prompt: list[int], params: SamplingParams, adapter: str | None = None) -> list[int]:
        return self.generate_batch([prompt], [params], adapter)[0]

    # ------------------------------------------------------------------ the loop
    def start(self) -> None:
        """Run the engine in a background thread (the server does this)."""
        if self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name="kuberft-serve-engine", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _run(self) -> None:
        while not self._stop.is_set():
            if not self.groups and not self.waiting:
                try:
                    self.waiting.append(self.inbox.get(timeout=0.1))
                except queue.Empty:
                    continue
            try:
                self.step()
            except Exception:  # a bug must not leave clients hanging: fail every running request
                log.exception("engine step failed; failing the running requests")
                for group in self.groups.values():
                    for seq in group.seqs:
                        seq.finish("error")
                self.groups.clear()

    def step(self) -> None:
        """Admit waiting requests, then one speculative step for every group."""
        with self.lock:
            while True:
                try:
                    self.waiting.append(self.inbox.get_nowait())
                except queue.Empty:
                    break
            self._admit()
            for key in list(self.groups):
                group = self.groups[key]
                self._drop_finished(group)
                if group.seqs:
                    self.speculative_step(group)
                    self._drop_finished(group)
                if not group.seqs:
                    del self.groups[key]
            self.adapters.release_forgotten(self._busy_adapters())
            if self.metrics is not None:
                self.metrics.running_requests.set(self.running)
                self.metrics.waiting_requests.set(len(self.waiting) + self.inbox.qsize())

    def _admit(self) -> None:
        """Move waiting requests into groups while the batch has room. A request whose adapter
        is not resident loads it (evicting an idle one); when every resident adapter is busy and
        there is no room, it keeps its place in the queue and the requests behind it go first."""
        free = self.max_batch_size - self.running
        admitted: dict[str | None, list[Sequence]] = {}
        busy = self._busy_adapters()
        deferred = []
        while free > 0 and self.waiting:
            seq = self.waiting.popleft()
            if seq.cancelled:
                seq.finish("abort")
                continue
            if seq.adapter is not None:
                if seq.adapter not in self.adapters and seq.adapter not in self.adapters.resident:
                    log.info("adapter %s was unloaded before its request was admitted", seq.adapter)
                    seq.finish("abort")
                    continue
                try:
                    resident = self.adapters.acquire(seq.adapter, busy)
                except (AdapterError, OSError) as err:  # its directory changed since it was loaded
                    log.warning("adapter %s cannot be reloaded: %s", seq.adapter, err)
                    seq.finish("error")
                    continue
                if not resident:
                    deferred.append(seq)
                    continue
                busy.add(seq.adapter)
            admitted.setdefault(MIXED, []).append(seq)
            free -= 1
        self.waiting.extendleft(reversed(deferred))
        for key, seqs in admitted.items():
            group = self.groups.get(key)
            if group is None:
                group = Group(
                    SequenceBatch(self.target_runner, want_hidden=self.speculator.needs_target_hidden),
                    self.speculator.new_state(None),
                )
                self.groups[key] = group
            self._prefill(group, seqs)

    def _controller(self, adapter: str | None) -> SpeculationController:
        """The k controller of a served model: it outlives the groups (a group ends when its last
        request does), so what it learned about acceptance and step costs carries over."""
        if adapter not in self.controllers:
            self.controllers[adapter] = SpeculationController(self.max_k, self.adaptive)
        return self.controllers[adapter]

    def _prefill(self, group: Group, seqs: list[Sequence]) -> None:
        """Prefill newly admitted requests and emit their first token. Requests for prompt
        logprobs are prefilled apart: only they need the logits of every prompt position."""
        scored = [s for s in seqs if s.params.prompt_logprobs is not None]
        plain = [s for s in seqs if s.params.prompt_logprobs is None]
        for batch in (plain, scored):
            if batch:
                self._prefill_batch(group, batch, all_positions=batch is scored)

    def _prefill_batch(self, group: Group, seqs: list[Sequence], all_positions: bool) -> None:
        fresh = SequenceBatch(self.target_runner, want_hidden=self.speculator.needs_target_hidden)
        prompts, adapters = [s.prompt_ids for s in seqs], [s.adapter for s in seqs]
        prefixes = None
        if self.prefix_cache is not None and not all_positions:
            prefixes = [self.prefix_cache.match(adapter, prompt) for adapter, prompt in zip(adapters, prompts)]
        result = fresh.prefill(prompts, self.pad_id, all_positions=all_positions, adapters=adapters, prefixes=prefixes)
        if self.prefix_cache is not None:
            for row, (adapter, prompt) in enumerate(zip(adapters, prompts)):
                self.prefix_cache.store(adapter, prompt, lambda row=row: fresh.prompt_kv(row))
        self._count_prompt_tokens(seqs, prefixes)
        for row, mask in self._grammar_masks(seqs, [[] for _ in seqs]).items():
            apply_token_bitmask(result.logits[row, -1:], mask)
        for row, seq in enumerate(seqs):
            logits = result.logits[row]  # [prompt positions or 1, V]; the prompt ends at the last one
            if seq.params.prompt_logprobs is not None:  # position i predicts prompt token i + 1
                count = len(seq.prompt_ids)
                seq.prompt_logprobs = token_logprobs(logits[-count:-1], seq.prompt_ids[1:], seq.params.prompt_logprobs)
            token = select_token(logits[-1], seq.params, position=0)
            top = seq.params.logprobs
            seq.emit([token], self.eos_ids, None if top is None else token_logprobs(logits[-1:], [token], top))
        group.target.merge(fresh)
        self.speculator.add_rows(group.spec_state, seqs, result)
        group.seqs.extend(seqs)

    def _count_prompt_tokens(self, seqs: list[Sequence], prefixes: list[torch.Tensor | None] | None) -> None:
        total = sum(len(seq.prompt_ids) for seq in seqs)
        cached = sum(prefix.shape[3] for prefix in prefixes or [] if prefix is not None)
        self.stats["prompt_tokens"] += total
        self.stats["cached_prompt_tokens"] += cached
        if self.metrics is not None and self.prefix_cache is not None:
            self.metrics.prefix_cache_queries.inc(total)
            self.metrics.prefix_cache_hits.inc(cached)

    def _drop_finished(self, group: Group) -> None:
        for seq in group.seqs:
            if seq.cancelled and not seq.finished:
                seq.finish("abort")
        keep = [i for i, seq in enumerate(group.seqs) if not seq.finished]
        if len(keep) == len(group.seqs):
            return
        group.seqs = [group.seqs[i] for i in keep]
        group.target.select(keep)
        self.speculator.select(group.spec_state, keep)

    def speculative_step(self, group: Group) -> None:
        seqs = group.seqs
        # each served model's controller picks its k; the speculator proposes up to the largest
        ks = {adapter: self._controller(adapter).next_k() for adapter in dict.fromkeys(s.adapter for s in seqs)} if self.speculating else {}
        k = max(ks.values(), default=0)
        started = time.perf_counter()

        # 1. propose (never past a request's max_tokens: the target's own token always follows)
        proposal = self.speculator.propose(group.spec_state, seqs, k) if k else Proposal([[] for _ in seqs])
        proposed = [
            tokens[: max(0, min(ks.get(seq.adapter, 0), seq.params.max_tokens - len(seq.output_ids) - 1))]
            for tokens, seq in zip(proposal.tokens, seqs)
        ]
        masks = self._grammar_masks(seqs, proposed)
        proposed_at = time.perf_counter()

        # 2. verify: one forward pass of the target over [last token, proposals] for every row
        width = 1 + max(len(p) for p in proposed)
        feed = [[seq.output_ids[-1]] + p + [self.pad_id] * (width - 1 - len(p)) for seq, p in zip(seqs, proposed)]
        verify = group.target.extend(torch.tensor(feed, device=self.target_runner.device), lengths=[1 + len(p) for p in proposed])
        self.stats["forwards"] += 1
        for row, mask in masks.items():
            apply_token_bitmask(verify.logits[row, : len(mask)], mask)

        # 3. accept, row by row (the greedy rows from one argmax of the whole batch)
        accepted, emitted = [], []
        best = verify.logits.argmax(dim=-1).tolist() if any(seq.params.greedy for seq in seqs) else None
        for row, (seq, tokens) in enumerate(zip(seqs, proposed)):
            if seq.params.greedy:
                n, next_token = accept_greedy(best[row], tokens)
                accepted.append(n)
                emitted.append(tokens[:n] + [next_token])
                continue
            draft_probs = proposal.draft_probs[row] if proposal.draft_probs else None
            if draft_probs is not None:
                draft_probs = draft_probs[: len(tokens)]
            n, next_token = accept_proposals(
                verify.logits[row, : len(tokens) + 1], tokens, seq.params, len(seq.output_ids), draft_probs
            )
            accepted.append(n)
            emitted.append(tokens[:n] + [next_token])

        # 4. roll back both caches to what was accepted
        group.target.commit([1 + n for n in accepted])
        for row, (seq, tokens) in enumerate(zip(seqs, emitted)):
            top = seq.params.logprobs  # logprobs: the target's distributions at the emitted positions
            seq.emit(tokens, self.eos_ids, None if top is None else token_logprobs(verify.logits[row, : len(tokens)], tokens, top))
        self.speculator.commit(group.spec_state, seqs, accepted, proposal, verify)

        # 5. learn and report, per served model (the step's times are the shared batch's)
        finished_at = time.perf_counter()
        lengths = [len(p) for p in proposed]
        for adapter, k_model in ks.items():
            rows = [row for row, seq in enumerate(seqs) if seq.adapter == adapter]
            self.controllers[adapter].observe(k_model, [lengths[r] for r in rows], [accepted[r] for r in rows],
                                              proposed_at - started, finished_at - proposed_at)
        self._record(seqs, lengths, accepted, [len(t) for t in emitted], finished_at - started)

    def _grammar_masks(self, seqs: list[Sequence], proposed: list[list[int]]) -> dict[int, torch.Tensor]:
        """For each row with a grammar: cut its proposals to the longest prefix the grammar
        accepts, and give the token bitmask [1 + proposals kept, ceil(V / 32)] of the positions the
        target scores in that row. Rows without a grammar cost a None check."""
        masks = {}
        for row, seq in enumerate(seqs):
            if seq.grammar is not None:
                mask = torch.full((1 + len(proposed[row]), (self.vocab_size + 31) // 32), -1, dtype=torch.int32)
                kept = seq.grammar.masks(proposed[row], mask)
                proposed[row] = proposed[row][:kept]
                masks[row] = mask[: 1 + kept]
        return masks

    def _record(self, seqs: list[Sequence], proposed: list[int], accepted: list[int], emitted_per_row: list[int], seconds: float) -> None:
        for seq, p, a, e in zip(seqs, proposed, accepted, emitted_per_row):
            model = self.stats_by_model.setdefault(seq.adapter, {"proposed": 0, "accepted": 0, "spec_steps": 0, "emitted": 0})
            model["proposed"] += p
            model["accepted"] += a
            model["spec_steps"] += 1 if p else 0
            model["emitted"] += e
        emitted = sum(emitted_per_row)
        steps = sum(1 for p in proposed if p)
        self.stats["proposed"] += sum(proposed)
        self.stats["accepted"] += sum(accepted)
        self.stats["spec_steps"] += steps
        self.stats["steps"] += 1
        self.stats["emitted"] += emitted
        if self.metrics is None:
            return
        self.metrics.tokens_per_second.set(emitted / seconds if seconds > 0 else 0.0)
        if not self.speculating:
            return
        name = self.speculator.name
        self.metrics.spec_proposed_tokens.labels(name).inc(sum(proposed))
        self.metrics.spec_accepted_tokens.labels(name).inc(sum(accepted))
        self.metrics.spec_steps.labels(name).inc(steps)
        self._recent.append((sum(proposed), sum(accepted), steps))
        total_proposed = sum(r[0] for r in self._recent)
        total_accepted = sum(r[1] for r in self._recent)
        total_steps = sum(r[2] for r in self._recent)
        if total_proposed:
            self.metrics.spec_acceptance_rate.labels(name).set(total_accepted / total_proposed)
        if total_steps:
            self.metrics.spec_mean_accepted_length.labels(name).set((total_accepted + total_steps) / total_steps)
