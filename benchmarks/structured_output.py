"""Structured output benchmark: what a grammar's token mask costs per token, for xgrammar (what
kuberft uses, measured through `kuberft_serve.structured`) against llguidance and outlines-core on
the same vocabulary and schemas, and what `response_format` costs end to end in kuberft's engine.

    .venv/bin/python benchmarks/structured_output.py            # about 3 minutes on 2 busy cores
    .venv/bin/python benchmarks/structured_output.py --quick    # smaller vocabulary and model (a smoke run)

The peers are optional: `pip install llguidance outlines-core` (a peer that is not importable is
skipped, and the run says so).

Vocabulary: no model hub is reachable, so a byte-level BPE tokenizer (GPT-2's pre-tokenizer and
byte alphabet, --vocab-size tokens) is trained here on the standard library's top-level modules
and on generated JSON, and cached in --work-dir.

1. Masks. For each library and schema (json_object, and three json_schema: a flat record, a
   nested order, a list of events): the time to compile the schema for the vocabulary (the
   vocabulary's own preprocessing reported apart), then walks through valid documents (laid out
   as `json.dumps` does, kuberft's layout) token by token, ending with the end-of-sequence token:
   per token, the time to fill the next-token bitmask and accept the token (median and p99,
   microseconds). The documents take turns across the libraries, so machine noise hits them
   alike. Each mask is checked to allow the document's next token; a library that refuses one
   says why. xgrammar runs as the engine runs it: `GrammarState.masks` (no proposals), then
   `GrammarState.advance`; the peers run as vLLM's backends do (a matcher or guide per request).
   Layout: xgrammar and llguidance allow exactly `json.dumps`'s separators; outlines-core's regex
   takes one whitespace pattern for every place, here `[ ]?` (so it admits a little more).
   Also measured: applying a mask to a row of logits (`sampling.apply_token_bitmask`, xgrammar's
   CPU kernel).

2. End to end. A random Llama built here with that tokenizer (`build_tiny_model`), served by
   `build_engine`, decodes the same prompts greedily with the same max_tokens with a json_schema
   `response_format` and without, at batch 1 and 8, with no speculator and with the ngram
   speculator (k fixed at 4: adaptive k would choose differently for the two arms). The schema
   is a list of at least max_tokens / 4 events, so the constrained output never ends before
   max_tokens and both arms decode the same number of tokens (checked). Arms alternate round by
   round, so each round gives a pair measured back to back. Printed: tokens/s of each (median
   over rounds); their ratio and the overhead per token, 1 / json tok/s - 1 / free tok/s (each
   the median over rounds of the pair's figure); the time per token spent in structured output's
   parts inside the engine (making and filling the masks, applying them, advancing the
   matchers); and the tokens emitted per row and step. The microseconds carry over to a larger model, the ratio
   does not: a small model's step is short, so the same overhead is a larger fraction of it.
   With ngram the two arms also differ in acceptance: a random model repeats itself in free
   text, which prompt lookup predicts well, so part of that ratio is speculation's, not the
   grammar's (the tokens per step show it).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import json
import multiprocessing
import pickle
import random
import statistics
import sys
import sysconfig
import time
from pathlib import Path
from unittest.mock import patch

import torch

ROOT = Path(__file__).resolve().parents[1]
for folder in ("operator", "serve_image"):
    sys.path.insert(0, str(ROOT / folder))

from common import percentile  # noqa: E402
from kuberft_core.api import ModelSpec, SpeculatorSpec  # noqa: E402
from kuberft_core.models import SPECIAL_TOKENS, build_tiny_model  # noqa: E402
from kuberft_serve import engine as engine_module  # noqa: E402
from kuberft_serve.config import ServeConfig  # noqa: E402
from kuberft_serve.engine import Sequence  # noqa: E402
from kuberft_serve.loading import build_engine  # noqa: E402
from kuberft_serve.protocol import ResponseFormat  # noqa: E402
from kuberft_serve.sampling import SamplingParams, apply_token_bitmask  # noqa: E402
from kuberft_serve.structured import Grammars, GrammarState  # noqa: E402

SIZES = {
    "full": dict(hidden_size=256, num_layers=4, intermediate_size=768, num_heads=4, num_kv_heads=2),
    "quick": dict(hidden_size=64, num_layers=2, intermediate_size=128, num_heads=4, num_kv_heads=2),
}

# --------------------------------------------------------------------------- schemas and documents
WORDS = ("alpha beta gamma delta server client request response token cache index value queue batch model "
         "layer weight update error warning state event user order price city river north south config "
         "timeout retry limit window buffer stream socket thread worker report metric label node cluster").split()
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "minLength": 1, "maxLength": 40},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "email": {"type": "string", "maxLength": 64},
        "role": {"enum": ["admin", "editor", "viewer", "guest"]},
        "active": {"type": "boolean"},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 16}, "maxItems": 8},
    },
    "required": ["name", "age", "email", "role", "active", "tags"],
    "additionalProperties": False,
}
ORDER = {
    "type": "object",
    "properties": {
        "order_id": {"type": "integer", "minimum": 1},
        "customer": {
            "type": "object",
            "properties": {
                "name": {"type": "string", "maxLength": 40},
                "address": {
                    "type": "object",
                    "properties": {"street": {"type": "string", "maxLength": 60}, "city": {"type": "string", "maxLength": 30},
                                   "country": {"enum": ["DE", "FR", "GB", "JP", "US"]}},
                    "required": ["street", "city", "country"],
                    "additionalProperties": False,
                },
            },
            "required": ["name", "address"],
            "additionalProperties": False,
        },
        "items": {
            "type": "array",
            "minItems": 1,
            "items": {
                "type": "object",
                "properties": {"sku": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{4}$"},
                               "quantity": {"type": "integer", "minimum": 1, "maximum": 100}, "price": {"type": "number", "minimum": 0}},
                "required": ["sku", "quantity", "price"],
                "additionalProperties": False,
            },
        },
        "status": {"enum": ["pending", "paid", "shipped", "delivered", "cancelled"]},
        "note": {"type": "string"},
    },
    "required": ["order_id", "customer", "items", "status", "note"],
    "additionalProperties": False,
}


def events_schema(min_items: int) -> dict:
    """A list of log events (enum, bounded integer, bounded string): at least `min_items` of them."""
    event = {
        "type": "object",
        "properties": {"level": {"enum": ["debug", "info", "warning", "error"]}, "code": {"type": "integer", "minimum": 0, "maximum": 999},
                       "message": {"type": "string", "maxLength": 24}},
        "required": ["level", "code", "message"],
        "additionalProperties": False,
    }
    return {"type": "object", "properties": {"events": {"type": "array", "items": event, "minItems": min_items}},
            "required": ["events"], "additionalProperties": False}


def phrase(rng: random.Random, most: int, limit: int | None = None) -> str:
    text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, most)))
    return text[:limit] if limit else text


def free_text(rng: random.Random) -> str:
    """A sentence that needs escapes in JSON now and then (quotes, a newline, a non-ASCII letter)."""
    text = phrase(rng, 10).capitalize() + "."
    extra = rng.random()
    if extra < 0.2:
        text += f' Ask for "{rng.choice(WORDS)}".'
    elif extra < 0.35:
        text += "\nCall ahead."
    elif extra < 0.45:
        text += " Caf\u00e9 na\u00efve."
    return text


def any_value(rng: random.Random, depth: int):
    kind = rng.choice(["str", "str", "int", "float", "bool", "null"] + ["list", "object"] * (depth < 3))
    if kind == "str":
        return free_text(rng) if rng.random() < 0.3 else phrase(rng, 3)
    if kind == "int":
        return rng.randint(-1000, 100000)
    if kind == "float":
        return round(rng.uniform(-100, 1000), rng.randint(1, 4))
    if kind == "bool":
        return rng.random() < 0.5
    if kind == "null":
        return None
    if kind == "list":
        return [any_value(rng, depth + 1) for _ in range(rng.randint(0, 4))]
    return any_object(rng, depth + 1)


def any_object(rng: random.Random, depth: int = 0) -> dict:
    return {"_".join(rng.sample(WORDS, rng.randint(1, 2))): any_value(rng, depth) for _ in range(rng.randint(1, 6))}


def person(rng: random.Random) -> dict:
    name = f"{rng.choice(WORDS).capitalize()} {rng.choice(WORDS).capitalize()}"
    return {"name": name, "age": rng.randint(0, 150), "email": f"{rng.choice(WORDS)}.{rng.randint(1, 99)}@example.com",
            "role": rng.choice(PERSON["properties"]["role"]["enum"]), "active": rng.random() < 0.5,
            "tags": [phrase(rng, 2, 16) for _ in range(rng.randint(0, 5))]}


def order(rng: random.Random) -> dict:
    return {
        "order_id": rng.randint(1, 10**7),
        "customer": {"name": phrase(rng, 3, 40).title(),
                     "address": {"street": f"{rng.randint(1, 400)} {phrase(rng, 2, 50).title()} Street", "city": phrase(rng, 1).title(),
                                 "country": rng.choice(["DE", "FR", "GB", "JP", "US"])}},
        "items": [{"sku": "".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(3)) + f"-{rng.randint(0, 9999):04d}",
                   "quantity": rng.randint(1, 100), "price": round(rng.uniform(0.5, 500), 2)} for _ in range(rng.randint(1, 5))],
        "status": rng.choice(["pending", "paid", "shipped", "delivered", "cancelled"]),
        "note": free_text(rng),
    }


def events(rng: random.Random) -> dict:
    return {"events": [{"level": rng.choice(["debug", "info", "warning", "error"]), "code": rng.randint(0, 999),
                        "message": phrase(rng, 4, 24)} for _ in range(rng.randint(8, 20))]}


SCHEMAS = {
    # name: (JSON schema, None for json_object; a generator of valid documents)
    "json_object": (None, any_object),
    "person": (PERSON, person),
    "order": (ORDER, order),
    "events": (events_schema(8), events),
}


def response_format(name: str, schema: dict | None) -> ResponseFormat:
    body = {"type": "json_object"} if schema is None else {"type": "json_schema", "json_schema": {"name": name, "schema": schema}}
    return ResponseFormat.model_validate(body)


def documents(name: str, count: int, seed: int) -> list[str]:
    """`count` valid documents of schema `name`, laid out as json.dumps does (kuberft's layout)."""
    import jsonschema

    schema, generate = SCHEMAS[name]
    rng = random.Random(f"{name}-{seed}")
    docs = [generate(rng) for _ in range(count)]
    for doc in docs:
        if schema is not None:
            jsonschema.validate(doc, schema)
    return [json.dumps(doc) for doc in docs]


# --------------------------------------------------------------------------- the vocabulary
def stdlib_texts(stride: int) -> list[str]:
    """Every `stride`-th top-level module of the standard library, as text."""
    texts = []
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))[::stride]:
        try:
            texts.append(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, OSError):
            continue
    return texts


