"""The API as code: generated CRDs are current and structural, examples are valid, and bad
manifests are rejected with a message naming the field, by `kuberft validate` and by the CRD."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from kuberft_core.api import RFTJob, TurboDeployment
from kuberft_core.manifests import check_document, load
from kuberft_operator.crdgen import crd_files

from .support.crd_schema import crd_errors

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((REPO / "examples").glob("*.yaml"))
CRDS = {name: yaml.safe_load(text) for name, text in crd_files().items()}
CRD_BY_KIND = {c["spec"]["names"]["kind"]: c for c in CRDS.values()}

FORBIDDEN_SCHEMA_KEYS = {"$ref", "$defs", "definitions", "allOf", "oneOf", "not", "title", "const", "uniqueItems"}


def test_committed_crds_match_the_models():
    for name, text in crd_files().items():
        committed = REPO / "crds" / name
        assert committed.exists(), f"crds/{name} is missing: run `kuberft crds --output-dir crds`"
        assert committed.read_text() == text, f"crds/{name} is stale: run `kuberft crds --output-dir crds`"
    assert sorted(p.name for p in (REPO / "crds").glob("*.yaml")) == sorted(crd_files())


def _walk(node, path=""):
    if isinstance(node, dict):
        yield path, node
        for key, value in node.items():
            yield from _walk(value, f"{path}/{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _walk(value, f"{path}/{i}")


@pytest.mark.parametrize("kind", ["RFTJob", "TurboDeployment"])
def test_crd_schema_is_structural(kind):
    schema = CRD_BY_KIND[kind]["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    for path, node in _walk(schema):
        assert not FORBIDDEN_SCHEMA_KEYS & set(node), f"{path} uses {FORBIDDEN_SCHEMA_KEYS & set(node)}"
        assert node.get("additionalProperties") is not False, path
        if "anyOf" in node:
            assert node.get("x-kubernetes-int-or-string") is True, f"{path}: anyOf only for int-or-string"
        if "properties" in node or "items" in node:
            assert "type" in node, f"{path} has no type"


def test_every_spec_field_is_documented_for_kubectl_explain():
    undocumented = []
    for kind, crd in CRD_BY_KIND.items():
        spec = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
        for path, node in _walk(spec):
            for name, prop in node.get("properties", {}).items():
                if not prop.get("description"):
                    undocumented.append(f"{kind}{path}/{name}")
    assert undocumented == []


def test_crd_identity_printer_columns_and_subresources():
    rft = CRD_BY_KIND["RFTJob"]
    version = rft["spec"]["versions"][0]
    assert rft["metadata"]["name"] == "rftjobs.kuberft.io"
    assert rft["spec"]["names"]["shortNames"] == ["rft", "rftj"]
    assert [c["name"] for c in version["additionalPrinterColumns"]] == ["Phase", "Step", "Reward", "Age"]
    assert version["subresources"] == {"status": {}}
    turbo = CRD_BY_KIND["TurboDeployment"]["spec"]["versions"][0]
    assert [c["name"] for c in turbo["additionalPrinterColumns"]] == ["Phase", "Ready", "URL", "Age"]
    assert turbo["subresources"]["scale"]["specReplicasPath"] == ".spec.replicas"
    grpo = version["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]["grpo"]
    assert grpo["properties"]["lossType"]["enum"] == ["grpo", "bnpo", "dr_grpo", "dapo"]
    assert grpo["properties"]["epsilon"] == {
        **grpo["properties"]["epsilon"], "minimum": 0.0, "exclusiveMinimum": True, "maximum": 1.0, "exclusiveMaximum": True
    }
    assert grpo["x-kubernetes-validations"][0]["fieldPath"] == ".epsilonHigh"


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_examples_are_valid_for_the_models_and_the_crds(path):
    for document in yaml.safe_load_all(path.read_text()):
        resource, problems = check_document(document, path.name)
        assert problems == []
        assert crd_errors(CRD_BY_KIND[document["kind"]], document) == []
        assert resource.metadata.name == document["metadata"]["name"]


def test_examples_cover_the_flagship_the_local_job_and_serving():
    kinds = {}
    for path in EXAMPLES:
        for document in yaml.safe_load_all(path.read_text()):
            kinds.setdefault(document["kind"], []).append(document)
    flagship = load(REPO / "examples" / "rftjob-triton.yaml", RFTJob)
    assert [r.kind for r in flagship.spec.rewards] == ["triton.format", "triton.compile", "triton.correctness"]
    assert flagship.spec.trainer.resources.limits["nvidia.com/gpu"] == 1
    turbo = load(REPO / "examples" / "turbodeployment.yaml", TurboDeployment)
    assert turbo.spec.adapter.from_rft_job == flagship.metadata.name


def _countdown():
    return yaml.safe_load((REPO / "examples" / "local-countdown.yaml").read_text())


def _turbo():
    return yaml.safe_load((REPO / "examples" / "turbodeployment.yaml").read_text())


def _set(doc, dotted, value):
    node = doc
    parts = dotted.split(".")
    for part in parts[:-1]:
        node = node[int(part)] if part.isdigit() else node.setdefault(part, {})
    node[parts[-1]] = value
    return doc


def _delete(doc, dotted):
    node = doc
    parts = dotted.split(".")
    for part in parts[:-1]:
        node = node[part]
    del node[parts[-1]]
    return doc


# (description, manifest, field path every validator must name, words of the message)
BAD_MANIFESTS = [
    ("epsilonHigh below epsilon", _set(_countdown(), "spec.grpo.epsilonHigh", 0.1), "spec.grpo.epsilonHigh", "at least epsilon"),
    ("group of one", _set(_countdown(), "spec.grpo.numGenerations", 1), "spec.grpo.numGenerations", "2"),
    ("unknown loss", _set(_countdown(), "spec.grpo.lossType", "ppo"), "spec.grpo.lossType", "dapo"),
    ("no rewards", _set(_countdown(), "spec.rewards", []), "spec.rewards", ""),
    ("custom reward without module", _set(_countdown(), "spec.rewards", [{"kind": "custom"}]), "spec.rewards[0].module", "module"),
    ("two dataset sources", _set(_countdown(), "spec.dataset.rows", [{"prompt": "x"}]), "spec.dataset", "exactly one"),
    ("held-out rows from two places", _set(_countdown(), "spec.dataset.eval", {"rows": [{"prompt": "x"}]}),
     "spec.dataset.evalFraction", "evalFraction (rows held out of the training source) or eval (a source of held-out rows), not both"),
    ("an eval source without rows", _set(_set(_countdown(), "spec.dataset.evalFraction", 0.0), "spec.dataset.eval", {}),
     "spec.dataset.eval", "exactly one of rows, configMap, uri or builtin"),
    ("prompt settings in the eval source", _set(_set(_countdown(), "spec.dataset.evalFraction", 0.0), "spec.dataset.eval",
                                               {"builtin": {"name": "countdown"}, "promptField": "q"}),
     "spec.dataset.eval.promptField", "unknown field"),
    ("no model", _delete(_countdown(), "spec.model"), "spec.model", ""),
    ("duplicate reward names", _set(_countdown(), "spec.rewards", [{"kind": "countdown"}, {"kind": "countdown"}]), "spec.rewards", "unique"),
    ("typo in a field", _set(_countdown(), "spec.grpo.learningrate", 0.1), "spec.grpo.learningrate", "unknown field"),
    ("name too long", _set(_countdown(), "metadata.name", "x" * 60), "metadata.name", "52"),
    ("bad quantity", _set(_countdown(), "spec.trainer", {"resources": {"limits": {"memory": "lots"}}}), "spec.trainer.resources.limits.memory", ""),
    ("negative learning rate", _set(_countdown(), "spec.grpo.learningRate", -1.0), "spec.grpo.learningRate", ""),
    ("no rollout servers", _set(_countdown(), "spec.rollout", {"mode": "server", "replicas": 0}), "spec.rollout.replicas",
     "greater than or equal to 1"),
    ("more GPU memory than there is", _set(_countdown(), "spec.rollout.gpuMemoryUtilization", 1.5), "spec.rollout.gpuMemoryUtilization",
     "less than or equal to 1"),
    ("unknown rollout mode", _set(_countdown(), "spec.rollout.mode", "remote"), "spec.rollout.mode", "'colocated' or 'server'"),
    ("draft without model", _set(_turbo(), "spec.speculator", {"type": "draft"}), "spec.speculator.draftModel", "draftModel"),
    ("adapter from two sources", _set(_turbo(), "spec.adapter.uri", "/adapters/a"), "spec.adapter", "exactly one"),
    ("autoscaling min above max", _set(_turbo(), "spec.autoscaling", {"minReplicas": 5, "maxReplicas": 2}), "spec.autoscaling.minReplicas", "exceed"),
    ("unknown speculator", _set(_turbo(), "spec.speculator.type", "eagle"), "spec.speculator.type", ""),
]


@pytest.mark.parametrize("manifest,field,words", [c[1:] for c in BAD_MANIFESTS], ids=[c[0] for c in BAD_MANIFESTS])
def test_bad_manifest_is_rejected_naming_the_field(manifest, field, words):
    _, problems = check_document(copy.deepcopy(manifest), "m.yaml")
    assert any(p.path == field and words in p.message for p in problems), [str(p) for p in problems]
    errors = crd_errors(CRD_BY_KIND[manifest["kind"]], manifest)
    assert any(e.startswith(field + ":") or e.startswith(field + "[") or e.startswith(field + ".") for e in errors), errors


def test_validate_command_prints_each_problem_with_its_path_and_fails(tmp_path):
    bad = tmp_path / "bad.yaml"
    documents = [_set(_countdown(), "spec.grpo.lossType", "ppo"), _set(_turbo(), "spec.speculator", {"type": "draft"})]
    bad.write_text(yaml.safe_dump_all(documents))
    result = subprocess.run(
        [sys.executable, "-m", "kuberft_operator.cli", "validate", str(bad), *map(str, EXAMPLES)],
        capture_output=True, text=True,
    )
    assert result.returncode == 1
    assert f"{bad}#0: spec.grpo.lossType: Input should be 'grpo', 'bnpo', 'dr_grpo' or 'dapo'" in result.stderr
    assert f"{bad}#1: spec.speculator.draftModel: type draft needs draftModel" in result.stderr
    for example in EXAMPLES:
        assert f"{example}: ok" in result.stdout


def test_validate_reports_unreadable_and_malformed_files(tmp_path):
    broken = tmp_path / "broken.yaml"
    broken.write_text("spec: [unclosed\n")
    wrong_kind = tmp_path / "pod.yaml"
    wrong_kind.write_text(yaml.safe_dump({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"}}))
    result = subprocess.run(
        [sys.executable, "-m", "kuberft_operator.cli", "validate", str(broken), str(wrong_kind), str(tmp_path / "missing.yaml")],
        capture_output=True, text=True,
    )
    assert result.returncode == 1
    assert f"{broken}: not valid YAML" in result.stderr
    assert f"{wrong_kind}: apiVersion: must be kuberft.io/v1alpha1, got 'v1'" in result.stderr
    assert f"{tmp_path / 'missing.yaml'}: cannot read" in result.stderr


def test_defaults_work_without_being_written():
    job = RFTJob.model_validate(
        {
            "apiVersion": "kuberft.io/v1alpha1", "kind": "RFTJob", "metadata": {"name": "minimal"},
            "spec": {"model": {"name": "m"}, "dataset": {"rows": [{"prompt": "p"}]}, "rewards": [{"kind": "exact_match"}]},
        }
    )
    assert job.spec.grpo.loss_type == "dapo"
    assert job.spec.grpo.effective_epsilon_high == 0.2
    assert job.spec.lora.target_modules == ["all-linear"]
    assert job.spec.rewards[0].effective_name == "exact_match"
    assert job.spec.reward_pool.sandbox.memory_mi_b == 4096
    assert job.to_wire()["spec"]["rewardPool"]["sandbox"]["memoryMiB"] == 4096


def test_crds_command_prints_applyable_yaml():
    result = subprocess.run([sys.executable, "-m", "kuberft_operator.cli", "crds"], capture_output=True, text=True, check=True)
    documents = list(yaml.safe_load_all(result.stdout))
    assert [d["metadata"]["name"] for d in documents] == ["rftjobs.kuberft.io", "turbodeployments.kuberft.io"]


def test_help_explains_each_command():
    result = subprocess.run([sys.executable, "-m", "kuberft_operator.cli", "--help"], capture_output=True, text=True, check=True)
    assert "validate" in result.stdout and "crds" in result.stdout
    result = subprocess.run([sys.executable, "-m", "kuberft_operator.cli", "validate", "--help"], capture_output=True, text=True, check=True)
    assert "field path" in result.stdout
