import torch
import torch.nn as nn


class Model(nn.Module):
    """A simple model that performs a cumulative sum (prefix sum) operation along a specified dimension."""

    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cumsum(x, dim=self.dim)


batch_size = 16
input_size = 512
dim = 1


def get_inputs():
    return [torch.rand(batch_size, input_size)]


def get_init_inputs():
    return [dim]
