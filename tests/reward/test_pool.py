"""The reward pool end to end on the CPU interpreter: known-good solutions score 1.0, broken
ones less, reward hacks and attacks on the sandbox score 0, and the pool stays healthy."""

import os
import re
import signal
import textwrap

import pytest

from kuberft_core.kernel_tasks import TaskSet, shipped_solution
from kuberft_core.reward_protocol import EvaluateRequest
from kuberft_reward.pool import PoolBusy, RewardPool
from kuberft_reward.rewards import RequestError

from .conftest import SECRET, TIMEOUT_SECONDS, kernel_request, solution, tagged

TASK_IDS = TaskSet().ids()
RELU = shipped_solution("relu")
HEADER = "import torch\nimport torch.nn as nn\nimport triton\nimport triton.language as tl\n"
REFERENCE_RELU = '''
class Model(nn.Module):
    def __init__(self):
        super().__init__()

    def forward(self, x):
        return torch.relu(x)
'''
SCRATCH_KERNEL = '''
@triton.jit
def copy_kernel(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n
    tl.store(out_ptr + offsets, tl.load(x_ptr + offsets, mask=mask), mask=mask)
'''


def relu_with_forward(body: str, prelude: str = "") -> str:
    """A relu program whose ModelNew.forward is `body` (indented), after a real kernel."""
    return tagged(
        HEADER + prelude + SCRATCH_KERNEL + "\n\nclass ModelNew(nn.Module):\n    def __init__(self):\n        super().__init__()\n\n"
        "    def forward(self, x):\n" + textwrap.indent(textwrap.dedent(body).strip("\n"), " " * 8) + "\n"
    )


def test_all_shipped_tasks_have_a_solution():
    assert len(TASK_IDS) >= 13
    for task_id in TASK_IDS:
        assert "@triton.jit" in shipped_solution(task_id)


@pytest.fixture(scope="module")
def solution_results(pool):
    response = pool.evaluate_sync(
        EvaluateRequest.model_validate(
            {"items": [{"completion": solution(t), "row": {"task": t}} for t in TASK_IDS], "rewards": [
                {"kind": "triton.format"}, {"kind": "triton.compile"}, {"kind": "triton.correctness"}, {"kind": "triton.speed"},
            ]}
        )
    )
    return dict(zip(TASK_IDS, response.results))


@pytest.mark.parametrize("task_id", TASK_IDS)
def test_every_known_good_solution_scores_full_marks(solution_results, task_id):
    result = solution_results[task_id]
    scores = {name: r.score for name, r in result.rewards.items()}
    assert scores == {"triton.format": 1.0, "triton.compile": 1.0, "triton.correctness": 1.0, "triton.speed": 0.0}, result
    assert re.fullmatch(r"(6/6|7/7) test cases match the reference", result.rewards["triton.correctness"].reason)  # 4 seeds, signed, scaled (+ odd-sized)
    assert result.rewards["triton.speed"].outcome == "unverifiable"
    assert not result.hacked


BROKEN = {
    "no_mask_tail": (
        RELU.replace("mask = offsets < n_elements", "mask = offsets < n_elements - 7"),
        0.0, "wrong", "elements differ",
    ),
    "wrong_math": (RELU.replace("tl.maximum(x, 0.0)", "tl.maximum(x, 0.1)"), 0.0, "wrong", "max abs error 0.1"),
    "name_error": (RELU.replace("grid = (", "grid = (undefined_name, "), 0.0, "wrong", "NameError: name 'undefined_name' is not defined"),
    "wrong_dtype": (RELU.replace("out = torch.empty_like(x)", "out = torch.empty_like(x, dtype=torch.float64)"), 0.0, "wrong", "output dtype float64, expected float32"),
    "half_the_grid": (RELU.replace("grid = (triton.cdiv(n, 1024),)", "grid = (max(1, triton.cdiv(n, 1024) - 4),)"), 0.0, "wrong", "elements differ"),
}


@pytest.mark.parametrize("name", sorted(BROKEN))
def test_broken_solutions_score_less(pool, name):
    program, correctness, outcome, reason = BROKEN[name]
    result = pool.evaluate_sync(kernel_request([tagged(program)])).results[0]
    assert result.rewards["triton.correctness"].score == correctness
    assert result.rewards["triton.correctness"].outcome == outcome
    assert reason in result.rewards["triton.correctness"].reason or reason in result.rewards["triton.compile"].reason


