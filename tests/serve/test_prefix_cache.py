"""Automatic prefix caching: a prompt whose leading tokens were prefilled before (for the same
served model) takes their KV from the cache and computes only the rest, and its output is the
output it gets without the cache; memory stays within its budget, least recently used first;
an adapter's blocks go when its weights change.

Models run in float64 (see test_lossless.py), so equal logits up to rounding give equal tokens."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from kuberft_core.api import ModelSpec, SpeculatorSpec
from kuberft_core.metrics import ComponentMetrics
from kuberft_serve.config import ServeConfig
from kuberft_serve.engine import Sequence
from kuberft_serve.kv_batch import ModelRunner, SequenceBatch
from kuberft_serve.lean_llama import LeanRunner
from kuberft_serve.loading import build_engine
from kuberft_serve.prefix_cache import BLOCK_TOKENS, PrefixCache
from kuberft_serve.sampling import SamplingParams

from .test_multi_adapter import save_adapter

LAYERS, KV_HEADS, HEAD_DIM = 2, 1, 4


def fake_kv(tokens: list[int]) -> torch.Tensor:
    """KV whose every slot says which token it is of (so a test can read back what it got)."""
    kv = torch.tensor(tokens, dtype=torch.float64)[None, None, None, :, None]
    return kv.expand(LAYERS, 2, KV_HEADS, len(tokens), HEAD_DIM).clone()


def block_bytes() -> int:
    return LAYERS * 2 * KV_HEADS * BLOCK_TOKENS * HEAD_DIM * 8


def stored(cache: PrefixCache, model, tokens: list[int]) -> None:
    cache.store(model, tokens, lambda: fake_kv(tokens))


# --------------------------------------------------------------------------- the cache
def test_a_match_gives_the_kv_of_the_longest_kept_prefix_but_never_of_the_last_token():
    cache = PrefixCache(max_bytes=1 << 20)
    prompt = list(range(100, 100 + 3 * BLOCK_TOKENS + 5))  # 3 whole blocks and 5 tokens
    stored(cache, None, prompt)
    assert len(cache) == 3 and cache.bytes == 3 * block_bytes()

    longer = prompt + [7, 8]
    kv = cache.match(None, longer)
    assert kv.shape == (LAYERS, 2, KV_HEADS, 3 * BLOCK_TOKENS, HEAD_DIM)
    assert kv[0, 1, 0, :, 0].tolist() == prompt[: 3 * BLOCK_TOKENS]
    # the same whole blocks sent again: all but the last token, part of the last block
    exact = prompt[: 2 * BLOCK_TOKENS]
    assert cache.match(None, exact).shape[3] == 2 * BLOCK_TOKENS - 1
    # a prompt shorter than a block, or one that differs in its first block, finds nothing
    assert cache.match(None, prompt[:BLOCK_TOKENS - 1]) is None
    assert cache.match(None, [0] + prompt[1:]) is None
    # a later block matches only after the same earlier blocks
    assert cache.match(None, prompt[BLOCK_TOKENS:]) is None


def test_blocks_are_kept_per_served_model():
    cache = PrefixCache(max_bytes=1 << 20)
    prompt = list(range(2 * BLOCK_TOKENS + 1))
    stored(cache, "sql", prompt)
    assert cache.match(None, prompt) is None and cache.match("other", prompt) is None
    assert cache.match("sql", prompt).shape[3] == 2 * BLOCK_TOKENS
    stored(cache, None, prompt)
    cache.forget("sql")
    assert cache.match("sql", prompt) is None and cache.match(None, prompt).shape[3] == 2 * BLOCK_TOKENS
    assert cache.bytes == 2 * block_bytes()


def test_the_least_recently_used_blocks_leave_first_with_every_block_that_continues_them():
    cache = PrefixCache(max_bytes=4 * block_bytes())
    first = [1] * (2 * BLOCK_TOKENS)
    second = [2] * (2 * BLOCK_TOKENS)
    stored(cache, None, first)
    stored(cache, None, second)
    assert len(cache) == 4
    cache.match(None, first + [0])  # `first` is now the more recent
    third = [3] * BLOCK_TOKENS
    stored(cache, None, third)  # one block must go: the oldest, `second`'s first, with its continuation
    assert cache.match(None, second + [0]) is None
    assert cache.match(None, first + [0]).shape[3] == 2 * BLOCK_TOKENS
    assert cache.match(None, third + [0]).shape[3] == BLOCK_TOKENS
    assert len(cache) == 3 and cache.bytes == 3 * block_bytes() <= cache.max_bytes


def test_continuations_evicted_on_their_own_leave_no_trace_in_the_block_they_continue():
    """A shared first block (a system prompt) outlives its many continuations: those evicted must
    not pile up in its list of children, else memory grows with every distinct prompt ever seen."""
    cache = PrefixCache(max_bytes=3 * block_bytes())
    system = [9] * BLOCK_TOKENS
    for tail in range(50):
        stored(cache, None, system + [tail] * BLOCK_TOKENS)
        cache.match(None, system + [0])  # the shared block stays the most recently used
    root = cache._blocks[(None, 0, tuple(system))]
    assert len(cache) == 3 and len(root.children) == 2
    assert cache.match(None, system + [49] * BLOCK_TOKENS + [0]).shape[3] == 2 * BLOCK_TOKENS


def test_a_prompt_longer_than_the_budget_keeps_what_fits_and_evicts_nothing_it_continues():
    cache = PrefixCache(max_bytes=2 * block_bytes())
    prompt = list(range(5 * BLOCK_TOKENS))
    stored(cache, None, prompt)
    assert cache.match(None, prompt).shape[3] == 2 * BLOCK_TOKENS
    with pytest.raises(ValueError, match="positive memory budget"):
        PrefixCache(0)


# --------------------------------------------------------------------------- a prefill after a cached prefix
@pytest.mark.parametrize("runner_type", [LeanRunner, ModelRunner])
def test_a_prefill_after_cached_prefixes_gives_the_logits_and_kv_of_the_whole_prompts(tiny_dir, runner_type):
    model = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float64).eval()
    runner = runner_type(model)
    prompts = [list(range(3, 13)) * 4, [5, 6, 7] * 9, [4, 9] * 3]  # 40, 27, 6 tokens
    whole = SequenceBatch(runner)
    expected = whole.prefill(prompts, pad_id=0)
    cached = [whole.prompt_kv(0)[:, :, :, :33], whole.prompt_kv(1)[:, :, :, :16], None]
    partial = SequenceBatch(runner)
    result = partial.prefill(prompts, pad_id=0, prefixes=cached)
    assert result.logits.shape == expected.logits.shape
    torch.testing.assert_close(result.logits, expected.logits, rtol=0, atol=1e-9)
    for row in range(3):
        torch.testing.assert_close(partial.prompt_kv(row), whole.prompt_kv(row), rtol=0, atol=1e-9)
    # and decoding goes on from there as from the whole prefill
    step = torch.tensor([[1], [2], [3]])
    torch.testing.assert_close(partial.extend(step).logits, whole.extend(step).logits, rtol=0, atol=1e-9)


# --------------------------------------------------------------------------- the engine
def make_engine(tiny_dir, adapters=None, speculator="none", **config):
    spec = SpeculatorSpec(type=speculator, num_speculative_tokens=3, adaptive=False)
    return build_engine(ServeConfig(model=ModelSpec(name=str(tiny_dir), dtype="float64"), adapters=adapters or {}, speculator=spec,
                                    device="cpu", max_batch_size=8, **config))


def decode(engine, requests) -> list[list[int]]:
    seqs = [engine.submit(Sequence(list(prompt), params, adapter)) for prompt, params, adapter in requests]
    while not all(s.finished for s in seqs):
        engine.step()
    return [s.output_ids for s in seqs]


def shared_prefix_requests(tokenizer, sampled: bool, adapters=(None,)):
    system = tokenizer.encode("a big cafe, i hid a jade bead. he fed a dog\n")  # 44 tokens: 2 whole blocks
    out = []
    for i, tail in enumerate(["jab, jab", "add a fig ", "hi", "jab, jab"]):
        for j, adapter in enumerate(adapters):
            params = SamplingParams(max_tokens=10, temperature=0.8 if sampled else 0.0, seed=10 * i + j)
            out.append((system + tokenizer.encode(tail), params, adapter))
    return out


@pytest.mark.parametrize("speculator", ["none", "ngram"])
@pytest.mark.parametrize("sampled", [False, True])
def test_requests_that_share_a_prompt_prefix_get_the_tokens_they_get_without_the_cache(patterned_dir, speculator, sampled):
    plain = make_engine(patterned_dir, speculator=speculator, prefix_cache_mib=0)
    cached = make_engine(patterned_dir, speculator=speculator)
    assert plain.prefix_cache is None and cached.prefix_cache is not None
    requests = shared_prefix_requests(cached.tokenizer, sampled)
    expected = decode(plain, requests)
    # one at a time: each later request finds the earlier ones' blocks
    assert [decode(cached, [request])[0] for request in requests] == expected
    assert decode(cached, requests) == expected  # and all together, every prompt's prefix cached now
    prompt_tokens = 2 * sum(len(prompt) for prompt, _, _ in requests)
    assert cached.stats["prompt_tokens"] == prompt_tokens
    # the first request finds nothing; each other one its 32 shared tokens at least, the repeated one 47
    assert cached.stats["cached_prompt_tokens"] >= 32 * 2 + 47 + 4 * 32


def test_the_n_samples_of_a_request_and_the_prompt_logprobs_of_another_are_unaffected(patterned_dir):
    plain = make_engine(patterned_dir, prefix_cache_mib=0)
    cached = make_engine(patterned_dir)
    prompt = cached.tokenizer.encode("i hid a jade bead. he fed a dog\nadd a fig ")
    warm = [(prompt, SamplingParams(max_tokens=4, temperature=0.0), None)]
    decode(cached, warm)
    samples = [(prompt, SamplingParams(max_tokens=8, temperature=1.0, seed=s), None) for s in range(3)]
    assert decode(cached, samples) == decode(plain, samples)
    scored = SamplingParams(max_tokens=2, temperature=0.0, prompt_logprobs=1)
    seq_plain = plain.submit(Sequence(list(prompt), scored))
    seq_cached = cached.submit(Sequence(list(prompt), scored))
    while not (seq_plain.finished and seq_cached.finished):
        plain.step()
        cached.step()
    assert len(seq_cached.prompt_logprobs) == len(prompt) - 1
    assert [e.logprob for e in seq_cached.prompt_logprobs] == pytest.approx([e.logprob for e in seq_plain.prompt_logprobs], abs=1e-9)


def test_each_adapter_has_its_own_prefixes_and_loses_them_when_its_weights_change(tiny_dir, adapter_dir, tmp_path):
    other = save_adapter(tiny_dir, tmp_path / "other", 9, r=4, lora_alpha=8, target_modules=["k_proj", "v_proj"])
    plain = make_engine(tiny_dir, {"tuned": str(adapter_dir)}, prefix_cache_mib=0)
    cached = make_engine(tiny_dir, {"tuned": str(adapter_dir)})
    requests = shared_prefix_requests(cached.tokenizer, sampled=False, adapters=(None, "tuned"))
    assert decode(cached, requests[:2]) == decode(plain, requests[:2])  # the base's blocks, and tuned's
    assert decode(cached, requests) == decode(plain, requests)
    tuned_blocks = {key for key in cached.prefix_cache._blocks if key[0] == "tuned"}
    assert tuned_blocks
    # the name `tuned` now serves other weights: its old KV must not be used
    for engine in (plain, cached):
        engine.unload_adapter("tuned")
        engine.load_adapter("tuned", other)
    assert not {key for key in cached.prefix_cache._blocks if key[0] == "tuned"}
    assert any(key[0] is None for key in cached.prefix_cache._blocks)
    assert decode(cached, requests) == decode(plain, requests)


def test_prefix_cache_hits_are_exported_as_prometheus_counters(patterned_dir):
    metrics = ComponentMetrics("serve")
    engine = build_engine(ServeConfig(model=ModelSpec(name=str(patterned_dir), dtype="float64"), device="cpu"), metrics=metrics)
    prompt = engine.tokenizer.encode("a big cafe, i hid a jade bead. he fed a dog\n")
    for _ in range(2):
        decode(engine, [(prompt, SamplingParams(max_tokens=2, temperature=0.0), None)])
    read = metrics.registry.get_sample_value
    assert read("kuberft_serve_prefix_cache_queries_total") == 2 * len(prompt)
    assert read("kuberft_serve_prefix_cache_hits_total") == 32  # the second request: 2 whole blocks of 44 tokens


# --------------------------------------------------------------------------- configuration
def test_the_prefix_cache_budget_comes_from_the_flag_or_the_spec_file(tmp_path, monkeypatch, capsys):
    import kuberft_serve.server
    from kuberft_operator.cli import main

    served = []
    monkeypatch.setattr(kuberft_serve.server, "run_server", served.append)
    (tmp_path / "serve.json").write_text(json.dumps({"model": {"name": "tiny:countdown"}, "prefixCacheMiB": 0}))
    assert main(["serve", "--config", str(tmp_path / "serve.json")]) == 0
    assert main(["serve", "--model", "tiny:countdown", "--prefix-cache-memory", "64"]) == 0
    assert main(["serve", "--model", "tiny:countdown"]) == 0
    assert [c.prefix_cache_mib for c in served] == [0, 64, 1024]
    for argv, message in [(["--model", "m", "--prefix-cache-memory", "-1"], "--prefix-cache-memory must be 0 MiB (off) or more"),
                          (["--config", str(tmp_path / "serve.json"), "--prefix-cache-memory", "8"], "--prefix-cache-memory: not with --config")]:
        with pytest.raises(SystemExit) as caught:
            main(["serve", *argv])
        assert caught.value.code == 2 and message in capsys.readouterr().err
