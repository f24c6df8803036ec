"""Child resources of RFTJob and TurboDeployment, as pure functions `spec -> manifest dict`.

Nothing here talks to a cluster: the reconciler decides *which* children should exist and
applies what these functions return, and the unit tests check the manifests directly. Every
child carries an owner reference to its parent (so deleting the parent deletes it through
Kubernetes garbage collection) and the labels the operator watches.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any, Optional

from kuberft_core.api import API_VERSION, AdapterSource, PodPlacement, RFTJobSpec, TurboDeploymentSpec
from kuberft_core.job_progress import progress_config_map_name
from kuberft_core.paths import CHECKPOINT_DIR, CONFIG_DIR, CONFIG_KEY, DATASET_DIR, EVAL_DATASET_DIR  # shared with the trainer

from . import __version__

MANAGED_BY = "kuberft-operator"
LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
LABEL_RFTJOB = "kuberft.io/rftjob"
LABEL_TURBO = "kuberft.io/turbodeployment"
LABEL_ROLE = "kuberft.io/role"
KUEUE_QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
ANNOTATION_HASH = "kuberft.io/applied-hash"
ANNOTATION_POD_TEMPLATE_HASH = "kuberft.io/pod-template-hash"
ANNOTATION_RESTARTS_BEFORE = "kuberft.io/restarts-before"
ANNOTATION_GENERATION = "kuberft.io/spec-generation"
ANNOTATION_CONFIG_HASH = "kuberft.io/config-hash"

REWARD_PORT = 8080
ROLLOUT_PORT = 8300
TRAINER_METRICS_PORT = 8080
TRAINER_RENDEZVOUS_PORT = 29500
"""Where pod 0 of a multi-node trainer serves torchrun's rendezvous store (torch's default)."""
GPU_RESOURCE = "nvidia.com/gpu"
# The user each image runs as (USER in its Dockerfile). The pods state it too: the kubelet can
# then verify runAsNonRoot before starting the container, and fsGroup makes volumes writable.
IMAGE_UID = {"trainer": 10001, "serve": 10001, "reward": 65532}


@dataclass(frozen=True)
class Images:
    """Default container images; a spec's `placement.image` / `trainer.image` overrides them."""

    trainer: str
    reward: str
    serve: str
    pull_secrets: tuple[str, ...] = ()
    """Image pull Secrets (in each job's namespace) every pod the operator creates names."""

    def pod_fields(self) -> dict[str, Any]:
        return {"imagePullSecrets": [{"name": name} for name in self.pull_secrets]} if self.pull_secrets else {}

    @classmethod
    def for_version(cls, registry: str = "ghcr.io/kuberft", version: str = __version__) -> "Images":
        return cls(f"{registry}/trainer:{version}", f"{registry}/reward:{version}", f"{registry}/serve:{version}")


@dataclass(frozen=True)
class Owner:
    """The parent object, as its children's owner reference and labels need it."""

    kind: str
    name: str
    namespace: str
    uid: str

    def reference(self) -> dict[str, Any]:
        return {
            "apiVersion": API_VERSION,
            "kind": self.kind,
            "name": self.name,
            "uid": self.uid,
            "controller": True,
            "blockOwnerDeletion": True,
        }

    @property
    def owner_label(self) -> str:
        return LABEL_RFTJOB if self.kind == "RFTJob" else LABEL_TURBO


def content_hash(value: Any) -> str:
    """A short stable hash of a JSON-able value (used to skip no-op applies and detect rollouts)."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:16]


def _labels(owner: Owner, role: str) -> dict[str, str]:
    return {
        "app.kubernetes.io/name": f"kuberft-{role.split('-')[0]}",
        "app.kubernetes.io/instance": owner.name,
        "app.kubernetes.io/component": role,
        LABEL_MANAGED_BY: MANAGED_BY,
        owner.owner_label: owner.name,
        LABEL_ROLE: role,
    }


def _selector(owner: Owner, role: str) -> dict[str, str]:
    return {owner.owner_label: owner.name, LABEL_ROLE: role}


def _object(api_version: str, kind: str, name: str, owner: Owner, role: str, **fields: Any) -> dict[str, Any]:
    manifest = {
        "apiVersion": api_version,
        "kind": kind,
        "metadata": {
            "name": name,
            "namespace": owner.namespace,
            "labels": _labels(owner, role),
            "ownerReferences": [owner.reference()],
        },
    }
    manifest.update(fields)
    return manifest


def _resources(placement: PodPlacement) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if placement.resources.requests:
        out["requests"] = {k: str(v) for k, v in placement.resources.requests.items()}
    if placement.resources.limits:
        out["limits"] = {k: str(v) for k, v in placement.resources.limits.items()}
    return out


def _scheduling(placement: PodPlacement) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if placement.node_selector:
        out["nodeSelector"] = dict(placement.node_selector)
    if placement.tolerations:
        out["tolerations"] = [t.to_wire() for t in placement.tolerations]
    return out


def gpu_count(placement: PodPlacement) -> int:
    """GPUs the pod asks for (`limits["nvidia.com/gpu"]`, as Kubernetes requires GPUs in limits)."""
    value = placement.resources.limits.get(GPU_RESOURCE, 0)
    try:
        return int(str(value))
    except ValueError:
        return 0


# --------------------------------------------------------------------------- RFTJob children


JOBSET_TRAINER, JOBSET_REWARD, JOBSET_ROLLOUT = "trainer", "reward", "rollout"
"""The replicated jobs of a job's JobSet."""