def test_a_solution_right_on_some_shapes_gets_partial_credit(pool):
    # correct only while the row length fits one block: the extra 1500-wide case fails
    program = shipped_solution("softmax").replace("BLOCK_SIZE=block", "BLOCK_SIZE=512")
    request = kernel_request([tagged(program)], task="softmax", rewards=[{"kind": "triton.correctness", "args": {"numTestCases": 3, "shapes": [{"dim": 700}]}}])
    result = pool.evaluate_sync(request).results[0].rewards["triton.correctness"]
    # 3 seeds, the 1500-wide shape, then signed, scaled and odd-sized cases derived at smaller sizes
    assert result.score == 6 / 7 and result.outcome == "wrong"
    assert result.reason.startswith("6/7 test cases match; case 3 (get_inputs() with seed 315187, {'dim': 700}): ")


def test_autotuned_kernels_run_one_config_on_the_interpreter(pool):
    autotuned = (
        RELU.replace("@triton.jit", "@triton.autotune(configs=[triton.Config({'BLOCK_SIZE': 256}), triton.Config({'BLOCK_SIZE': 512})], key=['n_elements'])\n@triton.jit")
        .replace(", BLOCK_SIZE=1024)", ")")
        .replace("grid = (triton.cdiv(n, 1024),)", "grid = lambda meta: (triton.cdiv(n, meta['BLOCK_SIZE']),)")
    )
    result = pool.evaluate_sync(kernel_request([tagged(autotuned)])).results[0]
    assert {n: r.score for n, r in result.rewards.items()} == {"triton.format": 1.0, "triton.compile": 1.0, "triton.correctness": 1.0}


def test_libdevice_math_runs_on_the_interpreter_and_what_it_cannot_run_is_unverifiable(pool):
    tanh_then_relu = RELU.replace("out = tl.maximum(x, 0.0)", "out = tl.maximum(tl.extra.cuda.libdevice.tanh(x) * 0 + x, 0.0)")
    unmapped = RELU.replace("out = tl.maximum(x, 0.0)", "out = tl.maximum(tl.extra.cuda.libdevice.rcp64h(x.to(tl.float64)).to(tl.float32) * 0 + x, 0.0)")
    ran, cannot = pool.evaluate_sync(kernel_request([tagged(tanh_then_relu), tagged(unmapped)])).results
    assert {n: r.score for n, r in ran.rewards.items()} == {"triton.format": 1.0, "triton.compile": 1.0, "triton.correctness": 1.0}
    assert cannot.rewards["triton.compile"].outcome == "unverifiable"
    assert cannot.rewards["triton.correctness"].outcome == "unverifiable"
    assert "libdevice.rcp64h is not supported in interpreter mode" in cannot.rewards["triton.correctness"].reason


# --------------------------------------------------------------------------- adversarial suite

