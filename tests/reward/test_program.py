"""Reading a kernel completion without running it: extraction, the format reward's checks,
and the constructs that are refused or flagged as reward hacking."""

import pytest

from kuberft_reward.kernel_tasks import TaskSet, shipped_solution
from kuberft_reward.program import analyze, extract_program
from kuberft_reward.rewards import format_reward

RELU_TASK = TaskSet().get("relu").source
GOOD = shipped_solution("relu")


def tagged(program: str) -> str:
    return f"Here is my kernel.\n<triton>\n{program}\n</triton>\nDone."


def test_extracts_the_last_tagged_block_and_strips_a_code_fence():
    completion = "<triton>old</triton> then <triton>\n```python\nprint(1)\n```\n</triton>"
    assert extract_program(completion) == "print(1)"
    assert extract_program("<kernel>x = 1</kernel>", tag="kernel") == "x = 1"
    assert extract_program("```python\nx = 1\n```") is None
    assert extract_program("<triton>   </triton>") is None


def test_every_shipped_solution_passes_every_format_check():
    for task_id in TaskSet().ids():
        verdict, report = format_reward(tagged(shipped_solution(task_id)), TaskSet().get(task_id).source, "triton")
        assert verdict == (1.0, "ok", "all format checks pass"), (task_id, verdict)
        assert not report.forbidden and not report.hacks


def test_format_gives_partial_credit_and_names_what_is_missing():
    unmasked = GOOD.replace("x = tl.load(x_ptr + offsets, mask=mask, other=0.0)", "x = tl.load(x_ptr + offsets)")
    score, outcome, reason = format_reward(tagged(unmasked), RELU_TASK, "triton")[0]
    assert (score, outcome) == (0.85, "wrong")
    assert reason == "masks: no mask on tl.load (line 12)"

    fake_tl = GOOD.replace("tl.maximum(x, 0.0)", "tl.relu(x)")
    assert format_reward(tagged(fake_tl), RELU_TASK, "triton")[0][2] == "tl_names: not Triton functions: tl.relu (line 13)"

    never_launched = GOOD.replace("relu_kernel[grid](x, out, n, BLOCK_SIZE=1024)", "pass")
    assert "jit: no @triton.jit kernel is launched with kernel[grid](...)" in format_reward(tagged(never_launched), RELU_TASK, "triton")[0][2]

    wrong_signature = GOOD.replace("def forward(self, x: torch.Tensor)", "def forward(self, x, y)")
    assert "model_new: ModelNew.forward takes 2 argument(s), Model.forward takes 1" in format_reward(tagged(wrong_signature), RELU_TASK, "triton")[0][2]

    assert format_reward(GOOD, RELU_TASK, "triton")[0] == (0.0, "invalid", "no <triton>...</triton> block with a program")


def test_a_program_that_does_not_parse_gets_only_the_tag_credit():
    score, outcome, reason = format_reward(tagged("def broken(:\n  pass"), RELU_TASK, "triton")[0]
    assert (score, outcome) == (0.15, "wrong")
    assert "imports: the program does not parse" in reason


@pytest.mark.parametrize(
    "line, expected",
    [
        ("import os", "imports os (a kernel program may import only torch, triton, math"),
        ("import subprocess", "imports subprocess"),
        ("from socket import socket", "imports socket.socket"),
        ("import torch.utils.cpp_extension", "imports torch.utils.cpp_extension, which the sandbox does not allow"),
        ("x = eval('1')", "uses eval()"),
        ("f = open('/etc/passwd')", "uses open()"),
        ("g = getattr(torch, 'relu')", "uses getattr()"),
        ("b = __builtins__", "uses __builtins__()"),
        ("c = ().__class__.__base__", "accesses the private attribute .__class__"),
        ("d = torch._C", "accesses the private attribute ._C"),
    ],
)
def test_constructs_the_sandbox_refuses(line, expected):
    report = analyze(GOOD + "\n" + line + "\n", RELU_TASK)
    assert any(expected in f for f in report.forbidden), report.forbidden


@pytest.mark.parametrize(
    "change, expected",
    [
        (("return out", "return torch.relu(x)"), "calls torch.relu in host code"),
        (("return out", "return torch.nn.functional.relu(x)"), "calls torch.nn.functional.relu in host code"),
        (("return out", "return x.clamp_min(0.0)"), "calls .clamp_min() on a tensor in host code"),
        (("return out", "return x @ x.t()"), "computes a matrix product with @ in host code"),
        (("class ModelNew(nn.Module):", "class ModelNew(Model):"), "ModelNew inherits from the reference Model"),
        (("return out", "return Model()(x)"), "calls the reference Model"),
        (("x = x.contiguous()", "torch.allclose = lambda *a, **k: True"), "monkey-patches torch.allclose"),
        (
            ("        relu_kernel[grid](x, out, n, BLOCK_SIZE=1024)", "        try:\n            relu_kernel[grid](x, out, n, BLOCK_SIZE=1024)\n        except Exception:\n            out = x"),
            "falls back when a kernel launch fails",
        ),
    ],
)
def test_reward_hacks_found_without_running(change, expected):
    old, new = change
    assert old in GOOD
    report = analyze(GOOD.replace(old, new), RELU_TASK)
    assert any(expected in h for h in report.hacks), report.hacks
    verdict = format_reward(tagged(GOOD.replace(old, new)), RELU_TASK, "triton")[0]
    assert verdict[:2] == (0.0, "hacked")


def test_calling_a_torch_layer_instead_of_a_kernel_is_a_hack():
    program = shipped_solution("linear_relu").replace("        return out", "        return torch.clamp(self.linear(x), min=0)")
    hacks = analyze(program, TaskSet().get("linear_relu").source).hacks
    assert "calls torch.clamp in host code" in hacks[0] or "calls the torch layer self.linear" in " ".join(hacks)
    assert any("calls the torch layer self.linear instead of a kernel" in h for h in hacks)


def test_features_the_interpreter_cannot_run_are_noted():
    program = GOOD.replace("out = tl.maximum(x, 0.0)", "out = tl.extra.cuda.libdevice.tanh(x)")
    assert any("libdevice functions" in u for u in analyze(program, RELU_TASK).unverifiable)
