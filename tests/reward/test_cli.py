"""`kuberft reward eval|tasks` from the command line."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kuberft_reward.kernel_tasks import SHIPPED_DIR, TaskSet

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
    assert json.loads(done.stdout)["rewards"] == {"triton.format": 1.0, "triton.compile": 1.0, "triton.correctness": 1.0}

    done = kuberft("reward", "eval", "--task", task, "--completion", str(leaky), "--json", "--rewards", "triton.compile", env={"KUBERFT_TEST_TOKEN": SECRET})
    result = json.loads(done.stdout)
    assert set(result) == {"rewards", "hacked", "reasons", "outcomes"}
    assert result["rewards"] == {"triton.compile": 0.0} and result["hacked"] is False
    assert result["reasons"]["triton.compile"] == "forward raised RuntimeError: [redacted] (line 24)"
    assert SECRET not in done.stdout + done.stderr


def test_eval_scores_text_rewards_without_a_sandbox():
    done = kuberft("reward", "eval", "--rewards", "countdown", "--row", '{"numbers": [3, 7, 25], "target": 46}', "--completion", "-", stdin="25+3+7\n")
    assert done.returncode == 0
    assert done.stdout.split() == ["countdown", "0.00", "wrong", "evaluates", "to", "35,", "not", "46"]


def test_eval_names_bad_arguments(tmp_path):
    done = kuberft("reward", "eval", "--task", "nope", "--completion", str(tmp_path / "missing.txt"))
    assert done.returncode == 1 and "--completion" in done.stderr and "No such file or directory" in done.stderr
    answer = tmp_path / "a.txt"
    answer.write_text("x")
    done = kuberft("reward", "eval", "--task", "nope", "--completion", str(answer))
    assert "kuberft reward eval: --task: unknown task 'nope' (known: " in done.stderr
    done = kuberft("reward", "eval", "--rewards", "triton.compile", "--completion", str(answer))
    assert "--task is needed for the triton rewards" in done.stderr
    done = kuberft("reward", "eval", "--rewards", "countdown", "--row", "[1]", "--completion", str(answer))
    assert "--row: must be a JSON object" in done.stderr


def test_tasks_lists_the_shipped_set():
    done = kuberft("reward", "tasks")
    lines = done.stdout.splitlines()
    assert len(lines) == len(TaskSet().ids())
    assert any(line.startswith("softmax ") and line.endswith("Softmax over the last dimension.") for line in lines)
    assert kuberft("reward", "tasks", "--show", "relu").stdout == Path(SHIPPED_DIR / "relu.py").read_text()
