import torch
import torch.nn as nn


class Model(nn.Module):
    """Simple model that performs a single matrix multiplication with transposed B (C = A * B.T)."""

    def __init__(self):
        super().__init__()

    def forward(self, A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
        return torch.matmul(A, B.T)


M = 64
K = 64
N = 48


def get_inputs():
    A = torch.rand(M, K)
    B = torch.rand(N, K)
    return [A, B]


def get_init_inputs():
    return []
