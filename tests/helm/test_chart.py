"""The Helm chart, rendered by the real `helm` binary: what `helm install` would create, with
default values and with every toggle on, and the clear errors a bad values file gets."""

from __future__ import annotations

import json

import pytest
import yaml

from kuberft_core.api import RFTJob, TurboDeployment
from kuberft_core.manifests import load
from kuberft_operator import __version__
from kuberft_operator.builders import REWARD_PORT, Images, Owner, reward_deployment, serve_deployment, trainer_job, trainer_role
from kuberft_operator.cli import build_parser
from kuberft_operator.controller import RBAC_RULES

from .chart import ALL_ON, CHART, NAMESPACE, REPO, find, helm, normalized_rules, one, render, template_text
from .k8s_schema import model_for
from .k8s_schema import problems as k8s_problems

FULLNAME = "kuberft"  # the release name contains the chart name
WATCHED = ["team-a", "team-b"]


@pytest.fixture(scope="module")
def defaults():
    return render()


@pytest.fixture(scope="module")
def all_on():
    return render([ALL_ON])


@pytest.fixture(scope="module")
def cluster_wide():
    return render(set_values={"watchAllNamespaces": "true"})


def _kinds(objects):
    return sorted((o["kind"], o["metadata"].get("namespace", ""), o["metadata"]["name"]) for o in objects)


def _container(objects):
    deployment = one(objects, "Deployment", FULLNAME)
    [container] = deployment["spec"]["template"]["spec"]["containers"]
    return container


def _operator_args(objects):
    container = _container(objects)
    assert container["command"] == ["kuberft", "operator"]
    return build_parser().parse_args(["operator", *container["args"]])


# ------------------------------------------------------------------ lint and what gets installed


@pytest.mark.parametrize("values", [[], [ALL_ON]], ids=["defaults", "all-toggles-on"])
def test_chart_lints_cleanly(values):
    args = ["lint", str(CHART), "--strict", "--namespace", NAMESPACE]
    for path in values:
        args += ["--values", str(path)]
    result = helm(*args)
    assert "1 chart(s) linted, 0 chart(s) failed" in result.stdout


def test_default_install_creates_the_operator_its_rbac_metrics_service_and_dashboards(defaults):
    assert _kinds(defaults) == [
        ("ConfigMap", NAMESPACE, "kuberft-dashboard-operator"),
        ("ConfigMap", NAMESPACE, "kuberft-dashboard-reward-pool"),
        ("ConfigMap", NAMESPACE, "kuberft-dashboard-serving"),
        ("ConfigMap", NAMESPACE, "kuberft-dashboard-training"),
        ("CustomResourceDefinition", "", "rftjobs.kuberft.io"),
        ("CustomResourceDefinition", "", "turbodeployments.kuberft.io"),
        ("Deployment", NAMESPACE, "kuberft"),
        ("NetworkPolicy", NAMESPACE, "kuberft"),
        ("Role", NAMESPACE, "kuberft"),  # least privilege by default: the release namespace only
        ("Role", NAMESPACE, "kuberft-leader-election"),
        ("RoleBinding", NAMESPACE, "kuberft"),
        ("RoleBinding", NAMESPACE, "kuberft-leader-election"),
        ("Service", NAMESPACE, "kuberft-metrics"),
        ("ServiceAccount", NAMESPACE, "kuberft"),
    ]
    policy = one(defaults, "NetworkPolicy", "kuberft")["spec"]
    operator_pod = one(defaults, "Deployment", "kuberft")["spec"]["template"]
    assert policy["podSelector"]["matchLabels"].items() <= operator_pod["metadata"]["labels"].items()
    metrics_port = operator_pod["spec"]["containers"][0]["ports"][0]["containerPort"]
    assert policy["ingress"] == [{"ports": [{"protocol": "TCP", "port": metrics_port}]}] and policy["policyTypes"] == ["Ingress"]


