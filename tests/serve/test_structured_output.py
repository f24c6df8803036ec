"""Structured output (`response_format`): what a request with a JSON schema gets parses and
validates against the schema, whatever the model says (a random tiny model here: its free text is
garbage, which makes the constraint visible); with every speculator the output is token for
token plain constrained decoding's; requests with and without a format, and with different
schemas, share a batch; a bad format is an OpenAI-shaped 400 naming the field.

The tiny models have a printable-ASCII character vocabulary (JSON needs braces and quotes) and
run in float64, so that verify passes and plain decoding round alike (see test_lossless.py)."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import jsonschema
import openai
import pytest
import torch
from transformers import AutoModelForCausalLM

from kuberft_core.api import ModelSpec, SpeculatorSpec
from kuberft_core.models import build_tiny_model
from kuberft_serve.config import ServeConfig
from kuberft_serve.engine import Engine, Sequence
from kuberft_serve.heads import MedusaHeads
from kuberft_serve.loading import build_engine
from kuberft_serve.protocol import ResponseFormat
from kuberft_serve.sampling import SamplingParams
from kuberft_serve.server import start_server
from kuberft_serve.speculators import Proposal, Speculator
from kuberft_serve.structured import Grammars, GrammarState

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "minLength": 2, "maxLength": 8},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "color": {"enum": ["red", "green", "blue"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 4}, "minItems": 1, "maxItems": 2},
    },
    "required": ["name", "age", "color", "tags"],
    "additionalProperties": False,
}
SWITCH = {
    "type": "object",
    "properties": {"on": {"type": "boolean"}, "level": {"type": "integer", "minimum": -5, "maximum": 5}},
    "required": ["on", "level"],
    "additionalProperties": False,
}
FORMATS = {
    "person": {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}},
    "switch": {"type": "json_schema", "json_schema": {"name": "switch", "schema": SWITCH}},
    "object": {"type": "json_object"},
    "text": None,
}
PROMPTS = ["Describe a person as JSON: ", "abc abc ab", "{", "the cafe. the cafe. the"]
MAX_TOKENS = 200  # the JSON layout is fixed and the schemas bound every value: their grammars end well before


def check(text: str, name: str) -> None:
    """`text` is what the format `name` asks for."""
    value = json.loads(text)
    if name == "object":
        assert isinstance(value, dict)
    else:
        jsonschema.validate(value, FORMATS[name]["json_schema"]["schema"])


# --------------------------------------------------------------------------- models and engines
@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models decode in thousands of small ops: threads only contend."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A target, a draft and random (untrained) Medusa heads, all with one tokenizer."""
    target = build_tiny_model(tmp_path_factory.mktemp("json-target"), hidden_size=32, num_layers=2, intermediate_size=64, seed=8)
    draft = build_tiny_model(tmp_path_factory.mktemp("json-draft"), hidden_size=16, num_layers=1, intermediate_size=32, seed=2)
    torch.manual_seed(4)
    heads = MedusaHeads.for_model(AutoModelForCausalLM.from_pretrained(target), num_heads=5)
    torch.nn.init.normal_(heads.block.weight, std=0.3)
    return {"target": str(target), "draft": str(draft), "heads": str(heads.save(tmp_path_factory.mktemp("json-heads")))}


def serve_config(models, speculator: str, **local) -> ServeConfig:
    return ServeConfig(
        model=ModelSpec(name=models["target"], dtype="float64"),
        speculator=SpeculatorSpec(type=speculator, num_speculative_tokens=4, adaptive=False, draft_model=models["draft"],
                                  heads_path=models["heads"]),
        device="cpu",
        max_batch_size=8,
        **local,
    )


@pytest.fixture(scope="module")
def plain(models) -> Engine:
    return build_engine(serve_config(models, "none"))


@pytest.fixture(scope="module")
def grammars(plain):
    compiler = Grammars(plain.tokenizer, plain.vocab_size, plain.eos_ids)
    return {name: compiler.compile(ResponseFormat.model_validate(body)) for name, body in FORMATS.items() if body}


