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


def test_a_packed_projection_computes_the_product_and_each_row_alike_whatever_the_rows():
    from kuberft_serve.lean_llama import Projection

    torch.manual_seed(0)
    weight = torch.randn(1024, 512)
    projection = Projection(weight)
    assert projection.packed == torch.backends.mkldnn.is_available()
    x = torch.randn(2, 5, 512)
    with torch.inference_mode():
        out = projection(x)
        torch.testing.assert_close(out, torch.nn.functional.linear(x, weight), rtol=1e-5, atol=1e-4)
        # a verification pass of 5 tokens computes token 0 exactly as decoding it alone does
        assert torch.equal(projection(x[:1, :1]), out[:1, :1])


def test_a_torch_without_the_internal_onednn_ops_falls_back_to_a_plain_product(monkeypatch):
    from kuberft_serve import lean_llama

    def missing(*args, **kwargs):
        raise RuntimeError("no such op")

    monkeypatch.setattr(torch.ops.mkldnn, "_reorder_linear_weight", missing, raising=False)
    weight = torch.randn(1024, 512)
    projection = lean_llama.Projection(weight)
    assert not projection.packed
    x = torch.randn(3, 512)
    torch.testing.assert_close(projection(x), torch.nn.functional.linear(x, weight))


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