def tokenizer_for(vocab_size: int, work: Path, stride: int):
    """A byte-level BPE tokenizer (GPT-2's pre-tokenizer and byte alphabet) of `vocab_size`
    tokens trained on the standard library and generated JSON, cached in `work`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    cached = work / f"tokenizer-{vocab_size}-{stride}"
    if (cached / "tokenizer.json").is_file():
        return PreTrainedTokenizerFast.from_pretrained(cached)
    texts = stdlib_texts(stride)
    for name in SCHEMAS:  # JSON in both layouts, from other seeds than the measured documents
        for seed, doc in enumerate(documents(name, 400 // stride, seed=1000)):
            texts.append(doc if seed % 2 else json.dumps(json.loads(doc), indent=2))
    started = time.perf_counter()
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    core.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                        unk_token="<unk>", clean_up_tokenization_spaces=False)
    tokenizer.save_pretrained(cached)
    print(f"trained a {len(tokenizer)}-token byte-level BPE on {sum(map(len, texts)) / 1e6:.1f} MB "
          f"({time.perf_counter() - started:.0f}s; cached in {cached})")
    return tokenizer


def token_bytes(tokenizer) -> dict[int, bytes]:
    """Each ordinary token's bytes (byte-level BPE spells byte b as GPT-2's printable character)."""
    # GPT-2's table: printable bytes are their own character, the others 256, 257, ... in byte order
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    char_to_byte, extra = {chr(b): b for b in printable}, 0
    for b in range(256):
        if b not in printable:
            char_to_byte[chr(256 + extra)] = b
            extra += 1
    special = set(tokenizer.all_special_ids)
    return {i: bytes(char_to_byte[c] for c in token) for token, i in tokenizer.get_vocab().items() if i not in special}


# --------------------------------------------------------------------------- the libraries
class Xgrammar:
    """kuberft's path: `Grammars.compile`, then per sequence a `GrammarState`."""

    name = "xgrammar"
    install = "pip install xgrammar"

    def __init__(self, tokenizer, vocab_size: int, eos: int):
        self.grammars = Grammars(tokenizer, vocab_size, {eos})

    def prepare(self) -> None:
        self.grammars.compiler()

    def compile(self, name: str, schema: dict | None):
        return self.grammars.compile(response_format(name, schema))

    def start(self, compiled) -> GrammarState:
        return GrammarState(compiled)

    def fill(self, state: GrammarState, bitmask: torch.Tensor) -> None:
        state.masks([], bitmask)

    def accept(self, state: GrammarState, token: int) -> None:
        state.advance([token])


