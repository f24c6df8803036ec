"""`make images` (scripts/build-images.sh) builds the four images under the names the chart
deploys, and each Dockerfile makes an image the chart's pods can run: a numeric non-root user (so
the kubelet can enforce runAsNonRoot), pinned base images, nothing that needs a writable root
filesystem. Here with a fake engine; tests/helm/test_images_built.py builds and runs them."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from kuberft_operator.cli import build_parser

from .chart import REPO, one, render

DOCKERFILES = {
    "operator": "operator/Dockerfile",
    "trainer": "trainer_image/Dockerfile",
    "reward": "reward_image/Dockerfile",
    "serve": "serve_image/Dockerfile",
}
FAKE_DOCKER = """#!/bin/sh
echo "$@" >> "{log}"
[ "$1" = info ] && exit {info_status}
[ "$1 $2" = "image inspect" ] && {{ grep -q "^import " "{log}" || exit 1; }}
exit 0
"""
FAKE_MMDEBSTRAP = """#!/bin/sh
echo "mmdebstrap $@" >> "{log}"
for last; do :; done
echo rootfs > "$last"
"""


def _fake_repo(tmp_path: Path, missing: tuple[str, ...] = (), engine_up: bool = True) -> tuple[Path, Path, Path]:
    """A copy of the Makefile and pyproject.toml with placeholder Dockerfiles, and a fake `docker`
    that records its arguments: the target is tested without a Docker engine."""
    repo = tmp_path / "repo"
    repo.mkdir(parents=True)
    shutil.copy(REPO / "Makefile", repo / "Makefile")
    shutil.copy(REPO / "pyproject.toml", repo / "pyproject.toml")
    (repo / "scripts").mkdir()
    shutil.copy(REPO / "scripts" / "build-images.sh", repo / "scripts" / "build-images.sh")
    for name, path in DOCKERFILES.items():
        if name not in missing:
            (repo / path).parent.mkdir(parents=True, exist_ok=True)
            (repo / path).write_text("FROM scratch\n")
    log = tmp_path / "docker.log"
    docker = tmp_path / "docker"
    docker.write_text(FAKE_DOCKER.format(log=log, info_status=0 if engine_up else 1))
    docker.chmod(0o755)
    return repo, docker, log


def _make_images(repo: Path, docker: Path, *extra: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(["make", "-s", "-C", str(repo), "images", f"DOCKER={docker}", *extra], check=False, capture_output=True, text=True, timeout=60,
                          env={**os.environ, **(env or {})})


def _builds(log: Path) -> list[str]:
    return [line for line in log.read_text().splitlines() if line.startswith("build ")]


def test_make_images_builds_the_four_images_the_chart_deploys(tmp_path):
    repo, docker, log = _fake_repo(tmp_path)
    result = _make_images(repo, docker)
    assert result.returncode == 0, result.stderr
    calls = log.read_text().splitlines()
    assert calls[0] == "info"
    built = {line.split(" -t ")[1].split()[0]: line.split(" -f ")[1].split()[0] for line in _builds(log)}
    container = one(render(), "Deployment")["spec"]["template"]["spec"]["containers"][0]
    args = build_parser().parse_args(["operator", *container["args"]])
    assert built == {
        container["image"]: "operator/Dockerfile",
        args.trainer_image: "trainer_image/Dockerfile",
        args.reward_image: "reward_image/Dockerfile",
        args.serve_image: "serve_image/Dockerfile",
    }
    assert all(line.endswith(" .") for line in _builds(log)), "the build context is the repository root"


def test_make_images_takes_registry_and_tag(tmp_path):
    repo, docker, log = _fake_repo(tmp_path)
    assert _make_images(repo, docker, "IMAGE_REGISTRY=registry.local/ml", "IMAGE_TAG=dev").returncode == 0
    assert "build -f serve_image/Dockerfile -t registry.local/ml/serve:dev ." in _builds(log)


def test_make_images_says_what_is_missing(tmp_path):
    repo, docker, log = _fake_repo(tmp_path, missing=("reward",))
    result = _make_images(repo, docker)
    assert result.returncode != 0
    assert "build-images: reward_image/Dockerfile is missing (image reward)" in result.stderr
    assert log.read_text().splitlines() == ["info"], "nothing is built when one image cannot be"

    repo, docker, _ = _fake_repo(tmp_path / "no-engine", engine_up=False)
    result = _make_images(repo, docker)
    assert result.returncode != 0
    assert f"build-images: no container engine answers '{docker} info'" in result.stderr


def test_local_base_builds_every_image_on_a_debian_base_made_here_without_a_registry(tmp_path):
    """With --local-base every FROM is the base made with mmdebstrap (once: it is cached), torch
    comes from PyPI alone, and the network's CA bundle is mounted over the base's for RUN steps
    only (podman's --volume), never copied."""
    repo, _, log = _fake_repo(tmp_path)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    podman = bin_dir / "podman"
    podman.write_text(FAKE_DOCKER.format(log=log, info_status=0))
    (bin_dir / "mmdebstrap").write_text(FAKE_MMDEBSTRAP.format(log=log))
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    ca = tmp_path / "corporate-ca.pem"
    ca.write_text("-----BEGIN CERTIFICATE-----\n")
    env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "KUBERFT_CACHE": str(tmp_path / "cache"), "SSL_CERT_FILE": str(ca)}

    result = _make_images(repo, podman, "IMAGE_BUILD_FLAGS=--local-base", env=env)
    assert result.returncode == 0, result.stderr
    calls = log.read_text().splitlines()
    rootfs = next(tmp_path.glob("cache/images/debian-bookworm-*.tar"))
    base = "localhost/kuberft-base:" + rootfs.name.removeprefix("debian-").removesuffix(".tar")
    assert [c for c in calls if c.startswith("mmdebstrap")] == [
        f"mmdebstrap --quiet --format=tar --variant=minbase --include=python3,ca-certificates bookworm {rootfs}.partial"
    ]
    assert [c for c in calls if c.startswith("import")] == [f"import --change ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin {rootfs} {base}"]
    builds = _builds(log)
    assert len(builds) == 4
    for line in builds:
        assert line.startswith("build --isolation chroot --format docker ")
        for arg in ("BASE_IMAGE", "BUILD_IMAGE", "RUNTIME_IMAGE", "GPU_IMAGE"):
            assert f" --build-arg {arg}={base} " in line
        assert " --build-arg TORCH_INDEX_URL= " in line
        assert f" --volume {ca}:/etc/ssl/certs/ca-certificates.crt:ro " in line

    assert _make_images(repo, podman, "IMAGE_BUILD_FLAGS=--local-base", env=env).returncode == 0
    again = log.read_text().splitlines()
    assert len(_builds(log)) == 8
    assert len([c for c in again if c.startswith(("mmdebstrap", "import"))]) == 2, "the base is made and imported once"


