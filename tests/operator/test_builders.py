"""The child manifests of RFTJob and TurboDeployment, checked without a cluster."""

from __future__ import annotations

import json
from pathlib import Path

from kuberft_core.api import RFTJob, RFTJobSpec, TurboDeploymentSpec
from kuberft_core.manifests import load
from kuberft_operator.builders import (
    ANNOTATION_POD_TEMPLATE_HASH,
    ANNOTATION_RESTARTS_BEFORE,
    KUEUE_QUEUE_LABEL,
    Images,
    Owner,
    adapter_volumes,
    job_config_map,
    longest_jobset_pod_name,
    reward_deployment,
    reward_network_policy,
    rftjob_children,
    rftjob_jobset,
    rollout_deployment,
    serve_autoscaler,
    serve_config_map,
    serve_deployment,
    trainer_job,
    trainer_pod_template,
    trainer_role,
)

from .test_pod_security import restricted_violations

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
IMAGES = Images.for_version("registry.test/kuberft", "9.9.9")
OWNER = Owner("RFTJob", "triton-kernels", "team-a", "uid-1")


def _example_spec() -> RFTJobSpec:
    return load(EXAMPLES / "rftjob-triton.yaml", RFTJob).spec


def test_every_child_is_owned_by_the_rftjob_and_labelled():
    children = rftjob_children(_example_spec(), OWNER, IMAGES, generation=1, reward_replicas=2, rollout_replicas=0)
    kinds = [c["kind"] for c in children]
    assert kinds == ["ConfigMap", "PersistentVolumeClaim", "ServiceAccount", "Deployment", "Service", "NetworkPolicy", "ConfigMap", "ServiceAccount", "Role", "RoleBinding", "NetworkPolicy"]
    for child in children:
        meta = child["metadata"]
        assert meta["namespace"] == "team-a"
        assert meta["ownerReferences"] == [
            {"apiVersion": "kuberft.io/v1alpha1", "kind": "RFTJob", "name": "triton-kernels", "uid": "uid-1", "controller": True, "blockOwnerDeletion": True}
        ]
        assert meta["labels"]["kuberft.io/rftjob"] == "triton-kernels"
        assert meta["labels"]["app.kubernetes.io/managed-by"] == "kuberft-operator"


def test_config_map_holds_the_resolved_spec_with_defaults():
    spec = _example_spec()
    data = json.loads(job_config_map(spec, OWNER, generation=3)["data"]["job.json"])
    assert data == spec.to_wire()
    assert data["grpo"]["epsilonHigh"] == 0.28
    assert data["rewardPool"]["sandbox"]["timeoutSeconds"] == 120


