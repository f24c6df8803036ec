"""Speculative decoding changes nothing in the output: greedy decoding with every speculator is
token-for-token identical to plain greedy decoding of the same model and adapter (through the
same KV-cache path), and sampling keeps the target's distribution.

The models run in float64 here so that the verify pass (k+1 tokens at once) and plain decoding
(one token) round identically enough that no argmax can flip; in float32 their logits differ
in the last bits (different matmul shapes), as in every peer.
"""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from kuberft_core.api import ModelSpec, SpeculatorSpec
from kuberft_serve.config import ServeConfig
from kuberft_serve.engine import Engine, Sequence
from kuberft_serve.heads import MedusaHeads
from kuberft_serve.loading import build_engine
from kuberft_serve.sampling import SamplingParams, accept_proposals, keyed_uniform, sample

PROMPTS = ["abc abc ab", "hello, ", "a", "jig jag jig jag ", "the cafe. the cafe. the"]


@pytest.fixture(scope="module")
def heads_dir(tiny_dir, adapter_dir, tmp_path_factory):
    """Random (untrained) heads: proposals are poor, which exercises rejection and rollback."""
    torch.manual_seed(4)
    heads = MedusaHeads.for_model(AutoModelForCausalLM.from_pretrained(tiny_dir), num_heads=5)
    torch.nn.init.normal_(heads.block.weight, std=0.3)
    base = heads.save(tmp_path_factory.mktemp("heads-base"))
    adapted = heads.save(tmp_path_factory.mktemp("heads-adapter"))
    return {None: str(base), "tuned": str(adapted)}


def make_engine(tiny_dir, adapter_dir, draft_dir, heads_dir, speculator, k=4, adaptive=False, batch=8) -> Engine:
    config = ServeConfig(
        model=ModelSpec(name=str(tiny_dir), dtype="float64"),
        adapters={"tuned": str(adapter_dir)},
        speculator=SpeculatorSpec(type=speculator, num_speculative_tokens=k, adaptive=adaptive, draft_model=str(draft_dir),
                                  heads_path=heads_dir["tuned"]),
        heads_by_model={str(tiny_dir): heads_dir[None]},
        device="cpu",
        max_batch_size=batch,
    )
    return build_engine(config)


@pytest.fixture(scope="module")
def plain(tiny_dir, adapter_dir, draft_dir, heads_dir):
    return make_engine(tiny_dir, adapter_dir, draft_dir, heads_dir, "none")


def encode(engine, text):
    return engine.tokenizer.encode(text)


GREEDY = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)


def test_plain_engine_decodes_exactly_like_transformers_generate(plain, tiny_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float64).eval()
    for text in PROMPTS:
        ids = encode(plain, text)
        reference = model.generate(torch.tensor([ids]), max_new_tokens=40, do_sample=False, eos_token_id=None)
        assert plain.generate(ids, GREEDY, adapter=None) == reference[0, len(ids) :].tolist()


def test_the_adapter_changes_the_output(plain):
    ids = encode(plain, PROMPTS[0])
    assert plain.generate(ids, GREEDY, adapter="tuned") != plain.generate(ids, GREEDY, adapter=None)


@pytest.mark.parametrize("speculator", ["ngram", "draft", "heads"])
@pytest.mark.parametrize("k", [1, 3, 5])
def test_greedy_speculative_output_equals_plain_greedy(plain, tiny_dir, adapter_dir, draft_dir, heads_dir, speculator, k):
    engine = make_engine(tiny_dir, adapter_dir, draft_dir, heads_dir, speculator, k=k)
    for adapter in (None, "tuned"):
        for text in PROMPTS:
            ids = encode(plain, text)
            assert engine.generate(ids, GREEDY, adapter) == plain.generate(ids, GREEDY, adapter), (adapter, text)


@pytest.mark.parametrize("speculator", ["ngram", "draft", "heads"])
def test_batched_adaptive_speculation_equals_plain_decoding_one_request_at_a_time(
    plain, tiny_dir, adapter_dir, draft_dir, heads_dir, speculator
):
    """All prompts decoded together (rows accept different numbers of tokens, finish at
    different times, rows of two adapters interleave) give each prompt's plain output."""
    engine = make_engine(tiny_dir, adapter_dir, draft_dir, heads_dir, speculator, k=5, adaptive=True, batch=16)
    prompts = [encode(plain, t) for t in PROMPTS]
    lengths = [7, 40, 23, 31, 12]
    params = [SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True) for n in lengths]
    for adapter in (None, "tuned"):
        expected = [plain.generate(p, sp, adapter) for p, sp in zip(prompts, params)]
        assert engine.generate_batch(prompts, params, adapter) == expected
        assert [len(e) for e in expected] == lengths


@pytest.mark.parametrize("speculator", ["ngram", "heads"])
def test_seeded_sampling_with_a_deterministic_speculator_equals_plain_seeded_sampling(
    plain, tiny_dir, adapter_dir, draft_dir, heads_dir, speculator
):
    engine = make_engine(tiny_dir, adapter_dir, draft_dir, heads_dir, speculator, k=4)
    for seed, text in enumerate(PROMPTS):
        params = SamplingParams(max_tokens=30, temperature=0.8, top_p=0.9, seed=seed, ignore_eos=True)
        ids = encode(plain, text)
        assert engine.generate(ids, params, "tuned") == plain.generate(ids, params, "tuned")


