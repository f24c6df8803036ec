import torch
import torch.nn as nn
import torch.nn.functional as F


class Model(nn.Module):
    """A model that computes Smooth L1 (Huber) Loss for regression tasks."""

    def __init__(self):
        super().__init__()

    def forward(self, predictions: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.smooth_l1_loss(predictions, targets)


batch_size = 32
input_shape = (256,)
dim = 1


def get_inputs():
    return [torch.rand(batch_size, *input_shape), torch.rand(batch_size, *input_shape)]


def get_init_inputs():
    return []