def decode_all(engine: Engine, grammars, requests: list[tuple[str, str, SamplingParams]]) -> list[Sequence]:
    """Decode (prompt, format name, params) requests together, in one batch."""
    seqs = [
        engine.submit(Sequence(engine.tokenizer.encode(prompt), params, grammar=GrammarState(grammars[name]) if name != "text" else None))
        for prompt, name, params in requests
    ]
    while not all(seq.finished for seq in seqs):
        engine.step()
    return seqs


GREEDY = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0)


def batch(temperature: float) -> list[tuple[str, str, SamplingParams]]:
    """Requests of every format (and free text) with different prompts and lengths, for one batch."""
    names = ["person", "switch", "object", "text", "person", "switch"]
    return [
        (PROMPTS[i % len(PROMPTS)], name,
         SamplingParams(max_tokens=MAX_TOKENS if name != "text" else 25 + 10 * i, temperature=temperature, seed=7 + i))
        for i, name in enumerate(names)
    ]


@pytest.fixture(scope="module")
def plain_batches(plain, grammars):
    """Plain constrained decoding of `batch(temperature)`, per temperature, decoded once."""
    done = {}

    def run(temperature: float) -> list[Sequence]:
        if temperature not in done:
            done[temperature] = decode_all(plain, grammars, batch(temperature))
        return done[temperature]

    return run


# --------------------------------------------------------------------------- the engine
def test_the_output_of_a_random_model_is_the_json_its_format_asks_for(plain, plain_batches):
    for (_, name, _), seq in zip(batch(0.0), plain_batches(0.0)):
        if name == "text":  # the same model without a format
            with pytest.raises(json.JSONDecodeError):
                json.loads(seq.output_text)
            continue
        assert seq.finish_reason == "stop" and seq.output_ids[-1] in plain.eos_ids
        check(seq.output_text, name)


def test_sampled_output_follows_its_schema_too(plain_batches):
    """(A sampled free-form object, by contrast, goes on: a random model rarely closes a key.)"""
    for (_, name, _), sampled in zip(batch(0.9), plain_batches(0.9)):
        if name in ("person", "switch"):
            check(sampled.output_text, name)
    assert plain_batches(0.9)[0].output_text != plain_batches(0.0)[0].output_text


def test_max_tokens_reached_first_cuts_the_output(plain, grammars, plain_batches):
    prompt, name, _ = batch(0.0)[0]
    cut = decode_all(plain, grammars, [(prompt, name, SamplingParams(max_tokens=20, temperature=0.0))])[0]
    assert cut.finish_reason == "length" and cut.output_ids == plain_batches(0.0)[0].output_ids[:20]


def allowed(engine: Engine, mask: torch.Tensor) -> set[str]:
    """The tokens a bitmask row allows."""
    bits = ((mask[:, None] >> torch.arange(32)) & 1).flatten()[: engine.vocab_size]
    return set(engine.tokenizer.convert_ids_to_tokens(bits.nonzero()[:, 0].tolist()))


