"""LoRA adapters in the lean forward: peft adapter directories read into the fused layout of
`lean_llama`, and the grouped LoRA product that lets one forward pass serve rows of many
adapters (as LoRAX and vLLM do).

For a projection y = x W^T with adapter a on some rows, LoRA adds s_a (x A_a^T) B_a^T to those
rows (s = alpha / r, or alpha / sqrt(r) with rsLoRA). The base product runs once for every row.
The factors of the adapters a batch holds are stacked side by side (`AdapterStack`: A [R, in],
B [out, R], R the sum of their ranks); every row is multiplied by the stacked A in one matmul, the
rank columns of adapters other than the row's own are zeroed, and one matmul with the stacked B
gives each row its own adapter's delta (`GroupedLora`). Rows of the base model get nothing. The
same on a GPU is what Punica's and S-LoRA's gather kernels compute without the zeroed columns;
on a CPU the two dense matmuls cost less than gathering each adapter's rows (four small
operations per adapter per projection: 2.7x less LoRA time for 8 adapters in 16 rows).

The lean forward fuses projections (q, k, v and the rotary halves of q and k in one; gate and up
in one), so an adapter's factors are fused the same way: the A factors of q, k, v stacked into
one [r_q + r_k + r_v, hidden] matrix, and B as a block matrix that puts each module's delta at
that module's output rows (B of q also at the rotated-q rows, rotated the same way as W). The
scale is folded into B.

Supported: peft LoRA (`peft_type: LORA`) on q/k/v/o/gate/up/down projections, any rank and
alpha, rsLoRA; dropout is a training-time thing and ignored. Refused with a message naming the
setting: DoRA, biases, embeddings or other modules, modules_to_save, rank/alpha patterns and the
other variants below.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")
TARGETS = ATTENTION + MLP

UNSUPPORTED = {
    "use_dora": "DoRA (use_dora)",
    "fan_in_fan_out": "fan_in_fan_out (Conv1D-style weights)",
    "rank_pattern": "per-module ranks (rank_pattern)",
    "alpha_pattern": "per-module alphas (alpha_pattern)",
    "modules_to_save": "fully trained modules (modules_to_save)",
    "trainable_token_indices": "trained token embeddings (trainable_token_indices)",
    "layer_replication": "layer_replication",
    "lora_bias": "LoRA biases (lora_bias)",
    "use_qalora": "QA-LoRA (use_qalora)",
    "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens)",
    "target_parameters": "LoRA on parameters (target_parameters)",
    "use_bdlora": "block-diagonal LoRA (use_bdlora)",
}

_KEY = re.compile(r"layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)\.lora_([AB])(?:\.[^.]+)?\.weight$")


class AdapterError(ValueError):
    """An adapter directory that cannot be served; the message says why."""


@dataclass
class Factors:
    """One fused projection's LoRA: delta = (x @ a.T) @ b.T, the scale folded into b."""

    a: torch.Tensor  # [r_total, in]
    b: torch.Tensor  # [out, r_total]

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        return (x @ self.a.T) @ self.b.T


@dataclass
class LeanLora:
    """An adapter in the lean forward's fused layout: per layer, the factors of its qkv, o,
    gate_up and down projections (None where the adapter leaves that projection alone)."""

    layers: list[tuple[Factors | None, Factors | None, Factors | None, Factors | None]]
    path: str

    @property
    def nbytes(self) -> int:
        return sum(f.a.numel() * f.a.element_size() + f.b.numel() * f.b.element_size() for layer in self.layers for f in layer if f)


