"""The four images the chart deploys, built for real and run, on a machine without Docker or a
registry: `scripts/build-images.sh --local-base` (what `make images` runs) builds them with podman
on a Debian 12 base it makes with mmdebstrap, from the current sources, and `buildah run` runs
commands in them as the user the chart runs each one as. Each command answers --help; the
trainer imports torch, transformers and peft; the reward image scores a shipped kernel task in
its sandbox; the serve image answers a completion from a tiny model; the operator without RBAC
says so in one sentence; no image carries the test suite, caches, .git or the build's CA bundle;
and each image stays within its size budget."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import pytest
from kuberft_operator import __version__
from kuberft_operator.builders import IMAGE_UID

from ..support.refusing_apiserver import USER, refusing_apiserver
from .chart import REPO, one, render

# The fixture builds all four images: with an empty layer store, on 2 cores, 11 minutes (13 for
# the whole module); after a change of the kuberft sources, 3 (5).
pytestmark = [pytest.mark.slow, pytest.mark.timeout(3600)]

REGISTRY = "localhost/kuberft-test"
NAMES = ("operator", "trainer", "reward", "serve")
# Size budgets in MB (10^6 bytes, as podman reports them) of these test builds. Every image
# starts from the Debian 12 minbase with Python (220 MB). The operator adds a venv with kopf, the
# Kubernetes client and pydantic (107 MB). The three torch images carry torch from PyPI with the
# nvidia-* CUDA wheels it needs to import at all (PyPI has no CPU-only build) and triton: one
# 5.5 GB layer that trainer and serve share; the trainer adds a C compiler and python3-dev for
# Triton's launcher (462 MB) and transformers, peft, accelerate, matplotlib (266 MB), serve
# transformers and peft (189 MB); the reward image copies its venv (torch, triton, numpy) onto
# the distroless stand-in. Each budget is the size measured when it was set plus ~10%: an added
# dependency (kopf or matplotlib where they do not belong, torch in the operator image, a second
# copy of site-packages, a forgotten cache) fails, the drift between two torch releases mostly
# does not. Move a budget on purpose, with the new measured size in SIZES_MEASURED.
SIZE_BUDGET_MB = {
    "operator": 360,
    "trainer": 7200,
    "reward": 6350,
    "serve": 6600,
}
SIZES_MEASURED = "operator 327, trainer 6525, reward 5775, serve 5987 MB (2026-12, torch 2.15.0 with CUDA 13 wheels, triton 3.9.0)"


def _sh(*args: str, timeout: float = 600, check: bool = True, **kwargs) -> subprocess.CompletedProcess:
    done = subprocess.run(list(args), check=False, capture_output=True, text=True, timeout=timeout, **kwargs)
    if check:
        assert done.returncode == 0, f"{' '.join(args)}: exit {done.returncode}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done


def image(name: str) -> str:
    return f"{REGISTRY}/{name}:{__version__}"


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict:
    """Build the four images as `make images` does: {"seconds": the build's time, "log": its output}."""
    _sh(str(REPO / "scripts" / "install-tools.sh"), "images", timeout=900)
    log = tmp_path_factory.mktemp("build") / "build.log"
    start = time.monotonic()
    with log.open("w") as out:
        done = subprocess.run(
            [str(REPO / "scripts" / "build-images.sh"), "--local-base"],
            env={**os.environ, "IMAGE_REGISTRY": REGISTRY, "IMAGE_TAG": __version__, "DOCKER": "podman"},
            stdout=out, stderr=subprocess.STDOUT, timeout=3300, check=False,
        )
    text = log.read_text()
    assert done.returncode == 0, f"scripts/build-images.sh failed (exit {done.returncode}):\n{text[-6000:]}"
    return {"seconds": time.monotonic() - start, "log": text}


@contextmanager
def container(name: str):
    """A working container of the image (`buildah from`), removed afterwards."""
    ctr = _sh("buildah", "from", "--pull=never", "--quiet", image(name)).stdout.strip()
    try:
        yield ctr
    finally:
        _sh("buildah", "rm", ctr, check=False)


def run_in(ctr: str, *command: str, user: str | None = None, volumes: tuple[str, ...] = (), env: tuple[str, ...] = (),
           timeout: float = 600) -> subprocess.CompletedProcess:
    """Run a command in the container with chroot isolation (the one podman can use here), as the
    image's USER unless `user` is given; `volumes` are HOST:CONTAINER[:ro], `env` NAME=VALUE."""
    return subprocess.run(
        ["buildah", "run", "--isolation", "chroot", *(["--user", user] if user else []),
         *(arg for volume in volumes for arg in ("-v", volume)), *(arg for pair in env for arg in ("--env", pair)),
         ctr, "--", *command],
        check=False, capture_output=True, text=True, timeout=timeout,
    )


def inspect(name: str, template: str) -> str:
    return _sh("podman", "image", "inspect", "--format", template, image(name)).stdout.strip()


def chart_uid(name: str) -> int:
    """The uid the chart (operator Deployment) or the operator's pods (the others) run the image as."""
    if name == "operator":
        return one(render(), "Deployment")["spec"]["template"]["spec"]["securityContext"]["runAsUser"]
    return IMAGE_UID[name]


# The command each image's pods run, as the chart and the operator's builders give it.
HELP = {
    "operator": ["kuberft", "operator", "--help"],
    "trainer": ["kuberft", "train", "--help"],
    "reward": ["kuberft", "reward", "serve", "--help"],
    "serve": ["kuberft", "serve", "--help"],
}


@pytest.mark.parametrize("name", NAMES)
def test_the_command_answers_help_as_the_user_the_chart_runs_it_as(built, name):
    uid = chart_uid(name)
    assert inspect(name, "{{.Config.User}}") == f"{uid}:{uid}"
    entrypoint = json.loads(inspect(name, "{{json .Config.Entrypoint}}")) or []
    if entrypoint:  # operator, reward: the chart and the operator give arguments only
        assert entrypoint == HELP[name][:-1]
    with container(name) as ctr:
        done = run_in(ctr, *HELP[name], user=f"{uid}:{uid}")
        assert done.returncode == 0, done.stderr
        assert done.stdout.startswith(f"usage: {' '.join(HELP[name][:-1])}")
        assert run_in(ctr, "python3", "-c", "import os; print(os.getuid(), os.getgid())").stdout.split() == [str(uid)] * 2


def test_the_trainer_imports_torch_transformers_and_peft(built):
    with container("trainer") as ctr:
        done = run_in(ctr, "python3", "-c", "import torch, transformers, peft, kuberft_trainer.train; "
                      "print(torch.__version__, transformers.__version__, peft.__version__, (torch.ones(2, 3) @ torch.ones(3)).tolist())")
    assert done.returncode == 0, done.stderr
    torch_version, _, _, product = done.stdout.split(" ", 3)
    assert torch_version.startswith("2.") and product.strip() == "[3.0, 3.0]"


def test_the_reward_image_scores_a_shipped_task_in_its_sandbox(built, tmp_path, capsys):
    from tests.reward.conftest import solution

    (tmp_path / "answer.txt").write_text(solution("softmax"))
    os.chmod(tmp_path, 0o755)  # readable by the image's user
    with container("reward") as ctr:
        probe = run_in(ctr, "python3", "-c", "import json; from kuberft_reward.sandbox import probe_isolation; "
                       "print(json.dumps(probe_isolation().as_dict()))")
        assert probe.returncode == 0, probe.stderr
        isolation = json.loads(probe.stdout.splitlines()[-1])
        with capsys.disabled():
            print("\nreward sandbox in `buildah run --isolation chroot`, what it lost:", *isolation["problems"] or ["nothing"], sep="\n  ")
        # A chrooted process may not create a user namespace (clone(2): EPERM "in a chroot
        # environment"), so under buildah's chroot isolation the sandbox loses its namespaces and
        # says so; the seccomp filter still holds. Where the runtime allows them, nothing is lost.
        assert isolation["seccomp"] is True
        if not isolation["user_namespace"]:
            assert isolation["problems"][0].startswith("unshare(CLONE_NEWUSER|CLONE_NEWNS|CLONE_NEWNET|") and "refused" in isolation["problems"][0]
        else:
            assert isolation["problems"] == []
        done = run_in(ctr, "kuberft", "reward", "eval", "--task", "softmax", "--completion", "/answer/answer.txt", "--json",
                      "--device", "cpu", volumes=(f"{tmp_path}:/answer:ro",))
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert {n: r["score"] for n, r in result["rewards"].items()} == {"triton.format": 1.0, "triton.compile": 1.0, "triton.correctness": 1.0}
    assert result["hacked"] is False


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_the_serve_image_answers_a_completion_from_a_tiny_model(built, tmp_path):
    from kuberft_core.api import ModelSpec, SpeculatorSpec
    from kuberft_core.models import build_tiny_model
    from kuberft_serve.config import ServeConfig
    from kuberft_serve.loading import build_engine
    from kuberft_serve.sampling import SamplingParams

    model = build_tiny_model(tmp_path / "model", alphabet="abcdefghij ,.\n", hidden_size=32, num_layers=2, intermediate_size=64, seed=1)
    for path in (tmp_path, model, *model.iterdir()):  # readable by the image's user
        path.chmod(0o755 if path.is_dir() else 0o644)
    engine = build_engine(ServeConfig(model=ModelSpec(name=str(model), dtype="float64"), speculator=SpeculatorSpec(type="none"), device="cpu"))
    prompt = "abc abc a"
    expected = engine.tokenizer.decode(
        engine.generate(engine.tokenizer.encode(prompt), SamplingParams(max_tokens=16, temperature=0.0)), skip_special_tokens=True
    )

    port = _free_port()
    with container("serve") as ctr:
        server = subprocess.Popen(
            ["buildah", "run", "--isolation", "chroot", "-v", f"{model}:/model:ro", ctr, "--",
             "kuberft", "serve", "--model", "/model", "--served-model-name", "tiny", "--dtype", "float64", "--device", "cpu",
             "--host", "127.0.0.1", "--port", str(port)],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        try:
            deadline = time.monotonic() + 300
            while True:
                assert server.poll() is None, f"kuberft serve exited: {server.stdout.read()[-3000:]}"
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as answer:
                        if answer.status == 200:
                            break
                except (urllib.error.URLError, OSError):
                    pass
                assert time.monotonic() < deadline, "kuberft serve did not become healthy in 300 s"
                time.sleep(1)
            request = urllib.request.Request(
                f"http://127.0.0.1:{port}/v1/completions",
                data=json.dumps({"model": "tiny", "prompt": prompt, "max_tokens": 16, "temperature": 0}).encode(),
                headers={"Content-Type": "application/json"},
            )
            with urllib.request.urlopen(request, timeout=120) as answer:
                completion = json.load(answer)
        finally:
            server.terminate()
            server.wait(30)
    assert completion["object"] == "text_completion" and completion["model"] == "tiny"
    assert completion["choices"][0]["text"] == expected


def _own_lines(stderr: str) -> list[str]:
    """stderr less the lines `buildah run` adds when the command fails."""
    return [line for line in stderr.splitlines() if line not in ("subprocess exited with status 1", "Error: exit status 1")]


def test_the_operator_without_rbac_says_so_in_one_sentence(built, tmp_path):
    with container("operator") as ctr:
        done = run_in(ctr, "kuberft", "operator")
        assert done.returncode == 1 and "Traceback" not in done.stderr
        assert _own_lines(done.stderr) == [
            "kuberft operator: cannot log in to Kubernetes: no credentials: not in a pod and neither KUBECONFIG nor ~/.kube/config is set"
        ]
        with refusing_apiserver(tmp_path) as (kubeconfig, refused):
            os.chmod(tmp_path, 0o755)
            kubeconfig.chmod(0o644)
            done = run_in(ctr, "kuberft", "operator", "--metrics-port", "0", volumes=(f"{tmp_path}:/kube:ro",), env=("KUBECONFIG=/kube/kubeconfig",))
    assert done.returncode == 1 and "Traceback" not in done.stderr and len(_own_lines(done.stderr)) == 1
    assert f'refuses the operator\'s requests (403 Forbidden: /apis/kuberft.io/v1alpha1/rftjobs is forbidden: User "{USER}"' in done.stderr
    assert "The operator needs the RBAC its Helm chart grants" in done.stderr and refused


# ------------------------------------------------------------------ what the images carry


@contextmanager
def mounted(reference: str):
    """The root filesystem of an image, read from the host (`buildah mount`)."""
    ctr = _sh("buildah", "from", "--pull=never", "--quiet", reference).stdout.strip()
    try:
        yield Path(_sh("buildah", "mount", ctr).stdout.strip())
    finally:
        _sh("buildah", "umount", ctr, check=False)
        _sh("buildah", "rm", ctr, check=False)


def _walk(root: Path) -> dict[str, Path]:
    """Every path under root (files, links and directories), by its path relative to root."""
    paths = {}
    for directory, dirs, files in os.walk(root):
        for entry in dirs + files:
            path = Path(directory, entry)
            paths[str(path.relative_to(root))] = path
    return paths


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def base(built) -> tuple[set[str], str]:
    """The paths of the base image the build started from, and the digest of its CA bundle."""
    reference = next(line.split()[-1] for line in built["log"].splitlines() if line.startswith("build-images: base "))
    with mounted(reference) as root:
        return set(_walk(root)), _sha256(root / "etc/ssl/certs/ca-certificates.crt")


def leftovers(root: Path, base_paths: set[str], host_bundle: Path | None) -> list[str]:
    """What the build added to the image at `root` that an image must not carry: bytecode caches,
    pip (or any) caches, .git, the sources' build folder, files in /tmp, our test suite, and the
    CA bundle the build ran with (`host_bundle`, when it is not the base's own)."""
    # our test suite by its files below a subfolder (tests/reward/test_attacks.py, ...): names like
    # tests/__init__.py are in third-party packages too
    tests = tuple("/" + str(p.relative_to(REPO)) for p in (REPO / "tests").glob("*/**/*.py"))
    base_bundle = root / "etc/ssl/certs/ca-certificates.crt"
    if host_bundle is not None and base_bundle.is_file() and base_bundle.read_bytes() == host_bundle.read_bytes():
        host_bundle = None  # a machine whose bundle is Debian's: nothing to tell apart
    found = []
    for relative, path in _walk(root).items():
        # Only what the build added; bytecode that dpkg compiles for the distribution's own Python
        # (when apt installs python3-venv, say) belongs to the OS.
        if relative in base_paths or relative.startswith(("usr/lib/python3", "usr/share/python3")):
            continue
        cache = set(Path(relative).parts) & {"__pycache__", ".git", ".cache", ".pytest_cache"} or path.suffix == ".pyc"
        if cache or relative.split("/")[0] in ("src", "tmp") or relative.endswith(tests):
            found.append(relative)
        elif host_bundle is not None and path.is_file() and not path.is_symlink() \
                and path.stat().st_size == host_bundle.stat().st_size and path.read_bytes() == host_bundle.read_bytes():
            found.append(relative + " (the CA bundle mounted into the build)")
    return found


@pytest.mark.parametrize("name", NAMES)
def test_no_image_carries_tests_caches_git_or_the_builds_ca_bundle(built, base, name):
    base_paths, base_bundle = base
    host_bundle = Path(os.environ.get("SSL_CERT_FILE", "/etc/ssl/certs/ca-certificates.crt"))
    with mounted(image(name)) as root:
        assert leftovers(root, base_paths, host_bundle if host_bundle.is_file() else None) == []
        assert _sha256(root / "etc/ssl/certs/ca-certificates.crt") == base_bundle, "the CA bundle is not the base's"
        assert (root / "opt/kuberft").is_dir() and not (root / "opt/kuberft").is_symlink(), "the walk looked at the image"
    env = json.loads(inspect(name, "{{json .Config.Env}}"))
    assert [e for e in env if e.split("=")[0].startswith(("PIP_", "SSL_", "REQUESTS_", "CURL_")) or "TOKEN" in e] == []


def test_image_sizes_stay_within_their_budgets(built, capsys):
    sizes = {name: int(inspect(name, "{{.Size}}")) // 1_000_000 for name in NAMES}
    with capsys.disabled():
        print(f"\nimages built in {built['seconds']:.0f} s (scripts/build-images.sh --local-base):")
        for name in NAMES:
            print(f"  {image(name):44} {sizes[name]:6d} MB (budget {SIZE_BUDGET_MB[name]} MB)")
    over = {name: f"{sizes[name]} MB > {SIZE_BUDGET_MB[name]} MB" for name in NAMES if sizes[name] > SIZE_BUDGET_MB[name]}
    assert over == {}, f"over budget (measured when the budgets were set: {SIZES_MEASURED})"
