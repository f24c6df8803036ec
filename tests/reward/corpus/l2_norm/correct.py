import torch
import torch.nn as nn
import triton
import triton.language as tl
from triton.language.extra import libdevice


@triton.jit
def l2_normalize_kernel(input, output, row_stride, n_cols, BLOCK_SIZE: tl.constexpr):
    row = tl.program_id(0)
    offsets = tl.arange(0, BLOCK_SIZE)
    mask = offsets < n_cols
    x = tl.load(input + row * row_stride + offsets, mask=mask, other=0.0)
    norm = libdevice.sqrt(tl.sum(x * x, axis=0))
    tl.store(output + row * row_stride + offsets, x / norm, mask=mask)


class ModelNew(nn.Module):
    def __init__(self):
        super().__init__()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        input = x.contiguous()
        output = torch.empty_like(input)
        n_rows, n_cols = input.shape
        l2_normalize_kernel[(n_rows,)](input, output, input.stride(0), n_cols, BLOCK_SIZE=triton.next_power_of_2(n_cols))
        return output