def decode(engine: Engine, prompt: list[int], params: SamplingParams, adapter=None) -> Sequence:
    seq = engine.submit(Sequence(prompt, params, adapter))
    while not seq.finished:
        engine.step()
    return seq


@pytest.fixture(scope="module")
def plain_decode(plain):
    """Plain decoding of (prompt, params, adapter), each decoded once for all speculators."""
    done = {}

    def run(prompt: list[int], params: SamplingParams, adapter) -> Sequence:
        key = (tuple(prompt), repr(params), adapter)
        if key not in done:
            done[key] = decode(plain, prompt, params, adapter)
        return done[key]

    return run


@pytest.mark.parametrize("speculator", ["ngram", "draft", "heads"])
def test_logprobs_and_stops_are_the_same_with_speculation(plain_decode, tiny_dir, adapter_dir, draft_dir, heads_dir, speculator):
    """The reported logprobs (the target's raw distribution at each position) match plain
    decoding's, and a stop string or stop token ends the output at the same token even when a
    step emits several tokens past it; seeded sampling too with the deterministic speculators."""
    engine = make_engine(tiny_dir, adapter_dir, draft_dir, heads_dir, speculator, k=4)
    for text, temperature in [(PROMPTS[0], 0.0), (PROMPTS[3], 0.0), (PROMPTS[3], 0.8)]:
        if temperature and speculator == "draft":
            continue  # a sampling draft keeps the distribution, not the seeded tokens
        ids = encode(engine, text)
        params = SamplingParams(max_tokens=30, temperature=temperature, seed=11, ignore_eos=True, logprobs=3, prompt_logprobs=2)
        free = plain_decode(ids, params, "tuned").output_ids
        stop_text = engine.tokenizer.decode(free[9:20])  # long: speculative steps run past where it completes
        for stops in ({}, {"stop": [stop_text]}, {"stop_token_ids": [free[9]]}):
            stopped = SamplingParams(**{**params.__dict__, **stops})
            expected, got = plain_decode(ids, stopped, "tuned"), decode(engine, ids, stopped, "tuned")
            assert got.output_ids == expected.output_ids, (text, temperature, stops)
            assert (got.finish_reason, got.stop_reason) == (expected.finish_reason, expected.stop_reason)
            assert len(got.logprobs) == len(got.output_ids)
            for mine, theirs in zip(got.logprobs + got.prompt_logprobs, expected.logprobs + expected.prompt_logprobs):
                assert (mine.token, mine.rank, [t for t, _ in mine.top]) == (theirs.token, theirs.rank, [t for t, _ in theirs.top])
                assert mine.logprob == pytest.approx(theirs.logprob, abs=1e-5)
        assert len(expected.output_ids) < 30  # the last stop did stop


def test_the_samples_of_one_prompt_share_one_prefill_row(plain):
    """n copies of a prompt are prefilled as one row whose KV row is copied; each then decodes
    exactly as the prompt alone."""
    rows = []
    forward = plain.target_runner.forward

    def counting(input_ids, *args, **kwargs):
        rows.append(input_ids.shape)
        return forward(input_ids, *args, **kwargs)

    plain.target_runner.forward = counting
    try:
        prompts = [encode(plain, PROMPTS[0])] * 3 + [encode(plain, PROMPTS[1])]
        outputs = plain.generate_batch(prompts, [GREEDY] * 4)
    finally:
        del plain.target_runner.forward
    assert rows[0][0] == 2  # the prefill: two distinct prompts
    assert outputs[:3] == [plain.generate(prompts[0], GREEDY)] * 3
    assert outputs[3] == plain.generate(prompts[3], GREEDY)


# --------------------------------------------------------------------------- distributions
def chi_square(counts: torch.Tensor, probs: torch.Tensor) -> tuple[float, int]:
    """Pearson's statistic and degrees of freedom, pooling outcomes expected fewer than 5 times."""
    expected = probs * counts.sum()
    big = expected >= 5
    observed = torch.cat([counts[big], counts[~big].sum().reshape(1)])
    expected = torch.cat([expected[big], expected[~big].sum().reshape(1)])
    keep = expected > 0
    stat = float(((observed[keep] - expected[keep]) ** 2 / expected[keep]).sum())
    return stat, int(keep.sum()) - 1


def chi_square_critical(df: int, z: float = 3.09) -> float:
    """Upper 0.1% point of the chi-square distribution (Wilson-Hilferty)."""
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


