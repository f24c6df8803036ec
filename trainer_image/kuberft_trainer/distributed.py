"""The trainer's processes: the process group torchrun starts, and how the model is spread over it.

- `Distributed`: rank, world size and the few collectives the GRPO step needs (gather a
  Python object, sum a tensor, wait for everyone). One process without torchrun.
- `shard_model` (`trainer.sharding: fsdp`): FSDP2 `fully_shard` of every decoder layer and of
  the root, so the frozen base and the LoRA weights are split over all processes; each layer's
  parameters are gathered for its forward and backward only. A bf16 base keeps its LoRA weights
  in fp32 (peft's default): they are the master copy, cast to bf16 for compute, their gradients
  reduced in fp32.
- `full_parameters`: every parameter gathered for the duration of a block (generation and
  evaluation, where each process runs a different number of forwards, so per-layer gathers
  would not line up across processes); a no-op for an unsharded model.
- `trainable_state` / `optimizer_state` / `load_optimizer_state`: the LoRA weights and the
  optimizer state in full, keyed by parameter name, whatever the sharding and the number of
  processes: a checkpoint written by N processes resumes on M, sharded or not.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Any, Iterator

import torch


def default_device(local_rank: int = 0) -> torch.device:
    return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")


class Distributed:
    """The process group when launched by torchrun (WORLD_SIZE > 1), else a single process."""

    def __init__(self):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.enabled = self.world > 1
        if self.enabled and not torch.distributed.is_initialized():
            if torch.cuda.is_available():
                torch.cuda.set_device(self.local_rank)
            torch.distributed.init_process_group("nccl" if torch.cuda.is_available() else "gloo")

    @property
    def main(self) -> bool:
        return self.rank == 0

    def gather_list(self, value: Any) -> list[Any]:
        if not self.enabled:
            return [value]
        out: list[Any] = [None] * self.world
        torch.distributed.all_gather_object(out, value)
        return out

    def sum_(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.enabled:
            torch.distributed.all_reduce(tensor)
        return tensor

    def max_(self, value: int) -> int:
        return max(self.gather_list(value))

    def barrier(self) -> None:
        if self.enabled:
            torch.distributed.barrier()


def decoder_layers(model) -> list[torch.nn.Module]:
    """The model's repeated blocks: the classes transformers names in `_no_split_modules` (what
    accelerate's and TRL's FSDP wrapping use)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    names = set(getattr(base, "_no_split_modules", None) or ())
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:
        raise ValueError(f"{type(base).__name__} names no decoder layer class (_no_split_modules): it cannot be sharded layer by layer")
    return layers


def shard_model(model) -> int:
    """FSDP2 over all processes: one shard group per decoder layer, the rest in the root's.
    Returns the number of groups."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    dtypes = {p.dtype for p in model.parameters()}
    policy = MixedPrecisionPolicy()
    if len(dtypes) > 1:  # a low-precision base with fp32 LoRA weights: compute in the base's dtype
        compute = min(dtypes, key=lambda d: torch.finfo(d).bits)
        policy = MixedPrecisionPolicy(param_dtype=compute, reduce_dtype=torch.float32)
    groups = [*decoder_layers(model), model]
    for group in groups:
        fully_shard(group, mp_policy=policy)
        # The loss is normalised over the whole step (all processes) already: sum the gradients,
        # with a plain SUM (gloo has no pre-multiplied sum, which FSDP picks for fp32 otherwise).
        group.set_gradient_divide_factor(1.0)
        group.set_force_sum_reduction_for_comms(True)
    return len(groups)


def is_sharded(model) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


@contextmanager
def full_parameters(model) -> Iterator[None]:
    if not is_sharded(model):
        yield
        return
    from torch.distributed.fsdp import FSDPModule

    groups = [m for m in model.modules() if isinstance(m, FSDPModule)]
    for group in groups:
        group.unshard()
    model.set_reshard_after_forward(False)
    try:
        yield
    finally:
        for group in groups:
            group.reshard()
        model.set_reshard_after_forward(True)


def _full(tensor: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def trainable_state(model) -> dict[str, torch.Tensor]:
    """The trainable (LoRA) parameters in full, on the CPU, by name (every process takes part)."""
    return {name: _full(p.detach()).cpu() for name, p in model.named_parameters() if p.requires_grad}


def grad_norm_value(norm: torch.Tensor) -> float:
    return float(_full(norm))


def optimizer_state(model, optimizer) -> dict[str, Any]:
    """The optimizer's state in full, keyed by parameter name (every process takes part; the
    result is complete on rank 0)."""
    if is_sharded(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        return get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    names = _trainable_names(model)
    plain = optimizer.state_dict()
    return {
        "state": {names[index]: value for index, value in plain["state"].items()},
        "param_groups": [{**group, "params": [names[i] for i in group["params"]]} for group in plain["param_groups"]],
    }


def load_optimizer_state(model, optimizer, state: dict[str, Any]) -> None:
    if is_sharded(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))
        return
    index = {name: i for i, name in enumerate(_trainable_names(model))}
    optimizer.load_state_dict({
        "state": {index[name]: value for name, value in state["state"].items()},
        "param_groups": [{**group, "params": [index[name] for name in group["params"]]} for group in state["param_groups"]],
    })


def _trainable_names(model) -> list[str]:
    """Names of the trainable parameters in the order the optimizer holds them."""
    return [name for name, p in model.named_parameters() if p.requires_grad]
