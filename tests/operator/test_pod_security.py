"""Every pod the operator creates passes the Pod Security Standards `restricted` profile (so it
runs in a namespace labelled `pod-security.kubernetes.io/enforce: restricted`), as the image's
own non-root user.

`restricted_violations` is written from the standard
(https://kubernetes.io/docs/concepts/security/pod-security-standards/): the baseline controls,
then the restricted ones. It checks only what a pod template states: fields left unset are
treated as the API server's admission sees them (unset privileged is not privileged, unset
runAsNonRoot is not non-root)."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest

from kuberft_core.api import RFTJob, RFTJobSpec, TurboDeploymentSpec
from kuberft_core.manifests import load
from kuberft_operator.builders import IMAGE_UID, Images, Owner, rftjob_children, serve_deployment, trainer_job

REPO = Path(__file__).resolve().parents[2]
IMAGES = Images.for_version("registry.test/kuberft", "9.9.9")

# Restricted: the volume types a pod may use (everything else, hostPath first, is refused).
RESTRICTED_VOLUME_TYPES = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim", "projected", "secret"}
# Baseline: the sysctls a pod may set.
SAFE_SYSCTLS = {
    "kernel.shm_rmid_forced", "net.ipv4.ip_local_port_range", "net.ipv4.ip_unprivileged_port_start",
    "net.ipv4.tcp_syncookies", "net.ipv4.ping_group_range", "net.ipv4.ip_local_reserved_ports",
    "net.ipv4.tcp_keepalive_time", "net.ipv4.tcp_fin_timeout", "net.ipv4.tcp_keepalive_intvl", "net.ipv4.tcp_keepalive_probes",
}
SELINUX_TYPES = {None, "", "container_t", "container_init_t", "container_kvm_t", "container_engine_t"}


def restricted_violations(pod: dict) -> list[str]:
    """What keeps this pod spec out of a `restricted` namespace, one line per control failed."""
    found = []
    pod_security = pod.get("securityContext") or {}
    containers = [*pod.get("initContainers", []), *pod.get("containers", []), *pod.get("ephemeralContainers", [])]

    # --- baseline
    for field in ("hostNetwork", "hostPID", "hostIPC"):
        if pod.get(field):
            found.append(f"{field} is set")
    contexts = [("pod", pod_security)] + [(c["name"], c.get("securityContext") or {}) for c in containers]
    for where, context in contexts:
        if (context.get("windowsOptions") or {}).get("hostProcess"):
            found.append(f"{where}: windowsOptions.hostProcess")
        selinux = context.get("seLinuxOptions") or {}
        if selinux.get("type") not in SELINUX_TYPES or selinux.get("user") or selinux.get("role"):
            found.append(f"{where}: seLinuxOptions {selinux}")
        apparmor = (context.get("appArmorProfile") or {}).get("type")
        if apparmor not in (None, "RuntimeDefault", "Localhost"):
            found.append(f"{where}: appArmorProfile {apparmor}")
        if (context.get("seccompProfile") or {}).get("type") == "Unconfined":
            found.append(f"{where}: seccompProfile Unconfined")
        if context.get("runAsUser") == 0:
            found.append(f"{where}: runAsUser 0")
    for sysctl in pod_security.get("sysctls", []):
        if sysctl["name"] not in SAFE_SYSCTLS:
            found.append(f"pod: sysctl {sysctl['name']}")
    for container in containers:
        name, context = container["name"], container.get("securityContext") or {}
        if context.get("privileged"):
            found.append(f"{name}: privileged")
        if context.get("procMount", "Default") != "Default":
            found.append(f"{name}: procMount {context['procMount']}")
        if any(port.get("hostPort") for port in container.get("ports", [])):
            found.append(f"{name}: hostPort")

    # --- restricted
    for volume in pod.get("volumes", []):
        kinds = set(volume) - {"name"}
        if not kinds <= RESTRICTED_VOLUME_TYPES:
            found.append(f"volume {volume['name']}: type {', '.join(sorted(kinds - RESTRICTED_VOLUME_TYPES))}")
    pod_seccomp = (pod_security.get("seccompProfile") or {}).get("type")
    for container in containers:
        name, context = container["name"], container.get("securityContext") or {}
        if context.get("allowPrivilegeEscalation") is not False:
            found.append(f"{name}: allowPrivilegeEscalation is not false")
        if context.get("runAsNonRoot") is False or not (context.get("runAsNonRoot") or pod_security.get("runAsNonRoot")):
            found.append(f"{name}: runAsNonRoot is not true")
        if ((context.get("seccompProfile") or {}).get("type") or pod_seccomp) not in ("RuntimeDefault", "Localhost"):
            found.append(f"{name}: seccompProfile is not RuntimeDefault or Localhost")
        capabilities = context.get("capabilities") or {}
        if "ALL" not in capabilities.get("drop", []):
            found.append(f"{name}: capabilities do not drop ALL")
        if set(capabilities.get("add", [])) - {"NET_BIND_SERVICE"}:
            found.append(f"{name}: capabilities add {sorted(set(capabilities['add']) - {'NET_BIND_SERVICE'})}")
    return found


# The image each pod runs, by container name: rollout servers run the trainer image (with vLLM).
IMAGE_OF_POD = {"reward": "reward", "rollout": "trainer", "serve": "serve", "trainer": "trainer"}


def _rftjob_spec() -> RFTJobSpec:
    """The flagship job, its completions sampled by rollout server pods (so every kind of pod is made)."""
    wire = load(REPO / "examples" / "rftjob-triton.yaml", RFTJob).spec.to_wire()
    return RFTJobSpec.model_validate({**wire, "rollout": {"mode": "server"}})


def pod_templates() -> dict[str, dict]:
    """The pod spec of every workload the builders produce, by container name."""
    rft_owner = Owner("RFTJob", "triton-kernels", "team-a", "uid-1")
    turbo_owner = Owner("TurboDeployment", "chat", "team-a", "uid-2")
    turbo = TurboDeploymentSpec.model_validate({"model": {"name": "m"}, "adapter": {"fromRFTJob": "triton-kernels"}})
    workloads = [
        *rftjob_children(_rftjob_spec(), rft_owner, IMAGES, generation=1, reward_replicas=1, rollout_replicas=1),
        trainer_job(_rftjob_spec(), rft_owner, IMAGES),
        serve_deployment(turbo, turbo_owner, IMAGES, {"default": "pvc://triton-kernels-checkpoints/triton-kernels/adapter"}),
    ]
    pods = {}
    for workload in workloads:
        if workload["kind"] == "Pod":
            pods[workload["spec"]["containers"][0]["name"]] = workload["spec"]
        elif "template" in workload.get("spec", {}):
            spec = workload["spec"]["template"]["spec"]
            pods[spec["containers"][0]["name"]] = spec
    return pods


def test_the_checker_covers_every_pod_and_every_component_image():
    assert sorted(pod_templates()) == sorted(IMAGE_OF_POD) == ["reward", "rollout", "serve", "trainer"]
    assert sorted(set(IMAGE_OF_POD.values())) == sorted(IMAGE_UID)


@pytest.mark.parametrize("pod_name", sorted(IMAGE_OF_POD))
def test_every_pod_meets_the_restricted_profile(pod_name):
    assert restricted_violations(pod_templates()[pod_name]) == []


@pytest.mark.parametrize("pod_name", sorted(IMAGE_OF_POD))
def test_every_pod_runs_as_its_image_user_on_a_read_only_root(pod_name):
    dockerfile = {"reward": "reward_image", "serve": "serve_image", "trainer": "trainer_image"}[IMAGE_OF_POD[pod_name]]
    users = re.findall(r"^USER (\d+):(\d+)$", (REPO / dockerfile / "Dockerfile").read_text(), flags=re.MULTILINE)
    pod = pod_templates()[pod_name]
    assert (pod["securityContext"]["runAsUser"], pod["securityContext"]["runAsGroup"]) == tuple(map(int, users[-1]))
    container = pod["containers"][0]
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    # HOME and the caches are under /tmp: it must be a writable volume, not the image's root.
    assert {"name": "tmp", "mountPath": "/tmp"} in container["volumeMounts"]
    assert any(v["name"] == "tmp" and "emptyDir" in v for v in pod["volumes"])


def test_the_checker_names_each_broken_control():
    pod = copy.deepcopy(pod_templates()["trainer"])
    del pod["securityContext"]["runAsNonRoot"]
    pod["securityContext"]["seccompProfile"] = {"type": "Unconfined"}
    pod["hostNetwork"] = True
    pod["volumes"].append({"name": "host", "hostPath": {"path": "/"}})
    container = pod["containers"][0]["securityContext"]
    container["allowPrivilegeEscalation"] = True
    container["capabilities"] = {"drop": ["NET_RAW"], "add": ["SYS_ADMIN", "NET_BIND_SERVICE"]}
    container["privileged"] = True
    assert restricted_violations(pod) == [
        "hostNetwork is set",
        "pod: seccompProfile Unconfined",
        "trainer: privileged",
        "volume host: type hostPath",
        "trainer: allowPrivilegeEscalation is not false",
        "trainer: runAsNonRoot is not true",
        "trainer: seccompProfile is not RuntimeDefault or Localhost",
        "trainer: capabilities do not drop ALL",
        "trainer: capabilities add ['SYS_ADMIN']",
    ]