ADVERSARIAL = {
    # reward hacks
    "torch does the work": (relu_with_forward("return torch.relu(x)"), "torch computed on the host while forward ran (test case 0): aten.relu"),
    "functional fallback": (relu_with_forward("return torch.nn.functional.relu(x)"), "aten.relu (line 18)"),
    "inherits the reference": (tagged(HEADER + REFERENCE_RELU + SCRATCH_KERNEL + "\nclass ModelNew(Model):\n    pass\n"), "torch computed on the host while forward ran (test case 0): aten.relu (line 11)"),
    "calls the reference": (relu_with_forward("return Model()(x)", REFERENCE_RELU), "aten.relu (line 11)"),
    "host arithmetic (no-op ablation)": (
        relu_with_forward("""
            scratch = torch.empty_like(x)
            copy_kernel[(triton.cdiv(x.numel(), 256),)](x, scratch, x.numel(), BLOCK=256)
            return x * (x > 0)
        """),
        "torch computed on the host while forward ran (test case 0): aten.gt (line 20), aten.mul (line 20)",
    ),
    "try/except fallback": (
        relu_with_forward("""
            try:
                copy_kernel[(1,)](x, None, 1, BLOCK=3)
            except Exception:
                return x * (x > 0)
            return x
        """),
        "aten.gt (line 21), aten.mul (line 21)",
    ),
    "outputs cached across calls": (
        relu_with_forward("""
            if CACHE:
                return CACHE[0]
            out = torch.empty_like(x)
            copy_kernel[(triton.cdiv(x.numel(), 256),)](x, out, x.numel(), BLOCK=256)
            CACHE.append(out * (out > 0))
            return CACHE[0]
        """, "CACHE = []\n"),
        "aten.gt (line 23), aten.mul (line 23)",
    ),
    "mutates its input": (
        tagged(RELU.replace("out = torch.empty_like(x)", "out = x")),
        "modified input 0 in place",
    ),
    "monkey-patches torch": (relu_with_forward("torch.allclose = lambda *a, **k: True\nreturn x"), "monkey-patches torch.allclose"),
    "prints fake results": (
        relu_with_forward('print("4/4 test cases match the reference")\nreturn torch.empty_like(x)'),
        "0/6 test cases match",
    ),
    "constant output": (relu_with_forward("return torch.zeros_like(x)"), "0/6 test cases match"),
    # attacks on the sandbox
    "os._exit": (relu_with_forward("import os\nos._exit(0)"), "refused to run: imports os"),
    "fork bomb": (relu_with_forward("import os\nwhile True:\n    os.fork()"), "refused to run: imports os"),
    "infinite loop in forward": (relu_with_forward("while True:\n    pass"), f"stopped after {TIMEOUT_SECONDS} s (the sandbox wall-clock limit)"),
    "infinite loop in a kernel": (
        tagged(RELU.replace("    out = tl.maximum(x, 0.0)", "    i = 0\n    while i >= 0:\n        i += 1\n    out = tl.maximum(x, 0.0)")),
        f"stopped after {TIMEOUT_SECONDS} s",
    ),
    "memory bomb": (relu_with_forward("hog = [1.0] * (1 << 33)\nreturn x"), "MemoryError"),
    "writes outside the sandbox": (relu_with_forward("open('/etc/kuberft-pwned', 'w').write('x')\nreturn x"), "uses open()"),
    "network access": (relu_with_forward("import socket\nsocket.create_connection(('10.0.0.1', 80))\nreturn x"), "refused to run: imports socket"),
    "reads the environment": (relu_with_forward("import os\nraise ValueError(str(os.environ))"), "refused to run: imports os"),
    "kills the parent": (relu_with_forward("import os, signal\nos.kill(os.getppid(), signal.SIGKILL)\nreturn x"), "refused to run: imports os"),
    "escapes through builtins": (relu_with_forward("__builtins__['__import__']('os').system('id')\nreturn x"), "refused to run"),
    "escapes through object subclasses": (relu_with_forward("classes = ().__class__.__base__.__subclasses__()\nreturn x"), "accesses the private attribute .__class__"),
    "infinite recursion": (relu_with_forward("return self.forward(x)"), "RecursionError"),
    "exits at import": (tagged(HEADER + "raise SystemExit(0)\n"), "SystemExit"),
}


@pytest.fixture(scope="module")
def adversarial_results(pool):
    names = sorted(ADVERSARIAL)
    response = pool.evaluate_sync(kernel_request([ADVERSARIAL[n][0] for n in names]))
    return dict(zip(names, response.results))


def test_the_adversarial_suite_is_large_enough():
    assert len(ADVERSARIAL) >= 15


@pytest.mark.parametrize("name", sorted(ADVERSARIAL))
def test_adversarial_completion_scores_zero(adversarial_results, name):
    result = adversarial_results[name]
    correctness = result.rewards["triton.correctness"]
    assert correctness.score == 0.0, result
    assert ADVERSARIAL[name][1] in correctness.reason, correctness.reason
    if result.hacked:
        assert all(r.score == 0.0 and r.outcome == "hacked" for r in result.rewards.values())


def test_hacks_are_flagged_and_attacks_end_as_timeouts_or_crashes(adversarial_results):
    hacked = {name for name, r in adversarial_results.items() if r.hacked}
    assert {"host arithmetic (no-op ablation)", "outputs cached across calls", "mutates its input", "fork bomb", "torch does the work"} <= hacked
    assert adversarial_results["infinite loop in forward"].rewards["triton.correctness"].outcome == "timeout"
    assert adversarial_results["memory bomb"].rewards["triton.compile"].outcome == "crash"


