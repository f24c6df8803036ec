"""The GRPO core against small cases computed by hand: advantages for each scaling, every
loss normalisation, asymmetric clipping, the k3 KL, and unscorable completions."""

from __future__ import annotations

import math

import pytest
import torch

from kuberft_trainer.grpo import combine_rewards, group_advantages, k3_kl, policy_loss, rollout_correction

NAN = float("nan")
EPS = 1e-4  # added to the std


def close(tensor, expected, tol=1e-6):
    assert torch.allclose(tensor.double(), torch.tensor(expected, dtype=torch.float64), atol=tol), tensor.tolist()


# --------------------------------------------------------------------------- advantages

REWARDS = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0])  # two groups of G=4


def test_group_scaling_divides_by_the_bessel_corrected_group_std():
    # group 1: mean 0.25, std sqrt((0.75^2 + 3 * 0.25^2) / 3) = 0.5; group 2: all equal -> 0
    adv = group_advantages(REWARDS, 4, "group")
    close(adv, [0.75 / (0.5 + EPS), -0.25 / (0.5 + EPS), -0.25 / (0.5 + EPS), -0.25 / (0.5 + EPS), 0, 0, 0, 0])


def test_batch_scaling_uses_group_mean_and_batch_std():
    # batch: mean 0.625, squares 5 * 0.375^2 + 3 * 0.625^2 = 1.875, std sqrt(1.875 / 7)
    std = math.sqrt(1.875 / 7)
    adv = group_advantages(REWARDS, 4, "batch")
    close(adv, [0.75 / (std + EPS)] + [-0.25 / (std + EPS)] * 3 + [0.0] * 4)


def test_no_scaling_only_subtracts_the_group_mean():
    close(group_advantages(REWARDS, 4, "none"), [0.75, -0.25, -0.25, -0.25, 0, 0, 0, 0])


def test_unscorable_completions_are_left_out_of_the_group_and_get_zero_advantage():
    # valid rewards 1, 0, 0: mean 1/3, std sqrt((4/9 + 2/9) / 2) = sqrt(1/3)
    adv = group_advantages(torch.tensor([1.0, NAN, 0.0, 0.0, NAN, NAN, NAN, NAN]), 4, "group")
    std = math.sqrt(1 / 3)
    close(adv, [(2 / 3) / (std + EPS), 0.0, (-1 / 3) / (std + EPS), (-1 / 3) / (std + EPS), 0, 0, 0, 0])
    assert not torch.isnan(adv).any()


def test_a_group_with_one_scorable_completion_has_zero_advantage():
    close(group_advantages(torch.tensor([NAN, 0.7, NAN]), 3, "group"), [0.0, 0.0, 0.0])


def test_advantages_reject_rewards_that_do_not_split_into_groups():
    with pytest.raises(ValueError, match="num_generations=4"):
        group_advantages(torch.zeros(6), 4)
    with pytest.raises(ValueError, match="scale must be"):
        group_advantages(torch.zeros(4), 2, "std")


def test_combined_reward_is_the_weighted_sum_and_a_failed_evaluation_makes_it_unscorable():
    scores = torch.tensor([[1.0, 0.5], [0.0, NAN]])
    total = combine_rewards(scores, torch.tensor([2.0, -1.0]))
    assert total[0].item() == pytest.approx(1.5)
    assert math.isnan(total[1].item())


# --------------------------------------------------------------------------- loss

# Two completions: the first (advantage 2) has 3 tokens, the second (advantage -1) has 1.
MASK = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
ADV = torch.tensor([2.0, -1.0])
ZERO = torch.zeros(2, 3)


@pytest.mark.parametrize(
    ("loss_type", "expected"),
    [
        ("grpo", (-2.0 + 1.0) / 2),  # per-sequence mean (-2 and +1), then mean over sequences
        ("bnpo", (-6.0 + 1.0) / 4),  # token mean over the batch
        ("dapo", (-6.0 + 1.0) / 4),  # token mean over the step (= the batch here)
        ("dr_grpo", (-6.0 + 1.0) / (2 * 3)),  # token sum / (B * T) without a max length
    ],
)
def test_on_policy_loss_is_minus_the_advantage_with_each_normalisation(loss_type, expected):
    loss, stats = policy_loss(ZERO, ZERO, ADV, MASK, loss_type=loss_type)
    assert loss.item() == pytest.approx(expected)
    assert stats["clip_ratio"] == 0.0 and stats["kl"] == 0.0 and stats["tokens"] == 4.0