def runs_as_jobset(spec: RFTJobSpec) -> bool:
    """Whether the trainer and the reward pool run as one JobSet `<job>`: for a queued job (Kueue
    admits them as one workload) and for a multi-node trainer (its pods start, fail and restart
    together). Any other job runs as a trainer Job and a reward Deployment."""
    return bool(spec.queue_name) or spec.trainer.nodes > 1


class RFTJobNames:
    """Names of an RFTJob's children (the API limits job names to 52 characters for the suffixes)."""

    def __init__(self, job_name: str):
        self.config = f"{job_name}-config"
        self.reward = f"{job_name}-reward"
        self.rollout = f"{job_name}-rollout"
        self.trainer = f"{job_name}-trainer"
        # A JobSet job: one JobSet, whose Jobs JobSet names <jobset>-<replicated job>-<index>.
        self.jobset = job_name
        self.jobset_trainer = f"{job_name}-{JOBSET_TRAINER}-0"
        self.jobset_reward = f"{job_name}-{JOBSET_REWARD}-0"
        self.jobset_rollout = f"{job_name}-{JOBSET_ROLLOUT}-0"
        # A multi-node trainer's pods are <jobset_trainer>-<index>.<trainer_subdomain>, a headless
        # Service JobSet creates (not `<job>`, JobSet's default: that may be a TurboDeployment's Service).
        self.trainer_subdomain = self.trainer
        self.rendezvous_host = f"{self.jobset_trainer}-0.{self.trainer_subdomain}"
        self.checkpoints = f"{job_name}-checkpoints"
        self.progress = progress_config_map_name(job_name)


def reward_url(name: str, namespace: str) -> str:
    return f"http://{RFTJobNames(name).reward}.{namespace}.svc:{REWARD_PORT}"


def job_config_map(spec: RFTJobSpec, owner: Owner, generation: int) -> dict[str, Any]:
    """The resolved job config the trainer reads: the whole spec, defaults filled, as JSON."""
    manifest = _object(
        "v1",
        "ConfigMap",
        RFTJobNames(owner.name).config,
        owner,
        "config",
        data={CONFIG_KEY: json.dumps(spec.to_wire(), indent=2, sort_keys=True)},
    )
    manifest["metadata"]["annotations"] = {ANNOTATION_GENERATION: str(generation)}
    return manifest


def checkpoint_claim(spec: RFTJobSpec, owner: Owner) -> Optional[dict[str, Any]]:
    """A PersistentVolumeClaim for checkpoints when `checkpoint.storageSize` asks the operator for
    one; ReadWriteMany for a multi-node trainer, whose pods on several nodes share one folder."""
    if spec.checkpoint.storage_size is None:
        return None
    access = "ReadWriteMany" if spec.trainer.nodes > 1 else "ReadWriteOnce"
    return _object(
        "v1",
        "PersistentVolumeClaim",
        RFTJobNames(owner.name).checkpoints,
        owner,
        "checkpoints",
        spec={"accessModes": [access], "resources": {"requests": {"storage": str(spec.checkpoint.storage_size)}}},
    )


def checkpoint_claim_name(spec: RFTJobSpec, job_name: str) -> Optional[str]:
    if spec.checkpoint.volume_claim_name:
        return spec.checkpoint.volume_claim_name
    if spec.checkpoint.storage_size is not None:
        return RFTJobNames(job_name).checkpoints
    return None


def output_location(spec: RFTJobSpec, job_name: str) -> Optional[str]:
    """Where the trainer's output (checkpoints, final adapter) survives the pod, as `pvc://claim/path`."""
    claim = checkpoint_claim_name(spec, job_name)
    return f"pvc://{claim}/{job_name}" if claim else None


def reward_service_account(owner: Owner) -> dict[str, Any]:
    """The reward pods' own identity: bound to no role, and its token is never mounted."""
    return _object(
        "v1", "ServiceAccount", RFTJobNames(owner.name).reward, owner, "reward-pool", automountServiceAccountToken=False
    )


@dataclass(frozen=True)
class Restricted:
    """The securityContexts of every pod the operator creates, meeting the Pod Security Standards
    `restricted` profile: non-root as the image's own user, the runtime's default seccomp
    profile, no privilege escalation, no capabilities, and a read-only root filesystem (each
    component writes only to emptyDir and claim volumes: /tmp as HOME and caches, checkpoints)."""

    pod: dict[str, Any]
    container: dict[str, Any]


