"""kuberft control plane: the API models, CRD generation, the operator and the `kuberft` command."""

__version__ = "0.1.0"
