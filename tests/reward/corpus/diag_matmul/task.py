import torch
import torch.nn as nn


class Model(nn.Module):
    """Simple model that performs a matrix multiplication of a diagonal matrix with another matrix."""

    def __init__(self):
        super().__init__()

    def forward(self, A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
        return torch.diag(A) @ B


N = 64
M = 128


def get_inputs():
    A = torch.rand(N)
    B = torch.rand(N, M)
    return [A, B]


def get_init_inputs():
    return []