def restricted_security(component: str) -> Restricted:
    uid = IMAGE_UID[component]
    return Restricted(
        pod={
            "runAsNonRoot": True,
            "runAsUser": uid,
            "runAsGroup": uid,
            "fsGroup": uid,
            "fsGroupChangePolicy": "OnRootMismatch",
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        container={
            "allowPrivilegeEscalation": False,
            "privileged": False,
            "readOnlyRootFilesystem": True,
            "capabilities": {"drop": ["ALL"]},
        },
    )


def reward_pod_template(spec: RFTJobSpec, owner: Owner, images: Images) -> dict[str, Any]:
    """A sandboxed reward pod: untrusted model output runs here, so the pods get no privileges,
    no token, no writable root filesystem and (with the NetworkPolicy) no egress."""
    pool = spec.reward_pool
    role = "reward-pool"
    tmp_limit_mib = max(1024, pool.workers * 512)
    container = {
        "name": "reward",
        "image": pool.placement.image or images.reward,
        "command": [
            "kuberft", "reward", "serve", "--port", str(REWARD_PORT), "--workers", str(pool.workers),
            "--timeout", str(pool.sandbox.timeout_seconds), "--memory-mib", str(pool.sandbox.memory_mi_b),
            "--max-queue", str(pool.max_queue),
        ],
        "ports": [{"name": "http", "containerPort": REWARD_PORT, "protocol": "TCP"}],
        "env": [
            {"name": "HOME", "value": "/tmp"},
            {"name": "TRITON_CACHE_DIR", "value": "/tmp/triton"},
            {"name": "XDG_CACHE_HOME", "value": "/tmp/cache"},
            *[e.to_wire() for e in pool.placement.env],
        ],
        "readinessProbe": {"httpGet": {"path": "/healthz", "port": "http"}, "periodSeconds": 5},
        "livenessProbe": {"httpGet": {"path": "/healthz", "port": "http"}, "periodSeconds": 20, "failureThreshold": 6},
        "securityContext": restricted_security("reward").container,
        "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"}],
    }
    resources = _resources(pool.placement)
    if resources:
        container["resources"] = resources
    pod_spec: dict[str, Any] = {
        "serviceAccountName": RFTJobNames(owner.name).reward,
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "securityContext": restricted_security("reward").pod,
        "containers": [container],
        "volumes": [{"name": "tmp", "emptyDir": {"medium": "Memory", "sizeLimit": f"{tmp_limit_mib}Mi"}}],
        **_scheduling(pool.placement),
        **images.pod_fields(),
    }
    if pool.sandbox.runtime_class_name:
        pod_spec["runtimeClassName"] = pool.sandbox.runtime_class_name
    return {"metadata": {"labels": _labels(owner, role)}, "spec": pod_spec}


def reward_deployment(spec: RFTJobSpec, owner: Owner, images: Images, replicas: int) -> dict[str, Any]:
    """The reward pool of a job that does not `runs_as_jobset` (a JobSet job's pool is part of its JobSet)."""
    role = "reward-pool"
    return _object(
        "apps/v1",
        "Deployment",
        RFTJobNames(owner.name).reward,
        owner,
        role,
        spec={
            "replicas": replicas,
            "selector": {"matchLabels": _selector(owner, role)},
            "template": reward_pod_template(spec, owner, images),
        },
    )


def reward_service(owner: Owner) -> dict[str, Any]:
    role = "reward-pool"
    return _object(
        "v1",
        "Service",
        RFTJobNames(owner.name).reward,
        owner,
        role,
        # The type is stated, not defaulted: server-side apply reverts only fields we set, and a
        # hand edit to NodePort must come back to ClusterIP.
        spec={
            "type": "ClusterIP",
            "selector": _selector(owner, role),
            "ports": [{"name": "http", "port": REWARD_PORT, "targetPort": "http", "protocol": "TCP"}],
        },
    )


def reward_network_policy(owner: Owner) -> dict[str, Any]:
    """Reward pods may send nothing (no egress rule at all, DNS included) and accept
    connections only from this job's trainer, on the reward port."""
    return _object(
        "networking.k8s.io/v1",
        "NetworkPolicy",
        RFTJobNames(owner.name).reward,
        owner,
        "reward-pool",
        spec={
            "podSelector": {"matchLabels": _selector(owner, "reward-pool")},
            "policyTypes": ["Ingress", "Egress"],
            "ingress": [
                {
                    "from": [{"podSelector": {"matchLabels": _selector(owner, "trainer")}}],
                    "ports": [{"protocol": "TCP", "port": REWARD_PORT}],
                }
            ],
            "egress": [],
        },
    )


ROLLOUT_STARTUP_SECONDS = 1800
"""How long a rollout server may take to load its model before it counts as failed."""
ROLLOUT_UNREAD_FIELDS = frozenset({"dataset", "rewards", "rewardPool", "trainer", "checkpoint", "suspend", "queueName",
                                   "backoffLimit", "activeDeadlineSeconds", "ttlSecondsAfterFinished"})
"""Job config fields no rollout server reads (it reads the model, the LoRA rank, the GRPO lengths
and seed, rollout.gpuMemoryUtilization): a change to any other field restarts the rollout pods
(they mount the config with a subPath, which never sees a ConfigMap update)."""


def rollout_service_account(owner: Owner) -> dict[str, Any]:
    """The rollout pods' own identity: bound to no role, and its token is never mounted."""
    return _object(
        "v1", "ServiceAccount", RFTJobNames(owner.name).rollout, owner, "rollout", automountServiceAccountToken=False
    )


def _rollout_config_hash(spec: RFTJobSpec) -> str:
    read = {key: value for key, value in spec.to_wire().items() if key not in ROLLOUT_UNREAD_FIELDS}
    # How many rollout pods there are and where they run is the Deployment's business, not the servers'.
    read["rollout"] = {key: value for key, value in read["rollout"].items() if key not in ("replicas", "placement")}
    return content_hash(read)


