"""Reading a kernel completion without running it: extraction, the format reward's checks,
and the constructs that are refused or flagged as reward hacking."""

import pytest

from kuberft_core.kernel_tasks import TaskSet, shipped_solution
from kuberft_reward import rewards
from kuberft_reward.program import analyze, extract_program


def format_reward(completion, task_source, tag):
    """The format verdict as (score, outcome, reason), with the analysis."""
    result, report = rewards.format_reward(completion, task_source, tag)
    return (result.score, result.outcome.value, result.reason), report

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
        ("lib = torch.library", "uses torch.library, which the sandbox does not allow"),
        ("x = eval('1')", "uses eval()"),
        ("g = getattr(torch, 'relu')", "uses getattr()"),
        ("b = __builtins__", "uses __builtins__()"),
        ("c = ().__class__.__base__", "accesses the private attribute .__class__"),
        ("d = torch._C", "accesses the private attribute ._C"),
        ("run = torch.builtins.exec", "reaches the module builtins through .builtins"),
        ("gc = torch.sys.modules['gc']", "reaches the module sys through .sys"),
        ("env = torch.os.environ", "reaches the module os through .os"),
        ("lib = torch.ctypes.CDLL(None)", "reaches the module ctypes through .ctypes"),
        ("frames = torch.inspect.stack()", "reaches the module inspect through .inspect"),
        ("alias = [torch][0].os", "reaches the module os through .os"),
        ("f = open(4, 'wb')", "uses open()"),
        ("def peek(v):\n    return v.handle.data", "reads .handle (the CPU interpreter's internals"),
    ],
)
def test_constructs_the_sandbox_refuses(line, expected):
    report = analyze(GOOD + "\n" + line + "\n", RELU_TASK)
    assert any(expected in f for f in report.forbidden), report.forbidden
    assert format_reward(tagged(GOOD + "\n" + line + "\n"), RELU_TASK, "triton")[0][:2] == (0.0, "hacked")


@pytest.mark.parametrize(
    "change",
    [
        ("def forward(self, x: torch.Tensor)", "def forward(self, input: torch.Tensor)"),
        ("x = x.contiguous()", "x = torch.squeeze(x.contiguous().unsqueeze(0), 0)"),
        ("x = x.contiguous()", "x = x.contiguous()\n        print('shape', x.shape)"),
        ("x = x.contiguous()", "x = x.reshape(-1).view(x.shape).contiguous()"),
    ],
)
def test_names_and_glue_never_refuse_a_correct_program(change):
    """Whether torch did the work is observed while the program runs (host_guard), never
    guessed from the names it uses: a parameter called `input`, squeeze/reshape glue."""
    old, new = change
    assert old in GOOD
    program = GOOD.replace(old, new).replace("x = x.contiguous()", "x = input.contiguous()") if "input" in new else GOOD.replace(old, new)
    report = analyze(program, RELU_TASK)
    assert not report.forbidden and not report.hacks and not report.not_triton, (report.forbidden, report.hacks, report.not_triton)
    assert format_reward(tagged(program), RELU_TASK, "triton")[0] == (1.0, "ok", "all format checks pass")


def test_tampering_with_imported_modules_is_a_hack():
    report = analyze(GOOD.replace("x = x.contiguous()", "torch.allclose = lambda *a, **k: True"), RELU_TASK)
    assert report.hacks == ["line 22: monkey-patches torch.allclose"]


@pytest.mark.parametrize(
    "kernel_line, expected",
    [
        ("    out = torch.relu(x)", "torch used inside a @triton.jit function"),
        ("    out = tl.maximum(x, 0.0)\n    vals = [v for v in range(3)]", "ListComp inside a @triton.jit function"),
        ("    out = helper(x)", "calls the plain Python function helper inside a @triton.jit function"),
    ],
)
def test_kernel_bodies_the_triton_compiler_refuses_are_found(kernel_line, expected):
    program = GOOD.replace("    out = tl.maximum(x, 0.0)", kernel_line) + "\n\ndef helper(v):\n    return v\n"
    report = analyze(program, RELU_TASK)
    assert any(expected in n for n in report.not_triton), report.not_triton


def test_autotune_configs_built_by_a_comprehension_are_triton():
    program = GOOD.replace("@triton.jit", "@triton.autotune(configs=[triton.Config({'B': b}) for b in (64, 128)], key=['n'])\n@triton.jit")
    assert analyze(program, RELU_TASK).not_triton == []


def test_features_the_interpreter_cannot_run_are_noted():
    program = GOOD.replace("out = tl.maximum(x, 0.0)", "out = tl.inline_asm_elementwise('mov.b32 $0, $1;', '=r,r', [x], dtype=tl.float32, is_pure=True, pack=1)")
    assert any("inline assembly" in u for u in analyze(program, RELU_TASK).unverifiable)
    libdevice = GOOD.replace("out = tl.maximum(x, 0.0)", "out = tl.extra.cuda.libdevice.tanh(x)")
    assert analyze(libdevice, RELU_TASK).unverifiable == []  # runs under the interpreter (interpreter_compat)