class Llguidance:
    """llguidance (vLLM's `guidance` backend): a matcher per request from the schema's grammar."""

    name = "llguidance"
    install = "pip install llguidance"
    note = ("by default it refuses \\u escapes of printable characters (json.dumps's escape of a non-ASCII letter; "
            "option json_allow_general_unicode_escapes)")
    """Why it refuses some valid documents (seen in this benchmark's documents)."""

    def __init__(self, tokenizer, vocab_size: int, eos: int):
        import llguidance  # noqa: F401  (fails early when not installed)

        self.hf_tokenizer, self.vocab_size, self.eos = tokenizer, vocab_size, eos

    def prepare(self) -> None:
        import llguidance.hf

        self.tokenizer = llguidance.hf.from_tokenizer(self.hf_tokenizer, n_vocab=self.vocab_size, eos_token=self.eos)

    def compile(self, name: str, schema: dict | None):
        """The grammar, and a first matcher: llguidance builds its lexer and parser there."""
        from llguidance import LLMatcher

        layout = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
        grammar = LLMatcher.grammar_from_json_schema(schema or {"type": "object"}, defaults=layout)
        matcher = LLMatcher(self.tokenizer, grammar)
        if matcher.is_error():
            raise RuntimeError(matcher.get_error())
        return grammar

    def start(self, grammar):
        from llguidance import LLMatcher

        return LLMatcher(self.tokenizer, grammar)

    def fill(self, matcher, bitmask: torch.Tensor) -> None:
        # what llguidance.torch.fill_next_token_bitmask does (importing that module costs seconds: torch.compile)
        row = bitmask[0]
        matcher.unsafe_compute_mask_ptr(row.data_ptr(), row.numel() * row.element_size())

    def accept(self, matcher, token: int) -> None:
        if not matcher.consume_token(token):
            raise RuntimeError(f"llguidance refused token {token}: {matcher.get_error()}")