def test_reward_pods_are_locked_down():
    spec = _example_spec().model_copy(deep=True)
    spec.reward_pool.sandbox.runtime_class_name = "gvisor"
    pod = reward_deployment(spec, OWNER, IMAGES, replicas=2)["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["command"] == [
        "kuberft", "reward", "serve", "--port", "8080", "--workers", "4", "--timeout", "120", "--memory-mib", "8192", "--max-queue", "1024",
    ]
    assert container["image"] == "registry.test/kuberft/reward:9.9.9"
    assert pod["securityContext"] == {
        "runAsNonRoot": True,
        "runAsUser": 65532,
        "runAsGroup": 65532,
        "fsGroup": 65532,
        "fsGroupChangePolicy": "OnRootMismatch",
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    assert container["securityContext"] == {
        "allowPrivilegeEscalation": False,
        "privileged": False,
        "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]},
    }
    assert pod["automountServiceAccountToken"] is False
    assert pod["runtimeClassName"] == "gvisor"
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert container["readinessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}


def test_network_policy_denies_all_egress_and_admits_only_the_trainer():
    policy = reward_network_policy(OWNER)["spec"]
    assert policy["policyTypes"] == ["Ingress", "Egress"]
    assert policy["egress"] == []
    assert policy["ingress"] == [
        {
            "from": [{"podSelector": {"matchLabels": {"kuberft.io/rftjob": "triton-kernels", "kuberft.io/role": "trainer"}}}],
            "ports": [{"protocol": "TCP", "port": 8080}],
        }
    ]


def test_trainer_job_runs_kuberft_train_on_a_gpu_with_the_checkpoint_claim():
    job = trainer_job(_example_spec(), OWNER, IMAGES)
    pod = job["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["command"] == [
        "kuberft", "train", "--config", "/etc/kuberft/job.json", "--output", "/checkpoints/triton-kernels",
        "--reward-url", "http://triton-kernels-reward.team-a.svc:8080",
    ]
    assert {"name": "KUBERFT_JOB_NAME", "value": "triton-kernels"} in container["env"]
    assert {"name": "KUBERFT_JOB_NAMESPACE", "value": "team-a"} in container["env"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert pod["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    assert {"name": "checkpoints", "persistentVolumeClaim": {"claimName": "triton-kernels-checkpoints"}} in pod["volumes"]
    assert pod["serviceAccountName"] == "triton-kernels-trainer"
    assert job["spec"]["backoffLimit"] == 3
    assert "suspend" not in job["spec"]


def test_a_config_map_dataset_is_mounted_where_the_trainer_reads_it():
    spec = _example_spec().model_copy(deep=True)
    spec.dataset = spec.dataset.model_validate({"configMap": {"name": "prompts", "key": "rows.jsonl"}})
    pod = trainer_job(spec, OWNER, IMAGES)["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert {"name": "dataset", "configMap": {"name": "prompts", "items": [{"key": "rows.jsonl", "path": "rows.jsonl"}]}} in pod["volumes"]
    assert {"name": "dataset", "mountPath": "/etc/kuberft/dataset", "readOnly": True} in container["volumeMounts"]
    assert {"name": "KUBERFT_DATASET_DIR", "value": "/etc/kuberft/dataset"} in container["env"]
    assert {"name": "config", "mountPath": "/etc/kuberft/job.json", "subPath": "job.json", "readOnly": True} in container["volumeMounts"]
    assert not any(v["name"] == "eval-dataset" for v in pod["volumes"])


def test_a_config_map_eval_dataset_is_mounted_beside_the_training_rows():
    spec = _example_spec().model_copy(deep=True)
    spec.dataset = spec.dataset.model_validate({"configMap": {"name": "prompts", "key": "rows.jsonl"},
                                                "eval": {"configMap": {"name": "held-out", "key": "rows.jsonl"}}})
    pod = trainer_job(spec, OWNER, IMAGES)["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert {"name": "eval-dataset", "configMap": {"name": "held-out", "items": [{"key": "rows.jsonl", "path": "rows.jsonl"}]}} in pod["volumes"]
    assert {"name": "eval-dataset", "mountPath": "/etc/kuberft/eval-dataset", "readOnly": True} in container["volumeMounts"]
    assert {"name": "KUBERFT_EVAL_DATASET_DIR", "value": "/etc/kuberft/eval-dataset"} in container["env"]
    assert {"name": "KUBERFT_DATASET_DIR", "value": "/etc/kuberft/dataset"} in container["env"]


def test_more_than_one_gpu_uses_torchrun():
    spec = _example_spec().model_copy(deep=True)
    spec.trainer.resources.limits["nvidia.com/gpu"] = 4
    command = trainer_job(spec, OWNER, IMAGES)["spec"]["template"]["spec"]["containers"][0]["command"]
    assert command[:4] == ["torchrun", "--standalone", "--nproc-per-node=4", "--no-python"]
    assert command[4:6] == ["kuberft", "train"]


def test_a_queued_job_is_one_suspended_jobset_holding_trainer_and_reward_pool():
    spec = _example_spec().model_copy(update={"queue_name": "gpu-queue"})
    jobset = rftjob_jobset(spec, OWNER, IMAGES, restarts_before=2)
    assert jobset["metadata"]["labels"][KUEUE_QUEUE_LABEL] == "gpu-queue"
    assert jobset["spec"]["suspend"] is True
    assert jobset["metadata"]["annotations"][ANNOTATION_RESTARTS_BEFORE] == "2"
    reward, trainer = jobset["spec"]["replicatedJobs"]
    pool = spec.reward_pool.replicas
    assert (reward["name"], reward["template"]["spec"]["parallelism"], reward["template"]["spec"]["completions"]) == ("reward", pool, pool)
    assert reward["template"]["spec"]["template"]["spec"]["restartPolicy"] == "OnFailure"  # a crashed evaluator restarts in place
    assert reward["template"]["spec"]["template"]["metadata"]["labels"] == reward_deployment(spec, OWNER, IMAGES, pool)["spec"]["template"]["metadata"]["labels"]
    assert trainer["dependsOn"] == [{"name": "reward", "status": "Ready"}]  # the trainer starts once the pool is ready
    assert trainer["template"]["spec"]["template"] == trainer_pod_template(spec, OWNER, IMAGES)
    assert jobset["spec"]["successPolicy"] == {"operator": "All", "targetReplicatedJobs": ["trainer"]}
    # A trainer pod's failure fails its Job at once, and JobSet restarts the whole set: 3 restarts
    # allowed, 2 already used before a suspend.
    assert trainer["template"]["spec"]["backoffLimit"] == 0
    assert jobset["spec"]["failurePolicy"] == {"maxRestarts": 1, "restartStrategy": "Recreate"}
    assert jobset["spec"]["network"]["enableDNSHostnames"] is False  # one trainer pod talks to nobody
    # The pool Deployment is not made for a queued job.
    assert "Deployment" not in [c["kind"] for c in rftjob_children(spec, OWNER, IMAGES, 1, spec.reward_pool.replicas, 0)]


def _rollout_server_spec(**rollout) -> RFTJobSpec:
    """The example job with its completions sampled by rollout server pods of 2 GPUs each."""
    placement = {"resources": {"limits": {"nvidia.com/gpu": 2}},
                 "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]}
    return RFTJobSpec.model_validate({**_example_spec().to_wire(), "rollout": {"mode": "server", "replicas": 3, "placement": placement, **rollout}})


def test_rollout_server_mode_adds_rollout_pods_behind_a_headless_service_only_the_trainer_reaches():
    children = rftjob_children(_rollout_server_spec(), OWNER, IMAGES, 1, reward_replicas=2, rollout_replicas=3)
    rollout = {c["kind"]: c for c in children if c["metadata"]["name"] == "triton-kernels-rollout"}
    assert sorted(rollout) == ["Deployment", "NetworkPolicy", "Service", "ServiceAccount"]
    assert all(c["metadata"]["labels"]["kuberft.io/role"] == "rollout" for c in rollout.values())
    assert rollout["Deployment"]["spec"]["replicas"] == 3
    # An update never asks for a GPU more than the job holds, and a pod has 30 minutes to load its model.
    assert rollout["Deployment"]["spec"]["strategy"] == {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 0, "maxUnavailable": 1}}
    assert rollout["Deployment"]["spec"]["progressDeadlineSeconds"] == 2400
    # Headless: the trainer resolves the name to every ready rollout pod and pushes its adapter to each.
    assert rollout["Service"]["spec"] == {
        "type": "ClusterIP", "clusterIP": "None",
        "selector": {"kuberft.io/rftjob": "triton-kernels", "kuberft.io/role": "rollout"},
        "ports": [{"name": "http", "port": 8300, "targetPort": "http", "protocol": "TCP"}],
    }
    assert rollout["NetworkPolicy"]["spec"] == {
        "podSelector": {"matchLabels": {"kuberft.io/rftjob": "triton-kernels", "kuberft.io/role": "rollout"}},
        "policyTypes": ["Ingress"],  # egress stays open: the pods download the model
        "ingress": [{
            "from": [{"podSelector": {"matchLabels": {"kuberft.io/rftjob": "triton-kernels", "kuberft.io/role": "trainer"}}}],
            "ports": [{"protocol": "TCP", "port": 8300}],
        }],
    }
    assert rollout["ServiceAccount"]["automountServiceAccountToken"] is False
    scaled_down = rftjob_children(_rollout_server_spec(), OWNER, IMAGES, 1, reward_replicas=0, rollout_replicas=0)
    assert next(c for c in scaled_down if c["metadata"]["name"] == "triton-kernels-rollout" and c["kind"] == "Deployment")["spec"]["replicas"] == 0


def test_rollout_pods_run_the_rollout_server_split_over_their_gpus_as_the_trainer_images_user():
    template = rollout_deployment(_rollout_server_spec(), OWNER, IMAGES, replicas=3)["spec"]["template"]
    pod = template["spec"]
    container = pod["containers"][0]
    assert container["command"] == [
        "kuberft", "rollout-server", "--config", "/etc/kuberft/job.json", "--port", "8300", "--tensor-parallel-size", "2",
    ]
    assert container["image"] == "registry.test/kuberft/trainer:9.9.9"
    assert container["ports"] == [{"name": "http", "containerPort": 8300, "protocol": "TCP"}]
    assert container["resources"] == {"limits": {"nvidia.com/gpu": "2"}}
    assert pod["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    # Ready once the model is loaded (up to 30 minutes); restarted when it stops answering after that.
    assert container["readinessProbe"] == {"httpGet": {"path": "/healthz", "port": "http"}, "periodSeconds": 5}
    assert container["startupProbe"] == {"httpGet": {"path": "/healthz", "port": "http"}, "periodSeconds": 10, "failureThreshold": 180}
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert {"name": "config", "mountPath": "/etc/kuberft/job.json", "subPath": "job.json", "readOnly": True} in container["volumeMounts"]
    assert {"name": "config", "configMap": {"name": "triton-kernels-config"}} in pod["volumes"]
    assert {"name": "dshm", "emptyDir": {"medium": "Memory"}} in pod["volumes"]
    assert [e["name"] for e in container["env"]] == ["HOME", "XDG_CACHE_HOME", "HF_HOME"]
    assert (pod["serviceAccountName"], pod["automountServiceAccountToken"], pod["enableServiceLinks"]) == ("triton-kernels-rollout", False, False)
    assert pod["securityContext"]["runAsUser"] == 10001 and container["securityContext"]["readOnlyRootFilesystem"] is True
    assert restricted_violations(pod) == []
    assert template["metadata"]["labels"]["kuberft.io/role"] == "rollout"  # what the Service and the policy select

    def tensor_parallel(limits: dict) -> str:
        spec = _rollout_server_spec(placement={"resources": {"limits": limits}})
        return rollout_deployment(spec, OWNER, IMAGES, 1)["spec"]["template"]["spec"]["containers"][0]["command"][-1]

    assert (tensor_parallel({"nvidia.com/gpu": 8}), tensor_parallel({})) == ("8", "1")


def test_rollout_pods_take_their_image_from_the_placement_else_from_the_trainer():
    def image(wire: dict) -> str:
        spec = RFTJobSpec.model_validate({**_example_spec().to_wire(), **wire})
        return rollout_deployment(spec, OWNER, IMAGES, 1)["spec"]["template"]["spec"]["containers"][0]["image"]

    assert image({"rollout": {"mode": "server"}}) == "registry.test/kuberft/trainer:9.9.9"
    # The trainer and its rollout servers speak one protocol: a custom trainer image serves both.
    assert image({"rollout": {"mode": "server"}, "trainer": {"image": "team/trainer-vllm:1"}}) == "team/trainer-vllm:1"
    assert image({"rollout": {"mode": "server", "placement": {"image": "team/rollout:2"}}, "trainer": {"image": "team/trainer-vllm:1"}}) == "team/rollout:2"


def test_rollout_pods_restart_when_the_config_they_read_changes_and_not_when_they_are_scaled():
    def config_hash(**changes) -> str:
        wire = _rollout_server_spec().to_wire()
        for key, value in changes.items():
            wire[key] = {**wire[key], **value} if isinstance(value, dict) else value
        template = rollout_deployment(RFTJobSpec.model_validate(wire), OWNER, IMAGES, 1)["spec"]["template"]
        return template["metadata"]["annotations"]["kuberft.io/config-hash"]

    first = config_hash()
    # The config is mounted with a subPath, which never sees an update: the pods must be replaced.
    assert config_hash(rollout={"gpuMemoryUtilization": 0.8}) != first
    assert config_hash(model={"name": "Qwen/Qwen2.5-Coder-1.5B-Instruct"}) != first
    assert config_hash(rollout={"replicas": 5}) == first
    assert config_hash(rewardPool={"replicas": 4}, suspend=True, trainer={"nodeSelector": {"pool": "h100"}}, dataset={"evalFraction": 0.1}) == first


def test_a_colocated_job_has_no_rollout_servers_and_its_trainer_samples_itself():
    spec = _example_spec()
    assert spec.rollout.mode == "colocated"
    children = rftjob_children(spec, OWNER, IMAGES, 1, reward_replicas=2, rollout_replicas=1)
    assert not [c for c in children if "rollout" in c["metadata"]["name"] or c["metadata"]["labels"]["kuberft.io/role"] == "rollout"]
    command = trainer_job(spec, OWNER, IMAGES)["spec"]["template"]["spec"]["containers"][0]["command"]
    assert not [part for part in command if part.startswith("--rollout")]


def test_the_trainer_of_a_rollout_server_job_is_told_the_service_and_how_many_servers_to_wait_for():
    flags = ["--rollout-service", "triton-kernels-rollout.team-a.svc:8300", "--rollout-replicas", "3"]
    command = trainer_job(_rollout_server_spec(), OWNER, IMAGES)["spec"]["template"]["spec"]["containers"][0]["command"]
    assert command[-4:] == flags
    spec = _rollout_server_spec()
    spec.trainer.resources.limits["nvidia.com/gpu"] = 4  # under torchrun: every rank gets the flags
    command = trainer_job(spec, OWNER, IMAGES)["spec"]["template"]["spec"]["containers"][0]["command"]
    assert command[:2] == ["torchrun", "--standalone"] and command[-4:] == flags


def test_a_rollout_server_jobset_starts_its_trainer_once_pool_and_rollout_servers_are_ready():
    spec = _rollout_server_spec(replicas=2).model_copy(update={"queue_name": "gpu-queue"})
    jobset = rftjob_jobset(spec, OWNER, IMAGES)
    reward, rollout, trainer = jobset["spec"]["replicatedJobs"]  # dependencies first, as JobSet's webhook wants
    assert (reward["name"], rollout["name"], trainer["name"]) == ("reward", "rollout", "trainer")
    job = rollout["template"]["spec"]
    assert (job["parallelism"], job["completions"], job["completionMode"], job["backoffLimit"]) == (2, 2, "Indexed", 1_000_000)
    assert job["template"]["spec"]["restartPolicy"] == "OnFailure"  # a crashed server restarts in place
    deployment_template = rollout_deployment(spec, OWNER, IMAGES, 2)["spec"]["template"]
    assert job["template"]["metadata"] == deployment_template["metadata"]
    assert {**job["template"]["spec"], "restartPolicy": None} == {**deployment_template["spec"], "restartPolicy": None}
    # JobSet v0.10 takes several dependencies: the trainer starts once both are ready.
    assert trainer["dependsOn"] == [{"name": "reward", "status": "Ready"}, {"name": "rollout", "status": "Ready"}]
    children = {(c["kind"], c["metadata"]["name"]) for c in rftjob_children(spec, OWNER, IMAGES, 1, 2, 2)}
    assert ("Deployment", "triton-kernels-rollout") not in children  # the rollout pods are the JobSet's
    assert {("Service", "triton-kernels-rollout"), ("NetworkPolicy", "triton-kernels-rollout")} <= children
    external_pool = spec.model_copy(update={"reward_pool": spec.reward_pool.model_copy(update={"url": "http://pool:8080"})})
    assert rftjob_jobset(external_pool, OWNER, IMAGES)["spec"]["replicatedJobs"][1]["dependsOn"] == [{"name": "rollout", "status": "Ready"}]


def test_a_jobset_is_replaced_when_its_rollout_pods_change_as_a_trainer_job_is_when_its_pod_does():
    def restart_hash(spec: RFTJobSpec, build=rftjob_jobset) -> str:
        return build(spec, OWNER, IMAGES)["metadata"]["annotations"][ANNOTATION_POD_TEMPLATE_HASH]

    queued = _rollout_server_spec().model_copy(update={"queue_name": "gpu-queue"})
    bigger = queued.model_copy(deep=True)
    bigger.rollout.placement.resources.limits["nvidia.com/gpu"] = 4
    assert restart_hash(bigger) != restart_hash(queued)  # created once, never patched: replaced
    # A Deployment's pods roll by themselves: the trainer Job stays.
    unqueued = _rollout_server_spec()
    moved = unqueued.model_copy(deep=True)
    moved.rollout.placement.resources.limits["nvidia.com/gpu"] = 4
    assert restart_hash(moved, trainer_job) == restart_hash(unqueued, trainer_job)


def test_the_longest_jobset_pod_name_counts_the_rollout_pods():
    spec = _rollout_server_spec(replicas=12).model_copy(update={"queue_name": "gpu-queue"})
    assert longest_jobset_pod_name(spec, "job") == "job-rollout-0-11-xxxxx"


def _multi_node_spec(nodes: int = 2, gpus: int = 4) -> RFTJobSpec:
    spec = _example_spec().model_copy(deep=True)
    spec.trainer.nodes = nodes
    spec.trainer.resources.limits["nvidia.com/gpu"] = gpus
    return spec


def test_a_multi_node_trainer_is_one_indexed_job_of_a_pod_per_node_in_a_jobset_that_restarts_as_a_whole():
    spec = _multi_node_spec(nodes=3)
    jobset = rftjob_jobset(spec, OWNER, IMAGES, restarts_before=1)
    assert jobset["spec"]["suspend"] is False and KUEUE_QUEUE_LABEL not in jobset["metadata"]["labels"]  # no queue: it starts at once
    reward, trainer = jobset["spec"]["replicatedJobs"]
    job = trainer["template"]["spec"]
    assert (job["completionMode"], job["parallelism"], job["completions"], job["backoffLimit"]) == ("Indexed", 3, 3, 0)
    assert jobset["spec"]["failurePolicy"] == {"maxRestarts": 2, "restartStrategy": "Recreate"}  # backoffLimit 3, 1 used before
    # Pods are triton-kernels-trainer-0-<index>.triton-kernels-trainer (a headless Service JobSet creates).
    assert jobset["spec"]["network"] == {"enableDNSHostnames": True, "subdomain": "triton-kernels-trainer", "publishNotReadyAddresses": True}
    container = job["template"]["spec"]["containers"][0]
    assert container["command"][:7] == [
        "torchrun", "--nnodes=3", "--nproc-per-node=4", "--node-rank=$(JOB_COMPLETION_INDEX)", "--rdzv-backend=static",
        "--rdzv-endpoint=triton-kernels-trainer-0-0.triton-kernels-trainer:29500", "--no-python",
    ]
    assert container["command"][7:9] == ["kuberft", "train"]
    assert {"name": "rendezvous", "containerPort": 29500, "protocol": "TCP"} in container["ports"]
    assert reward["name"] == "reward" and trainer["dependsOn"] == [{"name": "reward", "status": "Ready"}]
    children = rftjob_children(spec, OWNER, IMAGES, 1, spec.reward_pool.replicas, 0)
    assert "Deployment" not in [c["kind"] for c in children]  # the pool's pods are the JobSet's
    # Every node mounts the one checkpoint folder.
    claim = next(c for c in children if c["kind"] == "PersistentVolumeClaim")
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    assert {"name": "checkpoints", "persistentVolumeClaim": {"claimName": "triton-kernels-checkpoints"}} in job["template"]["spec"]["volumes"]


def test_the_multi_node_command_is_what_torchrun_and_kuberft_parse():
    """The command is a contract with torchrun: pod 1 of 2 (the kubelet expands
    $(JOB_COMPLETION_INDEX)) joins pod 0's store; a CPU pod runs one process."""
    from kuberft_operator.cli import build_parser
    from torch.distributed.run import get_args_parser

    spec = _multi_node_spec(nodes=2, gpus=0)
    command = trainer_pod_template(spec, OWNER, IMAGES)["spec"]["containers"][0]["command"]
    expanded = [part.replace("$(JOB_COMPLETION_INDEX)", "1") for part in command]
    torchrun = get_args_parser().parse_args(expanded[1:])
    assert (torchrun.nnodes, torchrun.nproc_per_node, torchrun.node_rank) == ("2", "1", 1)
    assert (torchrun.rdzv_backend, torchrun.rdzv_endpoint) == ("static", "triton-kernels-trainer-0-0.triton-kernels-trainer:29500")
    assert torchrun.no_python and torchrun.training_script == "kuberft"
    train = build_parser().parse_args(torchrun.training_script_args)
    assert (train.command, str(train.config)) == ("train", "/etc/kuberft/job.json")


def test_a_multi_node_trainers_pods_accept_each_other_on_every_port_and_stay_restricted():
    children = rftjob_children(_multi_node_spec(), OWNER, IMAGES, 1, 2, 0)
    policy = next(c for c in children if c["kind"] == "NetworkPolicy" and c["metadata"]["name"] == "triton-kernels-trainer")
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    assert policy["spec"]["ingress"] == [
        {"ports": [{"protocol": "TCP", "port": 8080}]},  # metrics, from anywhere (as for one node)
        {"from": [{"podSelector": {"matchLabels": {"kuberft.io/rftjob": "triton-kernels", "kuberft.io/role": "trainer"}}}]},  # peers: NCCL's ports are ephemeral
    ]
    trainer_pod = rftjob_jobset(_multi_node_spec(), OWNER, IMAGES)["spec"]["replicatedJobs"][1]["template"]["spec"]["template"]
    assert trainer_pod["metadata"]["labels"]["kuberft.io/role"] == "trainer"  # what the peers rule selects
    # Pod networking, no host network or host ports: the restricted Pod Security profile still holds.
    assert restricted_violations(trainer_pod["spec"]) == []


def test_a_queued_job_with_an_external_reward_pool_queues_only_its_trainer():
    spec = _example_spec().model_copy(update={"queue_name": "gpu-queue"})
    spec.reward_pool.url = "http://pool.example:8080"
    [trainer] = rftjob_jobset(spec, OWNER, IMAGES)["spec"]["replicatedJobs"]
    assert trainer["name"] == "trainer" and "dependsOn" not in trainer


def test_trainer_role_allows_only_reading_and_patching_its_own_progress_config_map():
    # Nothing on rftjobs or rftjobs/status: the operator alone writes the job's status.
    assert trainer_role(OWNER)["rules"] == [
        {"apiGroups": [""], "resources": ["configmaps"], "resourceNames": ["triton-kernels-progress"], "verbs": ["get", "patch"]}
    ]


def test_the_progress_config_map_is_an_owned_labelled_child_without_data():
    [progress] = [c for c in rftjob_children(_example_spec(), OWNER, IMAGES, generation=1, reward_replicas=2, rollout_replicas=0)
                  if c["metadata"]["name"] == "triton-kernels-progress"]
    assert progress["kind"] == "ConfigMap"
    # The operator's apply owns no data field, so re-applying never erases the trainer's report.
    assert "data" not in progress
    assert progress["metadata"]["labels"]["kuberft.io/role"] == "progress"
    assert progress["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "kuberft-operator"
    assert progress["metadata"]["ownerReferences"][0]["uid"] == "uid-1"


def test_serve_pods_read_the_resolved_spec_from_their_config_map_and_mount_a_pvc_adapter():
    spec = TurboDeploymentSpec.model_validate(
        {"model": {"name": "Qwen/Qwen2.5-0.5B"}, "adapter": {"fromRFTJob": "triton-kernels"},
         "speculator": {"type": "draft", "draftModel": "tiny-draft", "numSpeculativeTokens": 5}, "port": 9000}
    )
    owner = Owner("TurboDeployment", "chat", "team-a", "uid-2")
    deployment = serve_deployment(spec, owner, IMAGES, {"default": "pvc://ckpt/triton-kernels"})
    config = serve_config_map(spec, owner, {"default": "pvc://ckpt/triton-kernels"})
    pod = deployment["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["command"] == ["kuberft", "serve", "--config", "/etc/kuberft/serve.json"]
    assert {"name": "config", "mountPath": "/etc/kuberft/serve.json", "subPath": "serve.json", "readOnly": True} in container["volumeMounts"]
    assert {"name": "config", "configMap": {"name": "chat-serve"}} in pod["volumes"]
    assert (config["kind"], config["metadata"]["name"], config["metadata"]["ownerReferences"][0]["uid"]) == ("ConfigMap", "chat-serve", "uid-2")
    assert json.loads(config["data"]["serve.json"]) == {
        "model": {"name": "Qwen/Qwen2.5-0.5B", "dtype": "auto", "trustRemoteCode": False},
        "adapters": [{"name": "default", "uri": "/adapters/ckpt/triton-kernels"}],
        "speculator": {"type": "draft", "draftModel": "tiny-draft", "numSpeculativeTokens": 5, "adaptive": True, "trainHeads": False},
        "maxBatchSize": 8,
        "port": 9000,
        "prefixCacheMiB": 1024,
    }
    assert container["ports"] == [{"name": "http", "containerPort": 9000, "protocol": "TCP"}]
    assert {"name": "adapters-0", "persistentVolumeClaim": {"claimName": "ckpt", "readOnly": True}} in pod["volumes"]
    assert {"name": "adapters-0", "mountPath": "/adapters/ckpt", "readOnly": True} in container["volumeMounts"]
    assert deployment["spec"]["replicas"] == 1
    assert serve_autoscaler(spec, owner) is None


def test_a_changed_serve_document_rolls_the_pods_and_scaling_does_not():
    owner = Owner("TurboDeployment", "chat", "team-a", "uid-2")

    def config_hash(wire, adapter="/models/a"):
        spec = TurboDeploymentSpec.model_validate({"model": {"name": "m"}, "adapter": {"uri": adapter}, **wire})
        return serve_deployment(spec, owner, IMAGES, {"default": adapter})["spec"]["template"]["metadata"]["annotations"]["kuberft.io/config-hash"]

    first = config_hash({})
    assert config_hash({"replicas": 5}) == first
    assert config_hash({"autoscaling": {"minReplicas": 2, "maxReplicas": 4}}) == first
    assert config_hash({"speculator": {"numSpeculativeTokens": 6}}) != first
    assert config_hash({}, adapter="/models/b") != first


def test_autoscaled_serving_leaves_replicas_to_the_hpa():
    spec = TurboDeploymentSpec.model_validate({"model": {"name": "m"}, "autoscaling": {"minReplicas": 2, "maxReplicas": 5}})
    owner = Owner("TurboDeployment", "chat", "team-a", "uid-2")
    assert "replicas" not in serve_deployment(spec, owner, IMAGES, {})["spec"]
    hpa = serve_autoscaler(spec, owner)["spec"]
    assert (hpa["minReplicas"], hpa["maxReplicas"]) == (2, 5)
    assert hpa["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "chat"}


def test_the_example_turbo_deployment_trains_heads_at_start_up_for_its_named_adapter():
    from kuberft_core.api import TurboDeployment

    turbo = load(EXAMPLES / "turbodeployment.yaml", TurboDeployment)
    owner = Owner("TurboDeployment", "triton-kernels", "team-a", "uid-3")
    document = json.loads(serve_config_map(turbo.spec, owner, {"triton-kernels": "/models/adapter"})["data"]["serve.json"])
    assert (document["model"]["name"], document["model"]["dtype"]) == ("Qwen/Qwen2.5-Coder-7B-Instruct", "bfloat16")
    assert document["adapters"] == [{"name": "triton-kernels", "uri": "/models/adapter"}]
    assert "adapter" not in document
    assert (document["speculator"]["type"], document["speculator"]["trainHeads"], document["maxBatchSize"]) == ("heads", True, 16)
    assert not {"replicas", "autoscaling", "placement"} & set(document)


def test_adapters_on_claims_mount_each_claim_once_and_other_paths_pass_through():
    volumes, mounts, paths = adapter_volumes({
        "a": "pvc://ckpt/job-a/adapter", "b": "pvc://ckpt/job-b/adapter", "c": "pvc://other/c", "d": "/models/d",
    })
    assert volumes == [{"name": "adapters-0", "persistentVolumeClaim": {"claimName": "ckpt", "readOnly": True}},
                       {"name": "adapters-1", "persistentVolumeClaim": {"claimName": "other", "readOnly": True}}]
    assert mounts == [{"name": "adapters-0", "mountPath": "/adapters/ckpt", "readOnly": True},
                      {"name": "adapters-1", "mountPath": "/adapters/other", "readOnly": True}]
    assert paths == {"a": "/adapters/ckpt/job-a/adapter", "b": "/adapters/ckpt/job-b/adapter", "c": "/adapters/other/c", "d": "/models/d"}


def test_several_adapters_are_served_once_ready_and_in_the_order_the_spec_lists_them(tmp_path):
    from kuberft_serve.config import ServeConfig, load_spec_document

    spec = TurboDeploymentSpec.model_validate({
        "model": {"name": "m"},
        "adapters": [{"name": "sql", "fromRFTJob": "sql-job"}, {"name": "triton", "uri": "/models/triton"}, {"name": "later", "fromRFTJob": "j"}],
        "maxLoadedAdapters": 2, "maxAdapterMemoryMiB": 512,
    })
    owner = Owner("TurboDeployment", "chat", "team-a", "uid-2")
    locations = {"triton": "/models/triton", "sql": "pvc://ckpt/sql-job/adapter"}  # `later` is not ready
    document = json.loads(serve_config_map(spec, owner, locations)["data"]["serve.json"])
    assert document["adapters"] == [{"name": "sql", "uri": "/adapters/ckpt/sql-job/adapter"}, {"name": "triton", "uri": "/models/triton"}]
    (tmp_path / "serve.json").write_text(json.dumps(document))
    config = ServeConfig.from_spec(load_spec_document(tmp_path / "serve.json"))
    assert list(config.adapters.items()) == [("sql", "/adapters/ckpt/sql-job/adapter"), ("triton", "/models/triton")]
    assert (config.max_loras, config.max_lora_memory_mib) == (2, 512)
    pod = serve_deployment(spec, owner, IMAGES, locations)["spec"]["template"]["spec"]
    assert [v["name"] for v in pod["volumes"]] == ["config", "tmp", "adapters-0"]


def test_every_command_the_operator_runs_is_accepted_by_the_kuberft_cli():
    """The pods' commands are a contract with the trainer, reward and serve components."""
    from kuberft_core.api import TurboDeployment
    from kuberft_operator.cli import build_parser

    spec = _example_spec()
    turbo = load(EXAMPLES / "turbodeployment.yaml", TurboDeployment).spec
    commands = [
        trainer_job(spec, OWNER, IMAGES)["spec"]["template"]["spec"]["containers"][0]["command"],
        reward_deployment(spec, OWNER, IMAGES, replicas=1)["spec"]["template"]["spec"]["containers"][0]["command"],
        serve_deployment(turbo, Owner("TurboDeployment", "t", "team-a", "u"), IMAGES, {"triton-kernels": "pvc://c/p"})["spec"]["template"]["spec"]["containers"][0]["command"],
        trainer_job(_rollout_server_spec(), OWNER, IMAGES)["spec"]["template"]["spec"]["containers"][0]["command"],
        rollout_deployment(_rollout_server_spec(), OWNER, IMAGES, replicas=1)["spec"]["template"]["spec"]["containers"][0]["command"],
    ]
    parsed = [build_parser().parse_args(command[1:]) for command in commands]
    assert (parsed[0].command, str(parsed[0].config), parsed[0].reward_url) == ("train", "/etc/kuberft/job.json", "http://triton-kernels-reward.team-a.svc:8080")
    assert (parsed[1].reward_command, parsed[1].workers, parsed[1].timeout, parsed[1].memory_mib) == ("serve", 4, 120, 8192)
    assert (parsed[2].command, str(parsed[2].config)) == ("serve", "/etc/kuberft/serve.json")
    assert (parsed[3].rollout_service, parsed[3].rollout_replicas) == ("triton-kernels-rollout.team-a.svc:8300", 3)
    assert (parsed[4].command, str(parsed[4].config), parsed[4].port, parsed[4].tensor_parallel_size) == ("rollout-server", "/etc/kuberft/job.json", 8300, 2)


def test_the_serve_document_is_what_kuberft_serve_config_reads(tmp_path):
    """The serve pod's document is a contract with the serve component: it loads as the same spec."""
    from kuberft_core.api import TurboDeployment
    from kuberft_serve.config import ServeConfig, load_spec_document

    turbo = load(EXAMPLES / "turbodeployment.yaml", TurboDeployment).spec
    config_map = serve_config_map(turbo, Owner("TurboDeployment", "t", "team-a", "u"), {"triton-kernels": "pvc://c/p"})
    (tmp_path / "serve.json").write_text(config_map["data"]["serve.json"])
    config = ServeConfig.from_spec(load_spec_document(tmp_path / "serve.json"))
    assert config.adapters == {"triton-kernels": "/adapters/c/p"}
    assert (config.model, config.speculator) == (turbo.model, turbo.speculator)
    assert (config.max_batch_size, config.port) == (16, 8000)


def test_image_pull_secrets_and_secret_env_reach_every_pod_the_operator_creates():
    import dataclasses

    images = dataclasses.replace(IMAGES, pull_secrets=("regcred",))
    wire = _example_spec().to_wire()
    token = {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf", "key": "token"}}}
    wire["trainer"]["env"] = [token]
    wire["rewardPool"].setdefault("placement", {})["env"] = [token]
    wire["rollout"] = {"mode": "server", "placement": {"env": [token]}}
    spec = RFTJobSpec.model_validate(wire)
    turbo = TurboDeploymentSpec.model_validate({"model": {"name": "m"}, "placement": {"env": [token]}})
    pods = {
        "trainer": trainer_job(spec, OWNER, images)["spec"]["template"]["spec"],
        "reward": reward_deployment(spec, OWNER, images, 1)["spec"]["template"]["spec"],
        "rollout": rollout_deployment(spec, OWNER, images, 1)["spec"]["template"]["spec"],
        "serve": serve_deployment(turbo, Owner("TurboDeployment", "s", "team-a", "u"), images, {})["spec"]["template"]["spec"],
    }
    for name, pod in pods.items():
        assert pod["imagePullSecrets"] == [{"name": "regcred"}], name
        assert token in pod["containers"][0]["env"], name
    config = job_config_map(spec, OWNER, 1)["data"]
    assert "hf" in json.dumps(config) and "token" in json.dumps(config)  # the reference, never a value
    assert "imagePullSecrets" not in trainer_job(spec, OWNER, IMAGES)["spec"]["template"]["spec"]


def test_trainer_and_serve_pods_admit_connections_on_their_own_port_only():
    children = rftjob_children(_example_spec(), OWNER, IMAGES, 1, 2, 0)
    trainer_policy = next(c for c in children if c["kind"] == "NetworkPolicy" and c["metadata"]["name"] == "triton-kernels-trainer")
    assert trainer_policy["spec"]["podSelector"]["matchLabels"]["kuberft.io/role"] == "trainer"
    assert trainer_policy["spec"]["policyTypes"] == ["Ingress"]
    assert trainer_policy["spec"]["ingress"] == [{"ports": [{"protocol": "TCP", "port": 8080}]}]
    trainer_ports = trainer_job(_example_spec(), OWNER, IMAGES)["spec"]["template"]["spec"]["containers"][0]["ports"]
    assert [p["containerPort"] for p in trainer_ports] == [8080]
