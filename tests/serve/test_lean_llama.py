"""The lean draft forward computes what transformers computes for the same Llama weights, through
the same `SequenceBatch` steps the draft speculator takes: a left-padded prefill, several tokens
fed at once, a rollback that leaves a hole, and one token at a time after it."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from kuberft_core.api import ModelSpec, SpeculatorSpec
from kuberft_serve.config import ServeConfig
from kuberft_serve.kv_batch import ModelRunner, SequenceBatch
from kuberft_serve.lean_llama import LeanRunner
from kuberft_serve.loading import build_engine


def logits_through_a_batch(runner) -> list[torch.Tensor]:
    batch = SequenceBatch(runner)
    outputs = [batch.prefill([[3, 4, 5, 6, 7, 8], [9, 10, 11]], pad_id=0).logits[:, -1]]
    outputs.append(batch.extend(torch.tensor([[4, 5, 6], [7, 8, 0]])).logits)
    batch.commit([3, 1])  # row 1 keeps one of three slots: two holes, masked from now on
    for token in ([[5], [6]], [[7], [8]]):
        outputs.append(batch.extend(torch.tensor(token)).logits)
        batch.commit([1, 1])
    return outputs


def test_lean_forward_gives_the_logits_of_transformers_for_the_same_weights(draft_dir):
    model = AutoModelForCausalLM.from_pretrained(draft_dir, dtype=torch.float64).eval()
    assert LeanRunner.supports(model)
    reference = logits_through_a_batch(ModelRunner(model))
    lean = logits_through_a_batch(LeanRunner(model))
    for theirs, ours in zip(reference, lean):
        assert ours.shape == theirs.shape
        # transformers' RMSNorm computes in float32 whatever the model's dtype; ours in float64
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)
        assert torch.equal(ours.argmax(dim=-1), theirs.argmax(dim=-1))


def test_the_draft_speculator_runs_the_lean_forward_for_a_llama_draft(tiny_dir, draft_dir):
    engine = build_engine(ServeConfig(model=ModelSpec(name=str(tiny_dir), dtype="float64"),
                                      speculator=SpeculatorSpec(type="draft", draft_model=str(draft_dir)), device="cpu"))
    assert isinstance(engine.speculator.runner, LeanRunner)


def test_the_target_runs_the_lean_forward_on_the_cpu_with_its_adapters_and_peft_for_dora(tiny_dir, adapter_dir, tmp_path):
    from peft import LoraConfig, get_peft_model

    dora = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_dir), LoraConfig(r=2, target_modules=["q_proj"], use_dora=True))
    dora.save_pretrained(tmp_path)
    model = ModelSpec(name=str(tiny_dir), dtype="float32")
    none = SpeculatorSpec(type="none")
    plain = build_engine(ServeConfig(model=model, speculator=none, device="cpu"))
    adapted = build_engine(ServeConfig(model=model, adapters={"tuned": str(adapter_dir)}, speculator=none, device="cpu"))
    with_dora = build_engine(ServeConfig(model=model, adapters={"tuned": str(adapter_dir), "dora": str(tmp_path)}, speculator=none, device="cpu"))
    assert isinstance(plain.target_runner, LeanRunner)
    assert isinstance(adapted.target_runner, LeanRunner) and list(adapted.target_runner.adapters) == ["tuned"]
    assert isinstance(with_dora.target_runner, ModelRunner)


@pytest.mark.parametrize("speculator", ["ngram", "draft", "heads"])
def test_greedy_speculation_on_the_lean_target_equals_its_plain_decoding(tiny_dir, draft_dir, tmp_path, speculator):
    from kuberft_serve.heads import MedusaHeads
    from kuberft_serve.sampling import SamplingParams

    torch.manual_seed(4)
    heads = MedusaHeads.for_model(AutoModelForCausalLM.from_pretrained(tiny_dir), num_heads=4)
    torch.nn.init.normal_(heads.block.weight, std=0.3)
    heads.save(tmp_path)

    def engine(name):
        spec = SpeculatorSpec(type=name, draft_model=str(draft_dir), heads_path=str(tmp_path), num_speculative_tokens=4)
        return build_engine(ServeConfig(model=ModelSpec(name=str(tiny_dir), dtype="float64"), speculator=spec, device="cpu", max_batch_size=4))

    plain, fast = engine("none"), engine(speculator)
    assert isinstance(fast.target_runner, LeanRunner)
    prompts = [plain.tokenizer.encode(t) for t in ("abc abc ab", "hello, ", "a", "jig jag jig jag ")]
    params = [SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True) for n in (30, 12, 25, 40)]
    expected = [plain.generate(p, sp) for p, sp in zip(prompts, params)]
    assert fast.generate_batch(prompts, params) == expected  # batched: holes and rollbacks per row
    assert fast.stats["proposed"] > 0


def test_plain_decoding_on_the_lean_target_writes_what_transformers_generate_writes(tiny_dir):
    from kuberft_serve.sampling import SamplingParams

    engine = build_engine(ServeConfig(model=ModelSpec(name=str(tiny_dir), dtype="float32"), speculator=SpeculatorSpec(type="none"), device="cpu"))
    assert isinstance(engine.target_runner, LeanRunner)
    model = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).eval()
    for text in ("abc abc ab", "hello, ", "a", "the cafe. the cafe. the"):
        ids = engine.tokenizer.encode(text)
        reference = model.generate(torch.tensor([ids]), max_new_tokens=40, do_sample=False, eos_token_id=None)
        assert engine.generate(ids, SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)) == reference[0, len(ids):].tolist()


def test_the_lean_cache_writes_new_slots_in_place_and_follows_rollback_select_and_merge(draft_dir):
    """Keys and values live in buffers with spare slots: a step writes its slots in place (no copy
    of the cache), a rollback keeps the buffer, and rows leaving or joining move it to a new one;
    through all of it the logits stay those of transformers' own cache."""
    model = AutoModelForCausalLM.from_pretrained(draft_dir, dtype=torch.float64).eval()

    def steps(runner) -> list[torch.Tensor]:
        batch = SequenceBatch(runner)
        outputs = [batch.prefill([[3, 4, 5, 6, 7, 8], [9, 10, 11], [12, 13]], pad_id=0).logits[:, -1]]
        outputs.append(batch.extend(torch.tensor([[4, 5, 6], [7, 8, 0], [1, 2, 3]])).logits)
        batch.commit([2, 1, 2])  # the last slot of every row rolled back: the cache is cut
        outputs.append(batch.extend(torch.tensor([[5], [6], [7]])).logits)
        batch.commit([1, 1, 1])
        batch.select([0, 2])  # row 1 finished
        fresh = SequenceBatch(runner)
        outputs.append(fresh.prefill([[14, 15, 16, 17]], pad_id=0).logits[:, -1])
        batch.merge(fresh)
        for token in ([[8], [9], [10]], [[11], [12], [13]]):
            outputs.append(batch.extend(torch.tensor(token)).logits)
            batch.commit([1, 1, 1])
        return outputs

    reference = steps(ModelRunner(model))
    lean = steps(LeanRunner(model))
    for theirs, ours in zip(reference, lean):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)

    batch = SequenceBatch(LeanRunner(model))
    batch.prefill([[3, 4, 5], [6, 7, 8]], pad_id=0)
    layer = batch.cache.layers[0]
    buffer = layer.keys.data_ptr()
    batch.extend(torch.tensor([[1, 2, 3], [4, 5, 6]]))
    batch.commit([3, 2])
    assert layer.keys.data_ptr() == buffer and layer.keys.shape[2] == 6  # written in place
    batch.extend(torch.tensor([[1, 2], [3, 4]]))
    batch.commit([1, 1])  # the trailing slot is cut off: a view of the same buffer
    assert layer.keys.data_ptr() == buffer and layer.keys.shape[2] == 7
    batch.extend(torch.tensor([[5], [6]]))
    batch.commit([1, 1])
    assert layer.keys.data_ptr() == buffer and layer.keys.shape[2] == 8
    batch.select([1])
    batch.extend(torch.tensor([[7]]))
    assert layer.keys.data_ptr() != buffer and layer.keys.shape[:3] == (1, model.config.num_key_value_heads, 9)


def test_a_verify_pass_with_row_lengths_computes_only_their_tokens_and_the_same_logits(draft_dir):
    """`lengths` packs the tokens that count (rows proposing fewer than the widest are padded):
    their logits are those of the padded pass, the padding's are zeros, and the cache is the same."""
    model = AutoModelForCausalLM.from_pretrained(draft_dir, dtype=torch.float64).eval()
    runner = LeanRunner(model)
    assert runner.packs_rows

    def verify(lengths):
        batch = SequenceBatch(runner)
        batch.prefill([[3, 4, 5, 6], [9, 10]], pad_id=0)
        logits = batch.extend(torch.tensor([[4, 5, 6], [7, 0, 0]]), lengths=lengths).logits
        batch.commit([3, 1])
        return logits, batch.extend(torch.tensor([[7], [8]])).logits

    (padded, after_padded), (packed, after_packed) = verify(None), verify([3, 1])
    torch.testing.assert_close(packed[0], padded[0], rtol=0, atol=1e-9)
    torch.testing.assert_close(packed[1, :1], padded[1, :1], rtol=0, atol=1e-9)
    assert not packed[1, 1:].any()
    torch.testing.assert_close(after_packed, after_padded, rtol=0, atol=1e-9)