def test_every_toggle_on_adds_monitors_namespaced_rbac_sandbox_objects_and_a_disruption_budget(all_on):
    kinds = _kinds(all_on)
    assert ("ServiceMonitor", "monitoring", "kuberft") in kinds
    assert [k for k in kinds if k[0] == "PodMonitor"] == [
        ("PodMonitor", "monitoring", "kuberft-reward-pool"),
        ("PodMonitor", "monitoring", "kuberft-serve"),
        ("PodMonitor", "monitoring", "kuberft-trainer"),
    ]
    assert ("RuntimeClass", "", "gvisor") in kinds
    assert [k for k in kinds if k[0] == "NetworkPolicy"] == [("NetworkPolicy", NAMESPACE, "kuberft")] + [
        ("NetworkPolicy", ns, "kuberft-reward-metrics") for ns in WATCHED
    ]
    assert [k for k in kinds if k[0] in ("Role", "RoleBinding")] == [
        ("Role", NAMESPACE, "kuberft-leader-election"),
        ("Role", "team-a", "kuberft"),
        ("Role", "team-b", "kuberft"),
        ("RoleBinding", NAMESPACE, "kuberft-leader-election"),
        ("RoleBinding", "team-a", "kuberft"),
        ("RoleBinding", "team-b", "kuberft"),
    ]
    assert not find(all_on, "ClusterRole", "kuberft") and not find(all_on, "ClusterRoleBinding", "kuberft")
    assert one(all_on, "PodDisruptionBudget", "kuberft")["spec"]["minAvailable"] == 1
    assert {o["metadata"]["namespace"] for o in find(all_on, "ConfigMap")} == {"monitoring"}


def test_chart_crds_are_the_generated_crds():
    top = sorted(p.name for p in (REPO / "crds").glob("*.yaml"))
    chart = sorted(p.name for p in (CHART / "files" / "crds").glob("*.yaml"))
    assert chart == top == ["rftjobs.kuberft.io.yaml", "turbodeployments.kuberft.io.yaml"]
    for name in top:
        assert (CHART / "files" / "crds" / name).read_bytes() == (REPO / "crds" / name).read_bytes(), name
    assert not (CHART / "crds").exists()  # Helm would install those once and never upgrade them