class OutlinesCore:
    """outlines-core (vLLM's `outlines` backend): the schema as a regex, compiled to an index of
    allowed tokens per state of its automaton; a `Guide` walks it."""

    name = "outlines-core"
    install = "pip install outlines-core"
    note = ("its strings admit no \\u escapes (json.dumps's escape of a non-ASCII letter), and its json_object is a regex "
            "of values nested at most 3 deep (build_regex_from_schema's max_recursion_depth)")
    """Why it refuses some valid documents (seen in this benchmark's documents)."""
    slow_compile = True
    """Compiled in a child process with a time limit (its index for json_object takes seconds)."""

    def __init__(self, tokenizer, vocab_size: int, eos: int):
        import outlines_core  # noqa: F401

        self.hf_tokenizer, self.eos = tokenizer, eos

    def prepare(self) -> None:
        from outlines_core import Vocabulary

        tokens: dict[bytes, list[int]] = {}
        for i, piece in token_bytes(self.hf_tokenizer).items():
            tokens.setdefault(piece, []).append(i)
        self.vocabulary = Vocabulary(self.eos, tokens)

    def compile(self, name: str, schema: dict | None):
        from outlines_core import Index
        from outlines_core.json_schema import build_regex_from_schema

        # one whitespace pattern for every place: "[ ]?" admits json.dumps's ", " and ": "
        regex = build_regex_from_schema(json.dumps(schema or {"type": "object"}), whitespace_pattern="[ ]?")
        return Index(regex, self.vocabulary)

    def start(self, index):
        from outlines_core import Guide

        return Guide(index)

    def fill(self, guide, bitmask: torch.Tensor) -> None:
        row = bitmask[0]
        guide.write_mask_into(row.data_ptr(), row.numel(), row.element_size())

    def accept(self, guide, token: int) -> None:
        if token != self.eos:  # the mask allows EOS where the regex may end, but the guide has no move for it
            guide.advance(token, return_tokens=False)


