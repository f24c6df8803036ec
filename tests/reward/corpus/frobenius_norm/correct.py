import torch
import torch.nn as nn
import triton
import triton.language as tl
from triton.language.extra import libdevice


@triton.jit
def sum_of_squares_kernel(x_ptr, partial_ptr, n, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offs, mask=offs < n, other=0.0)
    tl.store(partial_ptr + pid, tl.sum(x * x, axis=0))


@triton.jit
def scale_by_inverse_norm_kernel(x_ptr, partial_ptr, out_ptr, n, num_partials, BLOCK: tl.constexpr, PARTIAL_BLOCK: tl.constexpr):
    p = tl.arange(0, PARTIAL_BLOCK)
    total = tl.sum(tl.load(partial_ptr + p, mask=p < num_partials, other=0.0), axis=0)
    inv_norm = libdevice.rsqrt(total)
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask, other=0.0)
    tl.store(out_ptr + offs, x * inv_norm, mask=mask)


class ModelNew(nn.Module):
    def __init__(self):
        super().__init__()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.contiguous().view(-1)
        n = flat.numel()
        BLOCK = 1024
        num_blocks = triton.cdiv(n, BLOCK)
        partial = torch.empty(num_blocks, device=x.device, dtype=torch.float32)
        sum_of_squares_kernel[(num_blocks,)](flat, partial, n, BLOCK=BLOCK)
        out = torch.empty_like(flat)
        scale_by_inverse_norm_kernel[(num_blocks,)](
            flat, partial, out, n, num_blocks, BLOCK=BLOCK, PARTIAL_BLOCK=triton.next_power_of_2(num_blocks),
        )
        return out.view_as(x)
