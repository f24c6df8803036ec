"""The mathematics of GRPO, as pure tensor functions (no model, no I/O).

- `combine_rewards`: per-function scores -> one weighted total per completion.
- `group_advantages`: totals -> group-relative advantages (DeepSeekMath outcome supervision,
  with the Dr. GRPO / Lite PPO variants of the std scaling).
- `policy_loss`: the clipped surrogate objective with asymmetric clipping (DAPO clip-higher),
  an optional k3 KL term to the reference model, and the four published normalisations.

Unscorable completions (a reward pool failure, not a model error) carry NaN rewards: they are
left out of their group's mean and std and get advantage 0; the trainer also drops them from
the loss mask, so they neither push the policy nor dilute the normaliser.

Gradient accumulation: `policy_loss` takes the size of the whole optimizer step
(`step_sequences`, `step_tokens`), so that summing the losses of the micro-batches gives
exactly the loss of the step computed in one piece. Without them a single call is the step.
"""

from __future__ import annotations

from typing import Literal, Optional

import torch

LossType = Literal["grpo", "bnpo", "dr_grpo", "dapo"]
RewardScale = Literal["group", "batch", "none"]

STD_EPSILON = 1e-4
"""Added to the std before dividing (as TRL does), so a group of equal rewards gives 0, not NaN."""