def test_dr_grpo_divides_by_the_max_completion_length_not_the_padded_length():
    loss, _ = policy_loss(ZERO, ZERO, ADV, MASK, loss_type="dr_grpo", max_completion_length=10)
    assert loss.item() == pytest.approx(-5.0 / 20)


def test_ratio_above_one_plus_epsilon_high_is_clipped_for_a_positive_advantage():
    logprobs = torch.full((1, 1), math.log(1.5), requires_grad=True)
    loss, stats = policy_loss(logprobs, torch.zeros(1, 1), torch.tensor([1.0]), torch.ones(1, 1))
    assert loss.item() == pytest.approx(-1.2)  # min(1.5 * 1, 1.2 * 1)
    loss.backward()
    assert logprobs.grad.item() == 0.0  # the clipped side carries no gradient
    assert stats["clip_ratio"] == 1.0 and stats["clip_ratio_high"] == 1.0 and stats["clip_ratio_low"] == 0.0


def test_ratio_below_one_minus_epsilon_low_is_clipped_for_a_negative_advantage():
    logprobs = torch.full((1, 1), math.log(0.5))
    loss, stats = policy_loss(logprobs, torch.zeros(1, 1), torch.tensor([-1.0]), torch.ones(1, 1))
    assert loss.item() == pytest.approx(0.8)  # -min(0.5 * -1, 0.8 * -1)
    assert stats["clip_ratio_low"] == 1.0 and stats["clip_ratio_high"] == 0.0


def test_clip_higher_lets_a_positive_advantage_ratio_grow_to_one_plus_epsilon_high():
    logprobs = torch.full((1, 1), math.log(1.25), requires_grad=True)
    args = (torch.zeros(1, 1), torch.tensor([1.0]), torch.ones(1, 1))
    symmetric, _ = policy_loss(logprobs, *args, epsilon_low=0.2, epsilon_high=0.2)
    asymmetric, stats = policy_loss(logprobs, *args, epsilon_low=0.2, epsilon_high=0.28)
    assert symmetric.item() == pytest.approx(-1.2)
    assert asymmetric.item() == pytest.approx(-1.25)
    assert stats["clip_ratio"] == 0.0
    asymmetric.backward()
    assert logprobs.grad.item() == pytest.approx(-1.25)  # d(-r)/dlogp = -r


def test_clipping_does_not_hold_back_a_ratio_moving_against_the_advantage():
    # ratio 0.5 with a positive advantage: min(0.5, 0.8) keeps the unclipped term and its gradient
    logprobs = torch.full((1, 1), math.log(0.5), requires_grad=True)
    loss, stats = policy_loss(logprobs, torch.zeros(1, 1), torch.tensor([1.0]), torch.ones(1, 1))
    assert loss.item() == pytest.approx(-0.5)
    loss.backward()
    assert logprobs.grad.item() == pytest.approx(-0.5)
    assert stats["clip_ratio"] == 0.0


def test_k3_kl_is_added_per_token_with_beta():
    delta = math.log(2.0)  # reference twice as likely as the policy
    k3 = 2.0 - delta - 1.0
    assert k3_kl(torch.zeros(1), torch.tensor([delta])).item() == pytest.approx(k3)
    ref = torch.full((2, 3), delta)
    loss, stats = policy_loss(ZERO, ZERO, ADV, MASK, ref_logprobs=ref, beta=0.1, loss_type="dapo")
    assert loss.item() == pytest.approx((-6.0 + 1.0) / 4 + 0.1 * k3)
    assert stats["kl"] == pytest.approx(k3)


def test_kl_is_reported_but_not_added_when_beta_is_zero():
    ref = torch.full((2, 3), math.log(2.0))
    loss, stats = policy_loss(ZERO, ZERO, ADV, MASK, ref_logprobs=ref, beta=0.0)
    assert loss.item() == pytest.approx(-1.25)
    assert stats["kl"] > 0


