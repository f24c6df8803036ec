"""A lean forward pass of a Llama-architecture causal LM, for the draft model.

A draft of a few hundred thousand parameters costs almost nothing in arithmetic; at batch 1 its
forward pass through transformers' module stack is per-op and per-call Python overhead (config
lookups, mask builders, cache objects, output dataclasses), which is what speculative decoding
pays k times per step. This is the same model with the same weights, computed in a handful of
tensor ops per layer (fused QKV and gate/up projections, a precomputed rotary table), the way
serving engines carry their own model code. Its cache duck-types the transformers cache
layout that `SequenceBatch` rolls back (`cache.layers[i].keys / .values`, [B, kv_heads, T, D]).

`LeanRunner.supports(model)` says whether a loaded model can take this path (Llama and the
Llama-shaped families without biases, sliding windows or rope scaling); `ModelRunner` is the
fallback for everything else.

LoRA adapters (`lora.py`) are held by name (`add_adapter`, `remove_adapter`); a forward takes
one adapter for every row, or one per row (`adapter=[name or None, ...]`), so rows of different
adapters and of the base model share one forward pass.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

from .kv_batch import ForwardResult, SequenceBatch
from .lora import AdapterStack, Factors, GroupedLora, LeanLora, read_lora

SUPPORTED_TYPES = {"llama", "mistral"}


MAX_ADAPTER_STACKS = 4
"""Sets of adapters whose stacked factors are kept (each a copy of those adapters' factors)."""

SHAPE_FAMILIES = 8
"""Graphs `LeanRunner.compile` makes: one row or several, one token or several, with or without
holes in the cache (an attention mask or none). Dynamic shapes keep size 1 apart; any other batch,
width or cache length reuses one of these."""
_compiled_runners = 0

CACHE_SPARE_SLOTS = 64
"""Free slots a layer's key and value buffers get past what they hold when (re)allocated."""


def _buffered(buffer: torch.Tensor | None, held: torch.Tensor | None) -> bool:
    """Whether `held` is the first slots of `buffer`, all its rows (so appending writes in place)."""
    return (
        buffer is not None
        and held is not None
        and held.data_ptr() == buffer.data_ptr()
        and held.stride() == buffer.stride()
        and held.shape[:2] == buffer.shape[:2]
    )


def _inference(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor` as an inference tensor (a copy, when it was made outside inference mode)."""
    return tensor if tensor.is_inference() else tensor.clone()


class _Layer:
    """One layer's keys and values, [B, kv_heads, T, head_dim]: views of the first T slots of
    buffers with spare slots, so a forward writes its new slots in place instead of copying the
    whole cache (torch.cat) every step. `SequenceBatch` may set `keys`/`values` to any tensor
    (rows selected, slots cut off or merged): a view of the buffer's first slots, as rolling
    back leaves, keeps the buffer; anything else moves to a new one at the next `update`."""

    __slots__ = ("keys", "values", "_key_buffer", "_value_buffer")

    def __init__(self):
        self.keys = None
        self.values = None
        self._key_buffer = None
        self._value_buffer = None

    def reserve(self, batch: int, n: int, heads: int, dim: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
        """The key and value buffers [batch, heads, capacity, dim], with room for n slots after the
        held ones, and how many are held: a forward writes its slots there in place (`like`: a
        tensor of the buffers' dtype and device), then `hold` says how many slots are filled."""
        held = 0 if self.keys is None else self.keys.shape[2]
        if not (
            _buffered(self._key_buffer, self.keys)
            and _buffered(self._value_buffer, self.values)
            and held + n < self._key_buffer.shape[2]  # a spare slot always: a view of a whole buffer is another graph
            and self._key_buffer.shape[0] == batch
        ):
            capacity = held + n + CACHE_SPARE_SLOTS
            self._key_buffer = like.new_empty(batch, heads, capacity, dim)
            self._value_buffer = like.new_empty(batch, heads, capacity, dim)
            if held:
                self._key_buffer[:, :, :held].copy_(self.keys)
                self._value_buffer[:, :, :held].copy_(self.values)
        return self._key_buffer, self._value_buffer, held

    def hold(self, slots: int) -> None:
        """The buffers' first `slots` slots are this layer's keys and values now."""
        self.keys = self._key_buffer[:, :, :slots]
        self.values = self._value_buffer[:, :, :slots]

    @torch.inference_mode()  # buffers are inference tensors, made in the forward or here alike
    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Add the slots k, v [B, kv_heads, n, head_dim] after the held ones; returns all of them
        (transformers' cache layers take new slots by the same name)."""
        n = k.shape[2]
        keys, values, held = self.reserve(k.shape[0], n, k.shape[1], k.shape[3], k)
        keys[:, :, held : held + n].copy_(k)
        values[:, :, held : held + n].copy_(v)
        self.hold(held + n)
        return self.keys, self.values


class LeanCache:
    """Keys and values per layer, [B, kv_heads, T, head_dim], appended by each forward."""

    def __init__(self, num_layers: int):
        self.layers = [_Layer() for _ in range(num_layers)]


class LeanRunner:
    """`ModelRunner`'s interface over the lean forward of a Llama model's weights."""
    packs_rows = True
    """`forward` takes `lengths`: a verify pass computes the tokens each row proposed, not its padding."""
    """Rows of different adapters go through one forward pass (the engine batches them together)."""

    @staticmethod
    def supports(model) -> bool:
        config = model.config
        rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
        return (
            getattr(config, "model_type", None) in SUPPORTED_TYPES
            and rope.get("rope_type", rope.get("type", "default")) == "default"
            and not getattr(config, "attention_bias", False)
            and not getattr(config, "mlp_bias", False)
            and getattr(config, "sliding_window", None) is None
            and getattr(config, "hidden_act", "silu") == "silu"
        )

    def __init__(self, model):
        if not self.supports(model):
            raise ValueError(f"{type(model).__name__} is not a plain Llama-architecture model")
        config = model.config
        self.model = model
        self.config = config
        self.device = next(model.parameters()).device
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.num_heads
        self.eps = config.rms_norm_eps
        self.grouped_query = self.num_heads != self.num_kv_heads
        """A bool, not a comparison made in the forward: compiled with dynamic shapes, ints are symbolic."""
        base = model.model
        self.embed = base.embed_tokens.weight
        self.final_norm = base.norm.weight
        self.lm_head = model.get_output_embeddings().weight.detach()
        self.adapters: dict[str, LeanLora] = {}
        self._stacks: dict[tuple[str, ...], AdapterStack] = {}
        """The stacked factors of the sets of adapters recent batches mixed, least recently used first."""
        self.layers = []
        for layer in base.layers:
            attn, mlp = layer.self_attn, layer.mlp
            q_w, k_w, v_w = attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight
            self.layers.append((
                layer.input_layernorm.weight,
                # one projection gives q, k, v and rotate_half(q), rotate_half(k) (rotary's second term)
                torch.cat([q_w, k_w, v_w, self._rotate_half_rows(q_w), self._rotate_half_rows(k_w)]).detach(),
                attn.o_proj.weight.detach(),
                layer.post_attention_layernorm.weight,
                torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]).detach(),  # [2 I, hidden]
                mlp.down_proj.weight.detach(),
            ))
        rope = getattr(config, "rope_parameters", None) or {}
        theta = rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))
        inv_freq = 1.0 / (theta ** (torch.arange(0, self.head_dim, 2, dtype=torch.float32, device=self.device) / self.head_dim))
        positions = torch.arange(config.max_position_embeddings, dtype=torch.float32, device=self.device)
        freqs = torch.outer(positions, inv_freq)
        emb = torch.cat([freqs, freqs], dim=-1)  # [P, D]
        dtype = self.embed.dtype
        self.cos, self.sin = emb.cos().to(dtype), emb.sin().to(dtype)
        self._compiled_run = None
        """`_run` compiled by `compile`, for the passes without LoRA or packing (None: eager only)."""

    def compile(self) -> None:
        """Compile the forward passes the decoding steps make without LoRA or packed rows into one
        graph each (torch.compile, inductor, dynamic shapes), as vLLM compiles its model: at a
        batch of a few rows a pass is a hundred small ops, whose dispatch costs more than their
        arithmetic; inductor fuses the element-wise ones around the matrix products. Warms up
        every shape family a `SequenceBatch` feeds (one row or several, one token or several, with
        and without holes): each is compiled here, at start-up (seconds to a minute each), not
        during a request. Raises RuntimeError when it cannot (inductor's CPU code needs a C++
        compiler)."""
        global _compiled_runners
        _compiled_runners += 1
        # dynamo keeps the graphs of `_run` for every runner together (they differ in `self`), and
        # refuses a new one past recompile_limit
        limits = torch._dynamo.config
        limits.recompile_limit = max(limits.recompile_limit, SHAPE_FAMILIES * _compiled_runners)
        self._compiled_run = torch.compile(self._run, dynamic=True, fullgraph=True)
        # sizes equal while tracing share a symbol, and would be taken as equal for good: the traced
        # ones (2 rows, 3 tokens, the prompt's slots and those after it) differ from each other and
        # from the weights' sizes
        taken = {size for weights in (self.embed, self.lm_head, self.cos, *self.layers[0]) for size in weights.shape} | {1, 2, 3}
        spare = CACHE_SPARE_SLOTS  # buffers are made at the prefill and again when rows are selected
        length = next(length for length in range(8, 10**6)
                      if taken.isdisjoint({length, length + 1, length + 3, length + 4, length + 6, length + spare,
                                           length + 4 + spare, length + 6 + spare}))
        try:
            for rows in (1, 2):
                for holes in (False, True):
                    for n in (1, 3):
                        self._warm_up(length, rows, holes, n)
        except Exception as err:
            self._compiled_run = None
            raise RuntimeError(f"torch.compile could not build the forward pass (its CPU backend needs a C++ compiler, "
                               f"such as g++, on PATH): {type(err).__name__}: {err}") from err

    def _warm_up(self, length: int, rows: int, holes: bool, n: int) -> None:
        """Feed n tokens per row to a `SequenceBatch` of `rows` rows (prompts of `length` tokens),
        with holes or without: the inputs of that family exactly as the engine makes them."""
        batch = SequenceBatch(self)
        batch.prefill([[1] * length, [2] * length][:rows if not holes else 2], 0)
        if holes:  # row 1 keeps one of three slots; alone, it keeps the two holes after it
            batch.extend(torch.ones(2, 3, dtype=torch.long, device=self.device), lengths=[3, 3])
            batch.commit([3, 1])
            batch.select(list(range(2 - rows, 2)))
        batch.extend(torch.ones(rows, n, dtype=torch.long, device=self.device), lengths=[n] * rows)

    def _rotate_half_rows(self, weight: torch.Tensor) -> torch.Tensor:
        """W' with W' x = rotate_half(W x) per head: rotate_half(y) = [-y2, y1] of y's halves."""
        heads = weight.view(-1, 2, self.head_dim // 2, weight.shape[-1])  # [h, 2, D/2, hidden]
        return torch.stack([-heads[:, 1], heads[:, 0]], dim=1).reshape(weight.shape)

    # ------------------------------------------------------------------ adapters
    def read_adapter(self, path: str) -> LeanLora:
        """An adapter directory in this model's fused layout (raises `AdapterError` with the reason
        when it cannot be served). Reading touches no state of the runner: any thread may."""
        config = self.config
        sizes = {
            "q_proj": self.num_heads * self.head_dim,
            "k_proj": self.num_kv_heads * self.head_dim,
            "v_proj": self.num_kv_heads * self.head_dim,
            "o_proj": config.hidden_size,
            "gate_proj": config.intermediate_size,
            "up_proj": config.intermediate_size,
            "down_proj": config.hidden_size,
        }
        return read_lora(path, out_sizes=sizes, num_layers=len(self.layers), rotate_half_rows=self._rotate_half_rows,
                         dtype=self.embed.dtype, device=self.device)

    def add_adapter(self, name: str, adapter: LeanLora) -> None:
        self._forget_stacks(name)
        self.adapters[name] = adapter

    def remove_adapter(self, name: str) -> None:
        self._forget_stacks(name)
        del self.adapters[name]

    def _forget_stacks(self, name: str) -> None:
        for names in [names for names in self._stacks if name in names]:
            del self._stacks[names]

    def _lora(self, adapter) -> LeanLora | GroupedLora | None:
        """The LoRA of a forward pass: none (the base model), one adapter for every row, or the
        grouped LoRA of rows of several adapters (and the base)."""
        if adapter is None:
            return None
        if isinstance(adapter, str):
            return self._adapter(adapter)
        names = tuple(dict.fromkeys(name for name in adapter if name is not None))
        if not names:
            return None
        if len(names) == 1 and None not in adapter:
            return self._adapter(names[0])
        stack = self._stacks.pop(names, None)
        if stack is None:
            stack = AdapterStack([self._adapter(name) for name in names])
            while len(self._stacks) >= MAX_ADAPTER_STACKS:
                del self._stacks[next(iter(self._stacks))]
        self._stacks[names] = stack  # most recently used last
        place = {name: i for i, name in enumerate(names)}
        return stack.for_rows(torch.tensor([place.get(name, -1) for name in adapter], device=self.device))

    def _adapter(self, name: str) -> LeanLora:
        try:
            return self.adapters[name]
        except KeyError:
            raise KeyError(f"adapter {name!r} is not loaded") from None

    @staticmethod
    def _project(weight: torch.Tensor, x: torch.Tensor, lora: LeanLora | GroupedLora | None, layer: int, slot: int) -> torch.Tensor:
        """x W^T plus its LoRA delta, each row's from its own adapter. (Plain F.linear: on torch 2.15's
        CPU build, oneDNN-prepacked weights, which this used, were 8-18% slower per forward at 1-5
        rows and no faster at 64 or at a 128-token prefill.)"""
        y = F.linear(x, weight)
        if lora is None:
            return y
        if isinstance(lora, LeanLora):
            factors: Factors | None = lora.layers[layer][slot]
            delta = factors.delta(x) if factors is not None else None
        else:
            delta = lora.delta(x, layer, slot)
        if delta is not None:
            y += delta
        return y

    def new_cache(self) -> LeanCache:
        return LeanCache(len(self.layers))

    @torch.inference_mode()
    def forward(
        self,
        input_ids: torch.Tensor,
        cache: LeanCache | None,
        attention_mask: torch.Tensor | None,
        position_ids: torch.Tensor,
        *,
        adapter: str | list[str | None] | None = None,
        want_hidden: bool = False,
        last_only: bool = False,
        lengths: list[int] | None = None,
    ) -> ForwardResult:
        """input_ids [B, n] at position_ids [B, n] after the cache's T slots; attention_mask
        [B, T + n] (1 = a token of the row) or None when every slot is valid. `adapter`: one
        adapter name (or None, the base model) for every row, or a list of B of them.
        `lengths`: the tokens of each row that count (a verify pass's rows proposing fewer than
        the widest are padded): the position-wise work (projections, norms, MLP) is done for
        those only, packed; attention sees the padded layout, and the padding's logits are 0."""
        batch, n = input_ids.shape
        lora = self._lora(adapter)
        rows = None  # the flat [B * n] indices of the tokens that count, when packed
        if lengths is not None and not last_only and n > 1 and sum(lengths) < batch * n:
            counts = torch.tensor(lengths, device=input_ids.device)
            rows = (torch.arange(n, device=input_ids.device)[None, :] < counts[:, None]).view(-1).nonzero()[:, 0]
            if isinstance(lora, GroupedLora):  # packed tokens carry their row's adapter
                lora = lora.stack.for_rows(lora.row_adapter[rows // n])
        cache = cache if cache is not None else self.new_cache()
        buffers = [layer.reserve(batch, n, self.num_kv_heads, self.head_dim, self.embed) for layer in cache.layers]
        held = buffers[0][2]
        run = self._run
        if self._compiled_run is not None and lora is None and rows is None and not last_only:
            run = self._compiled_run
            # the graphs were traced on tensors made in inference mode; one made outside it differs
            # in its dispatch keys, and would have another graph compiled for it
            input_ids, position_ids = _inference(input_ids), _inference(position_ids)
            attention_mask = None if attention_mask is None else _inference(attention_mask)
        logits, hidden = run(input_ids, position_ids, attention_mask, [b[0] for b in buffers], [b[1] for b in buffers], held,
                             lora, rows, last_only)
        for layer in cache.layers:
            layer.hold(held + n)
        if not want_hidden:
            return ForwardResult(logits, None)
        if rows is not None:
            hidden = hidden.new_zeros(batch * n, hidden.shape[-1]).index_copy_(0, rows, hidden).view(batch, n, -1)
        return ForwardResult(logits, hidden)

    def _run(self, input_ids: torch.Tensor, position_ids: torch.Tensor, attention_mask: torch.Tensor | None,
             keys: list[torch.Tensor], values: list[torch.Tensor], held: int, lora: LeanLora | GroupedLora | None,
             rows: torch.Tensor | None, last_only: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """The forward pass proper, (logits, final hidden states; packed, when `rows`): layer i writes the keys and values
        of the n fed tokens into keys[i], values[i] (buffers [B, kv_heads, capacity, head_dim]) at
        slots held..held + n, in place, and attends over their first held + n slots. `rows`: the
        flat indices of the tokens computed, when packed. With `compile`, the passes with neither
        LoRA nor packing run this compiled into one graph."""
        batch, n = input_ids.shape
        # from the weights' shapes, not self.num_heads...: compiled with dynamic shapes, an int
        # attribute is a symbol of its own, which a batch of as many rows as KV heads would be
        # taken to equal for good (sizes equal while tracing share a symbol)
        dim = self.cos.shape[-1]
        heads = self.layers[0][2].shape[1] // dim
        kv_heads = (self.layers[0][1].shape[0] // dim - 2 * heads) // 3
        cos = self.cos[position_ids].unsqueeze(1)  # [B, 1, n, D]
        sin = self.sin[position_ids].unsqueeze(1)
        total = held + n
        mask = None
        if attention_mask is not None or n > 1:
            slots = torch.arange(total, device=input_ids.device)
            fed = held + torch.arange(n, device=input_ids.device)
            mask = (slots[None, :] <= fed[:, None])[None, None]  # [1, 1, n, T + n] causal
            if attention_mask is not None:
                # a padding slot attends to itself only: a row with nothing to attend to would be NaN
                mask = (mask & attention_mask[:, None, None, :].bool()) | (slots[None, :] == fed[:, None])  # [B, 1, n, T + n]
            # additive, once: each layer's attention would otherwise turn the boolean mask into this
            mask = torch.zeros(mask.shape, dtype=self.embed.dtype, device=mask.device).masked_fill_(~mask, float("-inf"))
        x = F.embedding(input_ids if rows is None else input_ids.reshape(-1)[rows], self.embed)  # [B, n, H] or [N, H]
        shape, eps = (x.shape[-1],), self.eps
        project = self._project
        for index, (norm_1, qkv_proj, o_proj, norm_2, gate_up_proj, down_proj) in enumerate(self.layers):
            qkv = project(qkv_proj, F.rms_norm(x, shape, norm_1, eps), lora, index, 0)
            if rows is not None:  # back to the padded layout (padding: zeros) for rotary and attention
                qkv = qkv.new_zeros(batch * n, qkv.shape[-1]).index_copy_(0, rows, qkv)
            qkv = qkv.view(batch, n, 2 * heads + 3 * kv_heads, dim).transpose(1, 2)
            qk, v, qk_rotated = qkv.split([heads + kv_heads, kv_heads, heads + kv_heads], dim=1)  # [B, h, n, D]
            q, k = (qk * cos + qk_rotated * sin).split([heads, kv_heads], dim=1)  # rotary
            keys[index][:, :, held:total].copy_(k)
            values[index][:, :, held:total].copy_(v)
            attn = F.scaled_dot_product_attention(q, keys[index][:, :, :total], values[index][:, :, :total], attn_mask=mask,
                                                  enable_gqa=self.grouped_query)
            attn = attn.transpose(1, 2).reshape(batch, n, heads * dim)
            if rows is not None:
                attn = attn.view(batch * n, heads * dim).index_select(0, rows)
            x = x + project(o_proj, attn, lora, index, 1)
            gate, up = project(gate_up_proj, F.rms_norm(x, shape, norm_2, eps), lora, index, 2).chunk(2, dim=-1)
            x = x + project(down_proj, F.silu(gate) * up, lora, index, 3)
        if last_only:
            x = x[:, -1:]
        hidden = F.rms_norm(x, shape, self.final_norm, eps)
        logits = F.linear(hidden, self.lm_head).float()
        if rows is not None:
            logits = logits.new_zeros(batch * n, logits.shape[-1]).index_copy_(0, rows, logits).view(batch, n, -1)
        return logits, hidden