def rollout_pod_template(spec: RFTJobSpec, owner: Owner, images: Images) -> dict[str, Any]:
    """A rollout server pod (`kuberft rollout-server`): vLLM with the base model, sampling its share
    of each step's prompts with the adapter the trainer pushes to it. The GPUs it asks for are its
    tensor-parallel size; it reads the job config the trainer reads."""
    rollout = spec.rollout
    role = "rollout"
    probe = {"httpGet": {"path": "/healthz", "port": "http"}}
    container = {
        "name": "rollout",
        "image": rollout.placement.image or spec.trainer.image or images.trainer,
        "command": [
            "kuberft", "rollout-server", "--config", f"{CONFIG_DIR}/{CONFIG_KEY}", "--port", str(ROLLOUT_PORT),
            "--tensor-parallel-size", str(max(1, gpu_count(rollout.placement))),
        ],
        "ports": [{"name": "http", "containerPort": ROLLOUT_PORT, "protocol": "TCP"}],
        "env": [
            {"name": "HOME", "value": "/tmp"},
            {"name": "XDG_CACHE_HOME", "value": "/tmp/cache"},
            {"name": "HF_HOME", "value": "/tmp/huggingface"},  # as in the trainer image
            *[e.to_wire() for e in rollout.placement.env],
        ],
        "readinessProbe": {**probe, "periodSeconds": 5},
        # Loading a model takes minutes; after that, a server that stops answering is restarted.
        "startupProbe": {**probe, "periodSeconds": 10, "failureThreshold": ROLLOUT_STARTUP_SECONDS // 10},
        "livenessProbe": {**probe, "periodSeconds": 20, "timeoutSeconds": 5, "failureThreshold": 6},
        # A server that exits (vLLM missing from the image, the model not found) says why in its status.
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "securityContext": restricted_security("trainer").container,
        "volumeMounts": [
            {"name": "config", "mountPath": f"{CONFIG_DIR}/{CONFIG_KEY}", "subPath": CONFIG_KEY, "readOnly": True},
            {"name": "dshm", "mountPath": "/dev/shm"},
            {"name": "tmp", "mountPath": "/tmp"},
        ],
    }
    resources = _resources(rollout.placement)
    if resources:
        container["resources"] = resources
    return {
        "metadata": {"labels": _labels(owner, role), "annotations": {ANNOTATION_CONFIG_HASH: _rollout_config_hash(spec)}},
        "spec": {
            "serviceAccountName": RFTJobNames(owner.name).rollout,
            "automountServiceAccountToken": False,
            "enableServiceLinks": False,
            "securityContext": restricted_security("trainer").pod,
            "containers": [container],
            "volumes": [
                {"name": "config", "configMap": {"name": RFTJobNames(owner.name).config}},
                {"name": "dshm", "emptyDir": {"medium": "Memory"}},
                {"name": "tmp", "emptyDir": {}},
            ],
            **_scheduling(rollout.placement),
            **images.pod_fields(),
        },
    }


def rollout_deployment(spec: RFTJobSpec, owner: Owner, images: Images, replicas: int) -> dict[str, Any]:
    """The rollout servers of a job that does not `runs_as_jobset`. An update replaces one pod at a
    time and never adds one (a rollout pod holds GPUs the cluster may not have spare), and a new
    pod may load its model for ROLLOUT_STARTUP_SECONDS before the Deployment reports no progress."""
    role = "rollout"
    return _object(
        "apps/v1",
        "Deployment",
        RFTJobNames(owner.name).rollout,
        owner,
        role,
        spec={
            "replicas": replicas,
            "selector": {"matchLabels": _selector(owner, role)},
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 0, "maxUnavailable": 1}},
            "progressDeadlineSeconds": ROLLOUT_STARTUP_SECONDS + 600,
            "template": rollout_pod_template(spec, owner, images),
        },
    )


def rollout_service(owner: Owner) -> dict[str, Any]:
    """Headless: the trainer resolves `<job>-rollout` to the address of every ready rollout pod and
    talks to each one (its adapter goes to all of them every step), where a cluster IP would
    spread its connections over them."""
    role = "rollout"
    return _object(
        "v1",
        "Service",
        RFTJobNames(owner.name).rollout,
        owner,
        role,
        spec={
            "type": "ClusterIP",
            "clusterIP": "None",
            "selector": _selector(owner, role),
            "ports": [{"name": "http", "port": ROLLOUT_PORT, "targetPort": "http", "protocol": "TCP"}],
        },
    )


def rollout_network_policy(owner: Owner) -> dict[str, Any]:
    """Rollout pods accept connections only from this job's trainer, on the rollout port (whoever
    reaches them could load an adapter into them); their egress stays open: they download the model."""
    return _object(
        "networking.k8s.io/v1",
        "NetworkPolicy",
        RFTJobNames(owner.name).rollout,
        owner,
        "rollout",
        spec={
            "podSelector": {"matchLabels": _selector(owner, "rollout")},
            "policyTypes": ["Ingress"],
            "ingress": [
                {
                    "from": [{"podSelector": {"matchLabels": _selector(owner, "trainer")}}],
                    "ports": [{"protocol": "TCP", "port": ROLLOUT_PORT}],
                }
            ],
        },
    )


def ingress_only_on(name: str, owner: Owner, role: str, port: int) -> dict[str, Any]:
    """A NetworkPolicy that admits connections to the `role` pods on `port` only (their
    metrics or API port); their egress stays open (model hubs, dataset URIs, the API server and
    the reward pool lie wherever the user put them)."""
    return _object(
        "networking.k8s.io/v1",
        "NetworkPolicy",
        name,
        owner,
        role,
        spec={
            "podSelector": {"matchLabels": _selector(owner, role)},
            "policyTypes": ["Ingress"],
            "ingress": [{"ports": [{"protocol": "TCP", "port": port}]}],
        },
    )


def trainer_network_policy(spec: RFTJobSpec, owner: Owner) -> dict[str, Any]:
    """Connections to the trainer pods on their metrics port; the pods of a multi-node trainer
    also accept each other on every port (the rendezvous store, and NCCL's ephemeral ports)."""
    policy = ingress_only_on(RFTJobNames(owner.name).trainer, owner, "trainer", TRAINER_METRICS_PORT)
    if spec.trainer.nodes > 1:
        policy["spec"]["ingress"].append({"from": [{"podSelector": {"matchLabels": _selector(owner, "trainer")}}]})
    return policy


def trainer_service_account(owner: Owner) -> dict[str, Any]:
    return _object("v1", "ServiceAccount", RFTJobNames(owner.name).trainer, owner, "trainer")


