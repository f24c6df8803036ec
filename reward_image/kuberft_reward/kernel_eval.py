"""The trusted side of a kernel evaluation, run by a worker (never by the sandboxed child):
compute the reference once per task, run the candidate in a sandboxed child, compare its
outputs with the reference here, re-run it with every kernel turned into a no-op, and turn
all of it into `triton.compile`, `triton.correctness` and `triton.speed` results."""

from __future__ import annotations

import hashlib
import json
import math
import signal
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from kuberft_core.reward_protocol import Outcome, RewardResult

from . import channel, program
from .harness import tensors_in
from .sandbox import EXIT_SANDBOX_SETUP_FAILED, ChildRun, Limits
from .schema import WorkerAnswer, WorkerJob
from .zygote import Zygote

# Messages of errors that come from the interpreter's limits, not from the program.
INTERPRETER_LIMITS = (
    "not supported in interpreter mode",
    "'InterpreterBuilder' object has no attribute",
    "active drivers",
)

# atol/rtol per dtype (the same number for both), on the CPU interpreter and on a GPU (where
# tl.dot uses TF32 by default, as in KernelBench v0.1).
TOLERANCES = {
    "cpu": {"float32": 1e-4, "float64": 1e-7, "float16": 1e-2, "bfloat16": 2e-2},
    "cuda": {"float32": 1e-2, "float64": 1e-5, "float16": 1e-2, "bfloat16": 2e-2},
}


@dataclass
class Reference:
    inits: list[Any]
    perturbed: list[bool]
    """Per init: whether the parameters are re-initialised away from their defaults."""
    cases: list[dict[str, Any]]
    shrunk: dict[str, list[int]]
    skipped: list[str]
    """Derived test cases the task's domain does not allow, and why."""
    policy: dict[str, Any]
    """What host code may do (the task's `host_copies` and `host_ops`)."""
    seconds: float | None = None
    nbytes: int = 0


@dataclass
class CandidateRun:
    """What one sandboxed run of the candidate reported, as the worker parsed it."""

    child: ChildRun
    imported: bool = False
    build_error: str | None = None
    build_hack: bool = False
    tampered_with: list[str] = field(default_factory=list)
    """Attributes of torch, triton or the evaluator the program replaced or removed."""
    import_error: str | None = None
    cases: dict[int, dict[str, Any]] = field(default_factory=dict)
    done: bool = False
    tampered: str | None = None
    seconds: float | None = None


