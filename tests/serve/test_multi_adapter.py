"""Many LoRA adapters on one base model: requests for different adapters (and the base) decode in
one batch, one forward pass per step, and each gets exactly the tokens of its adapter served
alone; each adapter keeps its own speculation controller and acceptance counts; adapters beyond
`max_loras` are evicted least recently used first and reloaded when asked for; vLLM's
load/unload endpoints add and remove adapters at run time.

Models run in float64 (see test_lossless.py): a row's logits then do not depend on which other
rows share its batch closely enough for any argmax or sample to flip."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import pytest
import torch
from transformers import AutoModelForCausalLM

from kuberft_core.api import ModelSpec, SpeculatorSpec
from kuberft_serve.adapter_pool import AdapterPool
from kuberft_serve.config import ServeConfig
from kuberft_serve.engine import Engine, Sequence
from kuberft_serve.kv_batch import ModelRunner
from kuberft_serve.lean_llama import LeanRunner
from kuberft_serve.loading import build_engine, load_tokenizer
from kuberft_serve.lora import AdapterError
from kuberft_serve.sampling import SamplingParams
from kuberft_serve.server import start_server

PROMPTS = ["abc abc ab", "hello, ", "jig jag jig jag ", "the cafe. the cafe. the"]


def save_adapter(tiny_dir, out, seed, **lora):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_dir), LoraConfig(init_lora_weights=False, **lora))
    model.save_pretrained(out)
    return str(out)


@pytest.fixture(scope="module")
def adapters(tiny_dir, adapter_dir, tmp_path_factory):
    """Three adapters of different ranks, scalings and target modules."""
    every = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    return {
        "tuned": str(adapter_dir),  # q, v, down; r=4, alpha=16
        "wide": save_adapter(tiny_dir, tmp_path_factory.mktemp("wide"), 5, r=8, lora_alpha=8, target_modules=every, use_rslora=True),
        "mlp": save_adapter(tiny_dir, tmp_path_factory.mktemp("mlp"), 6, r=2, lora_alpha=4, target_modules=["o_proj", "gate_proj", "up_proj"]),
    }


def make_engine(tiny_dir, adapters, speculator="none", **config) -> Engine:
    spec = SpeculatorSpec(type=speculator, num_speculative_tokens=4, adaptive=config.pop("adaptive", False))
    return build_engine(ServeConfig(model=ModelSpec(name=str(tiny_dir), dtype="float64"), adapters=adapters, speculator=spec,
                                    device="cpu", **{"max_batch_size": 16, **config}))


@pytest.fixture(scope="module")
def alone(tiny_dir, adapters):
    """Per served model (None: the base), an engine serving only it, without speculation."""
    engines = {name: make_engine(tiny_dir, {name: path}) for name, path in adapters.items()}
    engines[None] = make_engine(tiny_dir, {})
    return engines


def requests(tokenizer, sampled: bool):
    """(prompt, params, adapter) for every prompt and served model, of several lengths."""
    out = []
    for i, text in enumerate(PROMPTS):
        for j, adapter in enumerate([None, "tuned", "wide", "mlp"]):
            params = SamplingParams(max_tokens=8 + 3 * ((i + j) % 4), temperature=0.9 if sampled else 0.0, seed=100 * i + j)
            out.append((tokenizer.encode(text), params, adapter))
    return out


def decode_all(engine: Engine, reqs) -> list[list[int]]:
    seqs = [engine.submit(Sequence(list(prompt), params, adapter)) for prompt, params, adapter in reqs]
    while not all(s.finished for s in seqs):
        engine.step()
    return [s.output_ids for s in seqs]


def test_the_lean_lora_gives_the_logits_of_peft_for_each_row_of_a_mixed_batch(tiny_dir, adapters):
    from peft import PeftModel

    lean = LeanRunner(AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float64).eval())
    for name, path in adapters.items():
        lean.add_adapter(name, lean.read_adapter(path))
    ids = torch.tensor([[3, 4, 5, 6, 7], [1, 2, 3, 4, 5], [5, 5, 5, 1, 2], [7, 1, 7, 1, 7]])
    rows = ["tuned", None, "wide", "mlp"]
    mixed = lean.forward(ids, None, None, torch.arange(5).expand(4, 5), adapter=rows).logits
    for row, name in enumerate(rows):
        model = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float64).eval()
        if name is not None:
            model = PeftModel.from_pretrained(model, adapters[name]).eval()
        with torch.no_grad():
            expected = model(ids[row : row + 1]).logits[0].float()
        torch.testing.assert_close(mixed[row], expected, rtol=0, atol=1e-6)


def test_grouped_lora_gives_each_row_its_own_adapters_delta_and_the_base_rows_none(tiny_dir, adapters):
    from kuberft_serve.lora import AdapterStack

    lean = LeanRunner(AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float64).eval())
    loras = [lean.read_adapter(path) for path in adapters.values()]  # tuned, wide, mlp: different ranks and targets
    stack = AdapterStack(loras)
    row_adapter = torch.tensor([2, -1, 0, 1, 2])
    grouped = stack.for_rows(row_adapter)
    torch.manual_seed(0)
    touched = 0
    for layer in range(len(loras[0].layers)):
        for slot in range(4):
            factors = [lora.layers[layer][slot] for lora in loras]
            if all(f is None for f in factors):
                assert grouped.delta(torch.zeros(5, 3, 1, dtype=torch.float64), layer, slot) is None
                continue
            x = torch.randn(5, 3, next(f for f in factors if f is not None).a.shape[1], dtype=torch.float64)
            delta = grouped.delta(x, layer, slot)
            for row, owner in enumerate(row_adapter.tolist()):
                own = factors[owner] if owner >= 0 else None
                expected = own.delta(x[row]) if own is not None else torch.zeros_like(delta[row])
                torch.testing.assert_close(delta[row], expected, rtol=0, atol=1e-12)
                touched += own is not None
    assert touched > 10
    assert stack.nbytes() == sum(lora.nbytes for lora in loras)


def test_an_adapter_replaced_or_removed_is_not_served_from_a_stale_stack(tiny_dir, adapters):
    from kuberft_serve.lean_llama import MAX_ADAPTER_STACKS

    lean = LeanRunner(AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float64).eval())
    for name, path in adapters.items():
        lean.add_adapter(name, lean.read_adapter(path))
    ids = torch.tensor([[3, 4, 5], [1, 2, 3]])
    positions = torch.arange(3).expand(2, 3)

    def logits(rows):
        return lean.forward(ids, None, None, positions, adapter=rows).logits

    before = logits(["tuned", "wide"])
    lean.add_adapter("tuned", lean.read_adapter(adapters["mlp"]))  # the name now serves other weights
    torch.testing.assert_close(logits(["tuned", "wide"])[0], logits(["mlp", "wide"])[0], rtol=0, atol=1e-12)
    assert (logits(["tuned", "wide"])[0] - before[0]).abs().max() > 1e-3
    lean.remove_adapter("wide")
    with pytest.raises(KeyError, match="'wide' is not loaded"):
        logits(["tuned", "wide"])
    for rows in (["tuned", "mlp"], ["mlp", "tuned"], ["tuned", None], ["mlp", None], [None, "mlp"]):
        logits(rows)
    assert len(lean._stacks) <= MAX_ADAPTER_STACKS


@pytest.mark.parametrize("rows", [["tuned", None, "wide"], ["mlp", "mlp", "mlp"]], ids=["mixed", "one-adapter"])
def test_a_packed_verify_pass_with_adapters_gives_the_padded_passs_logits(tiny_dir, adapters, rows):
    from kuberft_serve.kv_batch import SequenceBatch

    lean = LeanRunner(AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float64).eval())
    for name, path in adapters.items():
        lean.add_adapter(name, lean.read_adapter(path))

    def verify(lengths):
        batch = SequenceBatch(lean)
        batch.prefill([[3, 4, 5, 6], [9, 10], [5, 5, 1]], pad_id=0, adapters=rows)
        return batch.extend(torch.tensor([[4, 5, 6], [7, 0, 0], [2, 3, 0]]), lengths=lengths).logits

    padded, packed = verify(None), verify([3, 1, 2])
    for row, length in enumerate([3, 1, 2]):
        torch.testing.assert_close(packed[row, :length], padded[row, :length], rtol=0, atol=1e-9)
        assert not packed[row, length:].any()


@pytest.mark.parametrize("sampled", [False, True], ids=["greedy", "seeded-sampling"])
@pytest.mark.parametrize("speculator", ["none", "ngram"])
def test_a_batch_mixing_three_adapters_and_the_base_gives_each_request_its_adapter_alone_tokens(tiny_dir, adapters, alone, speculator, sampled):
    engine = make_engine(tiny_dir, adapters, speculator, adaptive=True)
    reqs = requests(engine.tokenizer, sampled)
    mixed = decode_all(engine, reqs)
    expected = [decode_all(alone[adapter], [(prompt, params, adapter)])[0] for prompt, params, adapter in reqs]
    assert mixed == expected
    # the adapters matter: the four models continue the first prompt differently
    assert len({tuple(tokens) for tokens in expected[:4]}) == 4
    assert engine.stats["forwards"] == engine.stats["steps"]


def test_a_mixed_batch_takes_one_forward_pass_per_step(tiny_dir, adapters, monkeypatch):
    engine = make_engine(tiny_dir, adapters)
    calls = []
    forward = engine.target_runner.forward
    monkeypatch.setattr(engine.target_runner, "forward", lambda *a, **kw: calls.append(kw["adapter"]) or forward(*a, **kw))
    params = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True)
    for adapter in [None, "tuned", "wide", "mlp"]:
        engine.submit(Sequence(engine.tokenizer.encode("hello, "), params, adapter))
    engine.step()  # admission: one prefill for the four, then the first step
    assert calls == [[None, "tuned", "wide", "mlp"]] * 2
    calls.clear()
    for _ in range(5):
        engine.step()
    assert calls == [[None, "tuned", "wide", "mlp"]] * 5
    assert len(engine.groups) == 1


def test_rows_keep_their_adapter_as_others_finish_and_join(tiny_dir, adapters, alone):
    engine = make_engine(tiny_dir, adapters, "ngram", max_batch_size=3)
    prompt = engine.tokenizer.encode("abc abc ab")
    reqs = [(prompt, SamplingParams(max_tokens=m, temperature=0.0), a) for m, a in
            [(3, "wide"), (12, "tuned"), (5, None), (9, "mlp"), (4, "tuned"), (7, "wide")]]
    expected = [decode_all(alone[adapter], [(p, params, adapter)])[0] for p, params, adapter in reqs]
    assert decode_all(engine, reqs) == expected


def test_each_adapter_has_its_own_k_controller_and_acceptance_counts(tiny_dir, adapters):
    """Each model's proposals and acceptances in the mixed batch are the ones it has served alone
    with the same speculator (fixed k): the counts are kept per adapter, not pooled."""
    engine = make_engine(tiny_dir, adapters, "ngram")
    reqs = requests(engine.tokenizer, sampled=False)
    decode_all(engine, reqs)
    assert set(engine.controllers) == {None, "tuned", "wide", "mlp"}
    assert set(engine.stats_by_model) == {None, "tuned", "wide", "mlp"}
    for adapter in (None, "tuned", "wide", "mlp"):
        single = make_engine(tiny_dir, {adapter: adapters[adapter]} if adapter else {}, "ngram")
        decode_all(single, [r for r in reqs if r[2] == adapter])
        counts = engine.stats_by_model[adapter]
        assert (counts["proposed"], counts["accepted"]) == (single.stats["proposed"], single.stats["accepted"]), adapter
        assert counts["proposed"] > 0
    assert sum(c["accepted"] for c in engine.stats_by_model.values()) == engine.stats["accepted"]


def test_adapters_beyond_max_loras_are_evicted_least_recently_used_first_and_reloaded(tiny_dir, adapters, alone):
    engine = make_engine(tiny_dir, adapters, max_loras=2)
    pool = engine.adapters
    assert list(pool.resident) == ["tuned", "wide"] and pool.names == ["tuned", "wide", "mlp"]
    prompt = engine.tokenizer.encode("hello, ")
    params = SamplingParams(max_tokens=10, temperature=0.0)
    engine.generate(prompt, params, "tuned")  # tuned is now the most recently used
    assert engine.generate(prompt, params, "mlp") == alone["mlp"].generate(prompt, params, "mlp")
    assert list(pool.resident) == ["tuned", "mlp"]  # wide, the least recently used, left
    assert engine.generate(prompt, params, "wide") == alone["wide"].generate(prompt, params, "wide")
    assert list(pool.resident) == ["mlp", "wide"] and pool.evictions == 2 and pool.loads == 4


def test_an_adapter_in_use_is_never_evicted_a_request_waits_for_room_instead(tiny_dir, adapters, alone):
    engine = make_engine(tiny_dir, adapters, max_loras=1)
    prompt = engine.tokenizer.encode("jig jag ")
    long = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    short = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    first = engine.submit(Sequence(list(prompt), long, "tuned"))
    second = engine.submit(Sequence(list(prompt), short, "mlp"))
    base = engine.submit(Sequence(list(prompt), short, None))
    engine.step()
    assert [s.adapter for g in engine.groups.values() for s in g.seqs] == ["tuned", None]  # mlp waits for room
    assert list(engine.waiting) == [second]
    while not second.finished:
        engine.step()
    assert first.output_ids == decode_all(alone["tuned"], [(prompt, long, "tuned")])[0]
    assert second.output_ids == decode_all(alone["mlp"], [(prompt, short, "mlp")])[0]
    assert base.output_ids == decode_all(alone[None], [(prompt, short, None)])[0]
    assert list(engine.adapters.resident) == ["mlp"]


def test_an_adapter_larger_than_the_memory_budget_is_refused_by_size(tiny_dir, adapters):
    with pytest.raises(AdapterError, match=r"adapter 'wide' takes .* MiB, more than the adapter memory budget of 0.0 MiB"):
        make_engine(tiny_dir, {"wide": adapters["wide"]}, max_lora_memory_mib=0.001)


@pytest.mark.parametrize(
    ("lora", "reason"),
    [
        ({"target_modules": ["q_proj"], "use_dora": True}, "DoRA"),
        ({"target_modules": ["q_proj"], "bias": "lora_only"}, "bias='lora_only'"),
        ({"target_modules": ["q_proj", "embed_tokens"]}, r"weight \S*embed_tokens\S* is not a LoRA factor"),
        ({"target_modules": ["q_proj"], "modules_to_save": ["lm_head"]}, "modules_to_save"),
    ],
    ids=["dora", "bias", "embeddings", "modules_to_save"],
)
def test_the_lean_forward_refuses_what_it_cannot_serve_and_says_why(tiny_dir, tmp_path, lora, reason):
    path = save_adapter(tiny_dir, tmp_path, 7, r=2, **lora)
    lean = LeanRunner(AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float64))
    with pytest.raises(AdapterError, match=reason.replace("(", r"\(").replace("[", r"\[")):
        lean.read_adapter(path)


def peft_engine(tiny_dir, adapters, names, speculator=None, **pool) -> Engine:
    """An engine on the transformers + peft runner (the path of accelerators and of what the lean
    forward cannot serve), with these adapters loaded."""
    runner = ModelRunner(AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float64).eval())
    engine = Engine(runner, load_tokenizer(str(tiny_dir)), speculator, max_batch_size=16, adapters=AdapterPool(runner, **pool))
    for name in names:
        engine.load_adapter(name, adapters[name])
    return engine


def test_the_peft_runner_gives_each_row_of_a_mixed_batch_its_adapters_logits(tiny_dir, adapters):
    runner = peft_engine(tiny_dir, adapters, adapters).target_runner
    ids = torch.tensor([[3, 4, 5, 6, 7], [1, 2, 3, 4, 5], [5, 5, 5, 1, 2], [7, 1, 7, 1, 7]])
    rows = ["tuned", None, "wide", "mlp"]
    positions = torch.arange(5).expand(4, 5)
    mixed = runner.forward(ids, runner.new_cache(), None, positions, adapter=rows, want_hidden=False).logits
    for row, name in enumerate(rows):
        alone = runner.forward(ids[row : row + 1], runner.new_cache(), None, positions[:1], adapter=name, want_hidden=False).logits
        torch.testing.assert_close(mixed[row], alone[0], rtol=0, atol=1e-9)
    base = runner.forward(ids[:1], runner.new_cache(), None, positions[:1], adapter=None, want_hidden=False).logits
    assert (mixed[0] - base[0]).abs().max() > 1e-2  # row 0's adapter changes its logits
    with pytest.raises(ValueError, match="'nope' is not loaded"):
        ModelRunner(AutoModelForCausalLM.from_pretrained(tiny_dir)).forward(ids, None, None, positions, adapter="nope", want_hidden=False)


@pytest.mark.parametrize("speculator", ["none", "ngram"])
def test_the_peft_path_mixes_adapters_in_one_batch_and_one_forward_per_step(tiny_dir, adapters, alone, speculator, monkeypatch):
    from kuberft_serve.speculators import NgramSpeculator

    engine = peft_engine(tiny_dir, adapters, adapters, NgramSpeculator() if speculator == "ngram" else None)
    forwards = []
    forward = engine.target_runner.forward
    monkeypatch.setattr(engine.target_runner, "forward", lambda *a, **kw: forwards.append(kw["adapter"]) or forward(*a, **kw))
    reqs = requests(engine.tokenizer, sampled=False)
    expected = [decode_all(alone[adapter], [(prompt, params, adapter)])[0] for prompt, params, adapter in reqs]
    assert decode_all(engine, reqs) == expected
    assert [None, "tuned", "wide", "mlp"] * 4 in forwards  # the first prefill: every row with its own adapter
    assert engine.stats["forwards"] == engine.stats["steps"]


def test_the_peft_path_loads_evicts_and_reloads_adapters(tiny_dir, adapters, alone):
    engine = peft_engine(tiny_dir, adapters, ("tuned", "mlp"), max_loras=1)
    prompt = engine.tokenizer.encode("abc abc ab")
    params = SamplingParams(max_tokens=8, temperature=0.0)
    reqs = [(prompt, params, "tuned"), (prompt, params, "mlp"), (prompt, params, None)]
    expected = [decode_all(alone[a], [(p, sp, a)])[0] for p, sp, a in reqs]
    assert decode_all(engine, reqs) == expected
    engine.unload_adapter("tuned")
    assert engine.adapters.names == ["mlp"] and "tuned" not in engine.adapters.resident


# --------------------------------------------------------------------------- the HTTP endpoints
@pytest.fixture(scope="module")
def server(tiny_dir, adapters):
    config = ServeConfig(model=ModelSpec(name=str(tiny_dir), dtype="float64"), served_model_name="tiny-base",
                         adapters={"tuned": adapters["tuned"]}, speculator=SpeculatorSpec(type="ngram"), device="cpu",
                         host="127.0.0.1", port=0, max_loras=1, runtime_lora_updating=True)
    running = start_server(config)
    yield running
    running.stop()


def post(server, path: str, body) -> tuple[int, str]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(server.url + path, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


def models(server) -> list[tuple[str, str | None]]:
    with urllib.request.urlopen(server.url + "/v1/models", timeout=60) as response:
        return [(m["id"], m["parent"]) for m in json.loads(response.read())["data"]]


def complete(server, model: str) -> tuple[int, dict]:
    status, text = post(server, "/v1/completions", {"model": model, "prompt": "hello, ", "max_tokens": 10, "temperature": 0})
    return status, json.loads(text)


def test_an_adapter_loaded_at_run_time_is_listed_and_served_then_unloaded(server, adapters, alone):
    status, text = post(server, "/v1/load_lora_adapter", {"lora_name": "wide", "lora_path": adapters["wide"]})
    assert (status, text) == (200, "Success: LoRA adapter 'wide' added successfully.")
    assert models(server) == [("tiny-base", None), ("tuned", "tiny-base"), ("wide", "tiny-base")]
    tokenizer = alone["wide"].tokenizer
    expected = tokenizer.decode(alone["wide"].generate(tokenizer.encode("hello, "), SamplingParams(max_tokens=10, temperature=0.0), "wide"))
    for name in ("wide", "tuned", "wide"):  # max_loras=1: each request evicts the other and reloads its own
        status, body = complete(server, name)
        assert status == 200
    assert body["choices"][0]["text"] == expected

    status, text = post(server, "/v1/unload_lora_adapter", {"lora_name": "wide"})
    assert (status, text) == (200, "Success: LoRA adapter 'wide' removed successfully.")
    assert models(server) == [("tiny-base", None), ("tuned", "tiny-base")]
    status, body = complete(server, "wide")
    assert status == 404 and body["error"]["param"] == "model" and body["error"]["code"] == "model_not_found"


@pytest.mark.parametrize(
    ("path", "body", "status", "param", "message"),
    [
        ("/v1/load_lora_adapter", {"lora_path": "/x"}, 400, "lora_name", "lora_name: give the adapter's served name"),
        ("/v1/load_lora_adapter", {"lora_name": "x"}, 400, "lora_path", "lora_path: give the adapter's directory"),
        ("/v1/load_lora_adapter", {"lora_name": "x", "lora_path": "/no/such/dir"}, 400, "lora_path",
         "lora_path: /no/such/dir has no adapter_config.json"),
        ("/v1/load_lora_adapter", {"lora_name": "tuned", "lora_path": "/x"}, 400, "lora_name",
         "The lora adapter 'tuned' has already been loaded."),
        ("/v1/load_lora_adapter", {"lora_name": "tiny-base", "lora_path": "/x"}, 400, "lora_name", "'tiny-base' is the base model's name"),
        ("/v1/unload_lora_adapter", {}, 400, "lora_name", "lora_name: give the adapter's served name"),
        ("/v1/unload_lora_adapter", {"lora_name": "nope"}, 404, "lora_name", "The lora adapter 'nope' cannot be found."),
        ("/v1/unload_lora_adapter", {"lora_name": "tiny-base"}, 400, "lora_name", "'tiny-base' is the base model, not an adapter"),
    ],
    ids=["no-name", "no-path", "no-such-dir", "name-taken", "base-name", "unload-no-name", "unload-unknown", "unload-base"],
)
def test_load_and_unload_errors_are_openai_shaped_and_name_the_field(server, path, body, status, param, message):
    got, text = post(server, path, body)
    error = json.loads(text)["error"]
    assert (got, error["param"], error["type"]) == (status, param, "invalid_request_error")
    assert message in error["message"]


def test_an_adapter_the_lean_forward_cannot_serve_is_refused_at_load(server, tiny_dir, tmp_path):
    path = save_adapter(tiny_dir, tmp_path, 8, r=2, target_modules=["q_proj"], use_dora=True)
    status, text = post(server, "/v1/load_lora_adapter", {"lora_name": "dora", "lora_path": path})
    assert status == 400 and "DoRA (use_dora) is not supported" in json.loads(text)["error"]["message"]
    assert "dora" not in dict(models(server))


# --------------------------------------------------------------------------- the command line
def test_the_adapter_limits_come_from_the_flags_or_the_spec_file(tmp_path, monkeypatch):
    import kuberft_serve.server
    from kuberft_operator.cli import main

    served = []
    monkeypatch.setattr(kuberft_serve.server, "run_server", served.append)
    (tmp_path / "serve.json").write_text(json.dumps({"model": {"name": "tiny:countdown"}, "maxLoadedAdapters": 3, "maxAdapterMemoryMiB": 64}))
    assert main(["serve", "--config", str(tmp_path / "serve.json")]) == 0
    assert main(["serve", "--model", "tiny:countdown", "--max-loras", "2", "--max-lora-memory", "32.5"]) == 0
    assert main(["serve", "--model", "tiny:countdown", "--enable-runtime-lora-updating"]) == 0
    assert [(c.max_loras, c.max_lora_memory_mib, c.runtime_lora_updating) for c in served] == [
        (3, 64, False), (2, 32.5, False), (None, None, True)]


@pytest.mark.parametrize(
    ("argv", "message"),
    [(["--max-loras", "0"], "--max-loras must be at least 1"), (["--max-lora-memory", "0"], "--max-lora-memory must be more than 0 MiB")],
)
def test_adapter_limits_below_one_are_refused(argv, message, capsys):
    from kuberft_operator.cli import main

    with pytest.raises(SystemExit) as caught:
        main(["serve", "--model", "m", *argv])
    assert caught.value.code == 2 and message in capsys.readouterr().err


def test_run_time_adapter_loading_is_off_unless_enabled(tiny_dir):
    """As in vLLM: the endpoints load any directory the server can read, so they exist only when asked for."""
    from kuberft_serve.server import create_app

    engine = build_engine(ServeConfig(model=ModelSpec(name=str(tiny_dir)), device="cpu"))
    routes = {route.resource.canonical for route in create_app(engine, ServeConfig(model=ModelSpec(name=str(tiny_dir)))).router.routes()}
    assert "/v1/load_lora_adapter" not in routes and "/v1/unload_lora_adapter" not in routes
    enabled = create_app(engine, ServeConfig(model=ModelSpec(name=str(tiny_dir)), runtime_lora_updating=True))
    assert "/v1/load_lora_adapter" in {route.resource.canonical for route in enabled.router.routes()}
