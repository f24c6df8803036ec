"""The kuberft API (group `kuberft.io`, version `v1alpha1`) as pydantic models.

These models are the single source of truth: `crds/` is generated from them, the operator
reconciles them, the trainer reads its configuration from them and `kuberft validate`
checks manifests with them. Field docstrings become the CRD descriptions shown by
`kubectl explain`. This module imports nothing heavy (no torch, no kopf).
"""

from __future__ import annotations

import re
from datetime import datetime
from typing import Annotated, Any, ClassVar, Literal, Optional, Union

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    model_validator,
)
from pydantic.alias_generators import to_camel
from pydantic_core import PydanticCustomError

from .cel import CelRule, failed_rules
from .reward_kinds import REWARD_KINDS, options_problems

GROUP = "kuberft.io"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"

# The Kubernetes resource.Quantity grammar, as kubebuilder emits it for CRDs.
QUANTITY_PATTERN = (
    r"^(\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))(([KMGTPE]i)|[numkMGTPE]|([eE](\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))))?$"
)


def _check_quantity(value: Union[int, str]) -> Union[int, str]:
    if isinstance(value, str) and not re.match(QUANTITY_PATTERN, value):
        raise ValueError(f"'{value}' is not a Kubernetes quantity (examples: 500m, 2, 8Gi)")
    return value


Quantity = Annotated[
    Union[int, str], AfterValidator(_check_quantity), Field(json_schema_extra={"pattern": QUANTITY_PATTERN})
]


class ApiModel(BaseModel):
    """Base of every API object: camelCase on the wire, unknown fields rejected (a typo is an
    error, never silently ignored), field docstrings as descriptions, CEL rules checked."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        use_attribute_docstrings=True,
        validate_default=True,
    )
    cel_rules: ClassVar[tuple[CelRule, ...]] = ()

    @classmethod
    def __get_pydantic_json_schema__(cls, core_schema, handler):  # noqa: ANN001
        schema = handler(core_schema)
        if cls.cel_rules:
            target = handler.resolve_ref_schema(schema)
            target["x-kubernetes-validations"] = [rule.to_schema() for rule in cls.cel_rules]
        return schema

    @model_validator(mode="after")
    def _check_cel_rules(self):
        if type(self).cel_rules:
            node = self.to_wire()
            failed = failed_rules(type(self).cel_rules, node)
            if failed:
                raise PydanticCustomError(
                    "cel_rule",
                    "{summary}",
                    {
                        "summary": "; ".join(r.message for r in failed),
                        "violations": [(r.field_path or "", r.message) for r in failed],
                    },
                )
        return self

    def to_wire(self) -> dict[str, Any]:
        """The object as the API server stores it (camelCase, defaults filled, unset omitted)."""
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)


def nested(model: type[BaseModel]) -> Any:
    """A nested object field that defaults to the model's defaults, in Python and in the CRD."""
    return Field(default_factory=model, json_schema_extra={"default": {}})


# --------------------------------------------------------------------------- shared parts


class ModelSpec(ApiModel):
    """The pre-trained causal language model."""

    name: str = Field(min_length=1, max_length=512)
    """Hugging Face model name (e.g. `Qwen/Qwen2.5-Coder-7B-Instruct`) or a local path / mounted volume path."""
    revision: Optional[str] = Field(default=None, max_length=256)
    """Model revision (branch, tag or commit) when loading by name."""
    dtype: Literal["auto", "float32", "bfloat16", "float16", "float64"] = "auto"
    """Weights dtype. `auto` uses bfloat16 on a GPU that supports it and float32 on a CPU; `float64` is for exact CPU comparisons."""
    trust_remote_code: bool = False
    """Allow model code shipped with the checkpoint to run. Off by default: it executes code from the model repository."""


class ResourceRequirements(ApiModel):
    """Compute resources, as in a Kubernetes container (`cpu`, `memory`, `nvidia.com/gpu`, ...)."""

    requests: dict[str, Quantity] = Field(default_factory=dict)
    """Minimum resources the scheduler reserves."""
    limits: dict[str, Quantity] = Field(default_factory=dict)
    """Maximum resources; GPUs are requested here (`nvidia.com/gpu: 1`)."""


class Toleration(ApiModel):
    """A Kubernetes toleration, letting pods schedule onto tainted nodes (e.g. GPU nodes)."""

    key: Optional[str] = None
    """Taint key the toleration applies to; empty with operator Exists matches all taints."""
    operator: Literal["Exists", "Equal"] = "Equal"
    """`Equal` matches key and value; `Exists` matches any value."""
    value: Optional[str] = None
    """Taint value to match when operator is Equal."""
    effect: Optional[Literal["NoSchedule", "PreferNoSchedule", "NoExecute"]] = None
    """Taint effect to match; empty matches all effects."""
    toleration_seconds: Optional[int] = Field(default=None, ge=0)
    """For NoExecute: how long the pod stays bound after the taint appears."""