def test_the_release_installs_and_upgrades_the_crds_as_generated_and_keeps_them():
    crds = {d["metadata"]["name"]: d for d in yaml.safe_load_all(helm("template", "kuberft", str(CHART)).stdout)
            if d and d["kind"] == "CustomResourceDefinition"}
    assert sorted(crds) == ["rftjobs.kuberft.io", "turbodeployments.kuberft.io"]
    for name, crd in crds.items():
        assert crd["metadata"]["annotations"] == {"helm.sh/resource-policy": "keep"}
        assert crd["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "Helm"
        crd["metadata"] = {"name": name}
        assert crd == yaml.safe_load((REPO / "crds" / f"{name}.yaml").read_text())  # byte-for-byte numbers included
    unkept = [d for d in yaml.safe_load_all(helm("template", "kuberft", str(CHART), "--set", "crds.keep=false").stdout)
              if d and d["kind"] == "CustomResourceDefinition"]
    assert [d["metadata"].get("annotations") for d in unkept] == [None, None]
    none = helm("template", "kuberft", str(CHART), "--set", "crds.install=false").stdout
    assert "CustomResourceDefinition" not in none


def test_chart_version_matches_the_package():
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert chart["appVersion"] == __version__


# ------------------------------------------------------------------ the operator Deployment


def test_operator_runs_with_the_default_images_and_watches_its_own_namespace(defaults, cluster_wide):
    assert _operator_args(cluster_wide).namespaces == []
    assert one(cluster_wide, "ClusterRole", "kuberft") and one(cluster_wide, "ClusterRoleBinding", "kuberft")
    args = _operator_args(defaults)
    expected = Images.for_version("ghcr.io/kuberft", __version__)
    assert _container(defaults)["image"] == f"ghcr.io/kuberft/operator:{__version__}"
    assert (args.trainer_image, args.reward_image, args.serve_image) == (expected.trainer, expected.reward, expected.serve)
    assert args.namespaces == [NAMESPACE]
    assert args.leader_election and args.lease_namespace == NAMESPACE and args.lease_name == "kuberft"
    assert (args.metrics_port, args.workers, args.lease_duration, args.renew_period) == (8080, 16, 15.0, 5.0)


def test_operator_args_follow_the_values(all_on):
    args = _operator_args(all_on)
    assert args.namespaces == WATCHED
    assert args.trainer_image == "registry.example.com/gpu/kuberft-trainer:cuda12"
    assert args.reward_image == "registry.example.com/ml/kuberft/reward:sandboxed"
    assert args.serve_image == "registry.example.com/serving/kuberft-serve:0.1.0-rc1"
    assert _container(all_on)["image"] == (
        "registry.example.com/ml/kuberft/operator@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"
    )
    assert (args.lease_name, args.lease_duration, args.renew_period, args.metrics_port, args.workers, args.verbose) == (
        "kuberft-leader", 20.0, 4.0, 9090, 32, True
    )


def test_one_replica_without_leader_election_is_replaced_not_rolled():
    objects = render(set_values={"operator.leaderElection.enabled": "false"})
    args = _operator_args(objects)
    assert not args.leader_election
    assert one(objects, "Deployment")["spec"]["strategy"] == {"type": "Recreate"}
    assert not find(objects, "Role", "kuberft-leader-election")


def test_operator_pod_runs_restricted_with_a_read_only_root(defaults):
    pod = one(defaults, "Deployment")["spec"]["template"]["spec"]
    container = _container(defaults)
    assert pod["securityContext"] == {
        "runAsNonRoot": True, "runAsUser": 65532, "runAsGroup": 65532, "seccompProfile": {"type": "RuntimeDefault"},
    }
    assert container["securityContext"] == {
        "allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True, "runAsNonRoot": True, "capabilities": {"drop": ["ALL"]},
    }
    assert container["volumeMounts"] == [{"name": "tmp", "mountPath": "/tmp"}]
    assert [e["name"] for e in container["env"]] == ["POD_NAME", "POD_NAMESPACE"]
    assert container["readinessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    assert container["ports"] == [{"name": "metrics", "containerPort": 8080, "protocol": "TCP"}]


# ------------------------------------------------------------------ RBAC


def _operator_grants_without_leases():
    return normalized_rules(r for r in RBAC_RULES if "leases" not in r["resources"])


def test_operator_role_grants_exactly_what_the_operator_uses(defaults, all_on, cluster_wide):
    cluster_role = one(cluster_wide, "ClusterRole", "kuberft")
    assert normalized_rules(cluster_role["rules"]) == _operator_grants_without_leases()
    assert normalized_rules(one(defaults, "Role", "kuberft", NAMESPACE)["rules"]) == _operator_grants_without_leases()
    for namespace in WATCHED:
        role = one(all_on, "Role", "kuberft", namespace)
        assert normalized_rules(role["rules"]) == _operator_grants_without_leases()
        binding = one(all_on, "RoleBinding", "kuberft", namespace)
        assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "kuberft-operator", "namespace": NAMESPACE}]


def test_leader_election_may_touch_only_its_own_lease(defaults):
    [lease_rule] = [r for r in RBAC_RULES if "leases" in r["resources"]]
    role = one(defaults, "Role", "kuberft-leader-election", NAMESPACE)
    grants = normalized_rules(role["rules"])
    assert grants == {("coordination.k8s.io", "leases", "*", "create")} | {
        ("coordination.k8s.io", "leases", "kuberft", verb) for verb in ("get", "update", "patch")
    }
    assert {verb for *_, verb in grants} == set(lease_rule["verbs"])


def test_nothing_is_granted_cluster_wide_unless_asked(defaults, cluster_wide):
    """kopf's namespace and CRD scanning is off (exact namespace names, CRDs read once at start),
    so a namespaced install holds no ClusterRole at all."""
    assert not [o for o in defaults if o["kind"] in ("ClusterRole", "ClusterRoleBinding")]
    assert [o["metadata"]["name"] for o in cluster_wide if o["kind"] == "ClusterRole"] == ["kuberft"]


