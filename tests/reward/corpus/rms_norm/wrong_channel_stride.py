# WRONG: the channel stride is taken from the wrong dimension (stride(2))
# Caught by: any inputs
import torch
import torch.nn as nn
import triton
import triton.language as tl
from triton.language.extra import libdevice


@triton.jit
def rms_norm_channels_kernel(
    x_ptr, out_ptr, C, S, stride_b, stride_c, eps,
    BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
):
    b = tl.program_id(0)
    s_block = tl.program_id(1)
    c = tl.arange(0, BLOCK_C)
    s = s_block * BLOCK_S + tl.arange(0, BLOCK_S)
    mask = (c[:, None] < C) & (s[None, :] < S)
    offsets = b * stride_b + c[:, None] * stride_c + s[None, :]
    x = tl.load(x_ptr + offsets, mask=mask, other=0.0)
    mean_sq = tl.sum(x * x, axis=0) / C
    inv_rms = libdevice.rsqrt(mean_sq + eps)
    tl.store(out_ptr + offsets, x * inv_rms[None, :], mask=mask)


class ModelNew(nn.Module):
    def __init__(self, num_features: int, eps: float = 1e-5):
        super().__init__()
        self.num_features = num_features
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.contiguous()
        batch, channels = x.shape[0], x.shape[1]
        spatial = x.numel() // (batch * channels)
        x3 = x.view(batch, channels, spatial)
        out = torch.empty_like(x3)
        BLOCK_C = triton.next_power_of_2(channels)
        BLOCK_S = 64
        grid = (batch, triton.cdiv(spatial, BLOCK_S))
        rms_norm_channels_kernel[grid](
            x3, out, channels, spatial, x3.stride(0), x3.stride(2), self.eps, BLOCK_C=BLOCK_C, BLOCK_S=BLOCK_S,
        )
        return out.view_as(x)
