import torch
import torch.nn as nn
import triton
import triton.language as tl


@triton.jit
def mean_kernel(x_ptr, out_ptr, R, N, stride_outer, stride_r, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr):
    outer = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < N
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    for r0 in range(0, R, BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R)
        tile = tl.load(
            x_ptr + outer * stride_outer + rows[:, None] * stride_r + cols[None, :],
            mask=(rows[:, None] < R) & col_mask[None, :], other=0.0,
        )
        acc += tl.sum(tile, axis=0)
    tl.store(out_ptr + outer * N + cols, acc / R, mask=col_mask)


class ModelNew(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dim = self.dim if self.dim >= 0 else self.dim + x.dim()
        outer = x.shape[:dim].numel()
        inner = x.shape[dim + 1:].numel()
        R = x.shape[dim]
        x3 = x.contiguous().reshape(outer, R, inner)
        out = torch.empty(outer, inner, device=x.device, dtype=x.dtype)
        grid = (outer, triton.cdiv(inner, 64))
        mean_kernel[grid](x3, out, R, inner, x3.stride(0), x3.stride(1), BLOCK_R=32, BLOCK_N=64)
        return out.reshape(x.shape[:dim] + x.shape[dim + 1:])
