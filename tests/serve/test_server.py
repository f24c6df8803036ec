"""The OpenAI-compatible API, driven with the official `openai` client against a running server
(ngram speculation on, a tiny model and a LoRA adapter)."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest

from kuberft_core.api import ModelSpec, SpeculatorSpec
from kuberft_serve.config import ServeConfig
from kuberft_serve.loading import build_engine
from kuberft_serve.sampling import SamplingParams
from kuberft_serve.server import start_server


@pytest.fixture(scope="module")
def config(tiny_dir, adapter_dir):
    return ServeConfig(
        model=ModelSpec(name=str(tiny_dir), dtype="float64"),
        served_model_name="tiny-base",
        adapters={"tuned": str(adapter_dir)},
        speculator=SpeculatorSpec(type="ngram", num_speculative_tokens=4),
        device="cpu",
        host="127.0.0.1",
        port=0,
        max_batch_size=4,
    )


@pytest.fixture(scope="module")
def server(config):
    running = start_server(config)
    yield running
    running.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def reference(config):
    """Plain greedy decoding of the same model, for the expected texts."""
    plain = ServeConfig(**{**config.__dict__, "speculator": SpeculatorSpec(type="none")})
    engine = build_engine(plain)

    def complete(prompt_ids, max_tokens, adapter=None):
        tokens = engine.generate(prompt_ids, SamplingParams(max_tokens=max_tokens, temperature=0.0), adapter)
        return engine.tokenizer.decode(tokens, skip_special_tokens=True)

    complete.tokenizer = engine.tokenizer
    return complete


def test_models_lists_the_base_model_and_each_adapter(client):
    models = client.models.list()
    assert [(m.id, m.parent) for m in models.data] == [("tiny-base", None), ("tuned", "tiny-base")]


def test_greedy_completion_is_the_plain_greedy_text(client, reference):
    result = client.completions.create(model="tiny-base", prompt="abc abc a", max_tokens=24, temperature=0)
    ids = reference.tokenizer.encode("abc abc a")
    assert result.choices[0].text == reference(ids, 24)
    assert result.choices[0].finish_reason in ("length", "stop")
    assert result.usage.prompt_tokens == len(ids)
    assert result.object == "text_completion"


def test_the_model_field_picks_the_adapter(client, reference):
    ids = reference.tokenizer.encode("hello, ")
    tuned = client.completions.create(model="tuned", prompt="hello, ", max_tokens=20, temperature=0)
    base = client.completions.create(model="tiny-base", prompt="hello, ", max_tokens=20, temperature=0)
    assert tuned.choices[0].text == reference(ids, 20, "tuned")
    assert tuned.choices[0].text != base.choices[0].text


def test_streamed_completion_concatenates_to_the_same_text(client):
    whole = client.completions.create(model="tuned", prompt="jig jag jig", max_tokens=30, temperature=0)
    chunks = list(client.completions.create(model="tuned", prompt="jig jag jig", max_tokens=30, temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == whole.choices[0].text
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason
    assert len(chunks) > 2


def test_chat_completion_uses_the_chat_template_and_streams(client, reference):
    messages = [{"role": "user", "content": "a cafe, a cafe"}]
    prompt = reference.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    result = client.chat.completions.create(model="tuned", messages=messages, max_tokens=16, temperature=0)
    assert result.choices[0].message.role == "assistant"
    assert result.choices[0].message.content == reference(list(prompt), 16, "tuned")
    assert result.usage.prompt_tokens == len(prompt)
    stream = list(client.chat.completions.create(model="tuned", messages=messages, max_tokens=16, temperature=0, stream=True,
                                                 stream_options={"include_usage": True}))
    assert stream[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert text == result.choices[0].message.content
    assert stream[-1].usage.completion_tokens == result.usage.completion_tokens


def test_stop_string_ends_the_text_before_it(client):
    full = client.completions.create(model="tiny-base", prompt="abc abc a", max_tokens=30, temperature=0).choices[0].text
    stop = full[5:7]
    assert stop and stop in full
    result = client.completions.create(model="tiny-base", prompt="abc abc a", max_tokens=30, temperature=0, stop=[stop])
    assert result.choices[0].text == full[: full.index(stop)]
    assert result.choices[0].finish_reason == "stop"
    streamed = client.completions.create(model="tiny-base", prompt="abc abc a", max_tokens=30, temperature=0, stop=stop, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == full[: full.index(stop)]


def test_the_same_seed_gives_the_same_sample(client):
    def draw(seed):
        return client.completions.create(model="tuned", prompt="a", max_tokens=20, temperature=1.0, top_p=0.9, seed=seed).choices[0].text

    assert draw(7) == draw(7)
    assert len({draw(s) for s in range(4)}) > 1


def test_concurrent_requests_are_batched_and_each_gets_its_own_plain_output(client, reference):
    prompts = ["abc abc a", "hello, ", "a", "jig jag jig jag ", "the cafe", "b", "c, c, c"]

    def ask(prompt):
        return client.completions.create(model="tiny-base", prompt=prompt, max_tokens=25, temperature=0).choices[0].text

    with ThreadPoolExecutor(len(prompts)) as pool:
        texts = list(pool.map(ask, prompts))
    assert texts == [reference(reference.tokenizer.encode(p), 25) for p in prompts]


def test_a_list_of_prompts_gets_one_choice_each(client):
    result = client.completions.create(model="tiny-base", prompt=["abc", "hello"], max_tokens=5, temperature=0)
    assert [c.index for c in result.choices] == [0, 1]
    single = client.completions.create(model="tiny-base", prompt="hello", max_tokens=5, temperature=0)
    assert result.choices[1].text == single.choices[0].text


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"max_tokens": 0}, "max_tokens: Input should be greater than or equal to 1"),
        ({"temperature": 3}, "temperature: Input should be less than or equal to 2"),
        ({"n": 0}, "n: Input should be greater than or equal to 1"),
        ({"max_tokens": 5000}, "maximum context length is 1024 tokens"),
        ({"extra_body": {"max_token": 5}}, "Unrecognized request argument supplied: max_token"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop: at most 4 stop sequences"),
    ],
)
def test_bad_requests_get_a_400_naming_the_field(client, kwargs, message):
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model="tiny-base", prompt="abc", **kwargs)
    assert caught.value.status_code == 400
    assert message in caught.value.body["message"]
    assert caught.value.body["type"] == "invalid_request_error"


def test_an_unknown_model_gets_a_404_listing_the_served_models(client):
    with pytest.raises(openai.NotFoundError) as caught:
        client.chat.completions.create(model="gpt-4", messages=[{"role": "user", "content": "hi"}])
    assert caught.value.body["message"] == "The model `gpt-4` does not exist; served models: tiny-base, tuned"
    assert caught.value.body["code"] == "model_not_found"


def _get(url):
    with urllib.request.urlopen(url, timeout=30) as response:
        return response.status, response.read().decode()


def test_invalid_json_gets_a_400(server):
    request = urllib.request.Request(server.url + "/v1/completions", data=b"{not json", headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(request, timeout=30)
    assert caught.value.code == 400
    assert json.loads(caught.value.read())["error"]["message"] == "the request body is not valid JSON"


def test_healthz_and_metrics_report_requests_and_speculation(server, client):
    client.completions.create(model="tuned", prompt="abc abc abc abc", max_tokens=20, temperature=0)
    status, body = _get(server.url + "/healthz")
    assert status == 200 and json.loads(body)["status"] == "ok"
    status, text = _get(server.url + "/metrics")
    assert status == 200
    assert 'kuberft_serve_requests_total{model="tuned",status="ok"}' in text
    assert 'kuberft_serve_generated_tokens_total{model="tuned"}' in text
    assert 'kuberft_serve_time_to_first_token_seconds_count{model="tuned"}' in text
    assert 'kuberft_serve_time_per_output_token_seconds_count{model="tuned"}' in text
    proposed = [line for line in text.splitlines() if line.startswith('kuberft_serve_spec_proposed_tokens_total{speculator="ngram"}')]
    assert proposed and float(proposed[0].split()[-1]) > 0
    assert 'kuberft_serve_spec_acceptance_rate{speculator="ngram"}' in text
    assert 'kuberft_serve_spec_mean_accepted_length{speculator="ngram"}' in text


def test_on_the_cpu_the_server_computes_with_one_core_fewer_than_it_may_use(monkeypatch):
    import os

    import torch

    from kuberft_serve.server import compute_threads

    before = torch.get_num_threads()
    config = ServeConfig(model=ModelSpec(name="tiny"), device="cpu")
    try:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
        assert compute_threads(config) == 3
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0}, raising=False)
        assert compute_threads(config) == 1
        torch.set_num_threads(2)
        monkeypatch.setenv("OMP_NUM_THREADS", "2")  # the operator's choice stands
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
        assert compute_threads(config) == 2
    finally:
        torch.set_num_threads(before)
