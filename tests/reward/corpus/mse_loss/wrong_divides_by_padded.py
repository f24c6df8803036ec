# WRONG: the mean divides by whole blocks (num_blocks * BLOCK) instead of n
# Caught by: odd-sized shapes
import torch
import torch.nn as nn
import triton
import triton.language as tl


@triton.jit
def squared_error_partial_kernel(p_ptr, t_ptr, partial_ptr, n, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    p = tl.load(p_ptr + offs, mask=mask, other=0.0)
    t = tl.load(t_ptr + offs, mask=mask, other=0.0)
    d = p - t
    tl.store(partial_ptr + pid, tl.sum(d * d, axis=0))


@triton.jit
def mean_of_partials_kernel(partial_ptr, out_ptr, num_partials, n, BLOCK: tl.constexpr):
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, num_partials, BLOCK):
        idx = start + tl.arange(0, BLOCK)
        acc += tl.load(partial_ptr + idx, mask=idx < num_partials, other=0.0)
    tl.store(out_ptr, tl.sum(acc, axis=0) / n)


class ModelNew(nn.Module):
    def __init__(self):
        super().__init__()

    def forward(self, predictions: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        p = predictions.contiguous().view(-1)
        t = targets.contiguous().view(-1)
        n = p.numel()
        BLOCK = 1024
        num_blocks = triton.cdiv(n, BLOCK)
        partial = torch.empty(num_blocks, device=p.device, dtype=torch.float32)
        squared_error_partial_kernel[(num_blocks,)](p, t, partial, n, BLOCK=BLOCK)
        out = torch.empty((), device=p.device, dtype=torch.float32)
        mean_of_partials_kernel[(1,)](partial, out, num_blocks, num_blocks * BLOCK, BLOCK=64)
        return out
