"""The report of a local run: `report.json` (config, per-step metrics, the step each reward first
reached 0.5, final evaluation) and `report.png` (reward curves per function, completions caught
hacking, loss and KL over steps)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def reward_summary(steps: list[dict[str, Any]], window: int = 10) -> dict[str, dict[str, float]]:
    """Per reward function (and `total`): mean over the first and the last `window` steps.
    `steps` are the trainer's per-step metrics; a step with nothing scorable (reward None) is
    left out of the total's mean."""
    if not steps:
        return {}
    window = max(1, min(window, len(steps) // 2 or 1))
    names = list(steps[0]["rewards"]) + ["total"]

    def mean(rows: list[dict[str, Any]], name: str) -> float:
        values = [r["reward"] if name == "total" else r["rewards"][name] for r in rows]
        values = [v for v in values if v is not None]
        return sum(values) / len(values) if values else float("nan")

    return {
        name: {"first": mean(steps[:window], name), "last": mean(steps[-window:], name)}
        for name in names
    }


def first_steps_at_half(steps: list[dict[str, Any]]) -> dict[str, int | None]:
    """Per reward function, the first step whose mean score reached 0.5 (None: never): the order
    the rewards were learnt in (for kernels: a well-formed program, then one that compiles, then
    a correct one)."""
    names = list(steps[0]["rewards"]) if steps else []
    return {name: next((s["step"] for s in steps if s["rewards"].get(name, 0.0) >= 0.5), None) for name in names}


def write_report(output_dir: Path, *, config: dict[str, Any], steps: list[dict[str, Any]],
                 final_eval: dict[str, Any] | None) -> tuple[Path, Path]:
    """Write report.json and report.png under `output_dir`; returns both paths."""
    output_dir.mkdir(parents=True, exist_ok=True)
    json_path = output_dir / "report.json"
    report = {
        "config": config,
        "steps": steps,
        "summary": reward_summary(steps),
        "first_step_at_half": first_steps_at_half(steps),
        "final_eval": final_eval,
    }
    json_path.write_text(json.dumps(report, indent=2))
    png_path = output_dir / "report.png"
    beta = config.get("spec", {}).get("grpo", {}).get("beta", 0.0)
    _plot(steps, png_path, title=config.get("name", "RFT run"), kl_measured=beta > 0)
    return json_path, png_path


def _plot(steps: list[dict[str, Any]], path: Path, title: str, kl_measured: bool) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = [s["step"] for s in steps]
    figure, axes = plt.subplots(2, 2, figsize=(13, 8))
    (rewards_ax, hacks_ax), (loss_ax, kl_ax) = axes
    if steps:
        for name, first in first_steps_at_half(steps).items():
            reached = "never 0.5" if first is None else f"0.5 at step {first}"
            rewards_ax.plot(xs, [s["rewards"].get(name, float("nan")) for s in steps], label=f"{name} ({reached})", alpha=0.8)
        totals = [s["reward"] if s["reward"] is not None else float("nan") for s in steps]
        rewards_ax.plot(xs, _smooth(totals), label="total (smoothed)", color="black")
        rewards_ax.legend(loc="lower right", fontsize=8)
        hacks_ax.bar(xs, [s.get("hacked", 0) for s in steps], color="tab:red")
        loss_ax.plot(xs, [s["loss"] for s in steps], color="tab:red")
        if kl_measured:
            kl_ax.plot(xs, [s["kl"] for s in steps], color="tab:purple")
    rewards_ax.set(title="mean reward per function (when its mean first reached 0.5)", xlabel="step", ylabel="reward")
    hacks_ax.set(title="completions caught hacking per step", xlabel="step", ylabel="completions")
    hacks_ax.yaxis.get_major_locator().set_params(integer=True)
    loss_ax.set(title="policy loss", xlabel="step")
    kl_ax.set(title="KL to the base model", xlabel="step")
    if not kl_measured:
        kl_ax.text(0.5, 0.5, "grpo.beta = 0: no KL term, not measured", ha="center", va="center", transform=kl_ax.transAxes)
    for ax in axes.flat:
        ax.grid(alpha=0.3)
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def _smooth(values: list[float], window: int = 10) -> list[float]:
    """Trailing mean over `window` steps, skipping NaN (steps with nothing scorable)."""
    out = []
    for i in range(len(values)):
        chunk = [v for v in values[max(0, i - window + 1): i + 1] if v == v]
        out.append(sum(chunk) / len(chunk) if chunk else float("nan"))
    return out
