"""The reward catalogue (kuberft_core.reward_kinds) is the one list of reward kinds and their
options: the API's RewardSpec, `kuberft validate` and the reward pool all read it."""

from __future__ import annotations

from typing import get_args

import pytest

from kuberft_core import reward_kinds
from kuberft_core.api import RewardSpec
from kuberft_core.manifests import check_document
from kuberft_core.reward_protocol import RewardRequest
from kuberft_reward import rewards


def test_the_pool_implements_exactly_the_kinds_of_the_catalogue():
    assert sorted(rewards.IMPLEMENTED_KINDS) == sorted(reward_kinds.REWARD_KINDS)
    assert len(set(rewards.IMPLEMENTED_KINDS)) == len(rewards.IMPLEMENTED_KINDS)


def test_the_api_offers_exactly_the_kinds_of_the_catalogue():
    assert get_args(RewardSpec.model_fields["kind"].annotation) == tuple(reward_kinds.REWARD_KINDS)


def test_every_builtin_kind_has_options_that_reject_a_typo():
    for kind, info in reward_kinds.REWARD_KINDS.items():
        if kind == "custom":
            assert reward_kinds.options_problems(kind, {"anything": 1}) == []
            continue
        assert info.options().model_dump()  # every option has a default: `args` may be left out
        [(path, message)] = reward_kinds.options_problems(kind, {"colour": 1})
        assert path == "colour" and message.startswith(f"unknown option of {kind} (known: ")


def job(rewards_: list[dict]) -> dict:
    return {
        "apiVersion": "kuberft.io/v1alpha1",
        "kind": "RFTJob",
        "metadata": {"name": "typo"},
        "spec": {"model": {"name": "tiny"}, "dataset": {"builtin": {"name": "countdown"}}, "rewards": rewards_},
    }


def test_validate_names_the_bad_option_of_a_reward():
    _, problems = check_document(job([
        {"kind": "countdown"},
        {"kind": "triton.correctness", "args": {"numTestCase": 4}},
        {"kind": "regex", "args": {"pattern": "("}},
        {"kind": "triton.speed", "args": {"maxSpeedup": 0.5}},
    ]))
    assert [(p.path, p.message) for p in problems] == [
        ("spec.rewards[1].args.numTestCase",
         "unknown option of triton.correctness (known: tag, numTestCases, seed, shapes, atol, rtol, maxElements, maxSpeedup)"),
        ("spec.rewards[2].args.pattern",
         "not a valid regular expression: missing ), unterminated subpattern at position 0"),
        ("spec.rewards[3].args.maxSpeedup", "Input should be greater than 1"),
    ]


def test_custom_args_are_passed_as_given():
    spec = RewardSpec.model_validate({"kind": "custom", "module": "pkg.mod:fn", "args": {"limit": 10, "anyName": [1]}})
    assert spec.args == {"limit": 10, "anyName": [1]}
    [plan] = rewards.plan_rewards([RewardRequest(kind="custom", module="pkg.mod:fn", args={"limit": 10})])
    assert plan.args == {"limit": 10}


def test_the_pool_checks_args_with_the_same_models():
    [plan] = rewards.plan_rewards([RewardRequest(kind="countdown", args={"formatScore": 0.1})])
    assert plan.args == {"formatScore": 0.1, "operators": "+-*/"}
    with pytest.raises(rewards.RequestError, match=r"^rewards\[0\]\.args\.numTestCase: unknown option of triton.speed"):
        rewards.plan_rewards([RewardRequest(kind="triton.speed", args={"numTestCase": 4})])
