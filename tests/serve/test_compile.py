"""`kuberft serve --compile`: the lean CPU forward compiled with torch.compile at start-up. The
compiled passes give eager's logits and output, every shape the engine feeds after the warm-up
reuses a graph compiled then (none is compiled during a request), and where compiling cannot
happen the server says why instead of starting slow or half-compiled."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

from kuberft_serve.engine import Engine, Sequence
from kuberft_serve.kv_batch import SequenceBatch
from kuberft_serve.lean_llama import LeanRunner
from kuberft_serve.loading import target_runner
from kuberft_serve.sampling import SamplingParams
from kuberft_serve.speculators import NgramSpeculator

from .test_multi_adapter import save_adapter


def test_the_compile_flag_reaches_the_config_with_flags_or_a_spec_file(tmp_path, monkeypatch):
    import kuberft_serve.server
    from kuberft_operator.cli import main

    served = []
    monkeypatch.setattr(kuberft_serve.server, "run_server", served.append)
    (tmp_path / "serve.json").write_text(json.dumps({"model": {"name": "tiny:countdown"}}))
    assert main(["serve", "--config", str(tmp_path / "serve.json"), "--compile"]) == 0
    assert main(["serve", "--model", "tiny:countdown", "--compile"]) == 0
    assert main(["serve", "--model", "tiny:countdown"]) == 0
    assert [c.compile for c in served] == [True, True, False]


def test_compile_is_refused_with_the_reason_where_the_lean_forward_does_not_serve(tiny_dir, tmp_path):
    from peft import LoraConfig, get_peft_model

    biased = AutoModelForCausalLM.from_config(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                                          num_attention_heads=2, num_key_value_heads=1, attention_bias=True))
    with pytest.raises(ValueError, match="LlamaForCausalLM is not a plain Llama-architecture model"):
        target_runner(biased, adapters={}, device=torch.device("cpu"), compile=True)
    runner, _ = target_runner(biased, adapters={}, device=torch.device("cpu"))  # without compile it is served, by transformers
    assert not isinstance(runner, LeanRunner)

    dora = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_dir), LoraConfig(r=2, target_modules=["q_proj"], use_dora=True))
    dora.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="compile: the adapters need transformers' forward"):
        target_runner(AutoModelForCausalLM.from_pretrained(tiny_dir), adapters={"dora": str(tmp_path)}, device=torch.device("cpu"),
                      compile=True)


def through_a_batch(runner) -> list[torch.Tensor]:
    """Logits of passes of every family, at sizes the warm-up did not use: 3 rows of different
    lengths (holes), widths 1, 2 and 5, a rollback, a row leaving, a longer cache."""
    batch = SequenceBatch(runner)
    outputs = [batch.prefill([[3, 4, 5, 6, 7, 8, 9, 10, 11], [9, 10, 11], [5] * 30], pad_id=0).logits]
    for width, keep in ((5, [5, 2, 5]), (1, [1, 1, 1]), (2, [2, 2, 2])):
        outputs.append(batch.extend(torch.arange(3, 3 + 3 * width).view(3, width) % 12 + 1, lengths=[width] * 3).logits)
        batch.commit(keep)
    batch.select([0])
    for width in (1, 5, 2, 1):
        outputs.append(batch.extend(torch.arange(width)[None] + 4).logits)
        batch.commit([width])
    return outputs


@pytest.mark.slow
def test_the_compiled_forward_gives_eagers_logits_and_output_and_compiles_nothing_after_start_up(patterned_dir, tmp_path):
    from torch._dynamo.utils import counters

    model = AutoModelForCausalLM.from_pretrained(patterned_dir, dtype=torch.float64).eval()
    adapter = save_adapter(patterned_dir, tmp_path / "tuned", 5, r=4, target_modules=["q_proj", "v_proj", "down_proj"])
    compiled, weights = target_runner(model, adapters={"tuned": str(adapter)}, device=torch.device("cpu"), compile=True)
    eager = LeanRunner(model)
    graphs = counters["stats"]["unique_graphs"]
    calls = []
    run = compiled._compiled_run
    compiled._compiled_run = lambda *args: calls.append(args[0].shape) or run(*args)

    for ours, theirs in zip(through_a_batch(compiled), through_a_batch(eager)):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-9)
    assert len(calls) == 7  # every pass but the prefill
    assert {tuple(shape) for shape in calls} >= {(3, 5), (3, 1), (1, 1), (1, 5)}

    # the engine, greedy and sampled, plain and speculating, with an adapter's rows in the batch
    # (those take the eager forward): the same tokens as without compiling
    tokenizer = AutoTokenizer.from_pretrained(patterned_dir)
    prompts = [tokenizer.encode(text) for text in ("a big cafe, a big", "he fed a dog\nhe", "jab, jab, hi. jab", "i hid")]
    requests = [(prompts[0], SamplingParams(max_tokens=40, temperature=0.0), None),
                (prompts[1], SamplingParams(max_tokens=30, temperature=0.0), None),
                (prompts[2], SamplingParams(max_tokens=35, temperature=0.8, seed=7), None),
                (prompts[3], SamplingParams(max_tokens=25, temperature=0.0), "tuned")]

    def decode(runner, speculator):
        engine = Engine(runner, tokenizer, speculator, num_speculative_tokens=4, max_batch_size=4)
        engine.adapters.register("tuned", str(adapter), weights["tuned"] if runner is compiled else runner.read_adapter(str(adapter)))
        seqs = [engine.submit(Sequence(list(prompt), params, name)) for prompt, params, name in requests]
        while not all(seq.finished for seq in seqs):
            engine.step()
        alone = engine.generate(prompts[0], SamplingParams(max_tokens=40, temperature=0.0))  # one row: the batch-of-one graphs
        return [seq.output_ids for seq in seqs] + [alone], engine.stats

    for speculator in (None, NgramSpeculator()):
        calls.clear()
        ours, stats = decode(compiled, speculator)
        theirs, _ = decode(eager, speculator)
        assert ours == theirs
        assert calls and (speculator is None or stats["accepted"] > 0)
    assert counters["stats"]["unique_graphs"] == graphs  # nothing compiled after start-up


@pytest.mark.slow
def test_without_a_cpp_compiler_compile_fails_at_start_up_saying_so(draft_dir, monkeypatch):
    import torch._inductor.config as inductor

    monkeypatch.setattr(inductor.cpp, "cxx", ("no-such-c++-compiler",))
    monkeypatch.setattr(inductor, "fx_graph_cache", False)  # a cached graph would need no compiler
    runner = LeanRunner(AutoModelForCausalLM.from_pretrained(draft_dir, dtype=torch.float32))
    with pytest.raises(RuntimeError, match=r"torch.compile could not build the forward pass \(its CPU backend needs a C\+\+ compiler"):
        runner.compile()
    assert runner._compiled_run is None  # and it serves, eagerly
    batch = SequenceBatch(runner)
    batch.prefill([[3, 4, 5]], pad_id=0)
    assert batch.extend(torch.tensor([[6, 7]])).logits.shape[:2] == (1, 2)
