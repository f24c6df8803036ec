"""The engine's small parts: the adaptive choice of k, prompt lookup, keyed sampling and the
streaming of text around stop strings."""

from __future__ import annotations

import pytest
import torch

from kuberft_serve.engine import Sequence, SpeculationController, TextTracker
from kuberft_serve.sampling import SamplingParams, TokenLogprob, keyed_uniform, sample, warp
from kuberft_serve.speculators import NgramSpeculator


def feed(controller: SpeculationController, alpha: float, verify_ms, steps: int = 400) -> None:
    """Steps whose acceptance follows a geometric model with per-token acceptance alpha."""
    import random

    rng = random.Random(0)
    for _ in range(steps):
        k = controller.next_k()
        accepted = 0
        while accepted < k and rng.random() < alpha:
            accepted += 1
        controller.observe(k, [k], [accepted], propose_s=0.0001 * k, verify_s=verify_ms(k + 1) / 1000)


def test_flat_verify_cost_and_high_acceptance_propose_the_most_tokens():
    controller = SpeculationController(max_k=8, adaptive=True)
    feed(controller, 0.9, lambda n: 10.0)
    assert controller.k == 8
    assert abs(controller.alpha - 0.9) < 0.08


def test_a_verify_cost_that_grows_with_width_and_poor_acceptance_propose_few_tokens():
    controller = SpeculationController(max_k=8, adaptive=True)
    feed(controller, 0.3, lambda n: 10.0 * (1 + 0.5 * (n - 1)))
    assert controller.k == 1


def test_without_adaptation_k_stays_fixed():
    controller = SpeculationController(max_k=5, adaptive=False)
    feed(controller, 0.1, lambda n: 10.0 * n)
    assert {controller.next_k() for _ in range(40)} == {5}


def test_prompt_lookup_proposes_what_followed_the_latest_match():
    ngram = NgramSpeculator(max_ngram=3)
    context = [1, 2, 3, 9, 9, 1, 2, 3, 7, 8, 5, 1, 2, 3]
    assert ngram.lookup(context, 3) == [7, 8, 5]  # the latest earlier "1 2 3" is followed by 7 8 5
    assert ngram.lookup([4, 5, 6], 2) == []  # nothing repeats
    assert ngram.lookup([5, 6, 5], 4) == [6, 5]  # one-token match, proposals cut at the end
    # the latest "1 2" is followed by only 2 tokens: the earlier one that 3 follow is taken
    context = [1, 2, 7, 8, 9, 1, 2, 1, 2]
    assert ngram.lookup(context, 3) == [7, 8, 9]
    assert ngram.lookup(context, 2) == [1, 2]


def test_keyed_uniforms_depend_only_on_seed_position_and_stream():
    assert keyed_uniform(7, 3) == keyed_uniform(7, 3)
    values = {keyed_uniform(7, p) for p in range(1000)}
    assert len(values) == 1000 and all(0 <= v < 1 for v in values)
    assert keyed_uniform(7, 3, 1) != keyed_uniform(7, 3, 0) != keyed_uniform(8, 3, 0)
    assert abs(sum(values) / 1000 - 0.5) < 0.05


def test_top_p_keeps_the_smallest_set_reaching_p_and_zero_mass_is_never_sampled():
    probs = warp(torch.tensor([2.0, 1.0, 0.5, -1.0]).log_softmax(-1) * 1.0, temperature=1.0, top_p=0.7)
    assert probs[2] == 0 and probs[3] == 0
    assert abs(float(probs.sum()) - 1) < 1e-12
    drawn = {sample(probs, keyed_uniform(0, i)) for i in range(500)}
    assert drawn == {0, 1}


class CharTokenizer:
    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(i) for i in ids)


@pytest.mark.parametrize("stop", [["END"], ["xx", "END"]])
def test_text_is_streamed_without_ever_showing_part_of_a_stop_string(stop):
    tracker = TextTracker(CharTokenizer(), stop)
    shown, ids = "", []
    for char in "hello EN, then E END and more":
        ids.append(ord(char))
        tracker.update(ids)
        shown += tracker.take(final=tracker.stopped)
        if tracker.stopped:
            break
    assert tracker.stopped
    assert shown == "hello EN, then E "


def test_a_stop_inside_a_multi_token_step_ends_the_output_where_one_token_steps_would():
    """A speculative step emits several tokens at once; the output (and its logprobs) ends with
    the token that completed the stop string or was the stop token, as in plain decoding."""
    def step_logprobs(text):
        return [TokenLogprob(ord(c), -0.5, 1, []) for c in text]

    for stop, text, reason in [({"stop": ["END"]}, "abc", "END"), ({"stop_token_ids": [ord("D")]}, "abcEND", ord("D"))]:
        seq = Sequence([1], SamplingParams(max_tokens=50, logprobs=0, **stop), text=TextTracker(CharTokenizer(), stop.get("stop", [])))
        seq.emit([ord(c) for c in "ab"], set(), step_logprobs("ab"))
        assert not seq.finished
        seq.emit([ord(c) for c in "cENDxy"], set(), step_logprobs("cENDxy"))
        assert "".join(map(chr, seq.output_ids)) == "abcEND"
        assert [e.token for e in seq.logprobs] == seq.output_ids
        assert (seq.finish_reason, seq.stop_reason, seq.output_text) == ("stop", reason, text)


def test_the_incremental_ngram_index_proposes_what_the_lookup_of_the_whole_context_proposes():
    import random

    from kuberft_serve.speculators import NgramIndex

    rng = random.Random(0)
    for _ in range(400):
        max_ngram = rng.randint(1, 4)
        min_ngram = rng.randint(1, max_ngram)
        ngram, index = NgramSpeculator(max_ngram=max_ngram, min_ngram=min_ngram), NgramIndex(min_ngram, max_ngram)
        vocab = rng.choice([2, 3, 5, 20])
        prompt, output = [rng.randrange(vocab) for _ in range(rng.randint(1, 20))], []
        for _ in range(20):  # the output grows by a few tokens a step, as speculation emits them
            k = rng.randint(1, 5)
            assert index.lookup(prompt, output, k) == ngram.lookup(prompt + output, k)
            output.extend(rng.randrange(vocab) for _ in range(rng.randint(1, 4)))
    # a context it did not follow (another row's) is indexed afresh
    assert index.lookup([1, 2, 3, 1, 2], [], 2) == [3, 1]
