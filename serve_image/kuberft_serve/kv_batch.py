"""A batch of sequences sharing one KV cache, with per-row rollback.

The cache is a transformers `DynamicCache` whose slots are aligned across rows; `valid[b, t]`
says whether slot t of row b holds a token of that row. Rows start at different slots (left
padding), and a verification step writes k+1 slots for every row, of which row b keeps only its
accepted prefix: the rest become holes, masked out of attention. Positions are tracked per row
(`next_position`), so holes do not shift the rotary positions. Trailing slots that no row keeps
are cut off (so a batch of one never has holes: its cache is exactly the plain decoding cache),
and leading slots no row uses are dropped when rows leave. Each row carries the adapter it is
decoded with (`adapters`), added and removed with it; the runner takes them all in one forward
pass.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch


@dataclass
class ForwardResult:
    logits: torch.Tensor
    """[B, n, V] float32 logits of the fed positions (or of the last one only, for prefill)."""
    hidden: torch.Tensor | None
    """[B, n, H] final (normalised) hidden states, when asked for."""


PEFT_BASE = "__base__"
"""peft's name for the base model among a mixed batch's `adapter_names`."""


class ModelRunner:
    """Calls a causal LM (optionally a peft model with several adapters) with an explicit cache.
    Rows of one forward pass may name different adapters (and None, the base model): peft's
    mixed-batch inference (`adapter_names`) applies each LoRA layer to its own rows' slice of the
    batch; a pass whose rows all name the same adapter activates that one instead."""

    def __init__(self, model, *, has_adapters: bool = False):
        self.model = model
        self.has_adapters = has_adapters
        base = model.get_base_model() if has_adapters else model
        self.config = base.config
        params = inspect.signature(base.forward).parameters
        # transformers 5.x names the argument `cache`; 4.x `past_key_values`
        self.cache_kwarg = "cache" if "cache" in params else "past_key_values"
        self.device = next(model.parameters()).device

    # ------------------------------------------------------------------ adapters (peft)
    def read_adapter(self, path: str) -> str:
        """Check that `path` is a LoRA directory peft can load; peft reads it in `add_adapter`."""
        from .lora import read_adapter_config

        read_adapter_config(path)
        return path

    def add_adapter(self, name: str, path: str) -> None:
        from peft import PeftModel

        if not self.has_adapters:
            self.model = PeftModel.from_pretrained(self.model, path, adapter_name=name).eval().requires_grad_(False)
            self.has_adapters = True
        else:
            self.model.load_adapter(path, adapter_name=name)
            self.model.requires_grad_(False)

    def remove_adapter(self, name: str) -> None:
        self.model.delete_adapter(name)

    def new_cache(self):
        from transformers import DynamicCache

        return DynamicCache(config=self.config)

    @torch.inference_mode()
    def forward(
        self,
        input_ids: torch.Tensor,
        cache,
        attention_mask: torch.Tensor | None,
        position_ids: torch.Tensor,
        *,
        adapter: str | None,
        want_hidden: bool,
        last_only: bool = False,
    ) -> ForwardResult:
        kwargs = {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "position_ids": position_ids,
            self.cache_kwarg: cache,
            "use_cache": True,
            "output_hidden_states": want_hidden,
        }
        if last_only:
            kwargs["logits_to_keep"] = 1
        if isinstance(adapter, list) and len(set(adapter)) == 1:
            adapter = adapter[0]
        if not self.has_adapters:
            if adapter is not None and (not isinstance(adapter, list) or any(a is not None for a in adapter)):
                raise ValueError(f"adapter {adapter!r} is not loaded")
            out = self.model(**kwargs)
        elif isinstance(adapter, list):
            out = self.model(**kwargs, adapter_names=[PEFT_BASE if a is None else a for a in adapter])
        elif adapter is None:
            with self.model.disable_adapter():
                out = self.model(**kwargs)
        else:
            if self.model.active_adapter != adapter:
                self.model.set_adapter(adapter)
            out = self.model(**kwargs)
        hidden = out.hidden_states[-1] if want_hidden else None
        if hidden is not None and last_only:
            hidden = hidden[:, -1:]
        return ForwardResult(out.logits.float(), hidden)


def _cache_layers(cache):
    layers = getattr(cache, "layers", None)
    if layers is None:
        raise TypeError("this transformers version has no layered DynamicCache; kuberft serve needs transformers>=4.56")
    for layer in layers:
        if getattr(layer, "is_sliding", False) or not hasattr(layer, "keys"):
            raise TypeError(
                f"cache layer {type(layer).__name__} is not a full-attention layer; "
                "speculative rollback supports full-attention models only"
            )
    return layers


class SequenceBatch:
    """The KV state of B sequences for one model (the target or a draft)."""

    def __init__(self, runner: ModelRunner, adapter: str | None = None, *, want_hidden: bool = False):
        self.runner = runner
        self.adapter = adapter
        """The adapter of rows prefilled without naming one."""
        self.adapters: list[str | None] = []
        """Per row, the adapter it is decoded with (None: the base model)."""
        self.want_hidden = want_hidden
        self.cache = None
        self.valid = torch.zeros(0, 0, dtype=torch.bool, device=runner.device)  # [B, T]
        self.next_position = torch.zeros(0, dtype=torch.long, device=runner.device)  # [B]
        self._pending = 0  # slots written by the last `extend`, awaiting `commit`
        self.holes = False  # whether any slot is invalid (then attention needs a mask)

    @property
    def size(self) -> int:
        return self.valid.shape[0]

    @property
    def length(self) -> int:
        return self.valid.shape[1]

    # ------------------------------------------------------------------ feeding tokens
    def prefill(self, prompts: list[list[int]], pad_id: int, *, all_positions: bool = False,
                adapters: list[str | None] | None = None, prefixes: list[torch.Tensor | None] | None = None) -> ForwardResult:
        """Start a new batch from prompts, row b decoded with adapters[b] (default: this batch's
        adapter); returns the last position's outputs, or every position's with `all_positions`
        (prompts end at the last one). `prefixes[b]`: the KV of prompt b's first m tokens
        ([layers, 2, kv_heads, m, head_dim], from the prefix cache), which are then not computed
        again (not with `all_positions`). Equal prompts for the same adapter (the n samples of a
        request) share one row of the forward pass, whose KV row is then copied."""
        if self.size:
            raise RuntimeError("prefill starts a new batch; merge it into a running one with `merge`")
        adapters = list(adapters) if adapters is not None else [self.adapter] * len(prompts)
        prefixes = list(prefixes) if prefixes is not None else [None] * len(prompts)
        keys = [(adapter, tuple(prompt)) for adapter, prompt in zip(adapters, prompts)]
        first_row = {}
        for row, key in enumerate(keys):
            first_row.setdefault(key, row)
        if len(first_row) < len(prompts):
            place = {key: index for index, key in enumerate(first_row)}
            rows = [place[key] for key in keys]
            result = self.prefill([list(prompt) for _, prompt in first_row], pad_id, all_positions=all_positions,
                                  adapters=[adapter for adapter, _ in first_row], prefixes=[prefixes[row] for row in first_row.values()])
            self.select(rows)
            return ForwardResult(result.logits[rows], None if result.hidden is None else result.hidden[rows])
        self.adapters = adapters
        if any(prefix is not None for prefix in prefixes):
            if all_positions:
                raise ValueError("a prefill for every position's logits computes the whole prompt: give no prefixes")
            return self._prefill_after(prompts, prefixes, pad_id)
        device = self.runner.device
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), pad_id, dtype=torch.long, device=device)
        valid = torch.zeros(len(prompts), width, dtype=torch.bool, device=device)
        for row, prompt in enumerate(prompts):
            ids[row, width - len(prompt) :] = torch.tensor(prompt, dtype=torch.long)
            valid[row, width - len(prompt) :] = True
        positions = (valid.long().cumsum(dim=1) - 1).clamp(min=0)
        self.cache = self.runner.new_cache()
        result = self.runner.forward(
            ids,
            self.cache,
            None if bool(valid.all()) else valid.long(),
            positions,
            adapter=self._adapter_argument(),
            want_hidden=self.want_hidden,
            last_only=not all_positions,
        )
        self.valid = valid
        self.holes = not bool(valid.all())
        self.next_position = valid.sum(dim=1)
        return result

    def _prefill_after(self, prompts: list[list[int]], prefixes: list[torch.Tensor | None], pad_id: int) -> ForwardResult:
        """The prefill of prompts whose first tokens' KV is given: the cache starts with those
        (left padded to the longest), the rest of each prompt is fed after them in one pass."""
        device = self.runner.device
        cached = [0 if prefix is None else prefix.shape[3] for prefix in prefixes]
        width = max(cached)
        some = next(prefix for prefix in prefixes if prefix is not None)
        layers, _, kv_heads, _, head_dim = some.shape
        kv = some.new_zeros(layers, 2, len(prompts), kv_heads, width, head_dim)
        self.valid = torch.zeros(len(prompts), width, dtype=torch.bool, device=device)
        for row, prefix in enumerate(prefixes):
            if prefix is not None:
                kv[:, :, row, :, width - cached[row] :] = prefix
                self.valid[row, width - cached[row] :] = True
        self.cache = self.runner.new_cache()
        for layer, (keys, values) in zip(self.cache.layers, kv):
            layer.update(keys, values)
        self.next_position = torch.tensor(cached, dtype=torch.long, device=device)
        self.holes = not bool(self.valid.all())
        rests = [prompt[count:] for prompt, count in zip(prompts, cached)]
        lengths = [len(rest) for rest in rests]
        feed = torch.tensor([rest + [pad_id] * (max(lengths) - len(rest)) for rest in rests], device=device)
        result = self.extend(feed, lengths=lengths)
        self.commit(lengths)
        rows = torch.arange(len(prompts), device=device)
        last = torch.tensor(lengths, device=device) - 1
        hidden = None if result.hidden is None else result.hidden[rows, last][:, None]
        return ForwardResult(result.logits[rows, last][:, None], hidden)

    def prompt_kv(self, row: int) -> torch.Tensor:
        """The KV of every token row `row` holds, in order: [layers, 2, kv_heads, tokens, head_dim]
        (what the prefix cache keeps of a prompt after its prefill)."""
        slots = self.valid[row].nonzero()[:, 0]
        return torch.stack([
            torch.stack([layer.keys[row].index_select(1, slots), layer.values[row].index_select(1, slots)])
            for layer in _cache_layers(self.cache)
        ])

    def extend(self, tokens: torch.Tensor, lengths: list[int] | None = None) -> ForwardResult:
        """Feed n tokens per row ([B, n]) after the slots fed so far; every fed slot counts as
        valid until `commit` says how many of the slots fed since the last commit each row keeps.
        `lengths`: the tokens of each row that matter (the rest pad it to n; the row keeps at
        most these, and their logits are not read); a runner that `packs_rows` skips the rest."""
        n = tokens.shape[1]
        # slots fed since the last commit come before these ones
        positions = self.next_position[:, None] + torch.arange(self._pending, self._pending + n, device=tokens.device)[None, :]
        self.valid = torch.cat([self.valid, torch.ones(self.size, n, dtype=torch.bool, device=tokens.device)], dim=1)
        mask = self.valid.long() if self.holes else None
        self._pending += n
        packed = {"lengths": lengths} if lengths is not None and getattr(self.runner, "packs_rows", False) else {}
        return self.runner.forward(
            tokens, self.cache, mask, positions, adapter=self._adapter_argument(), want_hidden=self.want_hidden, **packed
        )

    def _adapter_argument(self) -> str | list[str | None] | None:
        """The runner's `adapter`: one name when every row has the same, else the per-row list."""
        first = self.adapters[0] if self.adapters else self.adapter
        return first if all(a == first for a in self.adapters) else list(self.adapters)

    def commit(self, keep: list[int]) -> None:
        """Of the slots fed since the last commit, row b keeps the first keep[b]; the others are
        rolled back (holes), and slots no row keeps are cut off the end of the cache."""
        n = self._pending
        self._pending = 0
        if all(k == keep[0] for k in keep):  # every row keeps as many (a batch of one always): no new holes
            self.next_position += keep[0] if keep else 0
            if keep and keep[0] < n:
                self._slice_slots(0, self.length - (n - keep[0]))
            return
        keep_t = torch.tensor(keep, dtype=torch.long, device=self.valid.device)
        fed = torch.arange(n, device=self.valid.device)[None, :] < keep_t[:, None]
        self.valid[:, self.length - n :] = fed
        self.next_position += keep_t
        drop = n - max(keep, default=0)
        if drop > 0:
            self._slice_slots(0, self.length - drop)
        self.holes = not bool(self.valid.all())

    # ------------------------------------------------------------------ batch membership
    def select(self, rows: list[int]) -> None:
        """Keep only these rows (others finished), then drop leading slots no row uses."""
        index = torch.tensor(rows, dtype=torch.long, device=self.valid.device)
        self.valid = self.valid[index]
        self.next_position = self.next_position[index]
        self.adapters = [self.adapters[row] for row in rows]
        if self.cache is not None:
            for layer in _cache_layers(self.cache):
                if layer.keys is not None and layer.keys.numel():
                    layer.keys = layer.keys[index]
                    layer.values = layer.values[index]
        if not rows:
            self.cache = None
            self.valid = self.valid[:, :0]
            return
        used = self.valid.any(dim=0).nonzero()
        first = int(used[0]) if used.numel() else self.length
        if first > 0:
            self._slice_slots(first, self.length)
        self.holes = not bool(self.valid.all())

    def merge(self, other: "SequenceBatch") -> None:
        """Append the rows of `other` (a freshly prefilled batch) to this one."""
        if not self.size:
            self.cache, self.valid, self.next_position, self.holes = other.cache, other.valid, other.next_position, other.holes
            self.adapters = list(other.adapters)
            return
        width = max(self.length, other.length)
        self._left_pad(width - self.length)
        other._left_pad(width - other.length)
        for mine, theirs in zip(_cache_layers(self.cache), _cache_layers(other.cache)):
            mine.keys = torch.cat([mine.keys, theirs.keys], dim=0)
            mine.values = torch.cat([mine.values, theirs.values], dim=0)
        self.valid = torch.cat([self.valid, other.valid], dim=0)
        self.next_position = torch.cat([self.next_position, other.next_position], dim=0)
        self.adapters = self.adapters + other.adapters
        self.holes = not bool(self.valid.all())

    # ------------------------------------------------------------------ helpers
    def _slice_slots(self, start: int, stop: int) -> None:
        self.valid = self.valid[:, start:stop]
        for layer in _cache_layers(self.cache):
            if layer.keys is not None and layer.keys.numel():
                layer.keys = layer.keys[:, :, start:stop]
                layer.values = layer.values[:, :, start:stop]

    def _left_pad(self, slots: int) -> None:
        if slots <= 0:
            return
        for layer in _cache_layers(self.cache):
            shape = list(layer.keys.shape)
            shape[2] = slots
            layer.keys = torch.cat([layer.keys.new_zeros(shape), layer.keys], dim=2)
            vshape = list(layer.values.shape)
            vshape[2] = slots
            layer.values = torch.cat([layer.values.new_zeros(vshape), layer.values], dim=2)
        pad = torch.zeros(self.size, slots, dtype=torch.bool, device=self.valid.device)
        self.valid = torch.cat([pad, self.valid], dim=1)