LIBRARIES = (Xgrammar, Llguidance, OutlinesCore)


def compile_with_timeout(library, name: str, schema: dict | None, timeout: float):
    """(compiled grammar, seconds); None for the grammar when compiling takes longer than
    `timeout`. Compiled in a forked child (a compile in native code cannot be interrupted) and
    pickled back; an error in the child is raised here."""
    context = multiprocessing.get_context("fork")
    receive, send = context.Pipe(duplex=False)

    def child() -> None:
        started = time.perf_counter()
        try:
            result = (library.compile(name, schema), time.perf_counter() - started, None)
        except Exception as err:  # reported by the parent
            result = (None, None, f"{type(err).__name__}: {err}")
        send.send_bytes(pickle.dumps(result))

    process = context.Process(target=child, daemon=True)
    process.start()
    send.close()
    if not receive.poll(timeout):
        process.kill()
        process.join()
        return None, timeout
    compiled, seconds, error = pickle.loads(receive.recv_bytes())
    process.join()
    if error:
        raise RuntimeError(error)
    return compiled, seconds


# --------------------------------------------------------------------------- 1. masks
def allows(bitmask: torch.Tensor, token: int) -> bool:
    return bool(int(bitmask[0, token >> 5]) >> (token & 31) & 1)


def walk(library, compiled, tokens: list[int], bitmask: torch.Tensor, times: list[float]) -> bool:
    """Walk one document's tokens: append to `times` the microseconds of filling the mask and
    accepting each token; False (and the walk stops) where a mask refuses the document's token."""
    clock = time.perf_counter_ns
    state = library.start(compiled)
    for token in tokens:
        started = clock()
        library.fill(state, bitmask)
        filled = clock()
        if not allows(bitmask, token):
            return False
        accepting = clock()
        library.accept(state, token)
        times.append((filled - started + clock() - accepting) / 1000)
    return True