def new_masks(engine: Engine, rows: int) -> torch.Tensor:
    return torch.full((rows, (engine.vocab_size + 31) // 32), -1, dtype=torch.int32)


def test_a_grammar_keeps_the_longest_prefix_of_proposals_it_accepts_and_masks_each_position(plain, grammars):
    """The bitmask rows are the allowed tokens now and after each kept proposal; the matcher is
    left where it was."""
    state = GrammarState(grammars["switch"])
    state.advance(plain.tokenizer.encode('{"on'))
    masks = new_masks(plain, 6)
    assert state.masks(plain.tokenizer.encode('": x:'), masks) == 3  # `x` cannot start a boolean
    assert [allowed(plain, mask) for mask in masks[:4]] == [{'"'}, {":"}, {" "}, {"t", "f"}]  # json.dumps's layout
    assert (masks[4:] == -1).all()  # positions past the kept proposals are not scored
    again = new_masks(plain, 1)
    assert state.masks([], again) == 0 and torch.equal(again[0], masks[0])


def test_a_string_holds_no_raw_control_character_and_no_special_token(plain, grammars):
    """JSON forbids a raw tab in a string (xgrammar's own bounded strings let one in:
    `structured.BOUNDED_STRING_CHARACTER`); special tokens such as `<s>` are no text (decoding
    drops them)."""
    state = GrammarState(grammars["person"])
    state.advance(plain.tokenizer.encode('{"name": "a'))
    masks = new_masks(plain, 1)
    state.masks([], masks)
    assert {"b", " ", "~"} <= allowed(plain, masks[0])
    assert not {"\t", "\n", "<s>", "</s>", "<pad>", "<unk>"} & allowed(plain, masks[0])
    state.advance(plain.tokenizer.encode("bcdefgh"))  # maxLength 8
    state.masks([], masks)
    assert allowed(plain, masks[0]) == {'"'}


class Unknowns(Speculator):
    """Proposes `<unk>` tokens, which no grammar allows."""

    name = "unknowns"

    def __init__(self, unk: int):
        self.unk = unk

    def propose(self, state, seqs, k):
        return Proposal([[self.unk] * k for _ in seqs])


def test_proposals_a_grammar_refuses_never_reach_the_verify_pass(plain, grammars, plain_batches):
    engine = Engine(plain.target_runner, plain.tokenizer, Unknowns(plain.tokenizer.unk_token_id), num_speculative_tokens=3,
                    adaptive=False)
    prompt, name, params = batch(0.0)[1]
    assert decode_all(engine, grammars, [(prompt, name, params)])[0].output_ids == plain_batches(0.0)[1].output_ids
    assert engine.stats["proposed"] == 0
    decode_all(engine, grammars, [(prompt, "text", SamplingParams(max_tokens=5, temperature=0.0))])
    assert engine.stats["proposed"] == 3 + 2 + 1  # free text: all verified (never past max_tokens), all rejected


def test_ignore_eos_cannot_go_with_a_grammar(plain, grammars):
    with pytest.raises(ValueError, match="ignore_eos"):
        plain.submit(Sequence([5], SamplingParams(ignore_eos=True), grammar=GrammarState(grammars["object"])))


@pytest.mark.parametrize("speculator", ["ngram", "draft", "heads"])
def test_speculative_constrained_decoding_equals_plain_constrained_decoding(models, grammars, plain_batches, speculator):
    """Requests of several formats decoded together, proposals cut by each row's grammar, give
    plain decoding's output: greedy, and seeded sampling with the deterministic speculators."""
    engine = build_engine(serve_config(models, speculator))
    for temperature in (0.0, 0.9) if speculator != "draft" else (0.0,):  # a sampling draft keeps the distribution only
        for (_, name, _), seq, expected in zip(batch(temperature), decode_all(engine, grammars, batch(temperature)),
                                               plain_batches(temperature)):
            assert seq.output_ids == expected.output_ids, (speculator, temperature, name)
            assert seq.finish_reason == expected.finish_reason
    assert engine.stats["accepted"] > 20  # speculation did its work


# --------------------------------------------------------------------------- the server
@pytest.fixture(scope="module")
def server(models):
    running = start_server(serve_config(models, "ngram", served_model_name="tiny", host="127.0.0.1", port=0))
    yield running
    running.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def chat(client, name: str, **kwargs):
    """A chat completion in the format `name` (greedy unless kwargs say otherwise)."""
    kwargs = {"max_tokens": MAX_TOKENS, "temperature": 0.0, **({"response_format": FORMATS[name]} if FORMATS[name] else {}), **kwargs}
    return client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "A person, please."}], **kwargs)


@pytest.mark.parametrize("name", ["person", "object"])
def test_chat_answers_the_json_plain_constrained_decoding_gives(client, plain, grammars, name):
    choice = chat(client, name).choices[0]
    check(choice.message.content, name)
    assert choice.finish_reason == "stop"
    prompt = plain.tokenizer.apply_chat_template([{"role": "user", "content": "A person, please."}], add_generation_prompt=True,
                                                 tokenize=False)
    assert choice.message.content == decode_all(plain, grammars, [(prompt, name, GREEDY)])[0].output_text


