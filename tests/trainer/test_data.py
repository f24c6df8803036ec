"""Training rows from every source, the split, prompt formatting and the resumable sampler."""

from __future__ import annotations

import json

import pytest

from kuberft_core.api import DatasetSpec
from kuberft_core.models import build_char_tokenizer
from kuberft_trainer.data import DatasetError, PromptFormatter, PromptSampler, load_rows, split_rows, train_and_eval_rows


def dataset(**fields) -> DatasetSpec:
    return DatasetSpec.model_validate(fields)


def test_rows_come_from_a_jsonl_file_or_a_directory_of_them_in_name_order(tmp_path):
    (tmp_path / "b.jsonl").write_text('{"prompt": "b1"}\n\n{"prompt": "b2"}\n')
    (tmp_path / "a.jsonl").write_text('{"prompt": "a1"}\n')
    (tmp_path / "notes.txt").write_text("ignored")
    assert [r["prompt"] for r in load_rows(dataset(uri=str(tmp_path)))] == ["a1", "b1", "b2"]
    assert [r["prompt"] for r in load_rows(dataset(uri=str(tmp_path / "b.jsonl")))] == ["b1", "b2"]


def test_rows_come_from_the_mounted_configmap_key(tmp_path, monkeypatch):
    (tmp_path / "rows.jsonl").write_text('{"prompt": "p", "target": 3}\n')
    monkeypatch.setenv("KUBERFT_DATASET_DIR", str(tmp_path))
    assert load_rows(dataset(configMap={"name": "prompts", "key": "rows.jsonl"})) == [{"prompt": "p", "target": 3}]


def test_bad_rows_are_reported_with_file_line_and_field(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"prompt": \n')
    with pytest.raises(DatasetError, match=r"bad.jsonl:2: not valid JSON"):
        load_rows(dataset(uri=str(bad)))
    bad.write_text('["not", "an", "object"]\n')
    with pytest.raises(DatasetError, match=r"bad.jsonl:1: each line must be a JSON object, got list"):
        load_rows(dataset(uri=str(bad)))
    with pytest.raises(DatasetError, match=r"row 1 has no field 'question' \(dataset.promptField\)"):
        load_rows(dataset(rows=[{"question": "a"}, {"q": "b"}], promptField="question"))
    with pytest.raises(DatasetError, match="does not exist"):
        load_rows(dataset(uri=str(tmp_path / "missing.jsonl")))


def test_the_split_holds_out_a_seeded_fraction_and_keeps_at_least_one_row_to_train():
    rows = [{"prompt": str(i)} for i in range(10)]
    train, held_out = split_rows(rows, 0.2, seed=3)
    assert len(train) == 8 and len(held_out) == 2
    assert split_rows(rows, 0.2, seed=3) == (train, held_out)
    assert {r["prompt"] for r in train} | {r["prompt"] for r in held_out} == {str(i) for i in range(10)}
    assert split_rows(rows, 0.0, seed=3) == (rows, [])
    with pytest.raises(DatasetError, match="leaves none to train on"):
        split_rows(rows[:1], 0.5, seed=0)


def test_an_eval_source_gives_the_held_out_rows_and_every_training_row_trains(tmp_path, monkeypatch):
    rows = [{"prompt": str(i)} for i in range(10)]
    train, held_out = train_and_eval_rows(dataset(rows=rows, eval={"rows": [{"prompt": "h1"}, {"prompt": "h2"}]}), seed=3)
    assert (train, [r["prompt"] for r in held_out]) == (rows, ["h1", "h2"])
    assert train_and_eval_rows(dataset(rows=rows, evalFraction=0.2), seed=3) == split_rows(rows, 0.2, seed=3)
    (tmp_path / "rows.jsonl").write_text('{"prompt": "from the eval configmap"}\n')
    monkeypatch.setenv("KUBERFT_EVAL_DATASET_DIR", str(tmp_path))
    spec = dataset(rows=rows, eval={"configMap": {"name": "held-out", "key": "rows.jsonl"}})
    assert train_and_eval_rows(spec, seed=0)[1] == [{"prompt": "from the eval configmap"}]


def test_a_family_split_as_the_eval_source_holds_out_other_tasks_than_training():
    spec = dataset(builtin={"name": "triton-family", "size": 10, "options": {"split": "train", "kinds": ["ew"]}},
                   eval={"builtin": {"name": "triton-family", "size": 20, "options": {"split": "heldout", "kinds": ["ew"]}}})
    train, held_out = train_and_eval_rows(spec, seed=0)
    assert (len(train), len(held_out)) == (10, 20)
    assert not {r["task"] for r in train} & {r["task"] for r in held_out}


def test_eval_source_problems_name_the_eval_fields(tmp_path):
    with pytest.raises(DatasetError, match=r"dataset.eval.uri: .*missing.jsonl does not exist"):
        train_and_eval_rows(dataset(rows=[{"prompt": "p"}], eval={"uri": str(tmp_path / "missing.jsonl")}), seed=0)
    with pytest.raises(DatasetError, match=r"dataset.eval.rows: row 0 has no field 'prompt' \(dataset.promptField\)"):
        train_and_eval_rows(dataset(rows=[{"prompt": "p"}], eval={"rows": [{"question": "q"}]}), seed=0)
    bad_split = {"builtin": {"name": "triton-family", "options": {"split": "test"}}}
    with pytest.raises(DatasetError, match=r"^dataset.eval.builtin.options.split: must be one of train, heldout"):
        train_and_eval_rows(dataset(rows=[{"prompt": "p"}], eval=bad_split), seed=0)


def test_prompts_use_the_template_and_the_chat_template_with_the_system_prompt():
    tokenizer = build_char_tokenizer()
    spec = dataset(rows=[{"q": "x"}], promptTemplate="Solve: {q}", systemPrompt="Be brief.")
    formatter = PromptFormatter(tokenizer, spec, max_prompt_length=1000)
    assert formatter.text({"q": "2+2"}) == "<s>system: Be brief.\n<s>user: Solve: 2+2\n<s>assistant: "
    plain = PromptFormatter(tokenizer, dataset(rows=[{"prompt": "x"}], useChatTemplate=False), max_prompt_length=4)
    assert plain.text({"prompt": "hello"}) == "hello"
    assert tokenizer.decode(plain.token_ids({"prompt": "hello"})) == "ello"  # keeps the end
    with pytest.raises(DatasetError, match="promptTemplate: a row has no field 'q'"):
        formatter.text({"other": 1})


def test_the_sampler_visits_every_row_once_per_epoch_and_resumes_mid_epoch():
    sampler = PromptSampler(5, seed=1)
    first_epoch = sampler.take(5)
    assert sorted(first_epoch) == [0, 1, 2, 3, 4]
    sampler.take(2)
    state = json.loads(json.dumps(sampler.state_dict()))
    expected = sampler.take(6)
    resumed = PromptSampler(5, seed=1)
    resumed.load_state_dict(state)
    assert resumed.take(6) == expected
    with pytest.raises(DatasetError, match="trained on 5 rows, the dataset now has 4"):
        PromptSampler(4, seed=1).load_state_dict(state)
