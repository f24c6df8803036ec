"""Paths that two components must agree on: where the operator mounts what the trainer reads,
and the layout of the trainer's output that the operator and the server read."""

# In the trainer pod (the operator mounts them; the trainer reads them).
CONFIG_DIR = "/etc/kuberft"
"""Where the job's configuration ConfigMap is mounted."""
CONFIG_KEY = "job.json"
"""The ConfigMap key (and file name under CONFIG_DIR) holding the RFTJob spec in wire form."""
DATASET_DIR = "/etc/kuberft/dataset"
"""Where a `dataset.configMap` is mounted (the trainer reads `$KUBERFT_DATASET_DIR`, this by default)."""
EVAL_DATASET_DIR = "/etc/kuberft/eval-dataset"
"""Where a `dataset.eval.configMap` is mounted (the trainer reads `$KUBERFT_EVAL_DATASET_DIR`, this by default)."""
CHECKPOINT_DIR = "/checkpoints"
"""Where the checkpoint volume is mounted; each job writes under `<CHECKPOINT_DIR>/<job name>`."""

# In the trainer's output directory.
ADAPTER_DIR = "adapter"
"""The final LoRA adapter (peft format), written at the end of training."""
