"""OpenAI/vLLM compatibility of `kuberft serve`, checked with the official `openai` client (and raw
HTTP where the client cannot send the request) against a running server, once with plain
decoding and once with ngram speculation: the same answers either way.

Written from the OpenAI API reference and vLLM's documented behaviour: `n` and `best_of`
(samples seeded seed, seed + 1, ...; best_of keeps the n of highest cumulative logprob; greedy
sampling refuses n > 1), `logprobs` of completions and chat (the model's raw log-probabilities),
`echo`, vLLM's `prompt_logprobs` and `stop_token_ids`, `GET /v1/models/{id}`, `/health`, strict
request validation with OpenAI-shaped 400s, the finish reason on the last text chunk of a stream,
and clients that hang up."""

from __future__ import annotations

import json
import logging
import re
import socket
import time
import urllib.error
import urllib.request

import openai
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from kuberft_core.api import ModelSpec, SpeculatorSpec
from kuberft_serve.config import ServeConfig
from kuberft_serve.server import ENGINE, start_server

MODEL = "test/tiny"  # a Hub-style name, with a slash
PROMPT = "abc abc a"


@pytest.fixture(scope="module", params=["none", "ngram"])
def server(request, tiny_dir):
    config = ServeConfig(
        model=ModelSpec(name=str(tiny_dir), dtype="float64"),
        served_model_name=MODEL,
        speculator=SpeculatorSpec(type=request.param, num_speculative_tokens=4),
        device="cpu",
        host="127.0.0.1",
        port=0,
        max_batch_size=4,
    )
    running = start_server(config)
    yield running
    running.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def tokenizer(tiny_dir):
    return AutoTokenizer.from_pretrained(tiny_dir)


@pytest.fixture(scope="module")
def model_logprobs(tiny_dir):
    """The model's log-softmax over the vocabulary after each prefix of `ids` (plain transformers)."""
    model = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float64).eval()

    def logprobs(ids: list[int]) -> torch.Tensor:
        with torch.no_grad():
            return torch.log_softmax(model(torch.tensor([ids])).logits[0], dim=-1)  # [len, V]

    return logprobs


def post(server, path: str, body: bytes, content_type: str | None = "application/json"):
    """(status, parsed JSON body) of a raw POST."""
    headers = {"Content-Type": content_type} if content_type else {}
    request = urllib.request.Request(server.url + path, data=body, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def get(server, path: str):
    try:
        with urllib.request.urlopen(server.url + path, timeout=30) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


def bad_request(call) -> dict:
    with pytest.raises(openai.BadRequestError) as caught:
        call()
    assert caught.value.status_code == 400
    return caught.value.body


# --------------------------------------------------------------------------- n and best_of
def test_n_samples_are_the_requests_seeded_seed_plus_i(client):
    many = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=12, temperature=1.0, seed=40, n=3)
    assert [c.index for c in many.choices] == [0, 1, 2]
    singles = [client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=12, temperature=1.0, seed=40 + i) for i in range(3)]
    assert [c.text for c in many.choices] == [single.choices[0].text for single in singles]
    assert len({c.text for c in many.choices}) > 1
    assert many.usage.prompt_tokens == len(PROMPT)  # the prompt is counted once
    assert many.usage.completion_tokens == sum(single.usage.completion_tokens for single in singles)


def test_n_samples_of_each_prompt_of_a_list_are_numbered_prompt_by_prompt(client):
    result = client.completions.create(model=MODEL, prompt=["abc", "hij"], max_tokens=6, temperature=1.0, seed=3, n=2)
    assert [c.index for c in result.choices] == [0, 1, 2, 3]
    second = client.completions.create(model=MODEL, prompt="hij", max_tokens=6, temperature=1.0, seed=3, n=2)
    assert [c.text for c in result.choices[2:]] == [c.text for c in second.choices]


def test_chat_n_samples(client):
    messages = [{"role": "user", "content": "a cafe"}]
    result = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=8, temperature=1.0, seed=9, n=2)
    assert [c.index for c in result.choices] == [0, 1]
    assert all(c.message.role == "assistant" for c in result.choices)
    second = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=8, temperature=1.0, seed=10)
    assert result.choices[1].message.content == second.choices[0].message.content