def test_operator_holds_every_permission_of_the_trainer_role_it_grants(defaults):
    """Kubernetes lets a subject create a Role only with permissions it holds itself."""
    trainer = trainer_role(Owner("RFTJob", "job", "team-a", "uid"))
    held = normalized_rules(one(defaults, "Role", "kuberft", NAMESPACE)["rules"])
    for group, resource, name, verb in normalized_rules(trainer["rules"]):
        assert (group, resource, "*", verb) in held, (group, resource, name, verb)
    assert normalized_rules(trainer["rules"]) == {("", "configmaps", "job-progress", "get"), ("", "configmaps", "job-progress", "patch")}


# ------------------------------------------------------------------ metrics and dashboards


def test_service_monitor_scrapes_the_operator_metrics_port(all_on):
    service = one(all_on, "Service", "kuberft-metrics")
    monitor = one(all_on, "ServiceMonitor")
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    assert monitor["spec"]["namespaceSelector"] == {"matchNames": [NAMESPACE]}
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert [e["port"] for e in monitor["spec"]["endpoints"]] == [p["name"] for p in service["spec"]["ports"]] == ["metrics"]
    assert service["spec"]["ports"][0]["port"] == 9090


def _pod_templates():
    """The pod templates the operator creates, from its own builders."""
    owner = Owner("RFTJob", "triton-kernels", "team-a", "uid-1")
    images = Images.for_version()
    spec = load(REPO / "examples" / "rftjob-triton.yaml", RFTJob).spec
    turbo = load(REPO / "examples" / "turbodeployment.yaml", TurboDeployment).spec
    return {
        "trainer": trainer_job(spec, owner, images)["spec"]["template"],
        "reward-pool": reward_deployment(spec, owner, images, 1)["spec"]["template"],
        "serve": serve_deployment(turbo, Owner("TurboDeployment", "triton-kernels", "team-a", "uid-2"), images, {"triton-kernels": "pvc://c/p"})["spec"]["template"],
    }


@pytest.mark.parametrize("role", ["reward-pool", "serve", "trainer"])
def test_pod_monitors_select_the_pods_the_operator_creates_and_their_metrics_port(all_on, role):
    monitor = one(all_on, "PodMonitor", f"kuberft-{role}")
    template = _pod_templates()[role]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= template["metadata"]["labels"].items()
    assert monitor["spec"]["namespaceSelector"] == {"matchNames": WATCHED}
    [endpoint] = monitor["spec"]["podMetricsEndpoints"]
    ports = [p["name"] for c in template["spec"]["containers"] for p in c.get("ports", [])]
    assert endpoint["port"] in ports, f"the {role} container declares no port named {endpoint['port']!r} (it has {ports})"


def test_pod_monitors_look_in_every_namespace_when_the_operator_watches_the_cluster():
    objects = render(set_values={"metrics.podMonitor.enabled": "true", "watchAllNamespaces": "true"})
    assert {json.dumps(m["spec"]["namespaceSelector"]) for m in find(objects, "PodMonitor")} == {'{"any": true}'}


def test_dashboards_ship_as_configmaps_for_the_grafana_sidecar(defaults):
    maps = {m["metadata"]["name"]: m for m in find(defaults, "ConfigMap")}
    for name in ("operator", "reward-pool", "serving", "training"):
        config_map = maps[f"kuberft-dashboard-{name}"]
        assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
        [(key, text)] = config_map["data"].items()
        assert key == f"kuberft-{name}.json"
        assert json.loads(text) == json.loads((CHART / "dashboards" / f"{name}.json").read_text())


def test_dashboards_can_be_left_out():
    assert not find(render(set_values={"dashboards.enabled": "false"}), "ConfigMap")


# ------------------------------------------------------------------ the reward sandbox


def test_reward_metrics_policy_admits_only_the_given_peers_and_keeps_egress_denied(all_on):
    policy = one(all_on, "NetworkPolicy", namespace="team-a")
    reward_labels = _pod_templates()["reward-pool"]["metadata"]["labels"]
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= reward_labels.items()
    assert policy["spec"]["policyTypes"] == ["Ingress", "Egress"]
    assert policy["spec"]["egress"] == []
    [rule] = policy["spec"]["ingress"]
    assert rule["ports"] == [{"protocol": "TCP", "port": REWARD_PORT}]
    assert rule["from"] == [
        {
            "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}},
            "podSelector": {"matchLabels": {"app.kubernetes.io/name": "prometheus"}},
        }
    ]


