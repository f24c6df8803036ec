# WRONG: the channel index is computed as offs % C instead of (offs // L) % C
# Caught by: any inputs
import torch
import torch.nn as nn
import triton
import triton.language as tl


@triton.jit
def broadcast_add_kernel(
    x_ptr, y_ptr, out_ptr, n_elements, C, L,
    stride_xb, stride_xc, stride_xl, stride_yb, stride_yc, stride_yl,
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n_elements
    b = offs // (C * L)
    c = offs % C
    l = offs % L
    x = tl.load(x_ptr + b * stride_xb + c * stride_xc + l * stride_xl, mask=mask, other=0.0)
    y = tl.load(y_ptr + b * stride_yb + c * stride_yc + l * stride_yl, mask=mask, other=0.0)
    tl.store(out_ptr + offs, x + y, mask=mask)


class ModelNew(nn.Module):
    def __init__(self):
        super().__init__()

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        xb = x
        yb = y.expand_as(x)  # stride 0 along the broadcast dimensions
        out = torch.empty(x.shape, device=x.device, dtype=x.dtype)
        n = out.numel()
        B, C, L = x.shape
        broadcast_add_kernel[(triton.cdiv(n, 1024),)](
            xb, yb, out, n, C, L,
            xb.stride(0), xb.stride(1), xb.stride(2), yb.stride(0), yb.stride(1), yb.stride(2),
            BLOCK=1024,
        )
        return out
