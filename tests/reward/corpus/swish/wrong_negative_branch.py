# WRONG: the stable sigmoid's negative branch returns sigmoid(|x|)
# Caught by: signed inputs
import torch
import torch.nn as nn
import triton
import triton.language as tl


@triton.jit
def stable_sigmoid(x):
    z = tl.exp(-tl.abs(x))
    return tl.where(x >= 0, 1.0 / (1.0 + z), 1.0 - z / (1.0 + z))


@triton.jit
def swish_kernel(x_ptr, out_ptr, n_elements, BLOCK_SIZE: tl.constexpr):
    pid = tl.program_id(0)
    block_start = pid * BLOCK_SIZE
    offsets = block_start + tl.arange(0, BLOCK_SIZE)
    mask = offsets < n_elements
    x = tl.load(x_ptr + offsets, mask=mask, other=0.0)
    tl.store(out_ptr + offsets, x * stable_sigmoid(x), mask=mask)


class ModelNew(nn.Module):
    def __init__(self):
        super().__init__()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.empty_like(x)
        n_elements = x.numel()
        BLOCK_SIZE = 256
        swish_kernel[(triton.cdiv(n_elements, BLOCK_SIZE),)](x.contiguous(), out, n_elements, BLOCK_SIZE=BLOCK_SIZE)
        return out