class KeyRef(ApiModel):
    """One key of a Secret or ConfigMap in the job's namespace."""

    name: str = Field(min_length=1, max_length=253)
    """The Secret's or ConfigMap's name."""
    key: str = Field(min_length=1, max_length=253)
    """The key within it."""
    optional: Optional[bool] = None
    """Start the container even when the object or key is missing."""


class EnvVarSource(ApiModel):
    """Where a variable's value comes from: a Secret key (tokens, keys) or a ConfigMap key."""

    cel_rules: ClassVar[tuple[CelRule, ...]] = (
        CelRule("[has(self.secretKeyRef), has(self.configMapKeyRef)].filter(x, x).size() == 1",
                "exactly one of secretKeyRef or configMapKeyRef must be set"),
    )

    secret_key_ref: Optional[KeyRef] = None
    """A Secret's key: the value never appears in the RFTJob, its ConfigMaps or the pod spec."""
    config_map_key_ref: Optional[KeyRef] = None
    """A ConfigMap's key."""


class EnvVar(ApiModel):
    """An environment variable for a container: a literal `value`, or `valueFrom` a Secret or
    ConfigMap key (put credentials in a Secret, never in `value`)."""

    cel_rules: ClassVar[tuple[CelRule, ...]] = (
        CelRule("!(has(self.value) && has(self.valueFrom))", "set value or valueFrom, not both", ".valueFrom"),
    )

    name: str = Field(min_length=1, max_length=256)
    """Variable name."""
    value: Optional[str] = None
    """Variable value (default: empty)."""
    value_from: Optional[EnvVarSource] = None
    """A Secret or ConfigMap key to read the value from."""


class PodPlacement(ApiModel):
    """Where and how a component's pods run in the cluster (ignored by `kuberft run`)."""

    image: Optional[str] = None
    """Container image; defaults to the operator's configured image for this component."""
    resources: ResourceRequirements = nested(ResourceRequirements)
    """CPU, memory and GPU requests and limits."""
    node_selector: dict[str, str] = Field(default_factory=dict)
    """Node labels the pods must match (e.g. a GPU node pool)."""
    tolerations: list[Toleration] = Field(default_factory=list, max_length=32)
    """Tolerations for tainted nodes."""
    env: list[EnvVar] = Field(default_factory=list, max_length=64)
    """Extra environment variables."""


class TrainerSpec(PodPlacement):
    """The trainer's pods, and how training is spread over their GPUs."""

    nodes: int = Field(default=1, ge=1, le=1024)
    """Trainer pods, one per node, each running one process per GPU it asks for
    (`resources.limits["nvidia.com/gpu"]`). More than one runs as a JobSet (JobSet must be
    installed): the pods start together, meet at pod 0 (torchrun's c10d rendezvous) and, when any
    of them fails, all restart together from the latest checkpoint (counted against backoffLimit).
    Checkpoints must then be on a volume every node can mount (`checkpoint.volumeClaimName`, ReadWriteMany)."""
    sharding: Literal["none", "fsdp"] = "none"
    """`none`: every process holds the whole model (data parallel, LoRA gradients summed).
    `fsdp`: the base model and the LoRA weights are sharded over all processes (FSDP2, one shard
    group per decoder layer), for a model that does not fit one GPU. `kuberft run --nproc N` runs
    either on one machine."""
    activation_checkpointing: bool = False
    """Recompute each decoder layer's activations in the backward pass instead of keeping them:
    less memory for about a third more compute."""


class Condition(ApiModel):
    """A status condition in the shape of metav1.Condition."""

    type: str = Field(max_length=316)
    """Condition type, CamelCase (e.g. `RewardPoolReady`, `Succeeded`)."""
    status: Literal["True", "False", "Unknown"]
    """Whether the condition holds."""
    reason: str = Field(max_length=1024)
    """One CamelCase word saying why."""
    message: str = Field(default="", max_length=32768)
    """Human-readable detail."""
    last_transition_time: datetime
    """When the status last changed."""
    observed_generation: Optional[int] = Field(default=None, ge=0)
    """The metadata.generation this condition was computed from."""


class ObjectMeta(BaseModel):
    """The part of Kubernetes object metadata that `kuberft validate` checks."""

    model_config = ConfigDict(extra="allow")
    name: str = Field(
        min_length=1, max_length=253, pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
    )
    namespace: Optional[str] = None
    labels: dict[str, str] = Field(default_factory=dict)
    annotations: dict[str, str] = Field(default_factory=dict)


# --------------------------------------------------------------------------- RFTJob

RewardKind = Literal[tuple(REWARD_KINDS)]  # the catalogue in reward_kinds.py, in its order


class LoraSpec(ApiModel):
    """LoRA adapter trained on top of the frozen base model."""

    r: int = Field(default=16, ge=1, le=1024)
    """Rank of the low-rank update matrices."""
    alpha: int = Field(default=32, ge=1, le=4096)
    """Scaling numerator: the update is scaled by alpha / r."""
    dropout: float = Field(default=0.05, ge=0.0, lt=1.0)
    """Dropout on the LoRA input during training."""
    target_modules: list[str] = Field(default_factory=lambda: ["all-linear"], min_length=1, max_length=64)
    """Module names to adapt (e.g. `q_proj`, `v_proj`); `all-linear` adapts every linear layer but the output head."""


