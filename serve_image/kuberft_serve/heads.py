"""Medusa-style speculation heads (the "Turbo" speculator) and their self-distillation training.

Each head k is one residual block on the model's final hidden state h_t, read out through the
model's own (frozen) LM head: logits_k = lm_head(h_t + SiLU(W_k h_t + b_k)). Head k predicts
the token k+1 places after the one the model predicts at t, so after the model emits a token,
heads 1..K propose the K tokens that follow it, at the cost of K small matmuls and no extra
forward pass. The blocks start at zero (each head starts as a copy of the LM head).

Training is self-distillation: the served model (with its adapter) generates completions for
the given prompts, and head k learns the model's own next-token distribution k positions ahead.
The heads are saved next to their metadata (`heads.json`, `heads.safetensors`) and loaded with
`MedusaHeads.load(dir)`.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch
from torch import nn

log = logging.getLogger(__name__)

HEADS_FORMAT = "kuberft-medusa-v1"


class MedusaHeads(nn.Module):
    def __init__(self, hidden_size: int, num_heads: int):
        super().__init__()
        self.hidden_size = hidden_size
        self.num_heads = num_heads
        self.blocks = nn.ModuleList(nn.Linear(hidden_size, hidden_size) for _ in range(num_heads))
        for block in self.blocks:
            nn.init.zeros_(block.weight)
            nn.init.zeros_(block.bias)

    def forward(self, hidden: torch.Tensor, count: int | None = None) -> torch.Tensor:
        """hidden [..., H] -> [..., count, H], the input of the LM head for heads 1..count."""
        blocks = self.blocks[: count or self.num_heads]
        return torch.stack([hidden + nn.functional.silu(block(hidden)) for block in blocks], dim=-2)

    def save(self, out_dir: str | Path, **metadata) -> Path:
        from safetensors.torch import save_file

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().float().cpu().contiguous() for k, v in self.state_dict().items()}, out / "heads.safetensors")
        meta = {"format": HEADS_FORMAT, "hidden_size": self.hidden_size, "num_heads": self.num_heads, **metadata}
        (out / "heads.json").write_text(json.dumps(meta, indent=2) + "\n")
        return out

    @classmethod
    def load(cls, path: str | Path, *, hidden_size: int | None = None) -> "MedusaHeads":
        from safetensors.torch import load_file

        path = Path(path)
        meta_file = path / "heads.json"
        if not meta_file.is_file():
            raise FileNotFoundError(f"{path} holds no heads.json: not a heads directory (train one with `kuberft serve train-heads`)")
        meta = json.loads(meta_file.read_text())
        if meta.get("format") != HEADS_FORMAT:
            raise ValueError(f"{meta_file}: format {meta.get('format')!r}, expected {HEADS_FORMAT!r}")
        if hidden_size is not None and meta["hidden_size"] != hidden_size:
            raise ValueError(
                f"{meta_file}: heads were trained for hidden size {meta['hidden_size']}, the model has {hidden_size}"
            )
        heads = cls(meta["hidden_size"], meta["num_heads"])
        heads.load_state_dict(load_file(path / "heads.safetensors"))
        return heads


def _distillation_loss(heads: MedusaHeads, lm_head: nn.Module, hidden: torch.Tensor, start: int) -> torch.Tensor:
    """Mean cross-entropy of head k at position t against the model's distribution at t+k,
    over positions t >= start (the last prompt position onwards). hidden: [L, H]."""
    losses = []
    length = hidden.shape[0]
    with torch.no_grad():
        teacher_logp = torch.log_softmax(lm_head(hidden).float(), dim=-1)  # [L, V]
    for k in range(1, heads.num_heads + 1):
        stop = length - k
        if stop <= start:
            break
        student = lm_head(heads(hidden[start:stop], count=k)[:, k - 1]).float()  # [n, V]
        teacher = teacher_logp[start + k : stop + k].exp()
        losses.append(-(teacher * torch.log_softmax(student, dim=-1)).sum(dim=-1).mean())
    return torch.stack(losses).mean() if losses else hidden.new_zeros(())


def train_heads(
    engine,
    prompts: list[list[int]],
    *,
    adapter: str | None = None,
    num_heads: int = 4,
    max_new_tokens: int = 128,
    epochs: int = 3,
    learning_rate: float = 1e-3,
    temperature: float = 0.0,
    seed: int = 0,
) -> MedusaHeads:
    """Self-distil `num_heads` heads for the engine's model (with `adapter`) on its own
    completions of `prompts` (token ids). `engine` is a `kuberft_serve.engine.Engine`; it
    generates the completions in batches, so this is fast on the serving hardware."""
    from .sampling import SamplingParams

    started = time.monotonic()
    params = [
        SamplingParams(max_tokens=max_new_tokens, temperature=temperature, seed=seed + i, ignore_eos=False)
        for i in range(len(prompts))
    ]
    completions = engine.generate_batch(prompts, params, adapter=adapter)
    runner = engine.target_runner
    model = runner.model
    lm_head = model.get_output_embeddings()
    hidden_size = runner.config.get_text_config().hidden_size
    device = runner.device
    examples = []
    for prompt, completion in zip(prompts, completions):
        ids = torch.tensor([prompt + completion], dtype=torch.long, device=device)
        if ids.shape[1] < 3:
            continue
        with torch.inference_mode():
            result = runner.forward(
                ids, None, None, torch.arange(ids.shape[1], device=device)[None], adapter=adapter, want_hidden=True
            )
        examples.append((result.hidden[0].clone(), max(len(prompt) - 1, 0)))
    if not examples:
        raise ValueError("no training text: the prompts and completions are all shorter than 3 tokens")
    dtype = next(model.parameters()).dtype
    heads = MedusaHeads(hidden_size, num_heads).to(device=device, dtype=dtype)
    optimizer = torch.optim.AdamW(heads.parameters(), lr=learning_rate)
    generator = torch.Generator().manual_seed(seed)
    for epoch in range(epochs):
        order = torch.randperm(len(examples), generator=generator).tolist()
        total = 0.0
        for index in order:
            hidden, start = examples[index]
            loss = _distillation_loss(heads, lm_head, hidden, start)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += loss.item()
        log.info("heads epoch %d/%d: distillation loss %.4f", epoch + 1, epochs, total / len(examples))
    log.info("trained %d heads on %d completions in %.1fs", num_heads, len(examples), time.monotonic() - started)
    return heads.eval().requires_grad_(False)
