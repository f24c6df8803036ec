# WRONG: only the upper clamp is applied
# Caught by: signed inputs
import torch
import torch.nn as nn
import triton
import triton.language as tl


@triton.jit
def scale_shift_clamp_kernel(x_ptr, out_ptr, n, scale, shift, lo, hi, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask)
    y = x * scale + shift
    y = tl.minimum(y, hi)
    tl.store(out_ptr + offs, y, mask=mask)


class ModelNew(nn.Module):
    def __init__(self, scale: float, shift: float, min_val: float, max_val: float):
        super().__init__()
        self.scale = scale
        self.shift = shift
        self.min_val = min_val
        self.max_val = max_val

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.contiguous()
        out = torch.empty_like(x)
        n = x.numel()
        scale_shift_clamp_kernel[(triton.cdiv(n, 1024),)](
            x, out, n, self.scale, self.shift, self.min_val, self.max_val, BLOCK=1024,
        )
        return out
