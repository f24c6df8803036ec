import torch
import torch.nn as nn


class Model(nn.Module):
    """A model that performs a masked cumulative sum, only summing elements that satisfy a condition."""

    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return torch.cumsum(x * mask, dim=self.dim)


batch_size = 16
input_size = 256
dim = 1


def get_inputs():
    x = torch.rand(batch_size, input_size)
    mask = torch.randint(0, 2, (batch_size, input_size)).bool()
    return [x, mask]


def get_init_inputs():
    return [dim]
