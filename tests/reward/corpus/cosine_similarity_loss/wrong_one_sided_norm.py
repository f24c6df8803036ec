# WRONG: divides by |p|^2 instead of |p| * |t|
# Caught by: any inputs
import torch
import torch.nn as nn
import triton
import triton.language as tl
from triton.language.extra import libdevice


@triton.jit
def cosine_loss_kernel(p_ptr, t_ptr, out_ptr, n_cols, stride_p, stride_t, inv_rows, eps, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    dot = tl.zeros([BLOCK], dtype=tl.float32)
    pp = tl.zeros([BLOCK], dtype=tl.float32)
    tt = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, n_cols, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        mask = cols < n_cols
        p = tl.load(p_ptr + row * stride_p + cols, mask=mask, other=0.0)
        t = tl.load(t_ptr + row * stride_t + cols, mask=mask, other=0.0)
        dot += p * t
        pp += p * p
        tt += t * t
    p_norm = tl.maximum(libdevice.sqrt(tl.sum(pp, axis=0)), eps)
    t_norm = tl.maximum(libdevice.sqrt(tl.sum(tt, axis=0)), eps)
    cos = tl.sum(dot, axis=0) / (p_norm * p_norm)
    tl.atomic_add(out_ptr, (1.0 - cos) * inv_rows)


class ModelNew(nn.Module):
    def __init__(self):
        super().__init__()

    def forward(self, predictions: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        p = predictions.contiguous()
        t = targets.contiguous()
        rows, cols = p.shape
        out = torch.zeros((), device=p.device, dtype=torch.float32)
        cosine_loss_kernel[(rows,)](p, t, out, cols, p.stride(0), t.stride(0), 1.0 / rows, 1e-8, BLOCK=256)
        return out
