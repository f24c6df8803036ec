# WRONG: padded lanes load -inf (copied from an argmax kernel), so they win the argmin
# Caught by: odd-sized shapes
import torch
import torch.nn as nn
import triton
import triton.language as tl


@triton.jit
def argmin_rows_kernel(x_ptr, out_ptr, n_rows, n_cols, row_stride, BLOCK_ROWS: tl.constexpr, BLOCK: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    cols = tl.arange(0, BLOCK)
    mask = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
    vals = tl.load(x_ptr + rows[:, None] * row_stride + cols[None, :], mask=mask, other=-float("inf"))
    idx = tl.argmin(vals, axis=1)
    tl.store(out_ptr + rows, idx.to(tl.int64), mask=rows < n_rows)


class ModelNew(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.contiguous().view(-1, x.shape[-1])
        out = torch.empty(rows.shape[0], device=x.device, dtype=torch.long)
        n_rows, n_cols = rows.shape
        BLOCK_ROWS = 16
        argmin_rows_kernel[(triton.cdiv(n_rows, BLOCK_ROWS),)](
            rows, out, n_rows, n_cols, rows.stride(0), BLOCK_ROWS=BLOCK_ROWS, BLOCK=triton.next_power_of_2(n_cols),
        )
        return out.view(x.shape[:-1])