class AdapterStack:
    """Several adapters' factors side by side, per fused projection: A stacked to [R, in], B to
    [out, R], and which adapter (its place in the stack) owns each of the R rank columns. Built
    for the set of adapters a batch holds and reused while that set is unchanged."""

    def __init__(self, adapters: list[LeanLora]):
        self.size = len(adapters)
        self._owner_ids: dict[tuple[int, ...], int] = {}
        self.owners: list[torch.Tensor] = []
        """Per owner pattern: [R] the adapter of each rank column."""
        self.layers: list[tuple[tuple[torch.Tensor, torch.Tensor, int] | None, ...]] = []
        for layer in range(len(adapters[0].layers)):
            slots = []
            for slot in range(len(adapters[0].layers[layer])):
                parts = [(i, a.layers[layer][slot]) for i, a in enumerate(adapters) if a.layers[layer][slot] is not None]
                if not parts:
                    slots.append(None)
                    continue
                owners = tuple(i for i, factors in parts for _ in range(factors.a.shape[0]))
                owner_id = self._owner_ids.get(owners)
                if owner_id is None:
                    owner_id = self._owner_ids[owners] = len(self.owners)
                    self.owners.append(torch.tensor(owners, device=parts[0][1].a.device))
                a = torch.cat([factors.a for _, factors in parts]).contiguous()
                b = torch.cat([factors.b for _, factors in parts], dim=1).contiguous()
                slots.append((a, b, owner_id))
            self.layers.append(tuple(slots))

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for layer in self.layers for entry in layer if entry for t in entry[:2])

    def for_rows(self, row_adapter: torch.Tensor) -> GroupedLora:
        """The LoRA of a batch whose row b is decoded with adapter row_adapter[b] of this stack
        (-1: the base model)."""
        return GroupedLora(self, row_adapter)


class GroupedLora:
    """Grouped LoRA for one forward pass: every row times every stacked A in one matmul, the rank
    columns of other adapters zeroed per row, then one matmul with the stacked B. Two matmuls per
    projection however many adapters the batch mixes, where gathering each adapter's rows costs
    four small operations per adapter; the price is rank columns computed for rows that discard
    them, small while the stacked rank is small beside the hidden size."""

    def __init__(self, stack: AdapterStack, row_adapter: torch.Tensor):
        self.stack = stack
        self.row_adapter = row_adapter
        self._masks: dict[int, torch.Tensor] = {}

    def delta(self, x: torch.Tensor, layer: int, slot: int) -> torch.Tensor | None:
        """The LoRA delta of projection `slot` of `layer` for x [B, ..., in] (None: no adapter of
        the batch touches that projection)."""
        entry = self.stack.layers[layer][slot]
        if entry is None:
            return None
        a, b, owner_id = entry
        mask = self._masks.get(owner_id)
        if mask is None:
            mask = (self.stack.owners[owner_id][None, :] == self.row_adapter[:, None]).to(x.dtype)  # [B, R]
            mask = mask.view(mask.shape[0], *([1] * (x.dim() - 2)), mask.shape[1])
            self._masks[owner_id] = mask
        return ((x @ a.T) * mask) @ b.T


def read_adapter_config(path: str | Path) -> dict:
    """The adapter's peft config (adapter_config.json)."""
    path = Path(path)
    config_file = path / "adapter_config.json"
    if not config_file.is_file():
        raise AdapterError(f"{path} has no adapter_config.json (not a peft adapter directory)")
    try:
        config = json.loads(config_file.read_text())
    except json.JSONDecodeError as err:
        raise AdapterError(f"{config_file}: not JSON: {err}") from None
    if not isinstance(config, dict):
        raise AdapterError(f"{config_file}: not a JSON object")
    return config