def test_completions_take_a_response_format_too_and_streams_carry_it(client):
    kwargs = {"model": "tiny", "prompt": PROMPTS[1], "max_tokens": MAX_TOKENS, "temperature": 0.7, "seed": 3,
              "extra_body": {"response_format": FORMATS["switch"]}}
    whole = client.completions.create(**kwargs).choices[0].text
    check(whole, "switch")
    assert "".join(chunk.choices[0].text for chunk in client.completions.create(stream=True, **kwargs)) == whole


def test_formats_and_free_text_share_a_batch_each_getting_what_it_gets_alone(client):
    requests = [("person", 0.8), ("text", 0.8), ("switch", 0.8), ("object", 0.0), ("text", 0.0), ("person", 0.0)]

    def answer(name: str, temperature: float) -> str:
        return chat(client, name, seed=1, temperature=temperature).choices[0].message.content

    alone = [answer(*request) for request in requests]
    with ThreadPoolExecutor(len(requests)) as pool:
        together = list(pool.map(lambda request: answer(*request), requests))
    assert together == alone
    for (name, _), text in zip(requests, together):
        if name == "text":
            with pytest.raises(json.JSONDecodeError):
                json.loads(text)
        else:
            check(text, name)


def test_logprobs_are_those_of_the_masked_distribution(client):
    """As vLLM reports them: a token the grammar forces has logprob 0, the others -9999 (-inf)."""
    content = chat(client, "switch", logprobs=True, top_logprobs=2).choices[0].logprobs.content
    assert [(item.token, item.logprob) for item in content[:2]] == [("{", 0.0), ('"', 0.0)]
    assert [top.logprob for top in content[0].top_logprobs] == [0.0, -9999.0]


def test_response_format_text_is_free_text(client):
    free = chat(client, "text", max_tokens=40).choices[0].message.content
    assert chat(client, "text", max_tokens=40, response_format={"type": "text"}).choices[0].message.content == free


def test_max_tokens_before_the_grammar_ends_cuts_the_answer(client):
    choice = chat(client, "person", max_completion_tokens=12).choices[0]
    assert choice.finish_reason == "length" and len(choice.message.content) == 12
    with pytest.raises(json.JSONDecodeError):
        json.loads(choice.message.content)


@pytest.mark.parametrize(
    "response_format, param, message",
    [
        ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "banana"}}}, "response_format.json_schema.schema",
         'Unsupported type "banana"'),
        ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"$ref": "#/$defs/missing"}}},
         "response_format.json_schema.schema", "missing"),
        ({"type": "json_schema", "json_schema": {"name": "x", "schema": "an object"}}, "response_format.json_schema.schema",
         "valid dictionary"),
        ({"type": "json_schema", "json_schema": {"name": "x"}}, "response_format.json_schema.schema", "Field required"),
        ({"type": "json_schema", "json_schema": {"schema": PERSON}}, "response_format.json_schema.name", "Field required"),
        ({"type": "json_schema"}, "response_format.json_schema", "given exactly when type is json_schema"),
        ({"type": "json_object", "json_schema": {"name": "x", "schema": PERSON}}, "response_format.json_schema",
         "given exactly when type is json_schema"),
        ({"type": "yaml"}, "response_format.type", "'text', 'json_object' or 'json_schema'"),
    ],
)
def test_a_bad_response_format_gets_a_400_naming_the_field(client, response_format, param, message):
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], response_format=response_format)
    error = caught.value.body
    assert (error["param"], error["type"]) == (param, "invalid_request_error")
    assert message in error["message"]


def test_ignore_eos_with_a_response_format_gets_a_400(client):
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model="tiny", prompt="a", extra_body={"response_format": FORMATS["object"], "ignore_eos": True})
    assert caught.value.body["param"] == "ignore_eos"
