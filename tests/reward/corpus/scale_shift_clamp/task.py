import torch
import torch.nn as nn


class Model(nn.Module):
    """Scales, shifts and clamps its input."""

    def __init__(self, scale: float, shift: float, min_val: float, max_val: float):
        super().__init__()
        self.scale = scale
        self.shift = shift
        self.min_val = min_val
        self.max_val = max_val

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.clamp(x * self.scale + self.shift, min=self.min_val, max=self.max_val)


batch_size = 16
dim = 512


def get_inputs():
    return [torch.rand(batch_size, dim)]


def get_init_inputs():
    return [2.0, 0.1, 0.0, 1.0]
