"""`tiny:triton-shape`, the starting point of the RFT-against-SFT experiment: what its
pretraining material holds (each family op alone and in generic chains, never two family ops
next to each other), the tokenizer learnt from it, and the built model."""

from __future__ import annotations

import random

import pytest

from kuberft_core import kernel_families as kf
from kuberft_core.models import build_line_bpe_tokenizer
from kuberft_core.tasksets import family_row
from kuberft_core.tiny_zoo import TRITON_SHAPE_PROMPT, TritonShapeMaterial

MATERIAL = TritonShapeMaterial()


def test_every_single_op_family_task_is_in_the_material_with_its_reference_answer():
    singles = [c for c in kf.catalogue() if c.kind == "ew" and len(c.ops) == 1]
    assert len(singles) == 17
    assert MATERIAL.singles == [TRITON_SHAPE_PROMPT.format(**family_row(c)) + family_row(c)["completion"] for c in singles]


def test_chains_never_put_two_family_ops_next_to_each_other():
    chains = [MATERIAL.chain_ops(random.Random(i)) for i in range(3000)]
    family = [[op in kf.UNARY for op in ops] for ops in chains]
    assert not any(a and b for marks in family for a, b in zip(marks, marks[1:]))
    assert all(not all(marks) for marks in family)  # every chain has a generic op
    assert 0.2 < sum(map(sum, family)) / sum(map(len, family)) < 0.5  # family ops are mixed in
    assert {op for ops in chains for op in ops if op in kf.UNARY} == set(kf.UNARY)


def test_a_chain_is_rendered_as_the_family_renders_its_programs():
    text = MATERIAL.text(["sin", "mul2", "div4"])
    prompt, answer = text.split("\n", 1)
    assert prompt == "Triton kernel for torch.sin(x) * 2 / 4"
    body = [line.strip() for line in answer.splitlines() if line.startswith("    out = ")]
    assert body == ["out = tl.sin(x)", "out = out * 2.0", "out = out / 4.0"]
    assert "sin_mul_div_kernel[grid](x, out, n, BLOCK_SIZE=1024)" in answer


def test_the_line_tokenizer_is_learnt_deterministically_and_decodes_exactly():
    corpus = MATERIAL.singles + [MATERIAL.chain(random.Random(i)) for i in range(50)]
    first = build_line_bpe_tokenizer(corpus, vocab_size=512, max_token_length=16)
    again = build_line_bpe_tokenizer(corpus, vocab_size=512, max_token_length=16)
    assert first.get_vocab() == again.get_vocab()
    text = MATERIAL.chain(random.Random(999))
    ids = first(text)["input_ids"]
    assert first.decode(ids) == text and len(ids) < len(text) / 5
    assert all("\n" not in token[:-1] and len(token) <= 16 for token in first.convert_ids_to_tokens(ids))


@pytest.mark.slow
def test_the_built_model_answers_single_op_tasks_but_not_two_family_ops_in_a_row(tmp_path, monkeypatch):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kuberft_core.tiny_zoo import resolve

    monkeypatch.setenv("KUBERFT_CACHE", str(tmp_path))
    path = resolve("tiny:triton-shape")  # about 4 minutes on 2 cores
    tokenizer, model = AutoTokenizer.from_pretrained(path), AutoModelForCausalLM.from_pretrained(path)

    def greedy(text: str) -> str:
        prompt = text.split("<triton>")[0]
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=160, do_sample=False, eos_token_id=tokenizer.eos_token_id,
                                 pad_token_id=tokenizer.pad_token_id)
        return prompt + tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)

    assert all(greedy(text) == text for text in MATERIAL.singles)
    held_out = [c for c in kf.catalogue() if c.kind == "ew" and len(c.ops) == 3 and kf.split_of(c) == "heldout"][:20]
    right = sum(greedy(text) == text for text in (TRITON_SHAPE_PROMPT.format(**family_row(c)) + family_row(c)["completion"] for c in held_out))
    assert right <= 4
