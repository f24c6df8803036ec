"""Speculation heads trained by self-distillation (`kuberft serve train-heads`, and at start-up
with --train-heads) propose what the model will say; the CLI explains itself and refuses
incomplete command lines."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from kuberft_operator.cli import main
from kuberft_serve.config import ServeConfig
from kuberft_serve.heads import MedusaHeads
from kuberft_serve.loading import build_engine
from kuberft_serve.sampling import SamplingParams

PROMPTS = ["abc abc", "hello, ", "a cafe", "jig jag", "bad bed", "ace. ace.", "fig, ", "j", "head ", "dice", "gab", "i, e"]


def acceptance(engine, prompts, adapter=None) -> float:
    engine.stats = dict.fromkeys(engine.stats, 0)
    params = [SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)] * len(prompts)
    engine.generate_batch([engine.tokenizer.encode(p) for p in prompts], params, adapter)
    return engine.stats["accepted"] / engine.stats["proposed"]


def test_train_heads_command_writes_heads_that_predict_the_adapted_models_output(patterned_dir, tmp_path):
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    out = tmp_path / "heads"
    adapter = patterned_dir / "adapter"
    code = main(["serve", "train-heads", "--model", str(patterned_dir), "--adapter", str(adapter), "--data", str(data),
                 "--output", str(out), "--num-heads", "3", "--max-new-tokens", "40", "--epochs", "20", "--learning-rate", "1e-2"])
    assert code == 0
    meta = json.loads((out / "heads.json").read_text())
    assert (meta["format"], meta["num_heads"], meta["hidden_size"]) == ("kuberft-medusa-v2", 3, 48)

    untrained = tmp_path / "untrained"
    MedusaHeads.for_model(AutoModelForCausalLM.from_pretrained(patterned_dir), 3).save(untrained)

    def engine(heads_dir):
        return build_engine(ServeConfig(model=str(patterned_dir), adapters={"tuned": str(adapter)}, speculator="heads",
                                        heads={"tuned": str(heads_dir)}, num_speculative_tokens=3, adaptive=False,
                                        device="cpu", dtype="float32", max_batch_size=16))

    trained_rate = acceptance(engine(out), PROMPTS, "tuned")
    untrained_rate = acceptance(engine(untrained), PROMPTS, "tuned")
    assert trained_rate > 0.5
    assert trained_rate > untrained_rate + 0.3, (trained_rate, untrained_rate)


def test_train_heads_at_start_up_saves_them_and_serves_with_them(tiny_dir, tmp_path):
    heads_dir = tmp_path / "startup-heads"
    config = ServeConfig(model=str(tiny_dir), speculator="heads", heads={None: str(heads_dir)}, train_heads=True,
                         num_speculative_tokens=2, device="cpu", dtype="float64")
    engine = build_engine(config)
    assert (heads_dir / "heads.safetensors").is_file()
    plain = build_engine(ServeConfig(model=str(tiny_dir), speculator="none", device="cpu", dtype="float64"))
    ids = engine.tokenizer.encode("abc abc")
    params = SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True)
    assert engine.generate(ids, params) == plain.generate(ids, params)
    assert engine.stats["proposed"] > 0


def test_the_first_link_is_fed_the_token_the_model_emitted_not_its_greedy_guess():
    torch.manual_seed(0)
    heads = MedusaHeads(torch.randn(12, 8), torch.randn(12, 8), num_heads=3)
    torch.nn.init.normal_(heads.block.weight, std=0.5)
    hidden = torch.randn(2, 8)
    greedy = (hidden @ heads.lm_head.T).argmax(dim=-1)
    sampled = (greedy + 1) % 12  # what a sampling request might have emitted instead
    with torch.no_grad():
        assert torch.equal(heads(hidden, 3, emitted=greedy), heads(hidden, 3))
        chained = heads(hidden, 3, emitted=sampled)
        assert not torch.allclose(chained, heads(hidden, 3))
        # the same as feeding the links explicitly: the emitted token, then the chain's own choices
        first = heads(hidden, 1, emitted=sampled)[:, 0]
        second = (first @ heads.lm_head.T).argmax(dim=-1)
        torch.testing.assert_close(chained[:, :2], heads(hidden, 2, tokens=torch.stack([sampled, second], dim=-1)))


def test_a_heads_directory_holds_only_the_block_and_loading_shares_the_models_weights(tiny_dir, tmp_path):
    from safetensors.torch import load_file

    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    heads = MedusaHeads.for_model(model, 3)
    torch.nn.init.normal_(heads.block.weight, std=0.1)
    heads.save(tmp_path / "heads")
    assert set(load_file(tmp_path / "heads" / "heads.safetensors")) == {"block.weight", "block.bias"}
    loaded = MedusaHeads.load(tmp_path / "heads", model)
    assert loaded.embedding.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    torch.testing.assert_close(loaded.block.weight, heads.block.weight)
    other = json.loads((tmp_path / "heads" / "heads.json").read_text())
    (tmp_path / "heads" / "heads.json").write_text(json.dumps({**other, "vocab_size": other["vocab_size"] + 1}))
    with pytest.raises(ValueError, match="trained for vocabulary"):
        MedusaHeads.load(tmp_path / "heads", model)


def test_heads_for_another_model_size_are_refused(tiny_dir, tmp_path):
    MedusaHeads(torch.zeros(10, 48), torch.zeros(10, 48), 2).save(tmp_path / "wrong")
    with pytest.raises(ValueError, match="trained for hidden size 48, the model has 32"):
        build_engine(ServeConfig(model=str(tiny_dir), speculator="heads", heads={None: str(tmp_path / "wrong")}, device="cpu"))


@pytest.mark.parametrize(
    "argv, message",
    [
        (["serve", "--port", "9"], "--model is required"),
        (["serve", "--model", "m", "--speculator", "draft"], "--speculator draft needs --draft-model"),
        (["serve", "--model", "m", "--speculator", "heads"], "--speculator heads needs --heads DIR or --train-heads"),
        (["serve", "--model", "m", "--num-speculative-tokens", "0"], "--num-speculative-tokens must be between 1 and 32"),
        (["serve", "--model", "m", "--adapter", "a=/x", "--adapter", "a=/y"], "the name 'a' is used twice"),
        (["serve", "train-heads", "--model", "m", "--output", "o", "--data", "/no/such/file"], "--data /no/such/file: no such file"),
    ],
)
def test_incomplete_command_lines_are_refused_with_the_reason(argv, message, capsys):
    with pytest.raises(SystemExit) as caught:
        main(argv)
    assert caught.value.code == 2
    assert message in capsys.readouterr().err


def test_serve_help_teaches_the_speculators_and_the_api(capsys):
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    text = capsys.readouterr().out
    for phrase in ("ngram", "prompt lookup", "--draft-model", "Medusa-style", "/v1/chat/completions", "train-heads"):
        assert phrase in text