def parse_candidate_frames(run: ChildRun, expected: list[int]) -> CandidateRun:
    """Read a candidate child's frames strictly: `stage` (or an import error), then either a
    build error or one `case` frame per test case in order, an optional `timing`, and `done`,
    then a clean exit. Anything else (a malformed, forged, repeated, out-of-order or extra
    frame, or data after `done`) marks the run as tampered; a child that does not exit cleanly
    after `done` did not finish."""
    result = CandidateRun(child=run)
    try:
        frames, complete = channel.read_frames(run.result)
    except channel.ChannelError as e:
        result.tampered = f"wrote a malformed frame to the evaluator's result channel ({e})"
        return result
    pending = list(expected)
    try:
        for position, (header, payload) in enumerate(frames):
            kind = header.get("kind")
            if result.done:
                raise channel.ChannelError(f"a {kind!r} frame after 'done'")
            if position == 0:
                if kind == "error" and header.get("stage") == "import":
                    result.import_error = str(header.get("error"))
                elif kind == "stage" and header.get("stage") == "import":
                    result.imported = True
                    result.tampered_with = [str(x) for x in header["tampered"]]
                else:
                    raise channel.ChannelError(f"the first frame is {kind!r}, not the import stage")
            elif result.import_error is not None or result.build_error is not None:
                raise channel.ChannelError(f"a {kind!r} frame after an error")
            elif kind == "error" and header.get("stage") == "build":
                result.build_error = str(header.get("error"))
                result.build_hack = bool(header.get("hack"))
            elif kind == "case":
                if not pending or header.get("index") != pending[0]:
                    raise channel.ChannelError(f"case {header.get('index')!r} out of order (expected {pending[0] if pending else 'none'})")
                pending.pop(0)
                result.tampered_with += [str(x) for x in header["tampered"] if str(x) not in result.tampered_with]
                observed = {
                    "host_ops": [str(x) for x in header["host_ops"]],
                    "kernel_torch": [str(x) for x in header["kernel_torch"]],
                    "launches": int(header["launches"]),
                    "unlaunched_outputs": [int(x) for x in header["unlaunched_outputs"]],
                }
                if "error" in header:
                    entry = {"error": str(header["error"]), **observed}
                else:
                    entry = {
                        "output": channel.decode_values(header["output"], payload),
                        "mutated_inputs": [int(x) for x in header["mutated_inputs"]],
                        "out_of_bounds_inputs": [int(x) for x in header["out_of_bounds_inputs"]],
                        "aliases_input": bool(header["aliases_input"]),
                        **observed,
                    }
                result.cases[header["index"]] = entry
            elif kind == "timing" and not pending:
                result.seconds = float(header["seconds"])
            elif kind == "done" and (not pending or result.build_error is not None):
                result.done = True
            else:
                raise channel.ChannelError(f"an unexpected {kind!r} frame")
    except (channel.ChannelError, KeyError, TypeError, ValueError) as e:
        result.tampered = f"wrote to the evaluator's result channel: {e}"
        return result
    if not complete:
        if run.clean_exit:
            result.tampered = "left a partial frame on the evaluator's result channel"
        result.done = False
    if result.done and not run.clean_exit:
        result.done = False
    return result


def _observed_hack(real: CandidateRun) -> str | None:
    """What the child saw the program do while `forward` ran, as a hack reason."""
    if real.tampered_with:
        return "changed the evaluator's environment: replaced or removed " + ", ".join(real.tampered_with[:3])
    if real.build_hack:
        return real.build_error
    for index, entry in sorted(real.cases.items()):
        if entry["host_ops"]:
            return f"torch computed on the host while forward ran (test case {index}): " + ", ".join(entry["host_ops"][:3]) + "; the work must be done in Triton kernels"
        if entry["kernel_torch"]:
            return f"a Triton kernel body called torch (test case {index}): " + ", ".join(entry["kernel_torch"][:3]) + "; the real Triton compiler refuses this"
    return None


class SandboxDamaged(RuntimeError):
    """The sandbox could not be set up in this worker: not the program's fault; the worker is replaced."""


class TaskError(Exception):
    """The task itself (not the completion) failed: reported as outcome `error`."""


def plan_for(args: dict[str, Any], device: str) -> dict[str, Any]:
    """The test plan: which seeds and shapes, from the rewards' arguments."""
    count = int(args.get("numTestCases", 4))
    base = int(args.get("seed", 0))
    seeds = [1000 + base * 7919 + i * 104729 for i in range(count)]
    shapes: list[dict | None] = [None] * count
    for extra in args.get("shapes", []) or []:
        seeds.append(1000 + base * 7919 + len(seeds) * 104729)
        shapes.append(dict(extra))
    return {
        "init_seed": 42 + base,
        "seeds": seeds,
        "shapes": shapes,
        "max_elements": int(args.get("maxElements", 1 << 20)),
        "measure": device.startswith("cuda"),
    }


