"""Tiny models for the serving tests, built once per session: a target, a LoRA adapter on it, a
draft model and Medusa heads, all sharing the character tokenizer."""

from __future__ import annotations

import pytest
import torch

ALPHABET = "abcdefghij ,.\n"


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    from kuberft_core.models import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("target"), alphabet=ALPHABET, hidden_size=32, num_layers=2, intermediate_size=64, seed=1)


@pytest.fixture(scope="session")
def draft_dir(tmp_path_factory):
    from kuberft_core.models import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("draft"), alphabet=ALPHABET, hidden_size=16, num_layers=1, intermediate_size=32, seed=2)


@pytest.fixture(scope="session")
def adapter_dir(tiny_dir, tmp_path_factory):
    """A LoRA adapter with random (non-zero) weights, so it visibly changes the output."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(3)
    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    config = LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False)
    peft_model = get_peft_model(model, config)
    out = tmp_path_factory.mktemp("adapter")
    peft_model.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def patterned_dir(tmp_path_factory):
    """A tiny model trained for a few seconds on phrases in random order, so its greedy output
    runs through words (a randomly initialised one just repeats its last character, which
    untrained heads would predict as well as trained ones)."""
    import random

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kuberft_core.models import build_tiny_model

    out = build_tiny_model(tmp_path_factory.mktemp("patterned"), alphabet=ALPHABET, hidden_size=48, num_layers=2,
                           intermediate_size=96, seed=0)
    rng = random.Random(0)
    phrases = ["a big cafe, ", "i hid a jade bead. ", "he fed a dog\n", "jab, jab, hi. ", "add a fig "]
    text = "".join(rng.choice(phrases) for _ in range(3000))
    ids = torch.tensor(AutoTokenizer.from_pretrained(out).encode(text))
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(out)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(150):
        starts = torch.randint(0, len(ids) - 65, (16,))
        batch = torch.stack([ids[s : s + 64] for s in starts.tolist()])
        loss = model(input_ids=batch, labels=batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.save_pretrained(out)
    adapter = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    adapter.save_pretrained(out / "adapter")
    return out
