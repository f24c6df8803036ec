"""Step progress on the terminal: a progress bar with step/total, mean reward per function,
tokens/s and ETA, or one log line per step when output is not a terminal."""

from __future__ import annotations

import logging

log = logging.getLogger("kuberft.train")


def step_summary(m) -> str:
    """`reward 0.41 (countdown=0.41) loss 0.0123 kl 0.0000 tok/s 950` for a StepMetrics."""
    reward = "n/a" if m.reward is None else f"{m.reward:.3f}"
    per_function = " ".join(f"{name}={value:.2f}" for name, value in m.rewards.items())
    text = f"reward {reward} ({per_function}) loss {m.loss:.4f} kl {m.kl:.4f} tok/s {m.tokens_per_second:.0f}"
    if m.reward_failures:
        text += f" failed-evals {m.reward_failures}"
    if m.eval_pass_at_1 is not None:
        text += f" eval-pass@1 {m.eval_pass_at_1:.3f}"
    return text


class StepProgress:
    """Callable as the trainer's `on_step`; `close()` when training ends."""

    def __init__(self, bar: bool):
        self.use_bar = bar
        self.bar = None

    def __call__(self, m) -> None:
        if self.use_bar and self.bar is None:
            from tqdm import tqdm

            self.bar = tqdm(total=m.total_steps, initial=m.step - 1, unit="step", dynamic_ncols=True)
        if self.bar is not None:
            self.bar.set_postfix_str(step_summary(m), refresh=False)
            self.bar.update(1)
        else:
            log.info("step %d/%d %s (%.1fs)", m.step, m.total_steps, step_summary(m), m.step_seconds)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
