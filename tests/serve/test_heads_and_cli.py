"""Speculation heads trained by self-distillation (`kuberft serve train-heads`, and at start-up
with --train-heads) propose what the model will say; the CLI explains itself, reads a
TurboDeployment's spec document (`--config`) or flags into the same setup, and refuses incomplete
command lines and bad documents naming the field."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

import kuberft_serve.server
from kuberft_core.api import ModelSpec, SpeculatorSpec
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
        speculator = SpeculatorSpec(type="heads", heads_path=str(heads_dir), num_speculative_tokens=3, adaptive=False)
        return build_engine(ServeConfig(model=ModelSpec(name=str(patterned_dir), dtype="float32"), adapters={"tuned": str(adapter)},
                                        speculator=speculator, device="cpu", max_batch_size=16))

    trained_rate = acceptance(engine(out), PROMPTS, "tuned")
    untrained_rate = acceptance(engine(untrained), PROMPTS, "tuned")
    assert trained_rate > 0.5
    assert trained_rate > untrained_rate + 0.3, (trained_rate, untrained_rate)


def test_train_heads_at_start_up_saves_them_and_serves_with_them(tiny_dir, tmp_path):
    heads_dir = tmp_path / "startup-heads"
    model = ModelSpec(name=str(tiny_dir), dtype="float64")
    speculator = SpeculatorSpec(type="heads", heads_path=str(heads_dir), train_heads=True, num_speculative_tokens=2)
    engine = build_engine(ServeConfig(model=model, speculator=speculator, device="cpu"))
    assert (heads_dir / "heads.safetensors").is_file()
    plain = build_engine(ServeConfig(model=model, speculator=SpeculatorSpec(type="none"), device="cpu"))
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
        build_engine(ServeConfig(model=ModelSpec(name=str(tiny_dir)), speculator=SpeculatorSpec(type="heads", heads_path=str(tmp_path / "wrong")),
                                 device="cpu"))


@pytest.mark.parametrize(
    "argv, message",
    [
        (["serve", "--port", "9"], "--model is required (or --config FILE)"),
        (["serve", "--model", "m", "--speculator", "draft"], "--draft-model (speculator.draftModel): type draft needs draftModel"),
        (["serve", "--model", "m", "--speculator", "heads"], "--heads (speculator.headsPath): type heads needs headsPath or trainHeads: true"),
        (["serve", "--model", "m", "--num-speculative-tokens", "0"],
         "--num-speculative-tokens (speculator.numSpeculativeTokens): Input should be greater than or equal to 1"),
        (["serve", "--model", "m", "--adapter", "a=/x", "--adapter", "a=/y"], "the name 'a' is used twice"),
        (["serve", "--model", "m", "--heads", "/h1", "--heads", "m=/h2"], "--heads m=/h2: heads for 'm' are given twice"),
        (["serve", "--config", "serve.json", "--model", "m", "--port", "9"], "--model, --port: not with --config"),
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
    for phrase in ("ngram", "prompt lookup", "--draft-model", "Medusa-style", "/v1/chat/completions", "train-heads", "--config FILE"):
        assert phrase in text


@pytest.fixture
def served(monkeypatch):
    """The ServeConfig each `kuberft serve` would serve (the server is not started)."""
    configs = []
    monkeypatch.setattr(kuberft_serve.server, "run_server", configs.append)
    return configs


def test_a_spec_document_and_the_same_flags_give_one_serving_setup(tmp_path, served):
    document = {
        "model": {"name": "tiny:countdown", "dtype": "float32"},
        "adapter": {"name": "tuned", "uri": "/adapters/tuned"},
        "speculator": {"type": "heads", "headsPath": "/heads/tuned", "numSpeculativeTokens": 3, "adaptive": False},
        "maxBatchSize": 4,
        "port": 9001,
    }
    (tmp_path / "serve.json").write_text(json.dumps(document))
    assert main(["serve", "--config", str(tmp_path / "serve.json"), "--device", "cpu", "--seed", "7"]) == 0
    assert main(["serve", "--model", "tiny:countdown", "--dtype", "float32", "--adapter", "tuned=/adapters/tuned", "--speculator", "heads",
                 "--heads", "/heads/tuned", "--num-speculative-tokens", "3", "--no-adaptive", "--max-batch-size", "4", "--port", "9001",
                 "--device", "cpu", "--seed", "7"]) == 0
    from_file, from_flags = served
    assert from_file == from_flags
    assert (from_file.model.name, from_file.adapters, from_file.speculator.heads_path) == ("tiny:countdown", {"tuned": "/adapters/tuned"}, "/heads/tuned")
    assert (from_file.speculator.num_speculative_tokens, from_file.max_batch_size, from_file.port, from_file.device) == (3, 4, 9001, "cpu")


def test_flags_left_out_take_the_api_defaults(served):
    assert main(["serve", "--model", "tiny:countdown"]) == 0
    assert (served[0].model, served[0].speculator) == (ModelSpec(name="tiny:countdown"), SpeculatorSpec())
    assert (served[0].max_batch_size, served[0].port) == (8, 8000)


def test_named_heads_of_other_served_models_stay_apart_from_the_default_models(served):
    assert main(["serve", "--model", "base", "--adapter", "a=/a", "--adapter", "b=/b", "--speculator", "heads",
                 "--heads", "a=/heads/a", "--heads", "b=/heads/b"]) == 0
    assert (served[0].speculator.heads_path, served[0].heads_by_model) == ("/heads/a", {"b": "/heads/b"})


@pytest.mark.parametrize(
    "content, problem",
    [
        ('{"model": {"name": "m"}, "speculator": {"numSpeculativeTokens": 40}}', "speculator.numSpeculativeTokens: Input should be less than or equal to 32"),
        ('{"model": {"name": "m"}, "speculator": {"type": "draft"}}', "speculator.draftModel: type draft needs draftModel"),
        ('{"model": {"name": "m"}, "maxBatchsize": 4}', "maxBatchsize: unknown field"),
        ('{"speculator": {"type": "ngram"}}', "model: required field is missing"),
        ('{"model": {"name": "m"}, "adapter": {"fromRFTJob": "demo"}}', "adapter.fromRFTJob: the operator resolves this to adapter.uri"),
        ('{"model": {"name": "m"}, "adapters": [{"name": "a", "uri": "/a"}, {"name": "b", "fromRFTJob": "demo"}]}',
         "adapters[1].fromRFTJob: the operator resolves this to adapters[1].uri"),
        ('{"model": {"name": "m"', "not valid YAML"),
    ],
)
def test_a_bad_spec_document_is_refused_naming_the_field(tmp_path, served, capsys, content, problem):
    path = tmp_path / "serve.json"
    path.write_text(content)
    assert main(["serve", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"kuberft serve: {path}: {problem}" in err
    assert served == []


def test_a_turbo_deployment_manifest_serves_as_its_spec(tmp_path, served):
    import yaml

    example = yaml.safe_load((Path(__file__).resolve().parents[2] / "examples" / "turbodeployment.yaml").read_text())
    example["spec"]["adapter"] = {"uri": "/adapters/kernels", "name": "kernels"}
    (tmp_path / "turbo.yaml").write_text(yaml.safe_dump(example))
    assert main(["serve", "--config", str(tmp_path / "turbo.yaml")]) == 0
    assert (served[0].model.name, served[0].adapters) == ("Qwen/Qwen2.5-Coder-7B-Instruct", {"kernels": "/adapters/kernels"})
    assert (served[0].speculator.type, served[0].speculator.train_heads) == ("heads", True)


def test_a_manifest_of_several_adapters_serves_them_all_within_its_adapter_limits(tmp_path, served, capsys):
    import yaml

    example = yaml.safe_load((Path(__file__).resolve().parents[2] / "examples" / "turbodeployment-adapters.yaml").read_text())
    example["spec"]["adapters"] = [{"name": "kernels", "uri": "/adapters/kernels"}, {"name": "sql", "uri": "/adapters/sql"}]
    (tmp_path / "turbo.yaml").write_text(yaml.safe_dump(example))
    assert main(["serve", "--config", str(tmp_path / "turbo.yaml")]) == 0
    assert served[0].adapters == {"kernels": "/adapters/kernels", "sql": "/adapters/sql"}
    assert (served[0].max_loras, served[0].max_lora_memory_mib) == (8, None)
    with pytest.raises(SystemExit):
        main(["serve", "--config", str(tmp_path / "turbo.yaml"), "--max-loras", "2"])
    assert "--max-loras: not with --config" in capsys.readouterr().err
