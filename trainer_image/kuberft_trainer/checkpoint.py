"""Checkpoints under `<output>/checkpoints/step-NNNNNNNN/`, written atomically.

A checkpoint is written into a hidden temporary folder next to the others and renamed into
place only once complete (a rename is atomic on one filesystem), so a crash mid-write never
leaves a half-written checkpoint that looks like the latest: folders without the final name
or without `state.json` are ignored and cleaned up.

Contents: `adapter/` (peft format: loadable by `PeftModel.from_pretrained` and by servers),
`training_state.pt` (optimizer state keyed by parameter name, scheduler, RNG states, data
position, counters: the same whatever the number of processes and the sharding) and
`state.json` (step and a human-readable summary).
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any, Optional

import torch

CHECKPOINTS = "checkpoints"
_NAME = re.compile(r"^step-(\d{8})$")


def checkpoint_dir(output_dir: Path, step: int) -> Path:
    return output_dir / CHECKPOINTS / f"step-{step:08d}"


def complete_checkpoints(output_dir: Path) -> list[tuple[int, Path]]:
    """(step, path) of every complete checkpoint, oldest first."""
    root = output_dir / CHECKPOINTS
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        match = _NAME.match(path.name)
        if match and (path / "state.json").is_file() and (path / "training_state.pt").is_file():
            found.append((int(match.group(1)), path))
    return sorted(found)


def latest_checkpoint(output_dir: Path) -> Optional[tuple[int, Path]]:
    found = complete_checkpoints(output_dir)
    return found[-1] if found else None


def save_checkpoint(output_dir: Path, step: int, model, training_state: dict[str, Any], summary: dict[str, Any], keep_last: int,
                    adapter_state: Optional[dict[str, Any]] = None) -> Path:
    """Write the checkpoint of `step` atomically and keep only the newest `keep_last`;
    `adapter_state`: the LoRA weights in full, when the model holds only a shard of them."""
    root = output_dir / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    final = checkpoint_dir(output_dir, step)
    scratch = root / f".tmp-step-{step:08d}-{os.getpid()}"
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir()
    model.save_pretrained(scratch / "adapter", state_dict=adapter_state)
    torch.save(training_state, scratch / "training_state.pt")
    (scratch / "state.json").write_text(json.dumps({"step": step, **summary}, indent=2, sort_keys=True))
    _fsync_tree(scratch)
    if final.exists():  # the same step again (e.g. resumed and stopped at once): replace it whole
        stale = root / f".old-step-{step:08d}-{os.getpid()}"
        final.rename(stale)
        shutil.rmtree(stale, ignore_errors=True)
    scratch.rename(final)
    _fsync_dir(root)
    for _, old in complete_checkpoints(output_dir)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    for leftover in root.glob(".*-step-*"):
        shutil.rmtree(leftover, ignore_errors=True)
    return final


def rng_state() -> dict[str, Any]:
    """This process's random streams (Python, torch, CUDA, numpy)."""
    state = {
        "python": random.getstate(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }
    try:
        import numpy

        state["numpy"] = numpy.random.get_state()
    except ImportError:
        pass
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "numpy" in state:
        import numpy

        numpy.random.set_state(state["numpy"])


def load_training_state(path: Path) -> dict[str, Any]:
    # weights_only=False: the state holds RNG states and plain Python containers written by us
    return torch.load(path / "training_state.pt", map_location="cpu", weights_only=False)


def _fsync_tree(folder: Path) -> None:
    for path in folder.rglob("*"):
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
    _fsync_dir(folder)


def _fsync_dir(folder: Path) -> None:
    try:
        descriptor = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass  # some filesystems do not fsync directories; the rename is still atomic
    finally:
        os.close(descriptor)


def write_atomically(path: Path, text: str) -> None:
    scratch = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    scratch.write_text(text)
    with open(scratch, "rb") as handle:
        os.fsync(handle.fileno())
    os.replace(scratch, path)