def progress_config_map(owner: Owner) -> dict[str, Any]:
    """The trainer's progress report (`kuberft_core.job_progress`), created empty: the trainer
    fills its `data`, the operator copies the valid part into the RFTJob status. The operator's
    apply carries no `data`, so re-applying it never takes the trainer's fields away."""
    return _object("v1", "ConfigMap", RFTJobNames(owner.name).progress, owner, "progress")


def trainer_role(owner: Owner) -> dict[str, Any]:
    """The trainer may read and patch its own progress ConfigMap and nothing else: never the
    RFTJob or its status, which only the operator writes."""
    names = RFTJobNames(owner.name)
    return _object(
        "rbac.authorization.k8s.io/v1",
        "Role",
        names.trainer,
        owner,
        "trainer",
        rules=[{"apiGroups": [""], "resources": ["configmaps"], "resourceNames": [names.progress], "verbs": ["get", "patch"]}],
    )


def trainer_role_binding(owner: Owner) -> dict[str, Any]:
    name = RFTJobNames(owner.name).trainer
    return _object(
        "rbac.authorization.k8s.io/v1",
        "RoleBinding",
        name,
        owner,
        "trainer",
        roleRef={"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name},
        subjects=[{"kind": "ServiceAccount", "name": name, "namespace": owner.namespace}],
    )


def trainer_command(spec: RFTJobSpec, owner: Owner) -> list[str]:
    url = spec.reward_pool.url or reward_url(owner.name, owner.namespace)
    train = ["kuberft", "train", "--config", f"{CONFIG_DIR}/{CONFIG_KEY}", "--output", f"{CHECKPOINT_DIR}/{owner.name}", "--reward-url", url]
    if spec.rollout.mode == "server":
        service = f"{RFTJobNames(owner.name).rollout}.{owner.namespace}.svc:{ROLLOUT_PORT}"
        train += ["--rollout-service", service, "--rollout-replicas", str(spec.rollout.replicas)]
    gpus = gpu_count(spec.trainer)
    nodes = spec.trainer.nodes
    if nodes > 1:
        # Static rendezvous: the pod of completion index 0 hosts the store because its index says
        # so. (c10d decides it by comparing the endpoint's DNS answer with the pod's own address,
        # and pod 0 may start before the headless Service lists it.) The Job controller sets
        # JOB_COMPLETION_INDEX in each pod; the kubelet expands $(...) in a command.
        return ["torchrun", f"--nnodes={nodes}", f"--nproc-per-node={max(gpus, 1)}", "--node-rank=$(JOB_COMPLETION_INDEX)",
                "--rdzv-backend=static", f"--rdzv-endpoint={RFTJobNames(owner.name).rendezvous_host}:{TRAINER_RENDEZVOUS_PORT}",
                "--no-python", *train]
    if gpus > 1:
        return ["torchrun", "--standalone", f"--nproc-per-node={gpus}", "--no-python", *train]
    return train


def trainer_pod_template(spec: RFTJobSpec, owner: Owner, images: Images) -> dict[str, Any]:
    """The trainer pod: its GPUs, placement, the job config and the checkpoint volume."""
    role = "trainer"
    claim = checkpoint_claim_name(spec, owner.name)
    checkpoints = {"persistentVolumeClaim": {"claimName": claim}} if claim else {"emptyDir": {}}
    # `kuberft train` serves /metrics here (a PodMonitor scrapes declared ports only).
    ports = [{"name": "metrics", "containerPort": TRAINER_METRICS_PORT, "protocol": "TCP"}]
    if spec.trainer.nodes > 1:
        ports.append({"name": "rendezvous", "containerPort": TRAINER_RENDEZVOUS_PORT, "protocol": "TCP"})
    container = {
        "name": "trainer",
        "image": spec.trainer.image or images.trainer,
        "command": trainer_command(spec, owner),
        "ports": ports,
        "env": [
            {"name": "KUBERFT_JOB_NAME", "value": owner.name},
            {"name": "KUBERFT_JOB_NAMESPACE", "value": owner.namespace},
            *[e.to_wire() for e in spec.trainer.env],
        ],
        "securityContext": restricted_security("trainer").container,
        "volumeMounts": [
            {"name": "config", "mountPath": f"{CONFIG_DIR}/{CONFIG_KEY}", "subPath": CONFIG_KEY, "readOnly": True},
            {"name": "checkpoints", "mountPath": CHECKPOINT_DIR},
            {"name": "dshm", "mountPath": "/dev/shm"},
            # Model downloads and compiler caches (HF_HOME, KUBERFT_CACHE) live under /tmp.
            {"name": "tmp", "mountPath": "/tmp"},
        ],
    }
    volumes = [
        {"name": "config", "configMap": {"name": RFTJobNames(owner.name).config}},
        {"name": "checkpoints", **checkpoints},
        {"name": "dshm", "emptyDir": {"medium": "Memory"}},
        {"name": "tmp", "emptyDir": {}},
    ]
    # The trainer reads `dataset.configMap` rows from $KUBERFT_DATASET_DIR/<key>, and
    # `dataset.eval.configMap` rows from $KUBERFT_EVAL_DATASET_DIR/<key>.
    sources = [("dataset", spec.dataset, DATASET_DIR, "KUBERFT_DATASET_DIR"),
               ("eval-dataset", spec.dataset.eval, EVAL_DATASET_DIR, "KUBERFT_EVAL_DATASET_DIR")]
    for volume, source, folder, variable in sources:
        if source is not None and source.config_map is not None:
            ref = source.config_map
            volumes.append({"name": volume, "configMap": {"name": ref.name, "items": [{"key": ref.key, "path": ref.key}]}})
            container["volumeMounts"].append({"name": volume, "mountPath": folder, "readOnly": True})
            container["env"].append({"name": variable, "value": folder})
    resources = _resources(spec.trainer)
    if resources:
        container["resources"] = resources
    return {
        "metadata": {"labels": _labels(owner, role)},
        "spec": {
            "restartPolicy": "Never",
            "serviceAccountName": RFTJobNames(owner.name).trainer,
            "enableServiceLinks": False,
            "securityContext": restricted_security("trainer").pod,
            "containers": [container],
            "volumes": volumes,
            **_scheduling(spec.trainer),
            **images.pod_fields(),
        },
    }


def _trainer_job_spec(template: dict[str, Any], backoff_limit: int, deadline_seconds: Optional[int], pods: int = 1) -> dict[str, Any]:
    job_spec: dict[str, Any] = {
        "backoffLimit": backoff_limit,
        "completions": pods,
        "parallelism": pods,
        "template": template,
    }
    if deadline_seconds is not None:
        job_spec["activeDeadlineSeconds"] = max(1, deadline_seconds)
    return job_spec


def trainer_restart_hash(spec: RFTJobSpec, owner: Owner, images: Images) -> str:
    """The hash on the trainer Job (or the JobSet) whose change replaces it: its pod template's. A
    JobSet in rollout server mode holds the rollout pods too, and they change only with it (a
    JobSet is created once, never patched)."""
    template = trainer_pod_template(spec, owner, images)
    if runs_as_jobset(spec) and spec.rollout.mode == "server":
        return content_hash([template, rollout_pod_template(spec, owner, images)])
    return content_hash(template)


def _trainer_annotations(spec: RFTJobSpec, owner: Owner, images: Images, restarts_before: int) -> dict[str, str]:
    return {ANNOTATION_POD_TEMPLATE_HASH: trainer_restart_hash(spec, owner, images), ANNOTATION_RESTARTS_BEFORE: str(restarts_before)}


def trainer_job(
    spec: RFTJobSpec,
    owner: Owner,
    images: Images,
    restarts_before: int = 0,
    deadline_seconds: Optional[int] = None,
) -> dict[str, Any]:
    """The trainer Job of a job that does not `runs_as_jobset`. Retries are the Job's own (each new pod resumes
    from the latest checkpoint); `restarts_before` counts failures of earlier Jobs of this RFTJob
    (before a suspend), so the whole RFTJob never exceeds `backoffLimit`."""
    template = trainer_pod_template(spec, owner, images)
    manifest = _object("batch/v1", "Job", RFTJobNames(owner.name).trainer, owner, "trainer",
                       spec=_trainer_job_spec(template, max(0, spec.backoff_limit - restarts_before), deadline_seconds))
    manifest["metadata"]["annotations"] = _trainer_annotations(spec, owner, images, restarts_before)
    return manifest


JOBSET_API_VERSION = "jobset.x-k8s.io/v1alpha2"
SERVER_JOB_BACKOFF_LIMIT = 1_000_000
"""A reward or rollout pod that crashes restarts in place (restartPolicy OnFailure), as a
Deployment's would: the servers live as long as the trainer, whatever one request did to a pod."""


def _server_job(name: str, owner: Owner, role: str, template: dict[str, Any], pods: int) -> dict[str, Any]:
    """A replicated job of `pods` server pods the trainer calls (the reward pool, the rollout servers)."""
    template["spec"]["restartPolicy"] = "OnFailure"
    return {
        "name": name,
        "replicas": 1,
        "template": {
            "metadata": {"labels": _labels(owner, role)},
            "spec": {"parallelism": pods, "completions": pods, "backoffLimit": SERVER_JOB_BACKOFF_LIMIT,
                     "completionMode": "Indexed", "template": template},
        },
    }


def rftjob_jobset(
    spec: RFTJobSpec,
    owner: Owner,
    images: Images,
    restarts_before: int = 0,
    deadline_seconds: Optional[int] = None,
) -> dict[str, Any]:
    """The trainer, reward pool and (in rollout server mode) rollout servers of a job that
    `runs_as_jobset`, as one JobSet. A queued one is created suspended with Kueue's queue label:
    Kueue admits it as ONE workload (a pod set each for the trainer, the pool and the rollout
    servers) against the LocalQueue's quota, so no part holds resources while another waits. The
    trainer Job (one pod per node, `trainer.nodes`) starts once the pool and the rollout servers
    are ready (`dependsOn` both: JobSet v0.10 or later takes more than one entry); the JobSet
    succeeds when the trainer does (the other pods are then removed by JobSet). Any trainer pod's
    failure fails the trainer Job, and JobSet restarts the whole set (every pod anew; the trainer
    resumes from its latest checkpoint) until `backoffLimit` restarts are spent, then fails.
    Children are `<job>-trainer-0`, `<job>-reward-0` and `<job>-rollout-0` (JobSet's naming)."""
    names = RFTJobNames(owner.name)
    nodes = spec.trainer.nodes
    trainer_template = trainer_pod_template(spec, owner, images)
    trainer = {
        "name": JOBSET_TRAINER,
        "replicas": 1,
        "template": {
            "metadata": {"labels": _labels(owner, "trainer")},
            "spec": {**_trainer_job_spec(trainer_template, 0, deadline_seconds, pods=nodes), "completionMode": "Indexed"},
        },
    }
    # JobSet's webhook wants a replicated job's dependencies listed before it.
    servers = []
    if not spec.reward_pool.url:
        servers.append(_server_job(JOBSET_REWARD, owner, "reward-pool", reward_pod_template(spec, owner, images), spec.reward_pool.replicas))
    if spec.rollout.mode == "server":
        servers.append(_server_job(JOBSET_ROLLOUT, owner, "rollout", rollout_pod_template(spec, owner, images), spec.rollout.replicas))
    if servers:
        trainer["dependsOn"] = [{"name": server["name"], "status": "Ready"} for server in servers]
    replicated = [*servers, trainer]
    manifest = _object(
        JOBSET_API_VERSION,
        "JobSet",
        names.jobset,
        owner,
        "trainer",
        spec={
            "suspend": bool(spec.queue_name),
            "replicatedJobs": replicated,
            # Every field JobSet's admission webhook would default is stated, so the JobSet means
            # the same whether or not the webhook runs.
            "network": {"enableDNSHostnames": nodes > 1, "subdomain": names.trainer_subdomain, "publishNotReadyAddresses": True},
            "successPolicy": {"operator": "All", "targetReplicatedJobs": [JOBSET_TRAINER]},
            "failurePolicy": {"maxRestarts": max(0, spec.backoff_limit - restarts_before), "restartStrategy": "Recreate"},
            "startupPolicy": {"startupPolicyOrder": "AnyOrder"},
        },
    )
    if spec.queue_name:
        manifest["metadata"]["labels"][KUEUE_QUEUE_LABEL] = spec.queue_name
    manifest["metadata"]["annotations"] = _trainer_annotations(spec, owner, images, restarts_before)
    return manifest


def longest_jobset_pod_name(spec: RFTJobSpec, job_name: str) -> str:
    """The longest pod name JobSet generates for a job's JobSet (`<job>-<replicated job>-0-<index>`
    and 5 random characters): its webhook refuses a JobSet whose pod names would not be DNS labels."""
    pods = [(JOBSET_TRAINER, spec.trainer.nodes)] + ([] if spec.reward_pool.url else [(JOBSET_REWARD, spec.reward_pool.replicas)])
    if spec.rollout.mode == "server":
        pods.append((JOBSET_ROLLOUT, spec.rollout.replicas))
    return max((f"{job_name}-{replicated}-0-{count - 1}-xxxxx" for replicated, count in pods), key=len)


def reward_pool_children(spec: RFTJobSpec, owner: Owner, images: Images, replicas: int) -> list[dict[str, Any]]:
    """The reward pool (none when `rewardPool.url` points at an existing one); a JobSet job's
    pool pods come from its JobSet instead of a Deployment."""
    if spec.reward_pool.url:
        return []
    pods = [] if runs_as_jobset(spec) else [reward_deployment(spec, owner, images, replicas)]
    return [reward_service_account(owner), *pods, reward_service(owner), reward_network_policy(owner)]


def rollout_children(spec: RFTJobSpec, owner: Owner, images: Images, replicas: int) -> list[dict[str, Any]]:
    """The rollout servers (none when the trainer samples itself, `rollout.mode: colocated`); a
    JobSet job's rollout pods come from its JobSet instead of a Deployment."""
    if spec.rollout.mode != "server":
        return []
    pods = [] if runs_as_jobset(spec) else [rollout_deployment(spec, owner, images, replicas)]
    return [rollout_service_account(owner), *pods, rollout_service(owner), rollout_network_policy(owner)]


def rftjob_children(
    spec: RFTJobSpec, owner: Owner, images: Images, generation: int, reward_replicas: int, rollout_replicas: int
) -> list[dict[str, Any]]:
    """Every child the operator keeps applied while the job is live (the trainer Job aside,
    which is created only once the reward pool and the rollout servers are ready)."""
    children = [job_config_map(spec, owner, generation)]
    claim = checkpoint_claim(spec, owner)
    if claim:
        children.append(claim)
    children += reward_pool_children(spec, owner, images, reward_replicas)
    children += rollout_children(spec, owner, images, rollout_replicas)
    children += [progress_config_map(owner), trainer_service_account(owner), trainer_role(owner), trainer_role_binding(owner),
                 trainer_network_policy(spec, owner)]
    return children


# --------------------------------------------------------------------------- TurboDeployment children

SERVE_CONFIG_KEY = "serve.json"
"""The ConfigMap key (and file name under CONFIG_DIR in a serve pod) of the serve document."""
OPERATOR_ONLY_FIELDS = {"replicas", "autoscaling", "placement"}
"""TurboDeploymentSpec fields the serving process does not read: how many pods and where they
run. Left out of the serve document, so scaling the deployment does not restart its pods."""


def serve_config_name(name: str) -> str:
    """The serve document's ConfigMap (`-serve`: no RFTJob child name ends so)."""
    return f"{name}-serve"


def adapter_volumes(locations: dict[str, str]) -> tuple[list[dict[str, Any]], list[dict[str, Any]], dict[str, str]]:
    """(volumes, mounts, adapter name -> directory in the pod) for adapter locations:
    `pvc://claim/path` mounts the claim read-only at `/adapters/<claim>` (one volume per claim,
    however many adapters it holds); anything else is passed to the server as is."""
    claims = sorted({location[len("pvc://"):].partition("/")[0] for location in locations.values() if location.startswith("pvc://")})
    volumes = [{"name": f"adapters-{i}", "persistentVolumeClaim": {"claimName": claim, "readOnly": True}} for i, claim in enumerate(claims)]
    mounts = [{"name": f"adapters-{i}", "mountPath": f"/adapters/{claim}", "readOnly": True} for i, claim in enumerate(claims)]
    paths = {}
    for name, location in locations.items():
        if location.startswith("pvc://"):
            claim, _, sub = location[len("pvc://"):].partition("/")
            location = f"/adapters/{claim}/{sub}".rstrip("/")
        paths[name] = location
    return volumes, mounts, paths


def serve_document(spec: TurboDeploymentSpec, locations: dict[str, str]) -> dict[str, Any]:
    """What a serve pod runs (`kuberft serve --config`): the TurboDeploymentSpec as the API
    serialises it, with `adapters` the ones ready to serve (`locations`, by name; an RFTJob's
    resolved by the reconciler) as directories in the pod, less OPERATOR_ONLY_FIELDS."""
    _, _, paths = adapter_volumes(locations)
    served = [AdapterSource(uri=paths[a.name], name=a.name) for a in spec.adapter_list if a.name in paths]
    document = spec.model_copy(update={"adapter": None, "adapters": served or None})
    return document.model_dump(mode="json", by_alias=True, exclude_none=True, exclude=OPERATOR_ONLY_FIELDS)


def serve_config_map(spec: TurboDeploymentSpec, owner: Owner, locations: dict[str, str]) -> dict[str, Any]:
    """The serve document, mounted read-only in every serve pod."""
    document = json.dumps(serve_document(spec, locations), indent=2, sort_keys=True)
    return _object("v1", "ConfigMap", serve_config_name(owner.name), owner, "config", data={SERVE_CONFIG_KEY: document})


def serve_deployment(spec: TurboDeploymentSpec, owner: Owner, images: Images, locations: dict[str, str]) -> dict[str, Any]:
    """`kuberft serve` pods, reading the serve document (model, adapters, speculator) from the
    ConfigMap; its hash in the pod template rolls the pods when it changes."""
    role = "serve"
    volumes: list[dict[str, Any]] = [
        {"name": "config", "configMap": {"name": serve_config_name(owner.name)}},
        {"name": "tmp", "emptyDir": {}},
    ]
    mounts: list[dict[str, Any]] = [
        {"name": "config", "mountPath": f"{CONFIG_DIR}/{SERVE_CONFIG_KEY}", "subPath": SERVE_CONFIG_KEY, "readOnly": True},
        {"name": "tmp", "mountPath": "/tmp"},
    ]
    adapter_vols, adapter_mounts, _ = adapter_volumes(locations)
    volumes += adapter_vols
    mounts += adapter_mounts
    container = {
        "name": "serve",
        "image": spec.placement.image or images.serve,
        "command": ["kuberft", "serve", "--config", f"{CONFIG_DIR}/{SERVE_CONFIG_KEY}"],
        "ports": [{"name": "http", "containerPort": spec.port, "protocol": "TCP"}],
        "env": [{"name": "HOME", "value": "/tmp"}, *[e.to_wire() for e in spec.placement.env]],
        "readinessProbe": {"httpGet": {"path": "/healthz", "port": "http"}, "periodSeconds": 5},
        "startupProbe": {"httpGet": {"path": "/healthz", "port": "http"}, "periodSeconds": 10, "failureThreshold": 180},
        # After start-up (the probe above allows 30 minutes for loading a model), a server that
        # stops answering is restarted.
        "livenessProbe": {"httpGet": {"path": "/healthz", "port": "http"}, "periodSeconds": 20, "timeoutSeconds": 5, "failureThreshold": 3},
        "securityContext": restricted_security("serve").container,
        "volumeMounts": mounts,
    }
    resources = _resources(spec.placement)
    if resources:
        container["resources"] = resources
    deployment_spec: dict[str, Any] = {
        "selector": {"matchLabels": _selector(owner, role)},
        "template": {
            "metadata": {
                "labels": _labels(owner, role),
                "annotations": {ANNOTATION_CONFIG_HASH: content_hash(serve_document(spec, locations))},
            },
            "spec": {
                "automountServiceAccountToken": False,
                "enableServiceLinks": False,
                "securityContext": restricted_security("serve").pod,
                "containers": [container],
                "volumes": volumes,
                **_scheduling(spec.placement),
                **images.pod_fields(),
            },
        },
    }
    # With autoscaling the HPA owns the replica count; leaving the field out of our apply keeps
    # server-side apply from resetting it on every reconcile.
    if spec.autoscaling is None:
        deployment_spec["replicas"] = spec.replicas
    return _object("apps/v1", "Deployment", owner.name, owner, role, spec=deployment_spec)


def serve_service(spec: TurboDeploymentSpec, owner: Owner) -> dict[str, Any]:
    return _object(
        "v1",
        "Service",
        owner.name,
        owner,
        "serve",
        spec={
            "type": "ClusterIP",
            "selector": _selector(owner, "serve"),
            "ports": [{"name": "http", "port": spec.port, "targetPort": "http", "protocol": "TCP"}],
        },
    )


def serve_autoscaler(spec: TurboDeploymentSpec, owner: Owner) -> Optional[dict[str, Any]]:
    if spec.autoscaling is None:
        return None
    scaling = spec.autoscaling
    return _object(
        "autoscaling/v2",
        "HorizontalPodAutoscaler",
        owner.name,
        owner,
        "serve",
        spec={
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": owner.name},
            "minReplicas": scaling.min_replicas,
            "maxReplicas": scaling.max_replicas,
            "metrics": [
                {
                    "type": "Resource",
                    "resource": {
                        "name": "cpu",
                        "target": {"type": "Utilization", "averageUtilization": scaling.target_cpu_utilization_percentage},
                    },
                }
            ],
        },
    )


def serve_url(spec: TurboDeploymentSpec, name: str, namespace: str) -> str:
    return f"http://{name}.{namespace}.svc:{spec.port}/v1"


def serve_selector(name: str) -> str:
    return f"{LABEL_TURBO}={name},{LABEL_ROLE}=serve"