def test_streamed_n_samples_arrive_by_choice_index(client):
    kwargs = dict(model=MODEL, prompt=PROMPT, max_tokens=10, temperature=1.0, seed=21, n=2)
    whole = client.completions.create(**kwargs)
    texts = ["", ""]
    finished = [None, None]
    for chunk in client.completions.create(**kwargs, stream=True):
        for choice in chunk.choices:
            texts[choice.index] += choice.text
            finished[choice.index] = choice.finish_reason or finished[choice.index]
    assert texts == [c.text for c in whole.choices]
    assert finished == [c.finish_reason for c in whole.choices]


def test_best_of_returns_the_n_samples_of_highest_cumulative_logprob(client):
    def cumulative(seed):
        choice = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=8, temperature=1.0, seed=seed, logprobs=0).choices[0]
        return sum(choice.logprobs.token_logprobs), choice.text

    ranked = sorted((cumulative(70 + i) for i in range(4)), reverse=True)
    best = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=8, temperature=1.0, seed=70, n=2, best_of=4)
    assert [c.text for c in best.choices] == [text for _, text in ranked[:2]]
    assert best.choices[0].logprobs is None  # not asked for
    assert best.usage.completion_tokens == 4 * 8  # every generated sample is counted


@pytest.mark.parametrize(
    "kwargs, param, message",
    [
        ({"n": 2, "temperature": 0}, "n", "n must be 1 when using greedy sampling, got 2."),
        ({"extra_body": {"best_of": 3}, "temperature": 0}, "best_of", "best_of must be 1 when using greedy sampling, got 3."),
        ({"n": 3, "extra_body": {"best_of": 2}}, "best_of", "best_of must be greater than or equal to n, got n=3 and best_of=2."),
        ({"n": 1, "extra_body": {"best_of": 2}, "stream": True}, "best_of", "best_of > n cannot be streamed"),
    ],
)
def test_n_and_best_of_are_refused_where_vllm_refuses_them(client, kwargs, param, message):
    body = bad_request(lambda: client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=4, **kwargs))
    assert body["param"] == param and message in body["message"]


# --------------------------------------------------------------------------- logprobs
def test_completion_logprobs_are_the_models_raw_logprobs_with_the_top_ones(client, tokenizer, model_logprobs):
    choice = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=10, temperature=0.7, seed=5, logprobs=3).choices[0]
    lp = choice.logprobs
    assert "".join(lp.tokens) == choice.text
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(lp.tokens))]
    prompt_ids = tokenizer.encode(PROMPT)
    output_ids = tokenizer.convert_tokens_to_ids(lp.tokens)
    expected = model_logprobs(prompt_ids + output_ids)[len(prompt_ids) - 1 : -1]  # before temperature: raw
    for position, (token, logprob, top) in enumerate(zip(output_ids, lp.token_logprobs, lp.top_logprobs)):
        row = expected[position]
        assert logprob == pytest.approx(float(row[token]), abs=1e-4)
        best = row.topk(3)
        assert {tokenizer.convert_ids_to_tokens(i) for i in best.indices.tolist()} <= set(top) <= (
            {tokenizer.convert_ids_to_tokens(i) for i in best.indices.tolist()} | {lp.tokens[position]})
        assert top[lp.tokens[position]] == logprob
        assert max(top.values()) == pytest.approx(float(best.values[0]), abs=1e-4)


def test_logprobs_zero_returns_the_sampled_tokens_logprobs(client):
    lp = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=6, temperature=0, logprobs=0).choices[0].logprobs
    assert len(lp.token_logprobs) == 6 and all(v is not None and v <= 0 for v in lp.token_logprobs)
    assert lp.top_logprobs == [{token: value} for token, value in zip(lp.tokens, lp.token_logprobs)]


def test_greedy_tokens_are_the_most_likely_ones(client):
    lp = client.completions.create(model=MODEL, prompt="hello, ", max_tokens=8, temperature=0, logprobs=5).choices[0].logprobs
    for token, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert len(top) == 5 and logprob == max(top.values()) and top[token] == logprob


