# WRONG: the stable form uses exp(-x) instead of exp(-|x|)
# Caught by: signed inputs
import torch
import torch.nn as nn
import triton
import triton.language as tl
from triton.language.extra import libdevice


@triton.jit
def softplus_kernel(x_ptr, y_ptr, n_elements, THRESHOLD: tl.constexpr, BLOCK_SIZE: tl.constexpr):
    offsets = tl.program_id(0) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    mask = offsets < n_elements
    x = tl.load(x_ptr + offsets, mask=mask, other=0.0)
    # max(x, 0) + log(1 + exp(-|x|)) never overflows
    stable = tl.maximum(x, 0.0) + libdevice.log1p(libdevice.exp(-x))
    y = tl.where(x > THRESHOLD, x, stable)
    tl.store(y_ptr + offsets, y, mask=mask)


class ModelNew(nn.Module):
    def __init__(self):
        super().__init__()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.contiguous()
        y = torch.empty_like(x)
        n = x.numel()
        softplus_kernel[(triton.cdiv(n, 512),)](x, y, n, THRESHOLD=20.0, BLOCK_SIZE=512)
        return y