def test_rejection_rule_emits_the_target_distribution_whatever_the_draft():
    """Target p and draft q over 6 tokens, q far from p (and zero where p is not): the tokens
    the rule emits at the first and the second position follow p, not q."""
    p = torch.tensor([0.30, 0.25, 0.20, 0.15, 0.10, 0.0], dtype=torch.float64)
    q = torch.tensor([0.05, 0.05, 0.10, 0.0, 0.30, 0.50], dtype=torch.float64)
    logits = p.clamp(min=1e-300).log().expand(3, 6)  # the same target distribution at every position
    first, second = torch.zeros(6), torch.zeros(6)
    accepted_total = 0
    trials = 20000
    for trial in range(trials):
        params = SamplingParams(temperature=1.0, seed=trial)
        proposals = [sample(q, keyed_uniform(trial, i, 1)) for i in range(2)]
        accepted, token = accept_proposals(logits, proposals, params, 0, q.expand(2, 6))
        emitted = proposals[:accepted] + [token]
        first[emitted[0]] += 1
        if len(emitted) > 1:
            second[emitted[1]] += 1
        accepted_total += accepted
    for counts in (first, second):
        stat, df = chi_square(counts, p)
        assert stat < chi_square_critical(df)
        assert counts[5] == 0  # a token the target never emits is never emitted
        assert chi_square(counts, q)[0] > 100 * chi_square_critical(df)
    # acceptance probability per token is sum(min(p, q)) = 0.05+0.05+0.10+0+0.10+0 = 0.30
    first_accepted = first.sum()  # every trial emits a first token
    assert first_accepted == trials
    assert abs(accepted_total / trials - (0.30 + 0.30 * 0.30)) < 0.02


def test_speculative_sampling_end_to_end_matches_the_models_distribution(tmp_path):
    """A 7-token model sampled two tokens at a time with a draft model: the empirical
    distribution of the 49 possible continuations matches the target's exact probabilities."""
    from kuberft_core.models import build_tiny_model

    target_dir = build_tiny_model(tmp_path / "t", alphabet="abc", hidden_size=16, num_layers=1, intermediate_size=32, seed=5)
    draft_dir = build_tiny_model(tmp_path / "d", alphabet="abc", hidden_size=16, num_layers=1, intermediate_size=32, seed=6)
    config = ServeConfig(model=ModelSpec(name=str(target_dir), dtype="float64"),
                         speculator=SpeculatorSpec(type="draft", draft_model=str(draft_dir), num_speculative_tokens=2, adaptive=False),
                         device="cpu", max_batch_size=512)
    engine = build_engine(config)
    prompt = engine.tokenizer.encode("abcab")
    n = 6000
    params = [SamplingParams(max_tokens=2, temperature=1.5, seed=s, ignore_eos=True) for s in range(n)]
    outputs = engine.generate_batch([prompt] * n, params)
    vocab = 7
    counts = torch.zeros(vocab * vocab)
    for first, second in outputs:
        counts[first * vocab + second] += 1

    model = engine.target_runner.model
    with torch.no_grad():
        p1 = torch.softmax(model(torch.tensor([prompt])).logits[0, -1].double() / 1.5, -1)
        continued = torch.tensor([prompt + [t] for t in range(vocab)])
        p2 = torch.softmax(model(continued).logits[:, -1].double() / 1.5, -1)
    exact = (p1[:, None] * p2).reshape(-1)
    stat, df = chi_square(counts, exact)
    assert stat < chi_square_critical(df)
    drafted = engine.speculator.runner.model
    with torch.no_grad():
        q1 = torch.softmax(drafted(torch.tensor([prompt])).logits[0, -1].double() / 1.5, -1)
    assert chi_square(counts.reshape(vocab, vocab).sum(1), q1)[0] > chi_square_critical(vocab - 1)


def test_a_draft_identical_to_the_model_has_every_proposal_accepted(patterned_dir):
    """The draft's own cache and positions are right: drafting with the model itself proposes
    exactly what the model then says, at every proposal length (fixed k: with the adaptive
    controller the number of proposals followed the machine's timings)."""
    for k in (1, 2, 3, 4):
        config = ServeConfig(model=ModelSpec(name=str(patterned_dir), dtype="float64"),
                             speculator=SpeculatorSpec(type="draft", draft_model=str(patterned_dir), num_speculative_tokens=k, adaptive=False),
                             device="cpu", max_batch_size=8)
        engine = build_engine(config)
        engine.speculator.confidence_threshold = 0.0
        prompts = [encode(engine, t) for t in PROMPTS]
        params = [SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True) for n in (9, 30, 17, 25, 12)]
        engine.generate_batch(prompts, params)
        assert engine.stats["proposed"] > 40, k
        assert engine.stats["accepted"] == engine.stats["proposed"], k


def test_what_the_k_controller_learned_outlives_the_request(tiny_dir, adapter_dir, draft_dir, heads_dir):
    """A group ends with its last request; the next request of the same model starts from the
    acceptance and step costs measured so far, not from the prior."""
    engine = make_engine(tiny_dir, adapter_dir, draft_dir, heads_dir, "ngram", k=4, adaptive=True)
    engine.generate(encode(engine, PROMPTS[3]), GREEDY)
    controller = engine.controllers[None]
    steps = controller.steps
    assert steps > 0 and not engine.groups
    engine.generate(encode(engine, PROMPTS[4]), GREEDY)
    assert engine.controllers[None] is controller and controller.steps > steps