class ConfigMapRef(ApiModel):
    """A key of a ConfigMap in the job's namespace."""

    name: str = Field(min_length=1, max_length=253)
    """ConfigMap name."""
    key: str = Field(default="train.jsonl", min_length=1, max_length=253)
    """Key holding JSONL rows."""


class BuiltinDataset(ApiModel):
    """A dataset generated from one of the task sets shipped with the reward pool."""

    name: Literal["triton-kernels", "triton-family", "countdown"]
    """`triton-kernels`: the curated PyTorch-to-Triton tasks; `triton-family`: generated
    PyTorch-to-Triton tasks (elementwise compositions, row-wise reductions), options `split`
    (`train` or `heldout`) and `kinds`; `countdown`: arithmetic puzzles reaching a target."""
    size: int = Field(default=256, ge=1, le=1_000_000)
    """Rows to generate, for generated sets (countdown; triton-family: at most this many); fixed sets use all their tasks."""
    seed: int = 0
    """Seed of the generator."""
    options: dict[str, Any] = Field(default_factory=dict, json_schema_extra={"x-kubernetes-preserve-unknown-fields": True})
    """Generator options (e.g. countdown `numbers`, `maxNumber`)."""


SOURCE_RULE = CelRule(
    "[has(self.rows), has(self.configMap), has(self.uri), has(self.builtin)].filter(x, x).size() == 1",
    "exactly one of rows, configMap, uri or builtin must be set",
)


class DatasetSource(ApiModel):
    """Exactly one source of rows. Each row is an object with a prompt field; every other field
    (a task id, a target, an answer) is passed to the reward functions."""

    cel_rules: ClassVar[tuple[CelRule, ...]] = (SOURCE_RULE,)

    rows: Optional[list[dict[str, Any]]] = Field(
        default=None, min_length=1, max_length=10_000, json_schema_extra={"items": {"type": "object", "x-kubernetes-preserve-unknown-fields": True}}
    )
    """Inline rows (each an object with at least the prompt field)."""
    config_map: Optional[ConfigMapRef] = None
    """Rows as JSONL in a ConfigMap."""
    uri: Optional[str] = Field(default=None, min_length=1, max_length=2048)
    """A JSONL file or a directory of JSONL files, as a path inside the trainer (e.g. on a mounted volume)."""
    builtin: Optional[BuiltinDataset] = None
    """A dataset generated from a task set shipped with kuberft."""


class DatasetSpec(DatasetSource):
    """Training prompts: exactly one source of rows (each an object with a prompt field; every
    other field, a task id, a target, an answer, is passed to the reward functions), and where
    the held-out rows come from: `evalFraction` of these rows, or a second source, `eval`."""

    cel_rules: ClassVar[tuple[CelRule, ...]] = (
        SOURCE_RULE,
        CelRule(
            "!has(self.eval) || !has(self.evalFraction) || self.evalFraction == 0.0",
            "set evalFraction (rows held out of the training source) or eval (a source of held-out rows), not both",
            ".evalFraction",
        ),
    )

    prompt_field: str = Field(default="prompt", min_length=1, max_length=128)
    """Row field holding the prompt (or the task source, when a template formats it)."""
    prompt_template: Optional[str] = Field(default=None, max_length=65536)
    """Python format string applied to each row (e.g. `Solve: {question}`); default: the prompt field as is."""
    system_prompt: Optional[str] = Field(default=None, max_length=65536)
    """System message placed before each prompt when the model has a chat template."""
    use_chat_template: bool = True
    """Format prompts with the model's chat template when it has one."""
    eval_fraction: float = Field(default=0.0, ge=0.0, le=0.9)
    """Fraction of rows held out for evaluation (pass@1 with greedy decoding); 0 with `eval`."""
    eval: Optional[DatasetSource] = None
    """Held-out rows from a source of their own (e.g. the held-out split of a task family), with
    the same fields as the training rows, prompted and scored the same way; every training row
    then trains. Evaluated with greedy decoding every `grpo.evalEvery` steps and at the end."""


