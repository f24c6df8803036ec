# WRONG: the K loop loads without the K-tail mask
# Caught by: odd-sized shapes
import torch
import torch.nn as nn
import triton
import triton.language as tl


@triton.jit
def matvec_kernel(a_ptr, x_ptr, y_ptr, M, K, stride_am, stride_ak, stride_xk, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    acc = tl.zeros([BLOCK_M], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        a = tl.load(a_ptr + rows[:, None] * stride_am + ks[None, :] * stride_ak, mask=rows[:, None] < M, other=0.0)
        x = tl.load(x_ptr + ks * stride_xk)
        acc += tl.sum(a * x[None, :], axis=1)
    tl.store(y_ptr + rows, acc, mask=rows < M)


class ModelNew(nn.Module):
    def __init__(self):
        super().__init__()

    def forward(self, A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
        M, K = A.shape
        vec = B.squeeze(1)
        out = torch.empty(M, device=A.device, dtype=A.dtype)
        BLOCK_M = 16
        matvec_kernel[(triton.cdiv(M, BLOCK_M),)](A, vec, out, M, K, A.stride(0), A.stride(1), vec.stride(0), BLOCK_M=BLOCK_M, BLOCK_K=64)
        return out.unsqueeze(1)