def test_chat_logprobs_have_the_chat_shape(client, tokenizer, model_logprobs):
    messages = [{"role": "user", "content": "a big cafe"}]
    result = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=8, temperature=0, logprobs=True, top_logprobs=2)
    content = result.choices[0].logprobs.content
    assert "".join(item.token for item in content) == result.choices[0].message.content
    prompt = list(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False))
    output = tokenizer.convert_tokens_to_ids([item.token for item in content])
    expected = model_logprobs(prompt + output)[len(prompt) - 1 : -1]
    for item, row, token in zip(content, expected, output):
        assert item.logprob == pytest.approx(float(row[token]), abs=1e-4)
        assert item.bytes == list(item.token.encode())
        assert [t.token for t in item.top_logprobs] == tokenizer.convert_ids_to_tokens(row.topk(2).indices.tolist())
        assert item.top_logprobs[0].logprob >= item.top_logprobs[1].logprob
    plain = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=3, temperature=0, logprobs=True)
    assert [item.top_logprobs for item in plain.choices[0].logprobs.content] == [[], [], []]
    assert client.chat.completions.create(model=MODEL, messages=messages, max_tokens=3).choices[0].logprobs is None


def test_top_logprobs_without_logprobs_is_refused(client):
    body = bad_request(lambda: client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "a"}], top_logprobs=2))
    assert body["param"] == "top_logprobs"
    assert body["message"] == "when using `top_logprobs`, `logprobs` must be set to true."


def test_streamed_logprobs_add_up_to_the_whole_ones(client):
    kwargs = dict(model=MODEL, prompt=PROMPT, max_tokens=12, temperature=0, logprobs=2)
    whole = client.completions.create(**kwargs).choices[0].logprobs
    tokens, values, offsets = [], [], []
    for chunk in client.completions.create(**kwargs, stream=True):
        tokens += chunk.choices[0].logprobs.tokens
        values += chunk.choices[0].logprobs.token_logprobs
        offsets += chunk.choices[0].logprobs.text_offset
    assert (tokens, values, offsets) == (whole.tokens, whole.token_logprobs, whole.text_offset)
    messages = [{"role": "user", "content": "jig jag"}]
    chat = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=8, temperature=0, logprobs=True, top_logprobs=1)
    streamed = [item for chunk in client.chat.completions.create(model=MODEL, messages=messages, max_tokens=8, temperature=0,
                                                                 logprobs=True, top_logprobs=1, stream=True)
                if chunk.choices and chunk.choices[0].logprobs for item in chunk.choices[0].logprobs.content]
    assert streamed == chat.choices[0].logprobs.content


def test_echo_prepends_the_prompt_and_its_logprobs(client, tokenizer, model_logprobs):
    plain = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=5, temperature=0).choices[0].text
    echoed = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=5, temperature=0, echo=True, logprobs=1).choices[0]
    assert echoed.text == PROMPT + plain
    lp = echoed.logprobs
    assert lp.tokens[: len(PROMPT)] == list(PROMPT) and "".join(lp.tokens) == echoed.text
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    ids = tokenizer.encode(PROMPT)
    expected = model_logprobs(ids)
    for i in range(1, len(ids)):
        assert lp.token_logprobs[i] == pytest.approx(float(expected[i - 1, ids[i]]), abs=1e-4)
    streamed = list(client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=5, temperature=0, echo=True, stream=True))
    assert streamed[0].choices[0].text.startswith(PROMPT)
    assert "".join(c.choices[0].text for c in streamed) == PROMPT + plain


def test_prompt_logprobs_give_each_prompt_token_its_logprob_and_rank(client, tokenizer, model_logprobs):
    choice = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=2, temperature=0, extra_body={"prompt_logprobs": 2}).choices[0]
    scored = choice.prompt_logprobs
    ids = tokenizer.encode(PROMPT)
    expected = model_logprobs(ids)
    assert scored[0] is None and len(scored) == len(ids)
    for i in range(1, len(ids)):
        row = expected[i - 1]
        entry = scored[i][str(ids[i])]
        assert entry["logprob"] == pytest.approx(float(row[ids[i]]), abs=1e-4)
        assert entry["rank"] == int((row > row[ids[i]]).sum()) + 1
        assert entry["decoded_token"] == PROMPT[i]
        best = row.topk(2).indices.tolist()
        assert set(scored[i]) == {str(ids[i]), *map(str, best)}
        assert scored[i][str(best[0])]["rank"] == 1
    assert choice.logprobs is None
    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "ab"}], max_tokens=2,
                                          extra_body={"prompt_logprobs": 0})
    assert chat.prompt_logprobs[0] is None and all(len(entry) == 1 for entry in chat.prompt_logprobs[1:])
    body = bad_request(lambda: client.completions.create(model=MODEL, prompt=PROMPT, stream=True, extra_body={"prompt_logprobs": 1}))
    assert body["param"] == "prompt_logprobs"


