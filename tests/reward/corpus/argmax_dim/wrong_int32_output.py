# WRONG: returns int32 indices (torch.argmax returns int64)
# Caught by: any inputs
import torch
import torch.nn as nn
import triton
import triton.language as tl


@triton.jit
def argmax_kernel(x_ptr, out_ptr, R, N, stride_b, stride_r, stride_n, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr):
    b = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = tl.arange(0, BLOCK_R)
    mask = (rows[:, None] < R) & (cols[None, :] < N)
    tile = tl.load(x_ptr + b * stride_b + rows[:, None] * stride_r + cols[None, :] * stride_n, mask=mask, other=-float("inf"))
    idx = tl.argmax(tile, axis=0)
    tl.store(out_ptr + b * N + cols, idx, mask=cols < N)


class ModelNew(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, R, N = x.shape
        out = torch.empty((B, N), device=x.device, dtype=torch.int32)
        BLOCK_N = 16
        argmax_kernel[(B, triton.cdiv(N, BLOCK_N))](
            x, out, R, N, x.stride(0), x.stride(1), x.stride(2), BLOCK_R=triton.next_power_of_2(R), BLOCK_N=BLOCK_N,
        )
        return out