def test_runtime_class_uses_the_sandbox_handler(all_on):
    assert one(all_on, "RuntimeClass")["handler"] == "runsc"


# ------------------------------------------------------------------ bad values


@pytest.mark.parametrize(
    "values, message",
    [
        ({"operator": {"replica": 2}}, "at '/operator': additional properties 'replica' not allowed"),
        ({"operator": {"replicas": "two"}}, "at '/operator/replicas': got string, want integer"),
        ({"operator": {"replicas": 2, "leaderElection": {"enabled": False}}}, "at '/operator/leaderElection/enabled': value must be true"),
        ({"images": {"operator": {"digest": "latest"}}}, "at '/images/operator/digest'"),
        ({"images": {"pullPolicy": "Sometimes"}}, "at '/images/pullPolicy'"),
        ({"watchNamespaces": ["Team_A"]}, "at '/watchNamespaces/0'"),
        ({"metrics": {"port": 70000}}, "at '/metrics/port': maximum: got 70,000, want 65,535"),
        ({"metrics": {"serviceMonitor": {"interval": "30 seconds"}}}, "at '/metrics/serviceMonitor/interval'"),
        ({"rewardSandbox": {"networkPolicy": {"allowMetricsFrom": [{}]}}}, "at '/rewardSandbox/networkPolicy/allowMetricsFrom/0'"),
        (
            {"operator": {"leaderElection": {"leaseDurationSeconds": 10, "renewPeriodSeconds": 10}}},
            "operator.leaderElection.renewPeriodSeconds (10) must be less than leaseDurationSeconds (10)",
        ),
        (
            {"rewardSandbox": {"networkPolicy": {"enabled": True}}},
            "rewardSandbox.networkPolicy.enabled needs rewardSandbox.networkPolicy.allowMetricsFrom",
        ),
        (
            {"metrics": {"service": {"enabled": False}, "serviceMonitor": {"enabled": True}}},
            "metrics.serviceMonitor.enabled needs metrics.service.enabled",
        ),
        ({"serviceAccount": {"create": False}}, "serviceAccount.name is required when serviceAccount.create is false"),
    ],
    ids=lambda v: json.dumps(v) if isinstance(v, dict) else "",
)
def test_bad_values_fail_with_a_message_naming_the_value(tmp_path, values, message):
    path = tmp_path / "bad-values.yaml"
    path.write_text(yaml.safe_dump(values))
    result = template_text([path], check=False)
    assert result.returncode != 0
    assert message in result.stderr, result.stderr


# ------------------------------------------------------------------ the Kubernetes schema, offline


@pytest.mark.parametrize("values", [[], [ALL_ON]], ids=["defaults", "all-toggles-on"])
def test_every_built_in_object_matches_the_kubernetes_types(values):
    objects = render(values)
    custom = sorted({o["kind"] for o in objects if model_for(o) is None})
    # prometheus-operator's kinds are checked by the API server with their CRDs (test_chart_cluster.py).
    assert custom in ([], ["PodMonitor", "ServiceMonitor"])
    found = [problem for o in objects if model_for(o) is not None for problem in k8s_problems(o)]
    assert not found, "\n".join(found)


def test_the_offline_schema_check_finds_misspelt_missing_and_mistyped_fields(defaults):
    deployment = json.loads(json.dumps(one(defaults, "Deployment")))
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    container["readinessprobe"] = container.pop("readinessProbe")
    del container["name"]
    deployment["spec"]["replicas"] = "one"
    container["resources"]["limits"]["nvidia.com/gpu"] = 1  # a number is a valid quantity
    assert sorted(k8s_problems(deployment)) == [
        "Deployment/kuberft: spec.replicas: Input should be a valid integer",
        "Deployment/kuberft: spec.template.spec.containers.0.name: Field required",
        "Deployment/kuberft: spec.template.spec.containers.0.readinessprobe: Extra inputs are not permitted",
    ]
