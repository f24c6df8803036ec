"""What `kuberft serve` serves: one typed object, built from the command line or by the local
runner. Imports nothing heavy (the CLI builds it before torch is loaded)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

SpeculatorType = Literal["none", "ngram", "draft", "heads"]


@dataclass
class ServeConfig:
    model: str
    """Base model: a Hugging Face name, a local path, or a built-in tiny model name (`tiny:...`)."""
    adapters: dict[str, str] = field(default_factory=dict)
    """LoRA adapters by served name (the `model` field of requests) -> peft directory."""
    speculator: SpeculatorType = "ngram"
    """`none`, `ngram` (prompt lookup), `draft` (small LM, same tokenizer), `heads` (Medusa-style)."""
    num_speculative_tokens: int = 4
    """Tokens proposed per step (the upper bound when adaptive)."""
    adaptive: bool = True
    """Choose the number of proposed tokens from the observed acceptance rate and step costs."""
    draft_model: str | None = None
    """For `draft`: name or path of the draft model."""
    heads: dict[str | None, str] = field(default_factory=dict)
    """For `heads`: heads directory per served model (None = the default model)."""
    train_heads: bool = False
    """For `heads`: self-distil heads at start-up for every served model without heads."""
    train_heads_data: str | None = None
    """Prompts for start-up head training (JSONL/JSON with `prompt` or `messages`, or text lines)."""
    max_batch_size: int = 8
    """Requests decoded together."""
    host: str = "0.0.0.0"
    port: int = 8000
    dtype: str = "auto"
    """auto | float32 | bfloat16 | float16 | float64 (auto: bfloat16 on a GPU that has it, else float32)."""
    device: str = "auto"
    """auto | cpu | cuda | cuda:N."""
    revision: str | None = None
    trust_remote_code: bool = False
    served_model_name: str | None = None
    """Name of the base model in the API (default: the --model value)."""
    seed: int | None = None
    """Seed of requests that give none (default: a random one per request)."""

    @property
    def base_name(self) -> str:
        return self.served_model_name or self.model
