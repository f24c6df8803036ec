# WRONG: mean and variance divide by the padded length (whole blocks), not N
# Caught by: odd-sized shapes
import torch
import torch.nn as nn
import triton
import triton.language as tl


@triton.jit
def layer_norm_fwd_kernel(
    X, Y, W, B, stride_x_row, stride_y_row, N, eps, BLOCK_SIZE: tl.constexpr,
):
    row = tl.program_id(0)
    X += row * stride_x_row
    Y += row * stride_y_row
    # mean
    acc = tl.zeros([BLOCK_SIZE], dtype=tl.float32)
    for off in range(0, N, BLOCK_SIZE):
        cols = off + tl.arange(0, BLOCK_SIZE)
        acc += tl.load(X + cols, mask=cols < N, other=0.0).to(tl.float32)
    mean = tl.sum(acc, axis=0) / (tl.cdiv(N, BLOCK_SIZE) * BLOCK_SIZE)
    # variance
    acc = tl.zeros([BLOCK_SIZE], dtype=tl.float32)
    for off in range(0, N, BLOCK_SIZE):
        cols = off + tl.arange(0, BLOCK_SIZE)
        x = tl.load(X + cols, mask=cols < N, other=0.0).to(tl.float32)
        diff = tl.where(cols < N, x - mean, 0.0)
        acc += diff * diff
    var = tl.sum(acc, axis=0) / (tl.cdiv(N, BLOCK_SIZE) * BLOCK_SIZE)
    rstd = 1.0 / tl.sqrt(var + eps.to(tl.float32))
    # normalise, scale and shift
    for off in range(0, N, BLOCK_SIZE):
        cols = off + tl.arange(0, BLOCK_SIZE)
        mask = cols < N
        w = tl.load(W + cols, mask=mask)
        b = tl.load(B + cols, mask=mask)
        x = tl.load(X + cols, mask=mask, other=0.0).to(tl.float32)
        y = (x - mean) * rstd * w + b
        tl.store(Y + cols, y, mask=mask)


class ModelNew(nn.Module):
    def __init__(self, normalized_shape: tuple):
        super().__init__()
        self.ln = nn.LayerNorm(normalized_shape=normalized_shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n_cols = self.ln.weight.numel()
        x_2d = x.reshape(-1, n_cols).contiguous()
        y = torch.empty_like(x_2d)
        block = min(1024, triton.next_power_of_2(n_cols))
        block = max(block // 2, 16)
        layer_norm_fwd_kernel[(x_2d.shape[0],)](
            x_2d, y, self.ln.weight.reshape(-1), self.ln.bias.reshape(-1),
            x_2d.stride(0), y.stride(0), n_cols, self.ln.eps, BLOCK_SIZE=block,
        )
        return y.view_as(x)
