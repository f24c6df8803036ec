# WRONG: the negative branch computes alpha * exp(x), without the - 1
# Caught by: signed inputs
import torch
import torch.nn as nn
import triton
import triton.language as tl


@triton.heuristics({"EVEN_N": lambda args: args["n_elements"] % args["BLOCK_SIZE"] == 0})
@triton.jit
def elu_kernel(x_ptr, y_ptr, n_elements, alpha, BLOCK_SIZE: tl.constexpr, EVEN_N: tl.constexpr):
    offsets = tl.program_id(0) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    if EVEN_N:
        x = tl.load(x_ptr + offsets)
    else:
        x = tl.load(x_ptr + offsets, mask=offsets < n_elements, other=0.0)
    y = tl.where(x > 0, x, alpha * tl.exp(x))
    if EVEN_N:
        tl.store(y_ptr + offsets, y)
    else:
        tl.store(y_ptr + offsets, y, mask=offsets < n_elements)


class ModelNew(nn.Module):
    def __init__(self, alpha: float = 1.0):
        super().__init__()
        self.alpha = alpha

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_c = x.contiguous()
        y = torch.empty_like(x_c)
        n_elements = x_c.numel()
        grid = lambda meta: (triton.cdiv(n_elements, meta["BLOCK_SIZE"]),)
        elu_kernel[grid](x_c, y, n_elements, float(self.alpha), BLOCK_SIZE=256)
        return y