def combine_rewards(scores: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Weighted total reward per completion.

    scores: (N, K) per-function scores, NaN where that evaluation failed; weights: (K,).
    A completion with any failed evaluation is unscorable: its total is NaN (scoring the
    failed part as 0 would punish the model for the pool's fault)."""
    if scores.dim() != 2 or weights.shape != (scores.shape[1],):
        raise ValueError(f"scores must be (N, K) and weights (K,), got {tuple(scores.shape)} and {tuple(weights.shape)}")
    return (scores * weights.to(scores.dtype)).sum(dim=1)  # NaN propagates


def _nan_std(values: torch.Tensor, mean: torch.Tensor, count: torch.Tensor, dim: Optional[int]) -> torch.Tensor:
    """Bessel-corrected std over the non-NaN entries (0 where fewer than two)."""
    deviations = torch.where(torch.isnan(values), torch.zeros_like(values), values - mean)
    squares = deviations.pow(2).sum(dim=dim, keepdim=dim is not None)
    return torch.where(count > 1, (squares / (count - 1).clamp(min=1)).sqrt(), torch.zeros_like(squares))


def group_advantages(rewards: torch.Tensor, num_generations: int, scale: RewardScale = "group") -> torch.Tensor:
    """Group-relative advantages.

    rewards: (P*G,) total rewards, the G completions of each prompt contiguous; NaN marks an
    unscorable completion. Returns (P*G,): reward minus its group's mean, divided by
    - "group": the group's std (Bessel-corrected) + 1e-4  (GRPO, DeepSeekMath),
    - "batch": the std of all rewards of the batch + 1e-4  (Lite PPO),
    - "none":  nothing                                      (Dr. GRPO).
    Unscorable completions are left out of means and stds and get advantage 0."""
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be 1-D (prompts x generations), got shape {tuple(rewards.shape)}")
    if num_generations < 1 or rewards.numel() % num_generations:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of num_generations={num_generations}")
    if scale not in ("group", "batch", "none"):
        raise ValueError(f"scale must be 'group', 'batch' or 'none', got {scale!r}")
    values = rewards.double().view(-1, num_generations)
    valid = ~torch.isnan(values)
    count = valid.sum(dim=1, keepdim=True).double()
    mean = torch.where(valid, values, torch.zeros_like(values)).sum(dim=1, keepdim=True) / count.clamp(min=1)
    centred = values - mean
    if scale == "group":
        centred = centred / (_nan_std(values, mean, count, dim=1) + STD_EPSILON)
    elif scale == "batch":
        flat = values.flatten()
        batch_count = (~torch.isnan(flat)).sum().double()
        batch_mean = torch.nansum(flat) / batch_count.clamp(min=1)
        centred = centred / (_nan_std(flat, batch_mean, batch_count, dim=None) + STD_EPSILON)
    advantages = torch.where(valid, centred, torch.zeros_like(centred))
    return advantages.flatten().to(rewards.dtype if rewards.is_floating_point() else torch.float32)


def k3_kl(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """Per-token KL(pi_theta || pi_ref) by Schulman's k3 estimator: exp(d) - d - 1, d = ref - logp."""
    delta = ref_logprobs - logprobs
    return torch.exp(delta) - delta - 1.0


def policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    ref_logprobs: Optional[torch.Tensor] = None,
    beta: float = 0.0,
    epsilon_low: float = 0.2,
    epsilon_high: float = 0.2,
    loss_type: LossType = "dapo",
    max_completion_length: Optional[int] = None,
    step_sequences: Optional[int] = None,
    step_tokens: Optional[float] = None,
    rollout_weights: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The clipped GRPO objective (to minimise) and its statistics.

    logprobs, old_logprobs, ref_logprobs, mask: (B, T) per completion token; advantages: (B,).
    Per token: l = -min(r*A, clip(r, 1-epsilon_low, 1+epsilon_high)*A) + beta*k3, r = exp(logp - old).
    Reduction, with M the mask and B the sequences:
    - "grpo":    mean over sequences of (sum_t M*l / sum_t M)
    - "bnpo":    sum M*l / sum M over this batch
    - "dr_grpo": sum M*l / (B * max_completion_length)   (default length: T)
    - "dapo":    sum M*l / sum M over the whole optimizer step
    With gradient accumulation pass the step's totals: `step_sequences` (all sequences of the
    step) and, for dapo, `step_tokens` (all active tokens of the step).
    `rollout_weights` (B, T): per-token weights of the surrogate (not of the KL term) correcting
    for a rollout engine that sampled from slightly other probabilities (`rollout_correction`).

    stats: clip_ratio (fraction of tokens where the clip was active, either side),
    clip_ratio_low, clip_ratio_high, kl (mean per-token k3; 0 without reference), tokens."""
    if logprobs.dim() != 2 or logprobs.shape != old_logprobs.shape or logprobs.shape != mask.shape:
        raise ValueError(
            "logprobs, old_logprobs and mask must all be (B, T); got "
            f"{tuple(logprobs.shape)}, {tuple(old_logprobs.shape)}, {tuple(mask.shape)}"
        )
    if advantages.shape != (logprobs.shape[0],):
        raise ValueError(f"advantages must be (B,) = ({logprobs.shape[0]},), got {tuple(advantages.shape)}")
    if beta != 0.0 and ref_logprobs is None:
        raise ValueError("beta != 0 needs ref_logprobs")
    if loss_type not in ("grpo", "bnpo", "dr_grpo", "dapo"):
        raise ValueError(f"loss_type must be grpo, bnpo, dr_grpo or dapo, got {loss_type!r}")

    mask = mask.to(logprobs.dtype)
    batch_size, length = logprobs.shape
    advantage = advantages.to(logprobs.dtype).unsqueeze(1)  # (B, 1), broadcast over tokens
    ratio = torch.exp(logprobs - old_logprobs)
    clipped = torch.clamp(ratio, 1.0 - epsilon_low, 1.0 + epsilon_high)
    per_token = -torch.min(ratio * advantage, clipped * advantage)
    if rollout_weights is not None:
        per_token = per_token * rollout_weights.to(per_token.dtype)

    kl = None
    if ref_logprobs is not None:
        kl = k3_kl(logprobs, ref_logprobs)
        if beta != 0.0:
            per_token = per_token + beta * kl

    tokens = mask.sum()
    sequences = batch_size if step_sequences is None else step_sequences
    masked_sum = (per_token * mask).sum()
    if loss_type == "grpo":
        loss = ((per_token * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)).sum() / sequences
    elif loss_type == "bnpo":
        loss = masked_sum / tokens.clamp(min=1.0) * (batch_size / sequences)
    elif loss_type == "dr_grpo":
        loss = masked_sum / (sequences * (max_completion_length or length))
    else:  # dapo
        loss = masked_sum / (tokens.clamp(min=1.0) if step_tokens is None else max(float(step_tokens), 1.0))

    with torch.no_grad():
        denominator = max(float(tokens), 1.0)
        low = ((ratio < 1.0 - epsilon_low) & (advantage < 0)).to(mask.dtype) * mask
        high = ((ratio > 1.0 + epsilon_high) & (advantage > 0)).to(mask.dtype) * mask
        stats = {
            "clip_ratio": float((low + high).sum()) / denominator,
            "clip_ratio_low": float(low.sum()) / denominator,
            "clip_ratio_high": float(high.sum()) / denominator,
            "kl": float((kl * mask).sum()) / denominator if kl is not None else 0.0,
            "tokens": float(tokens),
        }
    return loss, stats


def rollout_correction(trainer_logprobs: torch.Tensor, rollout_logprobs: torch.Tensor, mask: torch.Tensor,
                       cap: float) -> tuple[torch.Tensor, dict[str, float]]:
    """Truncated importance-sampling weights for completions another engine sampled: per token
    min(exp(trainer - rollout), cap) (Yao et al., "Your efficient RL framework secretly brings
    you off-policy RL training"; TRL's and verl's token-level truncation). All (B, T); the
    weights are 1 where the mask is 0.

    stats: rollout_is_weight_mean, rollout_is_capped (fraction of tokens at the cap),
    rollout_logprob_diff_mean / _max (|trainer - rollout| per token: the mismatch itself)."""
    if trainer_logprobs.shape != rollout_logprobs.shape or trainer_logprobs.shape != mask.shape:
        raise ValueError(f"trainer and rollout log-probs and mask must have one shape, got "
                         f"{tuple(trainer_logprobs.shape)}, {tuple(rollout_logprobs.shape)}, {tuple(mask.shape)}")
    active = mask.bool()
    delta = (trainer_logprobs - rollout_logprobs).where(active, torch.zeros_like(trainer_logprobs))
    raw = torch.exp(delta)
    weights = raw.clamp(max=cap)
    tokens = max(int(active.sum()), 1)
    gap = delta.abs()
    stats = {
        "rollout_is_weight_mean": float(weights[active].sum()) / tokens,
        "rollout_is_capped": float((raw[active] > cap).sum()) / tokens,
        "rollout_logprob_diff_mean": float(gap[active].sum()) / tokens,
        "rollout_logprob_diff_max": float(gap.max()) if bool(active.any()) else 0.0,
    }
    return weights, stats
