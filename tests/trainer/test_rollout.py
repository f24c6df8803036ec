"""Sampling and scoring completions: the KV-cache loop matches Hugging Face `generate`, the
log-probabilities match a plain forward of each sequence alone, and the shared-prompt forward
gives the same values and gradients as the full one."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from kuberft_core.api import LoraSpec
from kuberft_trainer.modeling import add_lora
from kuberft_trainer.rollout import generate, left_pad, sample_next, sequence_logprobs


@pytest.fixture(scope="module")
def policy(tiny_model):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    model = add_lora(AutoModelForCausalLM.from_pretrained(tiny_model), LoraSpec(r=4, alpha=8, dropout=0.0))
    torch.manual_seed(0)
    for name, parameter in model.named_parameters():
        if "lora_B" in name:  # a trained-looking adapter, not the zero init
            torch.nn.init.normal_(parameter, std=0.1)
    prompts = [tokenizer(text)["input_ids"] for text in ("hello world", "hi", "abc def ghi")]
    return model.eval(), tokenizer, prompts


def seeded(count, seed):
    return [torch.Generator().manual_seed(seed * 1000 + i) for i in range(count)]


def test_greedy_completions_equal_hugging_face_generate_with_left_padding(policy):
    model, tokenizer, prompts = policy
    ours = generate(model, prompts, num_generations=1, max_new_tokens=12, eos_token_id=tokenizer.eos_token_id,
                    pad_token_id=tokenizer.pad_token_id, temperature=0.0)
    ids, mask = left_pad(prompts, tokenizer.pad_token_id, "cpu")
    theirs = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12, do_sample=False)
    width = ours.completion_ids.shape[1]
    assert ours.completion_ids.tolist() == theirs[:, ids.shape[1]:ids.shape[1] + width].tolist()


def test_sampled_rows_are_grouped_by_prompt_and_their_logprobs_match_a_forward_of_each_alone(policy):
    model, tokenizer, prompts = policy
    rollout = generate(model, prompts, num_generations=4, max_new_tokens=10, eos_token_id=tokenizer.eos_token_id,
                       pad_token_id=tokenizer.pad_token_id, generators=seeded(3, 0))
    assert rollout.completion_ids.shape[0] == 12
    logprobs = sequence_logprobs(model, rollout)
    for row in range(12):
        prompt = prompts[row // 4]
        completion = rollout.completion_ids[row][rollout.completion_mask[row].bool()].tolist()
        with torch.no_grad():
            alone = model(torch.tensor([prompt + completion])).logits[0, len(prompt) - 1:-1].log_softmax(-1)
        expected = alone.gather(-1, torch.tensor(completion)[:, None]).squeeze(-1)
        assert torch.allclose(logprobs[row, :len(completion)], expected, atol=1e-5)
        assert rollout.truncated[row].item() == (tokenizer.eos_token_id not in completion)


def test_the_shared_prompt_forward_gives_the_same_logprobs_and_gradients(policy):
    model, tokenizer, prompts = policy
    rollout = generate(model, prompts, num_generations=4, max_new_tokens=10, eos_token_id=tokenizer.eos_token_id,
                       pad_token_id=tokenizer.pad_token_id, generators=seeded(3, 1))
    trainable = [p for p in model.parameters() if p.requires_grad]
    mask = rollout.completion_mask.bool()
    full = sequence_logprobs(model, rollout, temperature=0.7)
    shared = sequence_logprobs(model, rollout, temperature=0.7, group_size=4)
    assert torch.allclose(full[mask], shared[mask], atol=1e-5)
    full_grads = torch.autograd.grad(full[mask].sum(), trainable)
    shared_grads = torch.autograd.grad(shared[mask].sum(), trainable)
    for a, b in zip(full_grads, shared_grads):
        assert torch.allclose(a, b, atol=1e-4, rtol=1e-4)


def test_top_p_samples_only_from_the_smallest_set_reaching_the_mass():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    generator = torch.Generator().manual_seed(0)
    drawn = {sample_next(logits, 1.0, 0.8, [generator]).item() for _ in range(200)}
    assert drawn == {0, 1}  # 0.5 + 0.3 reaches 0.8
    assert sample_next(logits, 0.0, 1.0, None).item() == 0  # temperature 0 is greedy


def test_a_prompts_samples_do_not_depend_on_the_prompts_batched_with_it(policy):
    """Each prompt draws from its own generator, so splitting a step's prompts over processes
    (or batching them differently) draws the same completions."""
    model, tokenizer, prompts = policy
    options = dict(num_generations=3, max_new_tokens=10, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    together = generate(model, prompts, generators=seeded(3, 5), **options)
    for i, prompt in enumerate(prompts):
        alone = generate(model, [prompt], generators=[seeded(3, 5)[i]], **options)
        rows = together.completion_ids[3 * i:3 * i + 3]
        width = alone.completion_ids.shape[1]
        assert rows[:, :width].tolist() == alone.completion_ids.tolist()
        assert (rows[:, width:] == tokenizer.pad_token_id).all()
    with pytest.raises(ValueError, match="one per prompt"):
        generate(model, prompts, generators=seeded(2, 5), **options)