def _describe_child_end(run: ChildRun, limits: Limits) -> tuple[Outcome, str]:
    """(outcome, reason) for a child that did not finish normally."""
    if run.timed_out:
        return Outcome.TIMEOUT, f"stopped after {limits.wall_seconds:g} s (the sandbox wall-clock limit)"
    if run.result_overflow:
        return Outcome.CRASH, f"sent more than {limits.result_bytes >> 20} MiB of results"
    if run.signal is not None:
        name = signal.Signals(run.signal).name if run.signal in signal.Signals._value2member_map_ else str(run.signal)
        if run.signal == signal.SIGXCPU or (run.signal == signal.SIGKILL and run.cpu_seconds >= limits.cpu_seconds):
            return Outcome.TIMEOUT, f"used more than {limits.cpu_seconds} s of CPU time"
        return Outcome.CRASH, f"killed by {name}"
    if run.exit_code == EXIT_SANDBOX_SETUP_FAILED:
        return Outcome.ERROR, "the sandbox could not be set up: " + run.log.strip().splitlines()[-1][:200] if run.log.strip() else "the sandbox could not be set up"
    return Outcome.CRASH, f"exited with status {run.exit_code} before finishing"


class KernelEvaluator:
    """Lives in a worker; keeps reference results of recent tasks in memory. Every sandboxed
    run is forked by the worker's zygote, which never holds any of them."""

    def __init__(self, zygote: Zygote, device: str, cache_bytes: int = 512 << 20):
        self.zygote = zygote
        self.device = device
        self.cache: OrderedDict[str, Reference] = OrderedDict()
        self.cache_bytes = cache_bytes

    # ------------------------------------------------------------------ reference

    def reference(self, task_source: str, plan: dict[str, Any], limits: Limits) -> Reference:
        key = hashlib.sha256((task_source + json.dumps(plan, sort_keys=True) + self.device).encode()).hexdigest()
        if key in self.cache:
            self.cache.move_to_end(key)
            return self.cache[key]
        run = self.zygote.run({"kind": "reference", "task_source": task_source, "plan": plan}, b"", limits)
        if run.exit_code == EXIT_SANDBOX_SETUP_FAILED:
            raise SandboxDamaged(_describe_child_end(run, limits)[1])
        try:
            frames, complete = channel.read_frames(run.result)
        except channel.ChannelError as e:
            raise TaskError(f"the reference sent a malformed result: {e}") from None
        if not run.clean_exit or not complete or not frames or frames[-1][0].get("kind") != "done":
            if run.timed_out:
                raise TaskError(f"the reference took longer than {limits.wall_seconds:g} s; use smaller shapes")
            tail = run.log.strip().splitlines()
            raise TaskError("the reference failed: " + (tail[-1][:300] if tail else f"exit status {run.exit_code}"))
        inits: list[Any] = []
        perturbed: list[bool] = []
        cases: list[dict[str, Any]] = []
        seconds = None
        for header, payload in frames:
            if header["kind"] == "init":
                inits.append(channel.decode_values(header["args"], payload))
                perturbed.append(bool(header.get("perturbed")))
            elif header["kind"] == "case":
                inputs, output = channel.decode_values(header["values"], payload)
                cases.append(
                    {"index": header["index"], "init": header["init"], "inputs": inputs, "output": output,
                     "shape": header.get("shape", {}), "label": header.get("label", "")}
                )
            elif header["kind"] == "timing":
                seconds = float(header["seconds"])
        done = frames[-1][0]
        policy = {"host_copies": bool(done.get("host_copies", True)), "host_ops": list(done.get("host_ops", []))}
        reference = Reference(inits, perturbed, cases, done.get("shrunk", {}), list(done.get("skipped", [])), policy, seconds, len(run.result))
        self.cache[key] = reference
        while sum(r.nbytes for r in self.cache.values()) > self.cache_bytes and len(self.cache) > 1:
            self.cache.popitem(last=False)
        return reference

    # ------------------------------------------------------------------ candidate

    def run_candidate(self, source: str, reference: Reference, plan: dict[str, Any], limits: Limits, noop: bool) -> CandidateRun:
        spec, payload = channel.encode_values((reference.inits, [c["inputs"] for c in reference.cases]))
        header = {
            "kind": "candidate", "program": source, "plan": plan, "noop": noop, "policy": reference.policy,
            "values": spec, "cases": [[c["index"], c["init"]] for c in reference.cases], "perturbed": reference.perturbed,
        }
        run = self.zygote.run(header, payload, limits)
        return parse_candidate_frames(run, [c["index"] for c in reference.cases])

    # ------------------------------------------------------------------ rewards

    def evaluate(self, job: WorkerJob) -> WorkerAnswer:
        """Score one completion with the sandboxed triton rewards named in the job."""
        limits = Limits(**job.limits.model_dump())
        args: dict[str, Any] = {}
        for kind in ("triton.compile", "triton.speed", "triton.correctness"):  # correctness' options win
            for r in job.rewards:
                if r.kind == kind:
                    args.update(r.args)
        tag = args.get("tag", "triton")
        task_name = job.task.name if job.task else "?"

        def everyone(outcome: Outcome, reason: str, **extra: Any) -> WorkerAnswer:
            return WorkerAnswer.everyone(job, outcome, reason, hacked=outcome is Outcome.HACKED, **extra)

        source = program.extract_program(job.completion, tag)
        if source is None:
            return everyone(Outcome.INVALID, f"no <{tag}>...</{tag}> block with a program")
        report = program.analyze(source, job.task.source)
        if report.syntax_error:
            return everyone(Outcome.INVALID, f"the program does not parse: {report.syntax_error}")
        if report.forbidden:
            return everyone(Outcome.HACKED, "refused to run: " + "; ".join(report.forbidden[:3]))
        if report.hacks:
            return everyone(Outcome.HACKED, "; ".join(report.hacks[:3]))
        if report.not_triton:
            return everyone(Outcome.WRONG, "the Triton compiler would refuse this kernel: " + "; ".join(report.not_triton[:3]))

        plan = plan_for(args, self.device)
        try:
            reference = self.reference(job.task.source, plan, limits)
        except TaskError as e:
            return everyone(Outcome.ERROR, f"task {task_name}: {e}")
        except (channel.ChannelError, KeyError, TypeError, ValueError) as e:
            return everyone(Outcome.ERROR, f"task {task_name}: unreadable reference ({e})")

        real = self.run_candidate(source, reference, plan, limits, noop=False)
        events = {"timeouts": int(real.child.timed_out), "crashes": int(not real.child.timed_out and real.child.signal is not None)}

        if real.child.exit_code == EXIT_SANDBOX_SETUP_FAILED:
            raise SandboxDamaged(_describe_child_end(real.child, limits)[1])
        hack_reason = real.tampered or _observed_hack(real)
        if hack_reason:
            return everyone(Outcome.HACKED, hack_reason, **events)

        compile_result = self._compile_result(real, reference, limits)
        if self.device == "cpu" and compile_result.outcome is Outcome.WRONG and report.unverifiable:
            compile_result = RewardResult.of(
                0.0, Outcome.UNVERIFIABLE,
                f"the program uses {report.unverifiable[0]}, which the CPU interpreter cannot run: {compile_result.reason}",
            )
        correctness, hack_reason, case_passed = self._correctness(real, reference, limits, report, args)
        if hack_reason is None and any(case_passed.values()):
            hack_reason = self._noop_rerun(source, reference, plan, limits, args, case_passed)
        if hack_reason:
            return everyone(Outcome.HACKED, hack_reason, **events)
        by_kind = {"triton.compile": compile_result, "triton.correctness": correctness}
        results = {r.name: by_kind.get(r.kind) or self._speed(real, reference, correctness, args) for r in job.rewards}
        return WorkerAnswer(rewards=results, **events)

    def _noop_rerun(
        self, source: str, reference: Reference, plan: dict[str, Any], limits: Limits, args: dict[str, Any], case_passed: dict[int, bool]
    ) -> str | None:
        """Run the program again with every Triton launch turned into a no-op: outputs that
        still match mean the kernels did not compute them. The re-run must report every case,
        like the real run: a program that fails, stops or goes silent only when its kernels do
        nothing is treated as evading the check."""
        noop = self.run_candidate(source, reference, plan, limits, noop=True)
        if noop.child.exit_code == EXIT_SANDBOX_SETUP_FAILED:
            raise SandboxDamaged(_describe_child_end(noop.child, limits)[1])
        if noop.tampered:
            return noop.tampered
        matched = [
            i for i, entry in noop.cases.items()
            if "output" in entry and case_passed.get(i) and not self._indistinguishable_from_zero(self._case(reference, i)["output"], args)
            and self._matches(entry["output"], self._case(reference, i)["output"], args)[0]
        ]
        if matched:
            return (
                "outputs still match the reference with every Triton launch turned into a no-op "
                f"(test case {matched[0]}): the kernels do not compute the result"
            )
        if not noop.done or len(noop.cases) < len(reference.cases):
            _, why = _describe_child_end(noop.child, limits) if not noop.child.clean_exit else ("", "it reported only some test cases")
            return f"the re-run with every Triton launch turned into a no-op did not complete ({why}): the program behaves differently when its kernels do nothing"
        return None

    def _indistinguishable_from_zero(self, expected: Any, args: dict[str, Any]) -> bool:
        """Whether zeros would match `expected` within tolerance (a loss of tiny inputs, say):
        such a case cannot tell a kernel's output from an untouched zeroed buffer."""
        import torch

        expected_tensors = list(tensors_in(expected))
        return bool(expected_tensors) and all(self._matches(torch.zeros_like(t), t, args)[0] for t in expected_tensors)

    @staticmethod
    def _case(reference: Reference, index: int) -> dict[str, Any]:
        return next(c for c in reference.cases if c["index"] == index)

    def _compile_result(self, real: CandidateRun, reference: Reference, limits: Limits) -> RewardResult:
        if real.import_error:
            return self._classify(f"importing the program failed: {real.import_error}")
        if real.build_error:
            return self._classify(f"building ModelNew failed: {real.build_error}")
        first = reference.cases[0]["index"]
        entry = real.cases.get(first)
        if entry is None:
            if not real.imported and not real.child.clean_exit:
                outcome, reason = _describe_child_end(real.child, limits)
                return RewardResult.of(0.0, outcome, f"importing the program: {reason}")
            outcome, reason = _describe_child_end(real.child, limits)
            return RewardResult.of(0.0, outcome, f"the first forward did not finish: {reason}")
        if "error" in entry:
            return self._classify(f"forward raised {entry['error']}")
        if not entry["launches"]:
            return RewardResult.of(0.0, Outcome.WRONG, "forward ran but launched no Triton kernel")
        return RewardResult.of(1.0, Outcome.OK, f"imports, builds ModelNew and runs a forward that launches {entry['launches']} Triton kernel(s)")

    def _classify(self, reason: str) -> RewardResult:
        if self.device == "cpu" and any(marker in reason for marker in INTERPRETER_LIMITS):
            return RewardResult.of(0.0, Outcome.UNVERIFIABLE, f"the Triton CPU interpreter cannot run this program: {reason}")
        if "MemoryError" in reason or "DefaultCPUAllocator" in reason:
            return RewardResult.of(0.0, Outcome.CRASH, f"ran out of memory: {reason}")
        return RewardResult.of(0.0, Outcome.WRONG, reason)

    def _tolerance(self, dtype: str, args: dict[str, Any]) -> tuple[float, float]:
        default = TOLERANCES["cuda" if self.device.startswith("cuda") else "cpu"].get(dtype, 0.0)
        return float(args.get("atol", default)), float(args.get("rtol", default))

    def _matches(self, got: Any, expected: Any, args: dict[str, Any]) -> tuple[bool, str]:
        """Whether `got` equals `expected` within tolerance, and why not."""
        import torch

        if isinstance(expected, torch.Tensor):
            if not isinstance(got, torch.Tensor):
                return False, f"returned {type(got).__name__}, expected a tensor"
            if tuple(got.shape) != tuple(expected.shape):
                return False, f"output shape {tuple(got.shape)}, expected {tuple(expected.shape)}"
            if got.dtype != expected.dtype:
                return False, f"output dtype {str(got.dtype).removeprefix('torch.')}, expected {str(expected.dtype).removeprefix('torch.')}"
            dtype = str(expected.dtype).removeprefix("torch.")
            atol, rtol = self._tolerance(dtype, args)
            if not expected.is_floating_point():
                if torch.equal(got, expected):
                    return True, ""
                bad = (got != expected).nonzero()
                return False, f"{len(bad)} element(s) differ, first at {tuple(bad[0].tolist())}"
            g, e = got.double(), expected.double()
            nan_mismatch = torch.isnan(g) != torch.isnan(e)
            diff = (g - e).abs().nan_to_num(nan=math.inf)
            same = (g == e) | (torch.isnan(g) & torch.isnan(e))  # equal infinities included
            bad = nan_mismatch | ((diff > atol + rtol * e.abs()) & ~same)
            if not bool(bad.any()):
                return True, ""
            first = tuple(bad.nonzero()[0].tolist())
            worst = float(diff[~torch.isnan(e)].max()) if (~torch.isnan(e)).any() else math.inf
            return False, (
                f"{int(bad.sum())} of {bad.numel()} elements differ, max abs error {worst:.3g}, first at {first} "
                f"(atol {atol:g}, rtol {rtol:g})"
            )
        if isinstance(expected, (list, tuple)):
            if not isinstance(got, (list, tuple)) or len(got) != len(expected):
                return False, f"returned {type(got).__name__}, expected a {type(expected).__name__} of {len(expected)}"
            for i, (a, b) in enumerate(zip(got, expected)):
                ok, why = self._matches(a, b, args)
                if not ok:
                    return False, f"output {i}: {why}"
            return True, ""
        if isinstance(expected, float) and isinstance(got, (int, float)):
            ok = math.isclose(got, expected, rel_tol=1e-4, abs_tol=1e-4)
            return ok, "" if ok else f"returned {got!r}, expected {expected!r}"
        return (got == expected), ("" if got == expected else f"returned {got!r}, expected {expected!r}")

    def _correctness(
        self, real: CandidateRun, reference: Reference, limits: Limits, report: program.ProgramReport, args: dict[str, Any]
    ) -> tuple[RewardResult, str | None, dict[int, bool]]:
        """(result, hack reason or None, passed per case)."""
        passed: dict[int, bool] = {}
        failures: list[str] = []
        hack = None
        for case in reference.cases:
            index = case["index"]
            entry = real.cases.get(index)
            if entry is None:
                passed[index] = False
                continue
            if "error" in entry:
                passed[index] = False
                failures.append(f"case {index}: raised {entry['error']}")
                continue
            if entry["mutated_inputs"]:
                hack = f"modified input {entry['mutated_inputs'][0]} in place (test case {index})"
            if entry["aliases_input"]:
                failures.append(f"case {index}: returns (a view of) one of its inputs")
                passed[index] = False
                continue
            if entry["out_of_bounds_inputs"]:
                failures.append(f"case {index}: wrote outside input {entry['out_of_bounds_inputs'][0]} (out-of-bounds store; mask it)")
                passed[index] = False
                continue
            ok, why = self._matches(entry["output"], case["output"], args)
            if ok and entry["unlaunched_outputs"] and hack is None:
                hack = f"returned output {entry['unlaunched_outputs'][0]} that no Triton kernel was given (test case {index}), yet it matches the reference"
            passed[index] = ok
            if not ok:
                failures.append(f"case {index} ({case['label']}): {why}" if case.get("label") else f"case {index}: {why}")
        repeated = self._repeated_output(real, reference, passed)
        if repeated and hack is None:
            hack = repeated
        total = len(reference.cases)
        count = sum(passed.values())
        score = count / total if total else 0.0
        if not real.done:
            # Only a run that reports every case and then exits cleanly earns credit: what a
            # child sent before it stopped cannot be told apart from frames it forged.
            outcome, why = _describe_child_end(real.child, limits)
            if real.import_error or real.build_error:
                why = real.import_error or real.build_error
                outcome = self._classify(why).outcome
            elif real.child.clean_exit:
                outcome, why = Outcome.CRASH, "it exited without reporting every test case"
            failures.append(f"stopped: {why}" if not failures else f"then stopped: {why}")
            score = 0.0
        elif count == total:
            return RewardResult.of(1.0, Outcome.OK, f"{count}/{total} test cases match the reference"), hack, passed
        else:
            outcome = Outcome.WRONG
        joined = "; ".join(failures[:2])
        result = RewardResult.of(score, outcome, f"{count}/{total} test cases match; {joined}")
        if self.device == "cpu":
            if any(marker in joined for marker in INTERPRETER_LIMITS):
                result = RewardResult.of(score, Outcome.UNVERIFIABLE, f"{count}/{total} test cases match; the Triton CPU interpreter cannot run this program: {joined}")
            elif report.unverifiable and count < total:
                result = RewardResult.of(score, Outcome.UNVERIFIABLE, f"{count}/{total} test cases match, but the program uses {report.unverifiable[0]}, which the CPU interpreter does not emulate faithfully")
        return result, hack, passed

    @staticmethod
    def _repeated_output(real: CandidateRun, reference: Reference, passed: dict[int, bool]) -> str | None:
        """A later test case returning bit for bit an earlier case's correct output, where
        the reference outputs differ, means outputs are cached across calls."""
        import torch

        seen: list[tuple[int, Any, Any]] = []
        for case in reference.cases:
            entry = real.cases.get(case["index"])
            if not entry or "output" not in entry or not isinstance(entry["output"], torch.Tensor):
                continue
            out = entry["output"]
            if out.is_floating_point() and bool(torch.isnan(out).all()):
                continue  # never written (poisoned memory), not cached
            for index, earlier, expected in seen:
                if (
                    earlier.shape == out.shape
                    and earlier.dtype == out.dtype
                    and torch.equal(earlier.reshape(-1).view(torch.uint8), out.reshape(-1).view(torch.uint8))
                    and not torch.equal(expected, case["output"])
                    and out.numel() > 1
                ):
                    return f"test case {case['index']} returned exactly the output of test case {index}: outputs are cached across calls"
            if passed.get(case["index"]):
                seen.append((case["index"], out, case["output"]))
        return None

    def _speed(self, real: CandidateRun, reference: Reference, correctness: RewardResult, args: dict[str, Any]) -> RewardResult:
        if not self.device.startswith("cuda"):
            return RewardResult.of(0.0, Outcome.UNVERIFIABLE, "speed is measured only on a GPU; this pool runs kernels in the Triton CPU interpreter")
        if correctness.score < 1.0:
            return RewardResult.of(0.0, Outcome.WRONG, "not timed: the outputs must match the reference first")
        if not real.seconds or not reference.seconds:
            return RewardResult.of(0.0, Outcome.ERROR, "no timing was recorded")
        speedup = reference.seconds / real.seconds
        best = float(args.get("maxSpeedup", 4.0))
        score = max(0.0, min(1.0, math.log(speedup) / math.log(best))) if speedup > 1 else 0.0
        return RewardResult.of(score, Outcome.OK, f"{speedup:.2f}x the PyTorch reference ({real.seconds * 1e3:.3f} ms vs {reference.seconds * 1e3:.3f} ms)")
