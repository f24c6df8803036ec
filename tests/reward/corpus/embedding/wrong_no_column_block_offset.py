# WRONG: every column block reads and writes the first BLOCK_D columns
# Caught by: odd-sized shapes
import torch
import torch.nn as nn
import triton
import triton.language as tl


@triton.jit
def embedding_kernel(idx_ptr, weight_ptr, out_ptr, n_tokens, dim, stride_w, stride_o, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    tokens = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    d_block = tl.program_id(1)
    token_mask = tokens < n_tokens
    rows = tl.load(idx_ptr + tokens, mask=token_mask, other=0)
    cols = tl.arange(0, BLOCK_D)
    mask = token_mask[:, None] & (cols[None, :] < dim)
    vec = tl.load(weight_ptr + rows[:, None] * stride_w + cols[None, :], mask=mask)
    tl.store(out_ptr + tokens[:, None] * stride_o + cols[None, :], vec, mask=mask)


class ModelNew(nn.Module):
    def __init__(self, num_embeddings: int, embedding_dim: int):
        super().__init__()
        self.embedding = nn.Embedding(num_embeddings, embedding_dim)

    def forward(self, indices: torch.Tensor) -> torch.Tensor:
        weight = self.embedding.weight
        flat = indices.reshape(-1).contiguous()
        dim = weight.shape[1]
        out = torch.empty((flat.numel(), dim), device=weight.device, dtype=weight.dtype)
        n_tokens = flat.numel()
        BLOCK_T, BLOCK_D = 16, 64
        grid = (triton.cdiv(n_tokens, BLOCK_T), triton.cdiv(dim, BLOCK_D))
        embedding_kernel[grid](flat, weight, out, n_tokens, dim, weight.stride(0), out.stride(0), BLOCK_T=BLOCK_T, BLOCK_D=BLOCK_D)
        return out.view(*indices.shape, dim)
