"""`kuberft reward eval|tasks` from the command line."""

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from kuberft_core.kernel_tasks import SHIPPED_DIR, TaskSet
from kuberft_reward import cli as reward_cli

from .conftest import SECRET, solution

KUBERFT = [sys.executable, "-m", "kuberft_operator.cli"]


def kuberft(*args: str, stdin: str | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(KUBERFT + list(args), input=stdin, capture_output=True, text=True, env={**os.environ, **(env or {})}, timeout=300)


@pytest.mark.slow  # starts a sandbox worker twice (~40 s on 2 cores)
def test_eval_json_scores_a_kernel_task_file_and_leaks_nothing(tmp_path):
    good = tmp_path / "good.txt"
    good.write_text(solution("softmax"))
    leaky = tmp_path / "leaky.txt"
    leaky.write_text(solution("softmax").replace("        x = x.contiguous()", f"        print('{SECRET}')\n        raise RuntimeError('{SECRET}')"))
    task = str(SHIPPED_DIR / "softmax.py")
    done = kuberft("reward", "eval", "--task", task, "--completion", str(good), "--json", env={"KUBERFT_TEST_TOKEN": SECRET})
    assert done.returncode == 0, done.stderr
    assert {n: r["score"] for n, r in json.loads(done.stdout)["rewards"].items()} == {"triton.format": 1.0, "triton.compile": 1.0, "triton.correctness": 1.0}

    done = kuberft("reward", "eval", "--task", task, "--completion", str(leaky), "--json", "--rewards", "triton.compile", env={"KUBERFT_TEST_TOKEN": SECRET})
    result = json.loads(done.stdout)
    assert set(result) == {"rewards", "hacked", "seconds"}  # the pool's ItemResult
    assert result["rewards"]["triton.compile"]["score"] == 0.0 and result["hacked"] is False
    assert result["rewards"]["triton.compile"]["reason"] == "forward raised RuntimeError: [redacted] (line 24)"
    assert SECRET not in done.stdout + done.stderr


def test_eval_scores_text_rewards_without_a_sandbox():
    done = kuberft("reward", "eval", "--rewards", "countdown", "--row", '{"numbers": [3, 7, 25], "target": 46}', "--completion", "-", stdin="25+3+7\n")
    assert done.returncode == 0
    assert done.stdout.split() == ["countdown", "0.00", "wrong", "evaluates", "to", "35,", "not", "46"]

    # --json prints what a --batch line holds, less its id and line
    single = json.loads(kuberft("reward", "eval", "--rewards", "countdown", "--row", COUNTDOWN_ROW, "--completion", "-", "--json", stdin="25+3+7\n").stdout)
    line = {"completion": "25+3+7\n", "row": json.loads(COUNTDOWN_ROW), "rewards": ["countdown"]}
    batch = json.loads(kuberft("reward", "eval", "--batch", "-", stdin=json.dumps(line) + "\n").stdout)
    assert batch.pop("id") == 1 and batch.pop("line") == 1
    assert set(single) == set(batch) == {"rewards", "hacked", "seconds"}
    assert single["rewards"] == batch["rewards"] == {"countdown": {"score": 0.0, "outcome": "wrong", "reason": "evaluates to 35, not 46"}}


def test_eval_names_bad_arguments(tmp_path):
    done = kuberft("reward", "eval", "--task", "nope", "--completion", str(tmp_path / "missing.txt"))
    assert done.returncode == 1 and "--completion" in done.stderr and "No such file or directory" in done.stderr
    answer = tmp_path / "a.txt"
    answer.write_text("x")
    done = kuberft("reward", "eval", "--task", "nope", "--completion", str(answer))
    assert "kuberft reward eval: --task: unknown task 'nope' (known: " in done.stderr
    done = kuberft("reward", "eval", "--rewards", "triton.compile", "--completion", str(answer))
    assert "kuberft reward eval: --task: needed for the triton rewards" in done.stderr
    done = kuberft("reward", "eval", "--rewards", "countdown", "--row", "[1]", "--completion", str(answer))
    assert "--row: must be a JSON object" in done.stderr


def test_eval_batch_names_bad_arguments(tmp_path):
    answer = tmp_path / "a.txt"
    answer.write_text("x")
    batch = tmp_path / "in.jsonl"
    batch.write_text('{"completion": "x", "rewards": ["exact_match"], "row": {"answer": "x"}}\n')
    done = kuberft("reward", "eval", "--batch", str(batch), "--completion", str(answer))
    assert done.returncode == 2 and "argument --completion: not allowed with argument --batch" in done.stderr
    done = kuberft("reward", "eval", "--task", "relu")
    assert done.returncode == 2 and "one of the arguments --completion --batch is required" in done.stderr
    done = kuberft("reward", "eval", "--batch", str(tmp_path / "missing.jsonl"))
    assert done.returncode == 1 and "kuberft reward eval: --batch " in done.stderr and "No such file or directory" in done.stderr
    done = kuberft("reward", "eval", "--batch", str(batch), "--rewards", "nope")
    assert done.returncode == 1 and "kuberft reward eval: --rewards: unknown reward 'nope'" in done.stderr and not done.stdout
    done = kuberft("reward", "eval", "--completion", str(answer), "--rewards", "exact_match", "--output", str(tmp_path / "out.jsonl"))
    assert done.returncode == 1 and "--output: only with --batch" in done.stderr


COUNTDOWN_ROW = '{"numbers": [3, 7, 25], "target": 46}'


def countdown_line(i: int) -> str:
    """A text-reward batch line, right for even i."""
    return json.dumps({"id": f"c{i}", "completion": "25+7*3" if i % 2 == 0 else "25+3+7", "row": json.loads(COUNTDOWN_ROW), "rewards": ["countdown"]})


def test_eval_batch_streams_stdin_in_input_order_with_per_line_errors():
    """Results come out chunk by chunk while the input is still open, in input order; bad lines
    get an error naming the line and field, the others are scored, and the exit status is 1."""
    chunk, in_flight = reward_cli.BATCH_CHUNK, reward_cli.BATCH_IN_FLIGHT
    first = [countdown_line(i) for i in range(chunk * in_flight)]
    first[5] = "{not json"
    first[6] = json.dumps({"id": "no-completion", "row": {}, "rewards": ["countdown"]})
    rest = [countdown_line(i) for i in range(len(first), len(first) + 10)] + ["", json.dumps({"completion": "x", "task": "nope"})]  # blank lines are skipped
    process = subprocess.Popen(KUBERFT + ["reward", "eval", "--batch", "-"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    early: list[str] = []
    reader = threading.Thread(target=lambda: early.extend(process.stdout.readline() for _ in range(chunk)), daemon=True)
    try:
        process.stdin.write("\n".join(first) + "\n")
        process.stdin.flush()
        reader.start()
        reader.join(timeout=60)
        assert len(early) == chunk, "no results before the input ended"
        process.stdin.write("\n".join(rest) + "\n")
    finally:
        process.stdin.close()
    out, err = process.stdout.read(), process.stderr.read()
    process.wait(timeout=60)
    results = [json.loads(line) for line in early + out.splitlines()]
    numbers = [n for n in range(1, len(first) + len(rest) + 1) if n != len(first) + len(rest) - 1]
    assert [r["line"] for r in results] == numbers
    assert [r["id"] for r in results[:9]] == ["c0", "c1", "c2", "c3", "c4", 6, "no-completion", "c7", "c8"]
    assert results[5]["error"].startswith("line 6: not JSON (")
    assert results[6]["error"] == "line 7: completion: missing"
    assert results[-1]["id"] == len(first) + len(rest) and results[-1]["error"].startswith(f"line {len(first) + len(rest)}: task: unknown task 'nope' (known: ")
    scored = [r for r in results if "error" not in r]
    assert len(scored) == len(results) - 3
    assert all(r["rewards"]["countdown"]["score"] == (1.0 if int(r["id"][1:]) % 2 == 0 else 0.0) for r in scored)
    assert process.returncode == 1
    assert f"kuberft reward eval: {len(results)} lines, 3 errors, " in err and " evaluations/s " in err


def test_eval_batch_scores_mixed_lines_with_one_sandbox_pool(tmp_path, monkeypatch, capsys):
    """Shipped task ids, a task file, an inline task, a wrong program and text rewards, in one
    process: the sandbox workers start once for the whole file."""
    from kuberft_operator.cli import main
    from kuberft_reward.pool import RewardPool

    starts: list[int] = []
    start = RewardPool.start

    def counting_start(self):
        starts.append(self.num_workers)
        return start(self)

    monkeypatch.setattr(RewardPool, "start", counting_start)
    monkeypatch.setattr(reward_cli, "BATCH_CHUNK", 3)  # three chunks, two in the pool at once
    wrong = solution("relu").replace("tl.maximum(x, 0.0)", "tl.minimum(x, 0.0)")
    inline = {"source": (SHIPPED_DIR / "relu.py").read_text(), "name": "my_relu"}
    lines = [
        json.dumps({"id": "relu", "completion": solution("relu"), "task": "relu"}),
        json.dumps({"id": "softmax-file", "completion": solution("softmax"), "task": str(SHIPPED_DIR / "softmax.py")}),
        "{not json",
        json.dumps({"id": "wrong", "completion": wrong, "row": {"task": "relu"}}),
        countdown_line(0),
        json.dumps({"id": "unknown-task", "completion": solution("relu"), "task": "nope"}),
        json.dumps({"completion": solution("relu"), "task": inline, "rewards": ["triton.format", {"kind": "triton.correctness", "name": "correct"}]}),
        countdown_line(1),
        json.dumps({"id": "bad-rewards", "completion": "x", "rewards": ["countdown", {"kind": "nope"}]}),
    ]
    batch = tmp_path / "in.jsonl"
    batch.write_text("\n".join(lines) + "\n")
    output = tmp_path / "out.jsonl"
    args = ["reward", "eval", "--batch", str(batch), "--output", str(output), "--workers", "2", "--num-test-cases", "1", "--device", "cpu", "--timeout", "30"]
    assert main(args) == 1
    results = [json.loads(line) for line in output.read_text().splitlines()]
    assert [r["id"] for r in results] == ["relu", "softmax-file", 3, "wrong", "c0", "unknown-task", 7, "c1", "bad-rewards"]
    assert [r["line"] for r in results] == list(range(1, 10))
    scores = [{n: v["score"] for n, v in r["rewards"].items()} if "rewards" in r else r["error"] for r in results]
    kernel = {"triton.format": 1.0, "triton.compile": 1.0, "triton.correctness": 1.0}
    assert scores[0] == scores[1] == kernel
    assert scores[2].startswith("line 3: not JSON (")
    assert scores[3] == {**kernel, "triton.correctness": 0.0} and results[3]["rewards"]["triton.correctness"]["outcome"] == "wrong"
    assert scores[4] == {"countdown": 1.0} and scores[7] == {"countdown": 0.0}
    assert scores[5].startswith("line 6: task: unknown task 'nope' (known: ")
    assert scores[6] == {"triton.format": 1.0, "correct": 1.0}
    assert scores[8].startswith("line 9: rewards[1].kind: unknown reward 'nope' (known: ")
    assert starts.count(2) == 1, starts  # one sandbox pool for the file (and one without workers for the text lines)
    assert "kuberft reward eval: 9 lines, 3 errors, " in capsys.readouterr().err


def test_tasks_lists_the_shipped_set():
    done = kuberft("reward", "tasks")
    lines = done.stdout.splitlines()
    assert len(lines) == len(TaskSet().ids())
    assert any(line.startswith("softmax ") and line.endswith("Softmax over the last dimension.") for line in lines)
    assert kuberft("reward", "tasks", "--show", "relu").stdout == Path(SHIPPED_DIR / "relu.py").read_text()