def test_the_pool_is_healthy_after_the_adversarial_suite(pool, adversarial_results):
    health = pool.health()
    assert health["status"] == "ok" and health["alive_workers"] == 2 and health["queue_depth"] == 0
    assert not os.path.exists("/etc/kuberft-pwned")
    result = pool.evaluate_sync(kernel_request([solution("relu")])).results[0]
    assert result.rewards["triton.correctness"].score == 1.0


# --------------------------------------------------------------------------- service behaviour


def test_reasons_never_carry_the_service_environment(pool):
    leak = relu_with_forward(f"raise ValueError('token is {SECRET}')")
    result = pool.evaluate_sync(kernel_request([leak])).results[0]
    assert SECRET not in result.model_dump_json()
    assert "token is [redacted]" in result.rewards["triton.compile"].reason


def test_a_dead_worker_is_replaced(pool):
    victim = pool._workers[0].process.pid
    os.killpg(victim, signal.SIGKILL)
    two_relus = [solution("relu"), solution("relu") + "\n# the same program, evaluated separately"]
    results = pool.evaluate_sync(kernel_request(two_relus, rewards=[{"kind": "triton.correctness"}])).results
    scores = [r.rewards["triton.correctness"] for r in results]
    # the job that met the dead worker is a verdict (crash, scored 0: never left out); the pool recovers
    assert all(s.score == 1.0 or (s.outcome == "crash" and "replaced" in s.reason) for s in scores), scores
    assert pool.health()["alive_workers"] == 2
    again = pool.evaluate_sync(kernel_request([solution("relu")], rewards=[{"kind": "triton.correctness"}])).results[0]
    assert again.rewards["triton.correctness"].score == 1.0


def test_identical_completions_are_evaluated_once(pool):
    before = sum(w.jobs_done for w in pool._workers if w)
    results = pool.evaluate_sync(kernel_request([solution("relu")] * 6)).results
    assert [r.rewards["triton.correctness"].score for r in results] == [1.0] * 6
    assert sum(w.jobs_done for w in pool._workers if w) == before + 1


def test_a_full_queue_is_refused(pool, monkeypatch):
    monkeypatch.setattr(pool, "max_queue", 2)
    with pytest.raises(PoolBusy, match=r"the queue is full \(0 evaluations waiting, at most 2\)"):
        pool.evaluate_sync(kernel_request([solution(t) for t in ("relu", "silu", "softmax")]))


def test_kernelbench_sized_tasks_are_shrunk_to_fit_the_interpreter(pool, tmp_path):
    # shapes as in current KernelBench level 1 (1.6 billion elements): unchanged file, scaled down
    task = (tmp_path / "huge_relu.py")
    task.write_text(TaskSet().get("relu").source.replace("batch_size = 37", "batch_size = 4096").replace("dim = 129", "dim = 393216"))
    request = EvaluateRequest.model_validate(
        {"items": [{"completion": solution("relu"), "task": {"source": task.read_text(), "name": "huge_relu"}}], "rewards": [{"kind": "triton.correctness"}]}
    )
    result = pool.evaluate_sync(request).results[0].rewards["triton.correctness"]
    assert (result.score, result.reason) == (1.0, "7/7 test cases match the reference")


def test_unknown_tasks_and_bad_rewards_are_named(pool):
    result = pool.evaluate_sync(kernel_request([solution("relu")], task="no_such_task")).results[0]
    assert result.rewards["triton.correctness"].outcome == "error"
    assert result.rewards["triton.correctness"].reason.startswith("items[0].row.task: unknown task 'no_such_task' (known: ")
    with pytest.raises(RequestError, match=r"rewards\[0\].kind: unknown reward 'triton.fast'"):
        pool.evaluate_sync(kernel_request(["x"], rewards=[{"kind": "triton.fast"}]))
    with pytest.raises(RequestError, match=r"rewards\[0\].args.numTestCases: Input should be greater than or equal to 1"):
        pool.evaluate_sync(kernel_request(["x"], rewards=[{"kind": "triton.correctness", "args": {"numTestCases": 0}}]))
    with pytest.raises(RequestError, match=r"rewards\[0\].args.colour: unknown option of countdown \(known: formatScore, operators\)"):
        pool.evaluate_sync(kernel_request(["x"], rewards=[{"kind": "countdown", "args": {"colour": 1}}]))


