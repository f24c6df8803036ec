"""What `kuberft serve` serves: one typed object. What a TurboDeployment decides is held as the
core API models themselves (`ModelSpec`, `SpeculatorSpec`); the rest is local to this process.

It is built from the spec document the operator mounts in a serve pod (`kuberft serve --config
FILE`, read by `load_spec_document`), from command-line flags (`kuberft serve --model ...`), or by
the local runner; from there on the three are one path. Imports nothing heavy (the CLI builds it
before torch is loaded)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from kuberft_core.api import ModelSpec, SpeculatorSpec, TurboDeployment, TurboDeploymentSpec
from kuberft_core.manifests import ManifestError, Problem, load_spec


@dataclass
class ServeConfig:
    model: ModelSpec
    """The base model: a Hugging Face name, a local path or a built-in tiny model name (`tiny:...`),
    with its revision, dtype and trust_remote_code."""
    speculator: SpeculatorSpec = field(default_factory=SpeculatorSpec)
    """Speculative decoding. `headsPath` holds the heads of the default served model (`default_model`)."""
    adapters: dict[str, str] = field(default_factory=dict)
    """LoRA adapters by served name (the `model` field of requests) -> peft directory."""
    heads_by_model: dict[str, str] = field(default_factory=dict)
    """For `heads` with several served models: heads directories by served name, for the models
    other than the default one (the command line's `--heads NAME=DIR`)."""
    train_heads_data: str | None = None
    """Prompts for start-up head training (JSONL/JSON with `prompt` or `messages`, or text lines)."""
    max_batch_size: int = 8
    """Requests decoded together."""
    host: str = "0.0.0.0"
    port: int = 8000
    """Listen port (0: any free port)."""
    device: str = "auto"
    """auto | cpu | cuda | cuda:N."""
    served_model_name: str | None = None
    """Name of the base model in the API (default: the model's name)."""
    seed: int | None = None
    """Seed of requests that give none (default: a random one per request)."""
    max_loras: int | None = None
    """LoRA adapters resident in memory at once (None: no limit). More may be known (listed at
    start-up or loaded with `POST /v1/load_lora_adapter`): the least recently used one that no
    running request uses is evicted to make room, and reloaded from its directory when asked for."""
    max_lora_memory_mib: float | None = None
    """Memory the resident adapters' weights may take, in MiB (None: no limit); evicts as `max_loras` does."""
    prefix_cache_mib: float = 1024
    """Memory for the prefix cache (the KV of prompts' leading tokens, reused by later prompts that
    start the same way), in MiB; 0: no prefix caching."""
    compile: bool = False
    """Whether the model's forward passes are compiled with torch.compile (`LeanRunner.compile`:
    the CPU forward of Llama-architecture models; needs a C++ compiler, adds a minute or more to
    start-up)."""
    runtime_lora_updating: bool = False
    """Whether `POST /v1/load_lora_adapter` and `/v1/unload_lora_adapter` exist (vLLM's, which it
    enables with VLLM_ALLOW_RUNTIME_LORA_UPDATING). Off by default, as in vLLM: they let whoever
    reaches the server load any directory the server can read."""

    @property
    def base_name(self) -> str:
        return self.served_model_name or self.model.name

    @property
    def default_model(self) -> str | None:
        """The served model `speculator.headsPath` is for: the first adapter, else the base (None)."""
        return next(iter(self.adapters), None)

    @classmethod
    def from_spec(cls, spec: TurboDeploymentSpec, **local) -> "ServeConfig":
        """A TurboDeployment's serving setup, its adapters resolved to directories (`uri`),
        plus the process-local settings in `local` (host, device, seed, ...)."""
        adapters = {}
        for adapter in spec.adapter_list:
            if adapter.uri is None:
                raise ValueError(f"adapter {adapter.name}: fromRFTJob is not resolved to uri")
            adapters[adapter.name] = adapter.uri
        return cls(
            model=spec.model,
            speculator=spec.speculator,
            adapters=adapters,
            max_batch_size=spec.max_batch_size,
            port=spec.port,
            max_loras=spec.max_loaded_adapters,
            max_lora_memory_mib=spec.max_adapter_memory_mib,
            prefix_cache_mib=spec.prefix_cache_mib,
            **local,
        )


def load_spec_document(path: Path) -> TurboDeploymentSpec:
    """The TurboDeploymentSpec in `path`: the JSON document the operator mounts in a serve pod
    (its adapters resolved to paths), or a TurboDeployment manifest. Raises ManifestError naming
    every problem with its field path."""
    _, spec = load_spec(path, TurboDeployment)
    where = ["adapter"] if spec.adapter is not None else [f"adapters[{i}]" for i in range(len(spec.adapter_list))]
    problems = [
        Problem(
            str(path),
            f"{field_path}.fromRFTJob",
            f"the operator resolves this to {field_path}.uri in a serve pod; to serve here, give {field_path}.uri (the adapter's directory)",
        )
        for field_path, adapter in zip(where, spec.adapter_list)
        if adapter.uri is None
    ]
    if problems:
        raise ManifestError(problems)
    return spec