def check_lean_support(config: dict, path: str | Path) -> None:
    """Refuse, with the reason, an adapter config the lean forward cannot serve."""
    if config.get("peft_type", "LORA") != "LORA":
        raise AdapterError(f"{path}: peft_type {config.get('peft_type')!r} is not supported; only LORA adapters are")
    for key, what in UNSUPPORTED.items():
        if config.get(key):
            raise AdapterError(f"{path}: {what} is not supported by kuberft serve")
    if config.get("bias", "none") != "none":
        raise AdapterError(f"{path}: bias={config['bias']!r} is not supported (adapters with trained biases); use bias='none'")
    if not isinstance(config.get("r"), int) or config["r"] < 1:
        raise AdapterError(f"{path}: r must be a positive integer, not {config.get('r')!r}")


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    weights = path / "adapter_model.safetensors"
    if weights.is_file():
        from safetensors.torch import load_file

        return load_file(weights)
    legacy = path / "adapter_model.bin"
    if legacy.is_file():
        return torch.load(legacy, map_location="cpu", weights_only=True)
    raise AdapterError(f"{path} has no adapter_model.safetensors")


def read_lora(path: str | Path, *, out_sizes: dict[str, int], num_layers: int, rotate_half_rows,
              dtype: torch.dtype, device: torch.device) -> LeanLora:
    """Read a peft LoRA directory into the fused layout of a lean model with `num_layers` layers
    whose projections have `out_sizes` outputs (by module name); `rotate_half_rows` is the
    model's own, so B of q and k is rotated as their W is."""
    path = Path(path)
    config = read_adapter_config(path)
    check_lean_support(config, path)
    r, alpha = config["r"], config.get("lora_alpha", config["r"])
    scale = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
    factors: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, tensor in _read_tensors(path).items():
        match = _KEY.search(key)
        if match is None or match.group(2) not in TARGETS:
            raise AdapterError(f"{path}: weight {key} is not a LoRA factor of a q/k/v/o/gate/up/down projection; "
                               "kuberft serve supports only those")
        layer, module, which = int(match.group(1)), match.group(2), match.group(3)
        if layer >= num_layers:
            raise AdapterError(f"{path}: weight {key} is for layer {layer}, the model has {num_layers}")
        factors.setdefault((layer, module), {})[which] = tensor.to(device=device, dtype=dtype)
    for (layer, module), pair in factors.items():
        if set(pair) != {"A", "B"}:
            raise AdapterError(f"{path}: layer {layer} {module} has lora_{''.join(pair)} without its other factor")
        if pair["B"].shape[0] != out_sizes[module] or pair["A"].shape[0] != pair["B"].shape[1]:
            raise AdapterError(f"{path}: layer {layer} {module}: factors {tuple(pair['A'].shape)} and {tuple(pair['B'].shape)} "
                               f"do not fit the model's projection of {out_sizes[module]} outputs")
    if not factors:
        raise AdapterError(f"{path}: no LoRA weights in the adapter")

    def fuse(layer: int, outputs: list[tuple[str, bool]]) -> Factors | None:
        """Factors of a fused projection whose output rows are `outputs` in order: (module,
        rotated), a rotated block being rotate_half of that module's. None when the adapter
        targets none of them."""
        present = list(dict.fromkeys(m for m, _ in outputs if (layer, m) in factors))
        if not present:
            return None
        a = torch.cat([factors[layer, m]["A"] for m in present])  # [r_total, in]
        columns, start = {}, 0
        for m in present:
            rank = factors[layer, m]["A"].shape[0]
            columns[m] = slice(start, start + rank)
            start += rank
        b = a.new_zeros(sum(out_sizes[m] for m, _ in outputs), a.shape[0])  # [out, r_total]
        row = 0
        for m, rotated in outputs:
            size = out_sizes[m]
            if m in columns:
                block = factors[layer, m]["B"] * scale
                b[row : row + size, columns[m]] = rotate_half_rows(block) if rotated else block
            row += size
        return Factors(a.contiguous(), b)

    qkv = [("q_proj", False), ("k_proj", False), ("v_proj", False), ("q_proj", True), ("k_proj", True)]
    layers = [
        (fuse(i, qkv), fuse(i, [("o_proj", False)]), fuse(i, [("gate_proj", False), ("up_proj", False)]), fuse(i, [("down_proj", False)]))
        for i in range(num_layers)
    ]
    return LeanLora(layers, str(path))