# ------------------------------------------------------------------ the Dockerfiles


def _final_stage(text: str) -> tuple[dict[str, str], list[str]]:
    """(ARG defaults, instructions of the last stage) with line continuations joined."""
    lines = re.sub(r"\\\n", " ", text).splitlines()
    instructions = [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]
    args = {}
    for line in instructions:
        match = re.match(r"ARG\s+(\w+)=(\S+)", line)
        if match:
            args[match.group(1)] = match.group(2).strip('"')
    last_from = max(i for i, line in enumerate(instructions) if line.upper().startswith("FROM "))
    return args, instructions[last_from:]


def _dockerfile(name: str) -> str:
    path = REPO / DOCKERFILES[name]
    if not path.exists():
        pytest.skip(f"{DOCKERFILES[name]} does not exist yet (written by the {name} component)")
    return path.read_text()


@pytest.mark.parametrize("name", sorted(DOCKERFILES))
def test_image_runs_as_a_numeric_non_root_user(name):
    _, stage = _final_stage(_dockerfile(name))
    users = [line.split()[1] for line in stage if line.upper().startswith("USER ")]
    assert users, f"{DOCKERFILES[name]}: the final stage sets no USER (it would run as root)"
    uid = users[-1].split(":")[0]
    assert uid.isdigit() and int(uid) != 0, f"{DOCKERFILES[name]}: USER {users[-1]} must be a numeric non-root uid for runAsNonRoot"


