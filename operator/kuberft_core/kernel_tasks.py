"""Kernel tasks: KernelBench-style Python files (`class Model`, `get_inputs()`,
`get_init_inputs()`), found by id in the task set shipped with the pool or in extra
directories (`kuberft reward serve --tasks DIR`), or generated from the id of a task family
(`kernel_families`: `ew.relu.mul2.add1`). A file task's id is its file name without `.py`.
Reading them imports nothing: the source is text until a sandboxed child runs it."""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass
from pathlib import Path

from . import kernel_families

SHIPPED_DIR = Path(__file__).parent / "tasks" / "triton"
SOLUTIONS_DIR = SHIPPED_DIR / "solutions"
_ID = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")


@dataclass(frozen=True)
class KernelTask:
    id: str
    source: str
    path: Path | None = None


class TaskError(ValueError):
    """A task that cannot be found or is not a KernelBench-style file."""


def check_task_source(source: str, where: str) -> None:
    """Raise TaskError unless `source` defines Model, get_inputs and get_init_inputs."""
    try:
        tree = ast.parse(source)
    except SyntaxError as e:
        raise TaskError(f"{where}: not valid Python ({e.msg}, line {e.lineno})") from None
    defined = {n.name for n in tree.body if isinstance(n, (ast.ClassDef, ast.FunctionDef))}
    missing = [name for name in ("Model", "get_inputs", "get_init_inputs") if name not in defined]
    if missing:
        raise TaskError(f"{where}: a kernel task must define {', '.join(missing)}")


class TaskSet:
    """The kernel tasks the pool knows: extra directories first (they may override a shipped
    task of the same id), then the shipped set and the generated family (whose ids, such as
    `ew.relu.mul2.add1`, `ids()` does not list: there are thousands)."""

    def __init__(self, extra_dirs: list[Path] | None = None, include_shipped: bool = True):
        self.dirs = [Path(d) for d in (extra_dirs or [])]
        for d in self.dirs:
            if not d.is_dir():
                raise TaskError(f"--tasks {d}: not a directory")
        self.include_shipped = include_shipped
        if include_shipped:
            self.dirs.append(SHIPPED_DIR)

    def ids(self) -> list[str]:
        seen: dict[str, None] = {}
        for d in self.dirs:
            for path in sorted(d.glob("*.py")):
                if not path.name.startswith("_"):
                    seen.setdefault(path.stem, None)
        return list(seen)

    def get(self, task_id: str) -> KernelTask:
        if not isinstance(task_id, str) or not _ID.match(task_id):
            raise TaskError(f"{task_id!r} is not a task id (a file name without .py)")
        for d in self.dirs:
            path = d / f"{task_id}.py"
            if path.is_file():
                source = path.read_text()
                check_task_source(source, str(path))
                return KernelTask(task_id, source, path)
        if self.include_shipped and kernel_families.is_family_id(task_id):
            try:
                composition = kernel_families.parse(task_id)
            except ValueError as e:
                raise TaskError(str(e)) from None
            return KernelTask(task_id, kernel_families.task_source(composition))
        known = ", ".join(self.ids()) + ("; or a generated one such as ew.relu.mul2.add1" if self.include_shipped else "")
        raise TaskError(f"unknown task {task_id!r} (known: {known})")


def load_task_file(path: Path) -> KernelTask:
    """A task given as a file path (`kuberft reward eval --task TASK.py`)."""
    if not path.is_file():
        raise TaskError(f"{path}: no such file")
    source = path.read_text()
    check_task_source(source, str(path))
    return KernelTask(path.stem, source, path)


def shipped_solution(task_id: str) -> str:
    """The known-good Triton program of a shipped task (for tests and benchmarks; never
    part of a prompt)."""
    path = SOLUTIONS_DIR / f"{task_id}.py"
    if not path.is_file():
        raise TaskError(f"no shipped solution for {task_id!r}")
    return path.read_text()
