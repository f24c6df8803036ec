"""Checkpoints are atomic: a half-written one is never taken for the latest."""

from __future__ import annotations

import json

import torch

from kuberft_trainer.checkpoint import complete_checkpoints, latest_checkpoint, load_training_state, save_checkpoint


class FakeAdapter:
    def save_pretrained(self, folder, state_dict=None):
        folder.mkdir(parents=True)
        (folder / "adapter_config.json").write_text("{}")


def test_only_complete_checkpoints_count_and_the_oldest_are_pruned(tmp_path):
    for step in (2, 4, 6):
        save_checkpoint(tmp_path, step, FakeAdapter(), {"step": step, "x": torch.ones(2) * step}, {"note": "n"}, keep_last=2)
    assert [s for s, _ in complete_checkpoints(tmp_path)] == [4, 6]
    step, path = latest_checkpoint(tmp_path)
    assert step == 6 and torch.equal(load_training_state(path)["x"], torch.full((2,), 6.0))
    assert json.loads((path / "state.json").read_text()) == {"step": 6, "note": "n"}


def test_a_crash_mid_write_leaves_the_previous_checkpoint_as_the_latest(tmp_path):
    save_checkpoint(tmp_path, 2, FakeAdapter(), {"step": 2}, {}, keep_last=3)
    root = tmp_path / "checkpoints"
    (root / ".tmp-step-00000004-999").mkdir()  # the scratch folder of a writer killed mid-way
    (root / "step-00000006").mkdir()  # a folder without its state: never renamed into place by us
    assert latest_checkpoint(tmp_path)[0] == 2
    save_checkpoint(tmp_path, 4, FakeAdapter(), {"step": 4}, {}, keep_last=3)
    assert latest_checkpoint(tmp_path)[0] == 4
    assert not (root / ".tmp-step-00000004-999").exists()  # leftovers are cleaned up
