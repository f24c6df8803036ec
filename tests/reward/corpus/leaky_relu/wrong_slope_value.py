# WRONG: a hard-coded slope of 0.1 instead of the module's negative_slope
# Caught by: signed inputs
import torch
import torch.nn as nn
import triton
import triton.language as tl


@triton.jit
def leaky_relu_kernel(x_ptr, out_ptr, n_elements, negative_slope, BLOCK_SIZE: tl.constexpr):
    pid = tl.program_id(0)
    offsets = pid * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    mask = offsets < n_elements
    x = tl.load(x_ptr + offsets, mask=mask, other=0.0)
    slope = negative_slope.to(tl.float32)
    out = tl.where(x >= 0, x, x * 0.1)
    tl.store(out_ptr + offsets, out, mask=mask)


class ModelNew(nn.Module):
    def __init__(self, negative_slope: float = 0.01):
        super().__init__()
        self.negative_slope = negative_slope

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_flat = x.contiguous().flatten()
        out = torch.empty_like(x_flat)
        n = x_flat.numel()
        BLOCK_SIZE = 1024
        leaky_relu_kernel[(triton.cdiv(n, BLOCK_SIZE),)](x_flat, out, n, self.negative_slope, BLOCK_SIZE=BLOCK_SIZE)
        return out.reshape(x.shape)