# --------------------------------------------------------------------------- stops, models, health
def test_stop_token_ids_end_the_output_with_the_token_kept(client, tokenizer):
    full = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=30, temperature=0, extra_body={"ignore_eos": True}).choices[0].text
    stop_char = full[4]
    stopped = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=30, temperature=0,
                                        extra_body={"stop_token_ids": [tokenizer.convert_tokens_to_ids(stop_char)], "ignore_eos": True}).choices[0]
    assert stopped.text == full[: full.index(stop_char) + 1]
    assert stopped.finish_reason == "stop"
    assert stopped.stop_reason == tokenizer.convert_tokens_to_ids(stop_char)
    by_string = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=30, temperature=0, stop=[stop_char],
                                          extra_body={"ignore_eos": True}).choices[0]
    assert (by_string.text, by_string.stop_reason) == (full[: full.index(stop_char)], stop_char)


def test_a_model_is_retrieved_by_id_and_an_unknown_one_is_a_404(client):
    card = client.models.retrieve(MODEL)
    assert (card.id, card.object) == (MODEL, "model")
    with pytest.raises(openai.NotFoundError) as caught:
        client.models.retrieve("gpt-4")
    assert caught.value.body["code"] == "model_not_found"
    assert caught.value.body["type"] == "invalid_request_error"


def test_health_answers_200_with_an_empty_body(server):
    assert get(server, "/health") == (200, b"")
    assert get(server, "/healthz")[0] == 200


# --------------------------------------------------------------------------- validation
@pytest.mark.parametrize(
    "body, param",
    [
        ({"stream_options": {"include_usage": True}}, "stream_options"),
        ({"max_tokens": "5"}, "max_tokens"),
        ({"max_tokens": True}, "max_tokens"),
        ({"stream": "yes"}, "stream"),
        ({"seed": 2**63}, "seed"),
        ({"seed": -(2**63) - 1}, "seed"),
        ({"logprobs": 21}, "logprobs"),
        ({"logprobs": True}, "logprobs"),
        ({"temperature": "0.5"}, "temperature"),
    ],
)
def test_wrong_types_and_values_get_an_openai_shaped_400(server, body, param):
    status, answer = post(server, "/v1/completions", json.dumps({"model": MODEL, "prompt": "abc", **body}).encode())
    assert status == 400
    assert set(answer["error"]) == {"message", "type", "param", "code"}
    assert answer["error"]["type"] == "invalid_request_error" and answer["error"]["param"] == param


def test_null_means_the_default(server):
    body = {"model": MODEL, "prompt": "abc", "max_tokens": 2, "n": None, "stream": None, "temperature": None, "logprobs": None,
            "stream_options": None, "seed": None}
    status, answer = post(server, "/v1/completions", json.dumps(body).encode())
    assert status == 200 and len(answer["choices"]) == 1 and answer["choices"][0]["logprobs"] is None


def test_a_bug_answers_an_openai_shaped_500(server, monkeypatch):
    monkeypatch.setattr(server.app[ENGINE].tokenizer, "encode", lambda *args, **kwargs: 1 / 0)
    status, answer = post(server, "/v1/completions", json.dumps({"model": MODEL, "prompt": "abc"}).encode())
    assert status == 500
    assert answer["error"] == {"message": "internal error: ZeroDivisionError", "type": "server_error", "param": None, "code": None}


def test_int64_seeds_are_accepted(client):
    for seed in (2**63 - 1, -(2**63)):
        assert client.completions.create(model=MODEL, prompt="abc", max_tokens=2, seed=seed).choices[0].finish_reason


@pytest.mark.parametrize("content_type", ["application/x-www-form-urlencoded", "text/plain", "multipart/form-data; boundary=x"])
def test_a_body_that_is_not_sent_as_json_is_refused(server, content_type):
    status, answer = post(server, "/v1/completions", b"model=tiny&prompt=abc", content_type)
    assert status == 400 and "must be JSON" in answer["error"]["message"]
    status, answer = post(server, "/v1/completions", json.dumps({"model": MODEL, "prompt": "abc"}).encode(), content_type)
    assert status == 400


def test_a_deeply_nested_body_gets_a_json_400(server):
    deep = b'{"model": "tiny", "prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    status, answer = post(server, "/v1/completions", deep)
    assert status == 400 and answer["error"]["message"] == "the request body is nested too deeply"
    status, answer = post(server, "/v1/chat/completions", b"[" * 100_000 + b"]" * 100_000)
    assert status == 400