class RewardSpec(ApiModel):
    """One reward function. Scores are in [0, 1]; the total reward is the weighted sum."""

    cel_rules: ClassVar[tuple[CelRule, ...]] = (
        CelRule("self.kind != 'custom' || has(self.module)", "a custom reward needs module", ".module"),
        CelRule("self.kind == 'custom' || !has(self.module)", "module is only for kind custom", ".module"),
    )

    kind: RewardKind
    """Built-in reward (`triton.format`, `triton.compile`, `triton.correctness`, `triton.speed`, `countdown`,
    `multiple_choice`, `exact_match`, `regex`) or `custom`."""
    name: Optional[str] = Field(default=None, pattern=r"^[a-z][a-z0-9_.]*$", max_length=63)
    """Name in metrics and status; defaults to the kind."""
    weight: float = Field(default=1.0, ge=-100.0, le=100.0)
    """Weight of this reward in the total reward."""
    module: Optional[str] = Field(default=None, pattern=r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$", max_length=512)
    """For `custom`: `package.module:function`, importable in the reward pool image."""
    args: dict[str, Any] = Field(default_factory=dict, json_schema_extra={"x-kubernetes-preserve-unknown-fields": True})
    """Options of the reward function (e.g. `numTestCases`, `tag`, `pattern`), checked against the
    kind's options by the operator and `kuberft validate`; a custom reward's are passed as given."""

    @model_validator(mode="after")
    def _check_args(self):
        problems = options_problems(self.kind, self.args)
        if problems:
            raise PydanticCustomError(
                "reward_args",
                "{summary}",
                {
                    "summary": "; ".join(f"args.{path}: {message}" for path, message in problems),
                    "violations": [(f".args.{path}", message) for path, message in problems],
                },
            )
        return self

    @property
    def effective_name(self) -> str:
        return self.name or self.kind


class GRPOSpec(ApiModel):
    """Group Relative Policy Optimization: per prompt, sample a group of completions, score
    them, and push up those better than the group's mean."""

    cel_rules: ClassVar[tuple[CelRule, ...]] = (
        CelRule(
            "!has(self.epsilonHigh) || self.epsilonHigh >= self.epsilon",
            "epsilonHigh must be at least epsilon (clip-higher widens the upper bound only)",
            ".epsilonHigh",
        ),
    )

    steps: int = Field(default=100, ge=0, le=1_000_000)
    """GRPO steps to run: each samples promptsPerStep x numGenerations completions, scores them and makes numIterations optimizer updates.
    0 (with `sft`): supervised fine-tuning only."""
    prompts_per_step: int = Field(default=4, ge=1, le=4096)
    """Prompts sampled per step; each yields numGenerations completions."""
    num_generations: int = Field(default=8, ge=2, le=512)
    """Completions per prompt (the group size G); at least 2 so advantages are defined."""
    learning_rate: float = Field(default=1e-5, gt=0.0, le=1.0)
    """AdamW learning rate for the LoRA parameters."""
    lr_scheduler: Literal["constant", "linear", "cosine"] = "constant"
    """Learning-rate schedule after warmup."""
    warmup_steps: int = Field(default=0, ge=0)
    """Linear warmup steps."""
    weight_decay: float = Field(default=0.0, ge=0.0, le=1.0)
    """AdamW weight decay."""
    max_grad_norm: float = Field(default=1.0, gt=0.0)
    """Gradient clipping norm."""
    beta: float = Field(default=0.0, ge=0.0, le=10.0)
    """KL coefficient towards the base model (k3 estimator); 0 disables the KL term and its forward pass."""
    epsilon: float = Field(default=0.2, gt=0.0, lt=1.0)
    """Lower clipping bound of the importance ratio: 1 - epsilon."""
    epsilon_high: Optional[float] = Field(default=None, gt=0.0, lt=10.0)
    """Upper clipping bound: 1 + epsilonHigh (DAPO clip-higher uses 0.28); defaults to epsilon."""
    loss_type: Literal["grpo", "bnpo", "dr_grpo", "dapo"] = "dapo"
    """Loss normalisation: `grpo` per-sequence mean then batch mean; `bnpo` token mean per micro-batch;
    `dr_grpo` token sum over batch size x maxCompletionLength; `dapo` token mean over the whole step."""
    scale_rewards: Literal["group", "batch", "none"] = "group"
    """Divide advantages by the group's reward std, the batch's, or not at all (Dr. GRPO)."""
    num_iterations: int = Field(default=1, ge=1, le=64)
    """Optimisation passes over each generation batch (old log-probs are stored and reused)."""
    micro_batch_size: Optional[int] = Field(default=None, ge=1)
    """Completions per forward/backward pass (gradient accumulation); default: the whole step at once."""
    temperature: float = Field(default=1.0, gt=0.0, le=10.0)
    """Sampling temperature."""
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    """Nucleus sampling probability mass."""
    max_prompt_length: int = Field(default=1024, ge=1, le=1_048_576)
    """Prompts longer than this many tokens are truncated from the left."""
    max_completion_length: int = Field(default=256, ge=1, le=1_048_576)
    """Maximum tokens generated per completion (also the dr_grpo normaliser)."""
    mask_truncated_completions: bool = False
    """Leave completions that hit maxCompletionLength out of the loss."""
    rollout_correction: bool = True
    """When a separate engine (vLLM) samples the completions, its token probabilities differ a
    little from the trainer's (other kernels, other precision): weight each token's loss by
    min(p_trainer / p_rollout, rolloutCorrectionCap), truncated importance sampling as in TRL and
    verl. Without vLLM the trainer samples itself and there is nothing to correct."""
    rollout_correction_cap: float = Field(default=2.0, ge=1.0, le=100.0)
    """The largest weight of the rollout correction."""
    eval_every: int = Field(default=10, ge=0)
    """Evaluate pass@1 on held-out rows every N steps; 0 only at the end."""
    seed: int = 42
    """Random seed (data order, sampling, LoRA init)."""

    @property
    def effective_epsilon_high(self) -> float:
        return self.epsilon if self.epsilon_high is None else self.epsilon_high


class RolloutSpec(ApiModel):
    """Where the completions of each GRPO step are sampled."""

    mode: Literal["colocated", "server"] = "colocated"
    """`colocated`: the trainer samples them itself (with vLLM in its own process where vLLM is
    installed and a GPU is present). `server`: vLLM runs in `replicas` rollout pods of their own;
    every step the trainer sends them its adapter and the step's prompts. For models whose
    trainer and rollout copies do not fit one GPU together."""
    replicas: int = Field(default=1, ge=1, le=256)
    """Rollout server pods (data parallel: the step's prompts are split among them)."""
    gpu_memory_utilization: float = Field(default=0.9, gt=0.0, le=1.0)
    """Fraction of each rollout pod's GPU memory vLLM may use (weights, activations and KV cache)."""
    placement: PodPlacement = nested(PodPlacement)
    """Image, resources and scheduling of the rollout pods. The image defaults to the trainer's,
    which must then include vLLM (built with `--build-arg EXTRA_PIP=vllm`); the GPUs a pod asks
    for (`resources.limits["nvidia.com/gpu"]`) are its tensor-parallel size."""


class SFTSpec(ApiModel):
    """Supervised fine-tuning of the same LoRA adapter on labelled rows, before the GRPO steps:
    "SFT then RFT", or with `grpo.steps: 0` "SFT only", from one manifest. Each step takes
    `batchSize` training rows that have a `completionField` (every such row once per pass, in an
    order seeded by `grpo.seed`) and minimises the completion's negative log-likelihood (plus the
    end-of-sequence token) after the prompt rendered exactly as for GRPO. Runs in full before
    GRPO step 1; an interrupted SFT phase starts again on the next run."""

    steps: int = Field(default=50, ge=1, le=1_000_000)
    """Optimizer steps."""
    batch_size: int = Field(default=4, ge=1, le=4096)
    """Labelled rows per step; must divide by the trainer processes."""
    learning_rate: float = Field(default=1e-4, gt=0.0, le=1.0)
    """AdamW learning rate (constant); weight decay and gradient clipping as in `grpo`."""
    completion_field: str = Field(default="completion", min_length=1, max_length=128)
    """The row field holding the labelled completion."""


class SandboxSpec(ApiModel):
    """Limits for each evaluation of untrusted model output."""

    timeout_seconds: int = Field(default=60, ge=1, le=3600)
    """Wall-clock limit per completion."""
    memory_mi_b: int = Field(default=4096, ge=256, le=1_048_576, alias="memoryMiB")
    """Address-space limit per evaluation, in MiB."""
    runtime_class_name: Optional[str] = Field(default=None, max_length=253)
    """RuntimeClass for the reward pods (e.g. `gvisor`) for kernel-level isolation."""


class RewardPoolSpec(ApiModel):
    """The pool of sandboxed reward-evaluator pods."""

    replicas: int = Field(default=1, ge=1, le=256)
    """Reward pool pods."""
    workers: int = Field(default=2, ge=1, le=256)
    """Pre-started sandbox workers per pod (about one per CPU core)."""
    max_queue: int = Field(default=1024, ge=1)
    """Evaluations waiting per pod before the pool answers 429."""
    url: Optional[str] = Field(default=None, max_length=2048)
    """Use an existing reward pool at this URL instead of starting one."""
    sandbox: SandboxSpec = nested(SandboxSpec)
    """Per-evaluation isolation and limits."""
    placement: PodPlacement = nested(PodPlacement)
    """Image, resources and scheduling of the reward pods."""


class CheckpointSpec(ApiModel):
    """Where checkpoints and the final adapter go."""

    cel_rules: ClassVar[tuple[CelRule, ...]] = (
        CelRule(
            "!(has(self.volumeClaimName) && has(self.storageSize))",
            "set volumeClaimName (an existing claim) or storageSize (a claim the operator creates), not both",
            ".storageSize",
        ),
    )

    every_steps: int = Field(default=10, ge=1)
    """Write a checkpoint every N steps (and at the end)."""
    keep_last: int = Field(default=2, ge=1, le=1000)
    """Checkpoints kept; older ones are deleted."""
    volume_claim_name: Optional[str] = Field(default=None, max_length=253)
    """An existing PersistentVolumeClaim for checkpoints and the adapter."""
    storage_size: Optional[Quantity] = None
    """Size of a PersistentVolumeClaim the operator creates for this job."""


class RFTJobSpec(ApiModel):
    """What to train: a base model, prompts, rewards and the GRPO settings."""

    model: ModelSpec
    """The base model."""
    lora: LoraSpec = nested(LoraSpec)
    """The LoRA adapter to train."""
    dataset: DatasetSpec
    """Training (and held-out evaluation) prompts."""
    rewards: list[RewardSpec] = Field(min_length=1, max_length=16)
    """Reward functions; the total reward is their weighted sum."""
    grpo: GRPOSpec = nested(GRPOSpec)
    """GRPO algorithm settings."""
    sft: Optional[SFTSpec] = None
    """Supervised fine-tuning on labelled rows before GRPO (none by default)."""
    rollout: RolloutSpec = nested(RolloutSpec)
    """Where completions are sampled: in the trainer, or in vLLM rollout server pods."""
    reward_pool: RewardPoolSpec = nested(RewardPoolSpec)
    """Reward evaluator pool."""
    trainer: TrainerSpec = nested(TrainerSpec)
    """Image, resources (GPUs), scheduling, nodes and sharding of the trainer."""
    checkpoint: CheckpointSpec = nested(CheckpointSpec)
    """Checkpointing and output."""
    suspend: bool = False
    """Stop the trainer, keeping checkpoints; setting it back to false resumes from the latest checkpoint."""
    queue_name: Optional[str] = Field(default=None, max_length=63)
    """Kueue LocalQueue: the trainer and the reward pool run as one JobSet, created suspended with this
    queue label, so Kueue admits them together as one workload (needs JobSet installed)."""
    backoff_limit: int = Field(default=3, ge=0, le=100)
    """Trainer restarts (each from the latest checkpoint) before the job fails."""
    active_deadline_seconds: Optional[int] = Field(default=None, ge=1)
    """Fail the job when it has run this long."""
    ttl_seconds_after_finished: Optional[int] = Field(default=None, ge=0)
    """Delete the children (not the RFTJob or its outputs) this long after the job finished."""

    cel_rules: ClassVar[tuple[CelRule, ...]] = (
        CelRule(
            "self.rewards.all(r, self.rewards.filter(s, (has(s.name) ? s.name : s.kind) == "
            "(has(r.name) ? r.name : r.kind)).size() == 1)",
            "reward names must be unique (a reward without a name is named after its kind)",
            ".rewards",
        ),
        CelRule(
            "!has(self.grpo) || !has(self.grpo.steps) || self.grpo.steps > 0 || has(self.sft)",
            "grpo.steps 0 trains nothing: add an sft section (supervised fine-tuning only) or give GRPO steps",
            ".grpo.steps",
        ),
    )


Phase = Literal["Pending", "Running", "Suspended", "Succeeded", "Failed"]


class RFTJobStatus(ApiModel):
    """Observed state of an RFTJob, written only by the operator (the trainer reports its step
    and rewards into the job's progress ConfigMap, which the operator checks and copies here)."""

    phase: Optional[Phase] = None
    """Summary of the conditions: Pending, Running, Suspended, Succeeded or Failed."""
    conditions: list[Condition] = Field(
        default_factory=list,
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]},
    )
    """Created, RewardPoolReady, RolloutReady (with `rollout.mode: server`), Running, Suspended,
    Succeeded, Failed; SpecAccepted after a refused change, ProgressAccepted after a trainer
    report with values the operator ignored."""
    observed_generation: Optional[int] = None
    """The metadata.generation the status reflects."""
    step: Optional[int] = None
    """Last completed optimizer step."""
    total_steps: Optional[int] = None
    """Steps the job runs in total."""
    progress: Optional[str] = None
    """step/total, for `kubectl get`."""
    rewards: dict[str, float] = Field(default_factory=dict)
    """Latest mean score per reward function."""
    mean_reward: Optional[float] = None
    """Latest mean total (weighted) reward."""
    adapter: Optional[str] = None
    """Where the trained adapter is (`pvc://<claim>/<job>/adapter`), set by the operator from
    the checkpoint settings once the trainer has written it."""
    restarts: Optional[int] = None
    """Trainer restarts so far (counted against backoffLimit)."""
    start_time: Optional[datetime] = None
    """When training started."""
    completion_time: Optional[datetime] = None
    """When the job finished."""


