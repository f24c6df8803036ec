import torch
import torch.nn as nn


class Model(nn.Module):
    """Looks up embeddings for a batch of token ids."""

    def __init__(self, num_embeddings: int, embedding_dim: int):
        super().__init__()
        self.embedding = nn.Embedding(num_embeddings, embedding_dim)

    def forward(self, indices: torch.Tensor) -> torch.Tensor:
        return self.embedding(indices)


num_embeddings = 100
embedding_dim = 64
batch_size = 8
seq_len = 16


def get_inputs():
    return [torch.randint(0, num_embeddings, (batch_size, seq_len))]


def get_init_inputs():
    return [num_embeddings, embedding_dim]
