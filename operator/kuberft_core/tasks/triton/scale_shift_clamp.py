import torch
import torch.nn as nn


class Model(nn.Module):
    """Fused affine transform and clamp: clamp(x * scale + shift, low, high)."""

    def __init__(self, scale: float, shift: float, low: float, high: float):
        super().__init__()
        self.scale = scale
        self.shift = shift
        self.low = low
        self.high = high

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.clamp(x * self.scale + self.shift, self.low, self.high)


batch_size = 40
dim = 90


def get_inputs():
    return [torch.randn(batch_size, dim)]


def get_init_inputs():
    return [1.5, 0.25, -1.0, 1.0]