# --------------------------------------------------------------------------- TurboDeployment


class AdapterSource(ApiModel):
    """Where the LoRA adapter comes from."""

    cel_rules: ClassVar[tuple[CelRule, ...]] = (
        CelRule("has(self.uri) != has(self.fromRFTJob)", "set exactly one of uri or fromRFTJob"),
    )

    uri: Optional[str] = Field(default=None, min_length=1, max_length=2048)
    """A directory in peft format: a path in the pod or `pvc://claim/path`."""
    from_rft_job: Optional[str] = Field(default=None, alias="fromRFTJob", max_length=253)
    """Name of an RFTJob in the same namespace; serving starts when it has Succeeded."""
    name: str = Field(default="default", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", max_length=128)
    """Model id of the adapter in the OpenAI API (the `model` field of requests)."""


class SpeculatorSpec(ApiModel):
    """Speculative decoding: a cheap speculator proposes tokens, the model verifies them in one
    forward pass; output is identical to plain decoding."""

    # The has() guards matter to the API server: it checks these rules against the CRD's
    # default for the field (`{}`, nested defaults not applied) when the CRD is installed.
    cel_rules: ClassVar[tuple[CelRule, ...]] = (
        CelRule("!has(self.type) || self.type != 'draft' || has(self.draftModel)", "type draft needs draftModel", ".draftModel"),
        CelRule(
            "!has(self.type) || self.type != 'heads' || has(self.headsPath) || (has(self.trainHeads) && self.trainHeads)",
            "type heads needs headsPath or trainHeads: true",
            ".headsPath",
        ),
    )

    type: Literal["none", "ngram", "draft", "heads"] = "ngram"
    """`ngram`: prompt lookup, no extra model; `draft`: a small model with the same tokenizer;
    `heads`: Medusa-style heads on the model's last hidden state (the Turbo speculator); `none`."""
    num_speculative_tokens: int = Field(default=4, ge=1, le=32)
    """Tokens proposed per step (the upper bound when adaptive)."""
    adaptive: bool = True
    """Adjust the proposal length to the observed acceptance rate."""
    draft_model: Optional[str] = Field(default=None, max_length=512)
    """For `draft`: name or path of the draft model."""
    heads_path: Optional[str] = Field(default=None, max_length=2048)
    """For `heads`: directory of trained heads."""
    train_heads: bool = False
    """For `heads`: train the heads at start-up by self-distillation on the served model's outputs."""


class AutoscalingSpec(ApiModel):
    """Horizontal autoscaling of the serving pods."""

    cel_rules: ClassVar[tuple[CelRule, ...]] = (
        CelRule("self.minReplicas <= self.maxReplicas", "minReplicas must not exceed maxReplicas", ".minReplicas"),
    )

    min_replicas: int = Field(default=1, ge=1)
    """Fewest serving pods."""
    max_replicas: int = Field(ge=1, le=1000)
    """Most serving pods."""
    target_cpu_utilization_percentage: int = Field(default=80, ge=1, le=100)
    """Average CPU utilisation the autoscaler aims for."""


class TurboDeploymentSpec(ApiModel):
    """Serve a base model plus a LoRA adapter with speculative decoding behind an OpenAI-compatible API."""

    cel_rules: ClassVar[tuple[CelRule, ...]] = (
        CelRule("!has(self.adapter) || !has(self.adapters)", "set adapter (one) or adapters (several), not both", ".adapters"),
        CelRule(
            "!has(self.adapters) || self.adapters.all(a, self.adapters.filter(b, b.name == a.name).size() == 1)",
            "adapter names must be unique (each is a model id in the API)",
            ".adapters",
        ),
        CelRule(
            "!has(self.adapters) || self.adapters.all(a, a.name != self.model.name)",
            "an adapter may not be named after the base model (both are model ids in the API)",
            ".adapters",
        ),
    )

    model: ModelSpec
    """The base model."""
    adapter: Optional[AdapterSource] = None
    """One LoRA adapter: the same as `adapters` with one entry (the v1alpha1 form, kept so
    existing manifests keep working). Without `adapter` and `adapters` the base model is served
    alone."""
    adapters: Optional[list[AdapterSource]] = Field(default=None, min_length=1, max_length=64)
    """LoRA adapters served together on the one base model, each under its `name` (requests for
    different adapters and the base share a batch). Each is served once it is ready (an RFTJob's
    once that job has Succeeded); the rest are listed in `status.adapters` until then."""
    max_loaded_adapters: Optional[int] = Field(default=None, ge=1, le=1024)
    """Adapters held in memory at once (default: all); the least recently used one that no request
    is using is evicted to make room, and read again from its directory when asked for."""
    max_adapter_memory_mib: Optional[int] = Field(default=None, ge=1, alias="maxAdapterMemoryMiB")
    """Memory the loaded adapters' weights may take, in MiB (default: no limit); evicts as
    `maxLoadedAdapters` does."""
    prefix_cache_mib: int = Field(default=1024, ge=0, alias="prefixCacheMiB")
    """Memory for the KV of prompts' leading tokens, kept for later requests whose prompt starts
    the same way (a shared system prompt, a chat's earlier turns), in MiB per serving pod, on the
    model's device; the least recently used go first. 0 turns prefix caching off."""
    speculator: SpeculatorSpec = nested(SpeculatorSpec)
    """Speculative decoding."""
    replicas: int = Field(default=1, ge=0, le=1000)
    """Serving pods (ignored when autoscaling is set)."""
    autoscaling: Optional[AutoscalingSpec] = None
    """Scale the pods with load."""
    max_batch_size: int = Field(default=8, ge=1, le=1024)
    """Requests decoded together."""
    port: int = Field(default=8000, ge=1, le=65535)
    """HTTP port of the OpenAI-compatible API."""
    placement: PodPlacement = nested(PodPlacement)
    """Image, resources (GPUs) and scheduling of the serving pods."""

    @property
    def adapter_list(self) -> list[AdapterSource]:
        """The adapters to serve, whichever of `adapter` and `adapters` lists them."""
        return [self.adapter] if self.adapter is not None else list(self.adapters or [])


class ServedAdapter(ApiModel):
    """The state of one adapter of a TurboDeployment."""

    name: str
    """Its model id in the API."""
    state: Literal["Serving", "Pending", "Failed"]
    """Serving: in the serving pods' configuration; Pending: waiting for its RFTJob; Failed: it
    will not become ready without a change (its RFTJob failed or wrote no adapter)."""
    location: Optional[str] = None
    """Where the adapter is (`uri`, or the RFTJob's `pvc://claim/path`)."""
    message: Optional[str] = None
    """Why it is Pending or Failed."""


class TurboDeploymentStatus(ApiModel):
    """Observed state of a TurboDeployment."""

    phase: Optional[Literal["Pending", "Progressing", "Ready", "Failed"]] = None
    """Pending (waiting for the adapter), Progressing, Ready or Failed."""
    conditions: list[Condition] = Field(
        default_factory=list,
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]},
    )
    """AdapterReady, Available, Failed."""
    observed_generation: Optional[int] = None
    """The metadata.generation the status reflects."""
    replicas: Optional[int] = None
    """Serving pods that exist."""
    ready_replicas: Optional[int] = None
    """Serving pods ready to take requests."""
    selector: Optional[str] = None
    """Label selector of the serving pods (for the scale subresource)."""
    url: Optional[str] = None
    """In-cluster URL of the OpenAI-compatible API."""
    adapter: Optional[str] = None
    """Where the adapter of `spec.adapter` is (the one-adapter form)."""
    adapters: list[ServedAdapter] = Field(
        default_factory=list,
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["name"]},
    )
    """Each adapter of the spec: where it is and whether it is served."""


