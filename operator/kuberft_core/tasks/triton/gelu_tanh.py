import torch
import torch.nn as nn
import torch.nn.functional as F


class Model(nn.Module):
    """Applies GELU with the tanh approximation."""

    def __init__(self):
        super().__init__()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(x, approximate="tanh")


batch_size = 33
dim = 200


def get_inputs():
    return [torch.randn(batch_size, dim) * 3]


def get_init_inputs():
    return []
