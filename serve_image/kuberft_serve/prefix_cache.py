"""Automatic prefix caching: the keys and values of prompts' leading tokens, kept after their
prefill and reused by later requests whose prompt starts with the same tokens for the same served
model (vLLM's automatic prefix caching): a shared system prompt, a chat's earlier turns, a prompt
sent again. A request that finds its first m tokens here prefills only the rest.

Prompts are cut into blocks of `BLOCK_TOKENS` tokens; a block is kept under the key (served
model, the id of the block before it, its tokens), so it matches only after the very same
prefix, compared token by token (no hash can collide). Only whole blocks are kept; a match may
use part of its last block, and never the prompt's last token, whose logits the prefill must
give. Blocks hold their KV at the positions they were computed at, which are the positions a
reusing prompt gives them (every prompt starts at position 0).

Memory is bounded (`max_bytes`); the least recently used blocks go first, with every block
that continues them (unreachable without them). A served model's blocks are dropped when its
weights change (`forget`).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable

import torch

BLOCK_TOKENS = 16
ROOT = 0
"""The id before a prompt's first block."""


@dataclass(eq=False)
class _Block:
    id: int
    key: tuple
    kv: torch.Tensor
    """[layers, 2 (keys, values), kv_heads, BLOCK_TOKENS, head_dim]."""
    parent: "_Block | None"
    children: set[tuple] = field(default_factory=set)
    """Keys of the kept blocks that continue this one."""


class PrefixCache:
    def __init__(self, max_bytes: int):
        if max_bytes <= 0:
            raise ValueError(f"the prefix cache needs a positive memory budget, got {max_bytes} bytes")
        self.max_bytes = max_bytes
        self.bytes = 0
        self._blocks: OrderedDict[tuple, _Block] = OrderedDict()  # least recently used first
        self._next_id = ROOT + 1

    def __len__(self) -> int:
        return len(self._blocks)

    def _chain(self, model: str | None, tokens: list[int]) -> list[_Block]:
        """The kept blocks that begin `tokens`, in order."""
        chain, parent = [], ROOT
        for start in range(0, len(tokens) - BLOCK_TOKENS + 1, BLOCK_TOKENS):
            block = self._blocks.get((model, parent, tuple(tokens[start : start + BLOCK_TOKENS])))
            if block is None:
                break
            chain.append(block)
            parent = block.id
        return chain

    def _touch(self, chain: list[_Block]) -> None:
        for block in reversed(chain):  # a block stays more recent than what continues it
            self._blocks.move_to_end(block.key)

    def match(self, model: str | None, tokens: list[int]) -> torch.Tensor | None:
        """The KV [layers, 2, kv_heads, m, head_dim] of the longest kept prefix of `tokens` served
        by `model` (m < len(tokens)), or None."""
        chain = self._chain(model, tokens)
        usable = min(len(chain) * BLOCK_TOKENS, len(tokens) - 1)
        if usable <= 0:
            return None
        self._touch(chain)
        blocks = chain[: -(-usable // BLOCK_TOKENS)]
        kv = blocks[0].kv if len(blocks) == 1 else torch.cat([block.kv for block in blocks], dim=3)
        return kv[:, :, :, :usable]

    def store(self, model: str | None, tokens: list[int], prompt_kv: Callable[[], torch.Tensor]) -> None:
        """Keep the whole blocks of `tokens` not kept yet; `prompt_kv()` gives the KV of every
        token of `tokens`, [layers, 2, kv_heads, len(tokens), head_dim] (asked only when needed)."""
        chain = self._chain(model, tokens)
        whole = len(tokens) // BLOCK_TOKENS
        if len(chain) == whole:
            return
        self._touch(chain)
        kv = prompt_kv()
        keep = {block.id for block in chain}
        parent = chain[-1] if chain else None
        for index in range(len(chain), whole):
            start = index * BLOCK_TOKENS
            block_kv = kv[:, :, :, start : start + BLOCK_TOKENS].clone()
            if not self._make_room(block_kv.nbytes, keep):
                return
            key = (model, parent.id if parent else ROOT, tuple(tokens[start : start + BLOCK_TOKENS]))
            block = _Block(self._next_id, key, block_kv, parent)
            self._next_id += 1
            self._blocks[key] = block
            self.bytes += block_kv.nbytes
            if parent is not None:
                parent.children.add(key)
            keep.add(block.id)
            parent = block

    def forget(self, model: str | None) -> None:
        """Drop every block of `model` (its weights changed: its KV would be wrong)."""
        for key in [key for key in self._blocks if key[0] == model]:
            if key in self._blocks:
                self._evict(key)

    def _make_room(self, size: int, keep: set[int]) -> bool:
        while self.bytes + size > self.max_bytes:
            oldest = next(iter(self._blocks), None)
            if oldest is None or self._blocks[oldest].id in keep:
                return False
            self._evict(oldest)
        return True

    def _evict(self, key: tuple) -> None:
        block = self._blocks.pop(key)
        self.bytes -= block.kv.nbytes
        if block.parent is not None:  # a block evicted on its own leaves its parent's list too
            block.parent.children.discard(key)
        for child in list(block.children):
            self._evict(child)