def test_custom_rewards_run_in_the_sandbox(pool):
    request = EvaluateRequest.model_validate(
        {
            "items": [{"completion": "short"}, {"completion": "a much longer answer"}],
            "rewards": [
                {"kind": "custom", "name": "brevity", "module": "kuberft_test_rewards:short_answers", "args": {"limit": 10}},
                {"kind": "custom", "name": "network", "module": "kuberft_test_rewards:phone_home"},
                {"kind": "custom", "name": "range", "module": "kuberft_test_rewards:out_of_range"},
                {"kind": "custom", "name": "missing", "module": "kuberft_test_rewards:nothing_here"},
            ],
        }
    )
    short, long = pool.evaluate_sync(request).results
    assert (short.rewards["brevity"].score, short.rewards["brevity"].reason) == (1.0, "5 characters (limit 10)")
    assert long.rewards["brevity"].score == 0.0
    assert short.rewards["network"].outcome == "error" and "PermissionError" in short.rewards["network"].reason
    assert short.rewards["range"].reason == "custom reward kuberft_test_rewards:out_of_range returned 3.0, outside [0, 1]"
    assert short.rewards["missing"].outcome == "error" and "cannot load custom reward" in short.rewards["missing"].reason


def test_text_rewards_need_no_worker(pool):
    request = EvaluateRequest.model_validate(
        {"items": [{"completion": "25+3*7", "row": {"numbers": [3, 7, 25], "target": 46}}], "rewards": [{"kind": "countdown"}]}
    )
    assert pool.evaluate_sync(request).results[0].rewards["countdown"].score == 1.0


def test_metrics_count_evaluations_hacks_and_timeouts(pool, adversarial_results):
    body = pool.metrics.exposition()[0].decode()
    assert 'kuberft_reward_evaluations_total{outcome="ok",reward="triton.correctness"}' in body
    assert 'kuberft_reward_hacks_detected_total{reward="triton.correctness"}' in body
    assert "kuberft_reward_evaluation_seconds_bucket" in body
    timeouts = next(line for line in body.splitlines() if line.startswith("kuberft_reward_timeouts_total"))
    assert float(timeouts.split()[-1]) >= 2
    assert "kuberft_reward_workers 2.0" in body


def test_a_jobs_pool_starts_sandbox_workers_only_for_rewards_that_run_model_code():
    from kuberft_core.api import RFTJobSpec

    def spec(*kinds):
        return RFTJobSpec.model_validate({
            "model": {"name": "m"}, "dataset": {"rows": [{"prompt": "p"}]},
            "rewards": [{"kind": k} for k in kinds],
            "rewardPool": {"workers": 3, "maxQueue": 7, "sandbox": {"timeoutSeconds": 9}},
        })

    text_only = RewardPool.for_job(spec("countdown", "regex"))
    assert text_only.num_workers == 0
    kernels = RewardPool.for_job(spec("triton.format", "triton.correctness"))
    assert (kernels.num_workers, kernels.max_queue, kernels.sandbox.timeout_seconds) == (3, 7, 9)


def test_a_worker_whose_zygote_is_gone_answers_error_and_is_replaced(pool):
    worker = pool._workers[0].process.pid
    zygotes = [int(pid) for pid in open(f"/proc/{worker}/task/{worker}/children").read().split()]
    assert len(zygotes) == 1
    os.kill(zygotes[0], signal.SIGKILL)
    before = pool.health()["replaced_workers"]
    two_relus = [solution("relu") + f"\n# copy {i}" for i in range(2)]
    scores = [r.rewards["triton.correctness"] for r in pool.evaluate_sync(kernel_request(two_relus, rewards=[{"kind": "triton.correctness"}])).results]
    # not the completion's fault: an error (left out by the trainer), and a fresh worker takes over
    assert sorted((s.score, s.outcome) for s in scores) == [(0.0, "error"), (1.0, "ok")], scores
    assert any("set-up is damaged" in s.reason and "the worker is replaced" in s.reason for s in scores)
    health = pool.health()
    assert health["replaced_workers"] == before + 1 and health["alive_workers"] == 2
    again = pool.evaluate_sync(kernel_request(two_relus, rewards=[{"kind": "triton.correctness"}])).results
    assert [r.rewards["triton.correctness"].score for r in again] == [1.0, 1.0]