def test_masked_tokens_contribute_nothing():
    logprobs = torch.tensor([[0.0, 0.0, 5.0]], requires_grad=True)
    loss, _ = policy_loss(logprobs, torch.zeros(1, 3), torch.tensor([1.0]), torch.tensor([[1.0, 1.0, 0.0]]))
    assert loss.item() == pytest.approx(-1.0)
    loss.backward()
    assert logprobs.grad[0, 2].item() == 0.0


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
def test_micro_batches_with_step_totals_add_up_to_the_whole_step(loss_type):
    generator = torch.Generator().manual_seed(0)
    logprobs = torch.randn(4, 5, generator=generator).requires_grad_()
    old = logprobs.detach() + 0.1 * torch.randn(4, 5, generator=generator)
    adv = torch.randn(4, generator=generator)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [1, 0, 0, 0, 0]], dtype=torch.float32)
    if loss_type == "bnpo":  # bnpo is a token mean per micro-batch by definition: compare equal-token halves
        mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [1, 1, 0, 0, 0]], dtype=torch.float32)
    kwargs = dict(loss_type=loss_type, max_completion_length=5)
    whole, _ = policy_loss(logprobs, old, adv, mask, **kwargs)
    (whole_grad,) = torch.autograd.grad(whole, logprobs)
    parts = [
        policy_loss(logprobs[s], old[s], adv[s], mask[s], step_sequences=4, step_tokens=float(mask.sum()), **kwargs)[0]
        for s in (slice(0, 2), slice(2, 4))
    ]
    (parts_grad,) = torch.autograd.grad(sum(parts), logprobs)
    assert sum(parts).item() == pytest.approx(whole.item(), abs=1e-6)
    assert torch.allclose(parts_grad, whole_grad, atol=1e-6)


def test_policy_loss_rejects_mismatched_shapes_with_the_shapes_in_the_message():
    with pytest.raises(ValueError, match=r"\(2, 3\), \(2, 3\), \(2, 2\)"):
        policy_loss(ZERO, ZERO, ADV, torch.ones(2, 2))
    with pytest.raises(ValueError, match="advantages must be"):
        policy_loss(ZERO, ZERO, torch.ones(3), MASK)
    with pytest.raises(ValueError, match="beta != 0 needs ref_logprobs"):
        policy_loss(ZERO, ZERO, ADV, MASK, beta=0.1)


def test_rollout_correction_weights_are_the_probability_ratio_truncated_at_the_cap():
    trainer = torch.log(torch.tensor([[0.5, 0.2, 0.9, 0.3]]))
    rollout = torch.log(torch.tensor([[0.5, 0.4, 0.3, 0.9]]))
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    weights, stats = rollout_correction(trainer, rollout, mask, cap=2.0)
    # ratios 1, 0.5, 3 (capped at 2); the masked token keeps weight 1
    assert torch.allclose(weights, torch.tensor([[1.0, 0.5, 2.0, 1.0]]))
    assert stats["rollout_is_weight_mean"] == pytest.approx(3.5 / 3)
    assert stats["rollout_is_capped"] == pytest.approx(1 / 3)
    assert stats["rollout_logprob_diff_max"] == pytest.approx(math.log(3))
    assert stats["rollout_logprob_diff_mean"] == pytest.approx((0 + math.log(2) + math.log(3)) / 3)
    with pytest.raises(ValueError, match="one shape"):
        rollout_correction(trainer, rollout[:, :3], mask, cap=2.0)


def test_rollout_weights_scale_the_surrogate_per_token_but_not_the_kl():
    logprobs = torch.log(torch.tensor([[0.5, 0.25]]))
    ref = torch.log(torch.tensor([[0.4, 0.5]]))
    mask = torch.ones(1, 2)
    advantages = torch.tensor([2.0])
    weights = torch.tensor([[0.5, 2.0]])
    plain, _ = policy_loss(logprobs, logprobs, advantages, mask, ref_logprobs=ref, beta=0.1, loss_type="bnpo")
    weighted, _ = policy_loss(logprobs, logprobs, advantages, mask, ref_logprobs=ref, beta=0.1, loss_type="bnpo",
                              rollout_weights=weights)
    kl = k3_kl(logprobs, ref)[0]
    # on-policy surrogate per token: -A; weighted: -A * w; the KL term is the same in both
    assert float(plain) == pytest.approx(float((-2.0 + 0.1 * kl).mean()))
    assert float(weighted) == pytest.approx(float((-2.0 * weights[0] + 0.1 * kl).mean()))
