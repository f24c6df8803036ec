# WRONG: the quadratic branch tests diff < 1 instead of |diff| < 1
# Caught by: signed inputs
import torch
import torch.nn as nn
import triton
import triton.language as tl


@triton.jit
def smooth_l1_kernel(input, target, out_ptr, n_elements, inv_n, BLOCK_SIZE: tl.constexpr):
    offsets = tl.program_id(0) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    mask = offsets < n_elements
    diff = tl.load(input + offsets, mask=mask, other=0.0) - tl.load(target + offsets, mask=mask, other=0.0)
    abs_diff = tl.abs(diff)
    loss = tl.where(diff < 1.0, 0.5 * diff * diff, abs_diff - 0.5)
    loss = tl.where(mask, loss, 0.0)
    tl.atomic_add(out_ptr, tl.sum(loss, axis=0) * inv_n)


class ModelNew(nn.Module):
    def __init__(self):
        super().__init__()

    def forward(self, predictions: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        input = predictions.contiguous()
        target = targets.contiguous()
        n = input.numel()
        out = torch.zeros((), device=input.device, dtype=torch.float32)
        smooth_l1_kernel[(triton.cdiv(n, 1024),)](input, target, out, n, 1.0 / n, BLOCK_SIZE=1024)
        return out