# --------------------------------------------------------------------------- resources

_NAME_RULE = CelRule(
    "self.metadata.name.size() <= 52",
    "metadata.name must be at most 52 characters (child resources append suffixes)",
    ".metadata.name",
)


class Resource(ApiModel):
    """A kuberft custom resource. Subclasses set the CRD identity below."""

    plural: ClassVar[str]
    short_names: ClassVar[tuple[str, ...]]
    printer_columns: ClassVar[tuple[dict[str, str], ...]]
    scale: ClassVar[Optional[dict[str, str]]] = None
    cel_rules: ClassVar[tuple[CelRule, ...]] = (_NAME_RULE,)

    api_version: Literal["kuberft.io/v1alpha1"]
    """kuberft.io/v1alpha1"""
    metadata: ObjectMeta

    @classmethod
    def kind_name(cls) -> str:
        return cls.model_fields["kind"].annotation.__args__[0]


class RFTJob(Resource):
    """Reinforcement fine-tuning of a model with GRPO and LoRA against reward functions."""

    kind: Literal["RFTJob"]
    """RFTJob"""
    plural: ClassVar[str] = "rftjobs"
    short_names: ClassVar[tuple[str, ...]] = ("rft", "rftj")
    printer_columns: ClassVar[tuple[dict[str, str], ...]] = (
        {"name": "Phase", "type": "string", "jsonPath": ".status.phase", "description": "Job phase"},
        {"name": "Step", "type": "string", "jsonPath": ".status.progress", "description": "Steps done / total"},
        {"name": "Reward", "type": "number", "jsonPath": ".status.meanReward", "description": "Latest mean total reward"},
        {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
    )

    spec: RFTJobSpec
    """What to train."""
    status: Optional[RFTJobStatus] = None
    """What happened so far."""


class TurboDeployment(Resource):
    """A fast OpenAI-compatible endpoint for a model plus a trained LoRA adapter."""

    kind: Literal["TurboDeployment"]
    """TurboDeployment"""
    plural: ClassVar[str] = "turbodeployments"
    short_names: ClassVar[tuple[str, ...]] = ("turbo", "td")
    printer_columns: ClassVar[tuple[dict[str, str], ...]] = (
        {"name": "Phase", "type": "string", "jsonPath": ".status.phase", "description": "Deployment phase"},
        {"name": "Ready", "type": "integer", "jsonPath": ".status.readyReplicas", "description": "Ready serving pods"},
        {"name": "URL", "type": "string", "jsonPath": ".status.url", "description": "OpenAI-compatible endpoint"},
        {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
    )
    scale: ClassVar[Optional[dict[str, str]]] = {
        "specReplicasPath": ".spec.replicas",
        "statusReplicasPath": ".status.replicas",
        "labelSelectorPath": ".status.selector",
    }

    spec: TurboDeploymentSpec
    """What to serve."""
    status: Optional[TurboDeploymentStatus] = None
    """What is being served."""


RESOURCES: tuple[type[Resource], ...] = (RFTJob, TurboDeployment)
RESOURCE_BY_KIND = {r.kind_name(): r for r in RESOURCES}