@pytest.mark.parametrize("name", sorted(DOCKERFILES))
def test_image_bases_are_pinned(name):
    text = _dockerfile(name)
    args, _ = _final_stage(text)
    stages = set()
    for line in re.findall(r"^FROM\s+(.+)$", text, flags=re.MULTILINE | re.IGNORECASE):
        parts = line.split()
        image = re.sub(r"\$\{?(\w+)\}?", lambda m: args.get(m.group(1), m.group(0)), parts[0])
        if len(parts) >= 3 and parts[1].upper() == "AS":
            stages.add(parts[2])
        if image in stages or image == "scratch":
            continue
        assert "@sha256:" in image or re.search(r":[^/]+$", image), f"{DOCKERFILES[name]}: base {image} has no tag"
        assert not image.endswith(":latest"), f"{DOCKERFILES[name]}: base {image} is not pinned"


@pytest.mark.parametrize("name", ["operator", "reward", "serve", "trainer"])
def test_image_needs_no_writable_root_filesystem(name):
    """The chart's and the operator's pods mount writable volumes only at /tmp (and the trainer's
    /checkpoints): an image must not declare VOLUMEs or point caches elsewhere on the root."""
    _, stage = _final_stage(_dockerfile(name))
    assert not [line for line in stage if line.upper().startswith("VOLUME")], f"{DOCKERFILES[name]}: VOLUME makes an anonymous writable volume"
    writable = ("/tmp", "/checkpoints", "/dev/shm")
    for line in stage:
        if line.upper().startswith("ENV "):
            for key, value in re.findall(r"(\w*(?:CACHE|HOME)\w*)=(/\S*)", line):
                assert value.startswith(writable), (
                    f"{DOCKERFILES[name]}: ENV {key}={value} is on the root filesystem, which the pod mounts read-only; "
                    "use a path under /tmp"
                )


# ------------------------------------------------------------------ the layers the images share


def _instructions(name: str) -> list[str]:
    """The Dockerfile's instructions, continuations joined, comments and blank lines dropped."""
    lines = re.sub(r"\\\n", " ", _dockerfile(name)).splitlines()
    return [" ".join(line.split()) for line in lines if line.strip() and not line.strip().startswith("#")]


def _prefix(name: str, last: str) -> list[str]:
    """From the first FROM (its base named by a neutral word) to the first instruction starting with `last`."""
    instructions = _instructions(name)
    start = next(i for i, line in enumerate(instructions) if line.startswith("FROM "))
    end = next(i for i, line in enumerate(instructions) if line.startswith(last))
    return ["FROM base"] + instructions[start + 1:end + 1]


def test_the_torch_images_share_their_first_layers():
    """trainer, serve and the reward image's build stage begin with the same instructions, up to
    the torch install: on one base those layers are one (a node running several of the images
    pulls torch once, a build of all four installs it once). Editing one copy alone breaks that."""
    torch_layer = "RUN --mount=type=cache,target=/root/.cache pip install --no-compile"
    prefixes = {name: _prefix(name, torch_layer) for name in ("trainer", "serve", "reward")}
    assert prefixes["serve"] == prefixes["trainer"]
    assert prefixes["reward"] == prefixes["trainer"]
    # the operator image shares the layers before torch
    assert _prefix("operator", "WORKDIR") == _prefix("trainer", "WORKDIR")


def test_the_shared_torch_layer_installs_the_range_pyproject_gives():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    ranges = {req.replace(" ", "") for extra in project["optional-dependencies"].values() for req in extra if re.match(r"torch\s*[<>=!~]", req)}
    assert len(ranges) == 1, f"the extras disagree on torch: {ranges}"
    for name in ("trainer", "serve", "reward"):
        installs = [line for line in _instructions(name) if line.startswith("RUN") and re.search(r'"torch[<>=!~]', line)]
        assert installs and all(f'"{next(iter(ranges))}"' in line for line in installs), f"{DOCKERFILES[name]}: {installs}"
