"""The report of a local run: when each reward was learnt, and the hacks caught per step."""

from __future__ import annotations

import json

from kuberft_operator.run_report import write_report


def step(number: int, format_: float, compile_: float, correct: float, hacked: int) -> dict:
    rewards = {"triton.format": format_, "triton.compile": compile_, "triton.correctness": correct}
    return {"step": number, "rewards": rewards, "reward": sum(rewards.values()), "loss": 0.1, "kl": 0.0, "hacked": hacked}


def test_the_report_says_when_each_reward_first_reached_half_and_draws_the_hacks(tmp_path):
    steps = [step(1, 0.3, 0.1, 0.0, 0), step(2, 0.6, 0.2, 0.0, 3), step(3, 0.9, 0.55, 0.1, 1), step(4, 0.95, 0.8, 0.2, 0)]
    report_json, report_png = write_report(tmp_path, config={"name": "kernels", "spec": {}}, steps=steps, final_eval=None)
    report = json.loads(report_json.read_text())
    assert report["first_step_at_half"] == {"triton.format": 2, "triton.compile": 3, "triton.correctness": None}
    assert [s["hacked"] for s in report["steps"]] == [0, 3, 1, 0]
    assert report_png.stat().st_size > 10_000


def test_a_run_without_grpo_steps_still_gets_a_report(tmp_path):
    report_json, report_png = write_report(tmp_path, config={"name": "sft-only", "spec": {}}, steps=[], final_eval={"step": 0, "pass_at_1": 0.5})
    assert json.loads(report_json.read_text())["first_step_at_half"] == {}
    assert report_png.exists()
