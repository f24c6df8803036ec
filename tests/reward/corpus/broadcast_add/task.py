import torch
import torch.nn as nn


class Model(nn.Module):
    """Adds a per-channel tensor to a (batch, channels, length) tensor with broadcasting."""

    def __init__(self):
        super().__init__()

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return x + y


batch_size = 8
channels = 32
length = 32


def get_inputs():
    return [torch.rand(batch_size, channels, length), torch.rand(channels, 1)]


def get_init_inputs():
    return []
