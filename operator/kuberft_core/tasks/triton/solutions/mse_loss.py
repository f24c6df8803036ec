import torch
import torch.nn as nn
import triton
import triton.language as tl


@triton.jit
def mse_kernel(pred_ptr, target_ptr, out_ptr, n_elements, BLOCK_SIZE: tl.constexpr):
    # one program walks the whole input: a deterministic sum, no atomics
    acc = tl.zeros((BLOCK_SIZE,), dtype=tl.float32)
    for start in range(0, n_elements, BLOCK_SIZE):
        offsets = start + tl.arange(0, BLOCK_SIZE)
        mask = offsets < n_elements
        p = tl.load(pred_ptr + offsets, mask=mask, other=0.0)
        t = tl.load(target_ptr + offsets, mask=mask, other=0.0)
        d = p - t
        acc += d * d
    total = tl.sum(acc, axis=0) / n_elements
    tl.store(out_ptr + tl.arange(0, 1), total + tl.zeros((1,), dtype=tl.float32), mask=tl.arange(0, 1) < 1)


class ModelNew(nn.Module):
    def __init__(self):
        super().__init__()

    def forward(self, predictions: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        predictions, targets = predictions.contiguous(), targets.contiguous()
        out = torch.empty(1, dtype=predictions.dtype, device=predictions.device)
        mse_kernel[(1,)](predictions, targets, out, predictions.numel(), BLOCK_SIZE=1024)
        return out.reshape(())