def measure_masks(args, tokenizer, libraries: list) -> dict:
    """Per schema and library: compile seconds, per-token mask microseconds, refused documents."""
    eos = tokenizer.eos_token_id
    bitmask = torch.full((1, (len(tokenizer) + 31) // 32), -1, dtype=torch.int32)
    results = {}
    for name, (schema, _) in SCHEMAS.items():
        docs = [tokenizer.encode(doc) + [eos] for doc in documents(name, args.documents, seed=0)]
        compiled, row = {}, {}
        for library in libraries:
            try:
                if getattr(library, "slow_compile", False):
                    grammar, seconds = compile_with_timeout(library, name, schema, args.compile_timeout)
                else:
                    started = time.perf_counter()
                    grammar, seconds = library.compile(name, schema), time.perf_counter() - started
            except Exception as err:  # a library that cannot compile the schema: a row saying so
                row[library.name] = {"error": str(err).splitlines()[0][:120]}
                continue
            if grammar is None:
                row[library.name] = {"error": f"compile took over {args.compile_timeout:.0f} s (--compile-timeout)"}
                continue
            compiled[library.name] = grammar
            row[library.name] = {"compile_s": seconds, "times": [], "refused": 0}
            walk(library, grammar, docs[0], bitmask, [])  # warm-up
        for tokens in docs:  # documents in turn, the libraries in turn on each: noise hits them alike
            for library in libraries:
                if library.name in compiled:
                    entry = row[library.name]
                    entry["refused"] += not walk(library, compiled[library.name], tokens, bitmask, entry["times"])
        for entry in row.values():
            times = entry.pop("times", None)
            if times is not None:
                entry.update(tokens=len(times), median_us=statistics.median(times), p99_us=percentile(times, 0.99))
        results[name] = row
    return results


def apply_cost_us(vocab_size: int, reps: int = 300) -> float:
    """Median microseconds of applying a mask to one row of logits with kuberft's
    `sampling.apply_token_bitmask` (what the engine runs: xgrammar's CPU kernel)."""
    bitmask = torch.randint(-2**31, 2**31 - 1, (1, (vocab_size + 31) // 32), dtype=torch.int32)
    logits = torch.randn(1, vocab_size)
    times = []
    for _ in range(reps):
        started = time.perf_counter_ns()
        apply_token_bitmask(logits, bitmask)
        times.append((time.perf_counter_ns() - started) / 1000)
    return statistics.median(times)


# --------------------------------------------------------------------------- 2. end to end
PROMPTS = ["Log the events of the last deploy as JSON: ", "List what the server did overnight: ", "events:", "{",
           "The worker reported a timeout, then a retry. As JSON: ", "Summarise the cluster's log: ", "Errors and warnings, please: ",
           "Describe the request queue's day in events: "]


class Stopwatch:
    """Seconds the engine spends in structured output's parts: the masks (`Engine._grammar_masks`:
    allocating and filling them), applying them to the logits, and advancing the matchers."""

    def __init__(self):
        self.seconds = dict.fromkeys(("masks", "apply", "advance"), 0.0)

    def wrap(self, function, part: str):
        def timed(*args, **kwargs):
            started = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                self.seconds[part] += time.perf_counter() - started

        return timed

    def attached(self) -> contextlib.ExitStack:
        """The three parts timed while the returned context is open."""
        stack = contextlib.ExitStack()
        stack.enter_context(patch.object(engine_module.Engine, "_grammar_masks", self.wrap(engine_module.Engine._grammar_masks, "masks")))
        stack.enter_context(patch.object(engine_module, "apply_token_bitmask", self.wrap(apply_token_bitmask, "apply")))
        stack.enter_context(patch.object(GrammarState, "advance", self.wrap(GrammarState.advance, "advance")))
        return stack


def decode(engine, prompts: list[list[int]], max_tokens: int, grammar) -> tuple[int, float]:
    """Decode `prompts` in one batch, greedily, to exactly max_tokens each (the grammar cannot end
    sooner; free text ignores EOS): (tokens, seconds), with the grammar states' creation."""
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=grammar is None)
    started = time.perf_counter()
    seqs = [engine.submit(Sequence(list(p), params, grammar=None if grammar is None else GrammarState(grammar))) for p in prompts]
    while not all(seq.finished for seq in seqs):
        engine.step()
    seconds = time.perf_counter() - started
    if any(seq.finish_reason != "length" or len(seq.output_ids) != max_tokens for seq in seqs):
        raise RuntimeError(f"a request ended before max_tokens: {[(s.finish_reason, len(s.output_ids)) for s in seqs]}")
    if grammar is not None and not all(seq.output_text.startswith('{"events": [{"level": "') for seq in seqs):
        raise RuntimeError(f"the output does not follow the schema: {seqs[0].output_text!r}")
    return max_tokens * len(seqs), seconds


def measure_engine(args, tokenizer, work: Path) -> dict:
    """Per speculator and batch size: tokens/s with and without a json_schema format, their ratio,
    the overhead per token, and the time per token in structured output's parts."""
    sizes = SIZES["quick" if args.quick else "full"]
    model_dir = work / f"model-{len(tokenizer)}-{sizes['hidden_size']}x{sizes['num_layers']}"
    if not (model_dir / "config.json").is_file():
        build_tiny_model(model_dir, tokenizer=tokenizer, seed=0, max_positions=1024, **sizes)
    prompts = [tokenizer.encode(p) for p in PROMPTS]
    schema = events_schema(max(1, args.max_tokens // 4))  # an event takes more than 4 tokens: no end before max_tokens
    stopwatch = Stopwatch()
    results = {}
    for speculator in ("none", "ngram"):
        engine = build_engine(ServeConfig(
            model=ModelSpec(name=str(model_dir), dtype="float32"),
            speculator=SpeculatorSpec(type=speculator, num_speculative_tokens=4, adaptive=False),
            device="cpu", max_batch_size=8,
        ))
        torch.set_num_threads(args.threads)
        grammar = Grammars(engine.tokenizer, engine.vocab_size, engine.eos_ids).compile(response_format("events", schema))
        for batch in (1, 8):
            arms = {"free": None, "json_schema": grammar}
            for arm in arms.values():  # warm-up
                decode(engine, prompts[:batch], args.max_tokens, arm)
            rates = {name: [] for name in arms}
            per_step = dict.fromkeys(arms, 0.0)
            parts = dict.fromkeys(stopwatch.seconds, 0.0)
            for round_ in range(args.rounds):
                batch_prompts = prompts[:batch] if batch > 1 else [prompts[round_ % len(prompts)]]
                for name in (("free", "json_schema") if round_ % 2 == 0 else ("json_schema", "free")):
                    engine.stats = dict.fromkeys(engine.stats, 0)
                    stopwatch.seconds = dict.fromkeys(stopwatch.seconds, 0.0)
                    with stopwatch.attached():
                        tokens, seconds = decode(engine, batch_prompts, args.max_tokens, arms[name])
                    rates[name].append(tokens / seconds)
                    per_step[name] += engine.stats["emitted"] / engine.stats["steps"] / batch / args.rounds
                    if name == "json_schema":
                        for part, spent in stopwatch.seconds.items():
                            parts[part] += spent / tokens / args.rounds * 1e6
            pairs = list(zip(rates["free"], rates["json_schema"]))  # a round's two arms ran back to back: compared in pairs
            results[f"{'ngram' if speculator == 'ngram' else 'plain'} batch {batch}"] = {
                "free_tokens_per_s": statistics.median(rates["free"]), "json_schema_tokens_per_s": statistics.median(rates["json_schema"]),
                "ratio": statistics.median(constrained / free for free, constrained in pairs),
                "overhead_us_per_token": statistics.median((1 / constrained - 1 / free) * 1e6 for free, constrained in pairs),
                "parts_us_per_token": parts,
                "free_tokens_per_row_step": per_step["free"], "json_schema_tokens_per_row_step": per_step["json_schema"],
            }
    return results


# --------------------------------------------------------------------------- report
def report_masks(masks: dict, libraries: list, documents_per_schema: int, apply_us: float, vocab_size: int) -> dict:
    """Print part 1; return each library's range over the schemas (its medians, and their ratio to xgrammar's)."""
    print("\n1. per token: fill the next-token bitmask + accept the token (microseconds); vs xgrammar: ratio of the medians")
    print(f"{'schema':12s} {'library':14s} {'compile':>9s} {'tokens':>7s} {'median':>8s} {'p99':>8s} {'vs xgrammar':>11s}  masks allow the document")
    for schema, row in masks.items():
        base = row.get("xgrammar", {}).get("median_us")
        for name, entry in row.items():
            if "error" in entry:
                print(f"{schema:12s} {name:14s} unsupported: {entry['error']}")
                continue
            ratio = f"{entry['median_us'] / base:10.2f}x" if base else f"{'-':>11s}"
            ok = "yes" if entry["refused"] == 0 else f"NO: refused a token in {entry['refused']}/{documents_per_schema} documents"
            print(f"{schema:12s} {name:14s} {entry['compile_s']:8.3f}s {entry['tokens']:7d} {entry['median_us']:8.1f} "
                  f"{entry['p99_us']:8.1f} {ratio}  {ok}")
    for library in libraries:
        if hasattr(library, "note") and any(row.get(library.name, {}).get("refused") for row in masks.values()):
            print(f"  {library.name}: {library.note}")
    summary = {}
    for library in libraries:
        rows = [row for row in masks.values() if "median_us" in row.get(library.name, {})]
        if not rows:
            continue
        medians = [row[library.name]["median_us"] for row in rows]
        ratios = [row[library.name]["median_us"] / row["xgrammar"]["median_us"] for row in rows if "median_us" in row.get("xgrammar", {})]
        summary[library.name] = {"median_us": [min(medians), max(medians)], "vs_xgrammar": [min(ratios), max(ratios)] if ratios else None}
        versus = f", {min(ratios):.2f}-{max(ratios):.2f}x xgrammar's" if library.name != "xgrammar" and ratios else ""
        print(f"  {library.name}: a median {min(medians):.1f}-{max(medians):.1f} us per token over the schemas{versus}")
    print(f"applying a mask to a row of {vocab_size} logits (sampling.apply_token_bitmask): {apply_us:.0f} us")
    return summary


def report_engine(engine: dict, size: dict, vocab_size: int, args) -> None:
    print(f"\n2. end to end: a random Llama (hidden {size['hidden_size']}, {size['num_layers']} layers, vocabulary {vocab_size}) "
          f"in kuberft's engine, greedy, {args.max_tokens} tokens per request, median of {args.rounds} rounds; ngram: k = 4")
    print(f"{'':15s} {'free tok/s':>10s} {'json tok/s':>10s} {'ratio':>6s} {'overhead':>9s}   {'in the grammar: masks+apply+advance':36s} "
          f"{'tokens/row-step free, json'}")
    for name, entry in engine.items():
        parts = entry["parts_us_per_token"]
        spent = " + ".join(f"{parts[p]:.0f}" for p in ("masks", "apply", "advance"))
        print(f"{name:15s} {entry['free_tokens_per_s']:10.1f} {entry['json_schema_tokens_per_s']:10.1f} {entry['ratio']:6.2f} "
              f"{entry['overhead_us_per_token']:6.0f} us   {spent + f' = {sum(parts.values()):.0f} us':36s} "
              f"{entry['free_tokens_per_row_step']:.2f}, {entry['json_schema_tokens_per_row_step']:.2f}")
    print("  (tok/s: medians over the rounds; ratio and overhead (1 / json tok/s - 1 / free tok/s): medians over the rounds of the\n"
          "   two arms' figures in that round; the grammar's parts: timed inside the engine, per token)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a smaller vocabulary and model, fewer documents and rounds: a smoke run")
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/kuberft-structured-bench"), help="where the tokenizer and model are cached")
    parser.add_argument("--vocab-size", type=int, default=32000, help="tokens of the trained BPE vocabulary (--quick: 8000 unless given)")
    parser.add_argument("--documents", type=int, default=24, help="valid documents walked per schema")
    parser.add_argument("--compile-timeout", type=float, default=120.0, help="seconds outlines-core may take to compile one schema")
    parser.add_argument("--max-tokens", type=int, default=96, help="tokens decoded per request end to end")
    parser.add_argument("--rounds", type=int, default=7, help="timed rounds per arm end to end (the median is reported)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: stable timings on a shared machine)")
    args = parser.parse_args()
    stride = 1  # of the standard library's modules the tokenizer learns from
    if args.quick:
        if args.vocab_size == parser.get_default("vocab_size"):
            args.vocab_size = 8000
        args.documents, args.max_tokens, args.rounds, stride = 6, 48, 3, 4
    torch.set_num_threads(args.threads)
    args.work_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()

    tokenizer = tokenizer_for(args.vocab_size, args.work_dir, stride)
    vocab_size, eos = len(tokenizer), tokenizer.eos_token_id
    libraries, skipped = [], {}
    for kind in LIBRARIES:
        try:
            libraries.append(kind(tokenizer, vocab_size, eos))
        except ImportError:
            skipped[kind.name] = kind.install
            print(f"{kind.name}: not importable, skipped (to compare with it: {kind.install})")
    versions = {library.name: importlib.metadata.version(library.name) for library in libraries}
    prepare_s = {}
    for library in libraries:
        began = time.perf_counter()
        library.prepare()
        prepare_s[library.name] = time.perf_counter() - began
    print(f"vocabulary: {vocab_size} tokens (byte-level BPE); {args.documents} documents per schema; torch {torch.__version__}, "
          f"{args.threads} thread(s); " + ", ".join(f"{n} {v}" for n, v in versions.items()))
    print("vocabulary preprocessing: " + ", ".join(f"{n} {s:.2f} s" for n, s in prepare_s.items()))

    masks = measure_masks(args, tokenizer, libraries)
    apply_us = apply_cost_us(vocab_size)
    summary = report_masks(masks, libraries, args.documents, apply_us, vocab_size)
    engine = measure_engine(args, tokenizer, args.work_dir)
    size = SIZES["quick" if args.quick else "full"]
    report_engine(engine, size, vocab_size, args)
    seconds = time.perf_counter() - started
    print(f"\n({seconds:.0f} s)")
    print(json.dumps({"vocab_size": vocab_size, "documents": args.documents, "versions": versions, "skipped": skipped,
                      "prepare_s": prepare_s, "masks": masks, "summary": summary, "apply_us": apply_us,
                      "engine": {"model": size, "max_tokens": args.max_tokens, "rounds": args.rounds, **engine}, "seconds": seconds}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