def test_custom_chat_roles_go_to_the_chat_template(client, tokenizer):
    messages = [{"role": "narrator", "content": "a cafe"}, {"role": "user", "content": "hi", "name": "bea"}]
    result = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=3, temperature=0)
    prompt = tokenizer.apply_chat_template([{"role": "narrator", "content": "a cafe"}, {"role": "user", "content": "hi"}],
                                           add_generation_prompt=True, tokenize=True, return_dict=False)
    assert result.usage.prompt_tokens == len(prompt)


# --------------------------------------------------------------------------- streaming
def sse_events(server, body: dict) -> list:
    status, raw = None, b""
    request = urllib.request.Request(server.url + "/v1/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        status, raw = response.status, response.read()
    assert status == 200
    return [json.loads(line[6:]) if line != "data: [DONE]" else "[DONE]" for line in raw.decode().split("\n\n") if line]


def test_the_finish_reason_arrives_with_the_last_text_chunk_and_usage_comes_last(server):
    events = sse_events(server, {"model": MODEL, "prompt": PROMPT, "max_tokens": 7, "temperature": 0, "ignore_eos": True,
                                 "stream": True, "stream_options": {"include_usage": True}})
    assert events[-1] == "[DONE]"
    usage = events[-2]
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 7
    chunks = events[:-2]
    assert all(chunk["choices"][0]["text"] for chunk in chunks)  # no empty chunk, the last one included
    assert [chunk["choices"][0]["finish_reason"] for chunk in chunks] == [None] * (len(chunks) - 1) + ["length"]


# --------------------------------------------------------------------------- clients that hang up
def running_requests(server) -> int:
    return json.loads(get(server, "/healthz")[1])["running"]


def aborted_requests(server) -> float:
    metrics = get(server, "/metrics")[1].decode()
    found = re.search(rf'kuberft_serve_requests_total\{{model="{re.escape(MODEL)}",status="abort"\}} (\S+)', metrics)
    return float(found.group(1)) if found else 0.0


def open_request(server, body: dict) -> socket.socket:
    """A request sent on a raw connection whose answer is never read."""
    data = json.dumps(body).encode()
    connection = socket.create_connection((server.host, server.port))
    connection.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
                       b"Content-Length: %d\r\n\r\n%s" % (len(data), data))
    return connection


def wait_for(condition, seconds: float) -> float:
    """Seconds until `condition()` held (fails after `seconds`)."""
    start = time.monotonic()
    while not condition():
        assert time.monotonic() - start < seconds, "timed out"
        time.sleep(0.02)
    return time.monotonic() - start


def test_abandoned_non_streaming_requests_free_the_batch(server, client, caplog):
    caplog.set_level(logging.INFO)
    aborted = aborted_requests(server)
    long = {"model": MODEL, "prompt": "abc", "max_tokens": 1000, "temperature": 0, "ignore_eos": True}
    connections = [open_request(server, long) for _ in range(20)]
    wait_for(lambda: running_requests(server) == 4, 30)  # the batch is full, 16 wait
    for connection in connections:
        connection.close()
    assert wait_for(lambda: running_requests(server) == 0 and aborted_requests(server) == aborted + 20, 30) < 2
    started = time.monotonic()
    assert client.completions.create(model=MODEL, prompt="abc", max_tokens=5, temperature=0).choices[0].finish_reason
    assert time.monotonic() - started < 2
    hung_up = [r for r in caplog.records if "the client hung up" in r.getMessage()]
    assert len(hung_up) == 20 and {r.levelno for r in hung_up} == {logging.INFO}
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


def test_a_stream_whose_client_hangs_up_is_cancelled_with_one_info_line(server, caplog):
    caplog.set_level(logging.INFO)
    connection = open_request(server, {"model": MODEL, "prompt": "abc", "max_tokens": 1000, "temperature": 0, "ignore_eos": True,
                                       "stream": True})
    received = b""
    while b"data:" not in received:
        received += connection.recv(4096)
    connection.close()
    wait_for(lambda: running_requests(server) == 0, 5)
    hung_up = [r for r in caplog.records if "the client hung up" in r.getMessage()]
    assert len(hung_up) == 1 and hung_up[0].levelno == logging.INFO
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
