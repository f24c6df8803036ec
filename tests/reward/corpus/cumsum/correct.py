import torch
import torch.nn as nn
import triton
import triton.language as tl


@triton.jit
def cumsum_rows_kernel(x_ptr, y_ptr, n_rows, n_cols, stride_row, ROWS: tl.constexpr, BLOCK: tl.constexpr):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    row_mask = rows < n_rows
    carry = tl.zeros([ROWS], dtype=tl.float32)
    for start in range(0, n_cols, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        mask = row_mask[:, None] & (cols[None, :] < n_cols)
        offsets = rows[:, None] * stride_row + cols[None, :]
        x = tl.load(x_ptr + offsets, mask=mask, other=0.0)
        prefix = tl.cumsum(x, axis=1) + carry[:, None]
        tl.store(y_ptr + offsets, prefix, mask=mask)
        carry += tl.sum(x, axis=1)


class ModelNew(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        moved = x.movedim(self.dim, -1).contiguous()
        rows = moved.view(-1, moved.shape[-1])
        y = torch.empty_like(rows)
        n_rows, n_cols = rows.shape
        ROWS = 4
        cumsum_rows_kernel[(triton.cdiv(n_rows, ROWS),)](rows, y, n_rows, n_cols, rows.stride(0), ROWS=ROWS, BLOCK=128)
        return y.view(moved.shape).movedim(-1, self.dim)
