"""Run one piece of untrusted work in a forked, locked-down child process.

A worker that already imported torch and triton forks a child per evaluation (a zygote, so no
evaluation pays interpreter start-up). Before the untrusted code runs, the child:

- starts a new session, so the worker can always kill it, and closes every inherited file
  descriptor but the result pipe and its stdout/stderr pipe;
- enters new user, mount, network, IPC and UTS namespaces where the kernel allows it: no
  network at all (only a loopback that is down), every mount read-only, a private tmpfs on
  /tmp, and an empty /proc, so no other process (the server with its credentials included) can
  be seen;
- gets resource limits: CPU time, address space, file size, open files, no core dumps;
- runs with a scrubbed environment in the private temporary directory;
- installs a seccomp filter (see `seccomp.py`): no sockets, no new processes, no signals to
  anyone but itself, no session changes, no mounts or namespaces.

The worker reads the child's result pipe and its output with size caps, and kills it at the
wall-clock deadline. Where namespaces are not available (some container runtimes), the seccomp
filter, the limits and a private directory still apply, and `Isolation` says what is missing.
"""

from __future__ import annotations

import ctypes
import errno
import os
import resource
import selectors
import shutil
import signal
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass, field
from typing import Callable

from . import seccomp

CLONE_NEWNS = 0x00020000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWNET = 0x40000000

MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
MS_REMOUNT = 32
MS_NOATIME = 1024
MS_NODIRATIME = 2048
MS_BIND = 4096
MS_REC = 16384
MS_PRIVATE = 1 << 18
MS_RELATIME = 1 << 21
MS_STRICTATIME = 1 << 24

_MOUNT_FLAGS = {
    "nosuid": MS_NOSUID,
    "nodev": MS_NODEV,
    "noexec": MS_NOEXEC,
    "noatime": MS_NOATIME,
    "nodiratime": MS_NODIRATIME,
    "relatime": MS_RELATIME,
    "strictatime": MS_STRICTATIME,
}

# Exit statuses the child uses for its own failures (not the untrusted code's).
EXIT_SANDBOX_SETUP_FAILED = 97
EXIT_HARNESS_FAILED = 98

SANDBOX_TMP = "/tmp"


@dataclass(frozen=True)
class Limits:
    """Per-evaluation limits."""

    wall_seconds: float = 60.0
    cpu_seconds: int = 60
    memory_bytes: int | None = 4 << 30
    """Address-space limit (RLIMIT_AS) of the child, which already holds torch and triton
    (about 3.3 GiB of address space on the CPU); None on a GPU, whose driver reserves
    hundreds of GiB of address space (use the pod's memory limit there)."""
    tmp_bytes: int = 64 << 20
    """Size of the private /tmp and of any file the child writes."""
    result_bytes: int = 64 << 20
    """Largest result the child may send back."""
    log_bytes: int = 16 << 10
    """Output (stdout/stderr) kept: the tail beyond this is dropped."""
    open_files: int = 256
    allow_processes: bool = False
    """Let the child start processes (needed on a GPU, where Triton calls ptxas)."""


@dataclass(frozen=True)
class Isolation:
    """Which isolation mechanisms work on this kernel/container (probed once per worker)."""

    user_namespace: bool = False
    network_namespace: bool = False
    mount_namespace: bool = False
    read_only_filesystem: bool = False
    private_tmp: bool = False
    hidden_proc: bool = False
    seccomp: bool = False
    problems: tuple[str, ...] = ()

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class ChildRun:
    """What the worker saw of one sandboxed child."""

    result: bytes = b""
    log: str = ""
    exit_code: int | None = None
    signal: int | None = None
    timed_out: bool = False
    result_overflow: bool = False
    wall_seconds: float = 0.0
    cpu_seconds: float = 0.0
    max_rss_bytes: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def clean_exit(self) -> bool:
        return self.exit_code == 0 and not self.timed_out and not self.result_overflow


_libc = ctypes.CDLL(None, use_errno=True)


def _check(rc: int, what: str) -> None:
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _mount(source: str | None, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    _libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
    rc = _libc.mount(
        source.encode() if source else None,
        target.encode(),
        fstype.encode() if fstype else None,
        flags,
        data.encode() if data else None,
    )
    _check(rc, f"mount {target}")


def _mount_points() -> list[tuple[str, int]]:
    """(mount point, per-mount flags to keep) from /proc/self/mountinfo, parents first."""
    points = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            parts = line.split()
            target = parts[4].replace("\\040", " ").replace("\\011", "\t").replace("\\012", "\n").replace("\\134", "\\")
            flags = 0
            for option in parts[5].split(","):
                flags |= _MOUNT_FLAGS.get(option, 0)
            points.append((target, flags))
    return points


def _write(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


def _enter_namespaces(limits: Limits, want: Isolation | None) -> tuple[bool, list[str]]:
    """Called in the child. Applies every namespace-based protection that works; returns
    whether the child is in its own mount namespace, and the problems. When `want` (the probed
    capabilities) says namespaces work, failing to enter them is fatal."""
    problems: list[str] = []
    uid, gid = os.getuid(), os.getgid()
    try:
        _check(_libc.unshare(CLONE_NEWUSER | CLONE_NEWNS | CLONE_NEWNET | CLONE_NEWIPC | CLONE_NEWUTS), "unshare")
        _write("/proc/self/setgroups", "deny")
        _write("/proc/self/uid_map", f"0 {uid} 1")
        _write("/proc/self/gid_map", f"0 {gid} 1")
    except OSError as e:
        if want is not None and want.user_namespace:
            raise
        problems.append(f"no user namespace ({e})")
        if os.geteuid() == 0:
            try:  # root without user namespaces (a privileged container): namespaces directly.
                _check(_libc.unshare(CLONE_NEWNS | CLONE_NEWNET | CLONE_NEWIPC | CLONE_NEWUTS), "unshare")
            except OSError as e2:
                problems.append(f"no namespaces ({e2})")
                return False, problems
        else:
            return False, problems
    _mount(None, "/", None, MS_REC | MS_PRIVATE)
    points = _mount_points()
    failed = []
    for target, keep in points:
        try:
            _mount(None, target, None, MS_REMOUNT | MS_BIND | MS_RDONLY | keep)
        except OSError as e:
            if e.errno not in (errno.ENOENT, errno.EACCES, errno.EPERM, errno.EINVAL):
                raise
            failed.append(target)
    if failed:
        problems.append("could not make read-only: " + ", ".join(failed[:5]))
    _mount("tmpfs", SANDBOX_TMP, "tmpfs", MS_NOSUID | MS_NODEV, f"size={limits.tmp_bytes},mode=1777")
    _mount("tmpfs", "/proc", "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC | MS_RDONLY, "size=4k,mode=555")
    return True, problems


def _set_limits(limits: Limits) -> None:
    cpu = max(1, int(limits.cpu_seconds))
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    resource.setrlimit(resource.RLIMIT_FSIZE, (limits.tmp_bytes, limits.tmp_bytes))
    resource.setrlimit(resource.RLIMIT_NOFILE, (limits.open_files, limits.open_files))
    if limits.memory_bytes is not None:
        resource.setrlimit(resource.RLIMIT_AS, (limits.memory_bytes, limits.memory_bytes))


def scrubbed_environment(home: str) -> dict[str, str]:
    """The only environment untrusted code sees: nothing of the service's."""
    env = {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "HOME": home,
        "TMPDIR": home,
        "LANG": "C.UTF-8",
        "OMP_NUM_THREADS": "1",
        "OPENBLAS_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        "TRITON_CACHE_DIR": os.path.join(home, "triton-cache"),
    }
    for name in ("TRITON_INTERPRET", "CUDA_VISIBLE_DEVICES", "NVIDIA_VISIBLE_DEVICES"):
        if name in os.environ:
            env[name] = os.environ[name]
    return env


def _close_fds(keep: set[int]) -> None:
    try:
        fds = [int(name) for name in os.listdir("/proc/self/fd")]
    except OSError:
        fds = list(range(3, 1024))
    for fd in fds:
        if fd not in keep and fd > 2:
            try:
                os.close(fd)
            except OSError:
                pass


def _child(
    work: Callable[[int], None], result_fd: int, log_fd: int, limits: Limits, want: Isolation | None, private_dir: str
) -> None:
    """The forked child: lock down, then run `work(result_fd)`. Never returns."""
    code = EXIT_HARNESS_FAILED
    try:
        stage = "setup"
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)
        os.dup2(log_fd, 1)
        os.dup2(log_fd, 2)
        _close_fds({0, 1, 2, result_fd})
        os.setsid()
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGPIPE):
            signal.signal(sig, signal.SIG_DFL)
        namespaced, _ = _enter_namespaces(limits, want)
        home = SANDBOX_TMP if namespaced else private_dir
        os.chdir(home)
        env = scrubbed_environment(home)
        os.environ.clear()
        os.environ.update(env)
        if not namespaced and os.geteuid() == 0:
            os.setgid(65534)  # root without namespaces: drop to nobody
            os.setuid(65534)
        _set_limits(limits)
        if seccomp.supported():
            seccomp.install(os.getpid(), allow_processes=limits.allow_processes)
        stage = "work"
        sys.stdout = os.fdopen(1, "w", buffering=1, closefd=False)
        sys.stderr = os.fdopen(2, "w", buffering=1, closefd=False)
        work(result_fd)
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    except BaseException:  # the child must never return into the worker's code
        try:
            os.write(2, traceback.format_exc().encode(errors="replace")[-4000:])
        except OSError:
            pass
        code = EXIT_SANDBOX_SETUP_FAILED if stage == "setup" else EXIT_HARNESS_FAILED
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        except Exception:  # noqa: BLE001 - the streams may be broken by the untrusted code
            pass
        os._exit(code)


def start_child(work: Callable[[int], None], result_w: int, log_w: int, limits: Limits, isolation: Isolation | None) -> int:
    """Fork a sandboxed child that runs `work(result_w)` with `log_w` as its stdout/stderr;
    returns its pid. The caller keeps (and closes) its own copies of the two descriptors."""
    private_dir = tempfile.mkdtemp(prefix="kuberft-sandbox-")
    os.chmod(private_dir, 0o777)
    pid = os.fork()
    if pid == 0:
        _child(work, result_w, log_w, limits, isolation, private_dir)
    # The child's copy of the directory is what it uses (without namespaces): remove it once it
    # is gone; with namespaces the child never sees it (it works in its private /tmp).
    _private_dirs[pid] = private_dir
    return pid


_private_dirs: dict[int, str] = {}


def collect(result_r: int, log_r: int, limits: Limits, deadline: float, kill: Callable[[], None]) -> ChildRun:
    """Read a child's result and output pipes until both close, with size caps, calling `kill`
    at the deadline or on a result flood. Closes both descriptors. Fills result, log,
    timed_out and result_overflow."""
    run = ChildRun()
    result = bytearray()
    log_tail = bytearray()
    log_dropped = 0
    selector = selectors.DefaultSelector()
    selector.register(result_r, selectors.EVENT_READ, "result")
    selector.register(log_r, selectors.EVENT_READ, "log")
    open_streams = 2
    try:
        while open_streams:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                run.timed_out = True
                break
            for key, _ in selector.select(timeout=remaining):
                chunk = os.read(key.fd, 1 << 16)
                if not chunk:
                    selector.unregister(key.fd)
                    open_streams -= 1
                elif key.data == "result":
                    if len(result) + len(chunk) > limits.result_bytes:
                        run.result_overflow = True
                        open_streams = 0
                        break
                    result += chunk
                else:
                    log_tail += chunk
                    if len(log_tail) > 2 * limits.log_bytes:
                        log_dropped += len(log_tail) - limits.log_bytes
                        del log_tail[: len(log_tail) - limits.log_bytes]
        if run.timed_out or run.result_overflow:
            kill()
    finally:
        selector.close()
        os.close(result_r)
        os.close(log_r)
    run.result = bytes(result)
    if len(log_tail) > limits.log_bytes:
        log_dropped += len(log_tail) - limits.log_bytes
        del log_tail[: len(log_tail) - limits.log_bytes]
    run.log = bytes(log_tail).decode(errors="replace")
    if log_dropped:
        run.log = f"[... {log_dropped} bytes of output dropped ...]\n" + run.log
    return run


@dataclass(frozen=True)
class ChildExit:
    """How a child ended, as its parent's wait4 saw it."""

    exit_code: int | None
    signal: int | None
    cpu_seconds: float
    max_rss_bytes: int

    def apply(self, run: ChildRun) -> ChildRun:
        run.exit_code, run.signal = self.exit_code, self.signal
        run.cpu_seconds, run.max_rss_bytes = self.cpu_seconds, self.max_rss_bytes
        return run


def wait_child(pid: int, deadline: float) -> ChildExit:
    """Reap a child started by `start_child`, killing it if it outlives `deadline`."""
    _, status, usage = _wait(pid, deadline)
    shutil.rmtree(_private_dirs.pop(pid, ""), ignore_errors=True)
    exit_code = os.WEXITSTATUS(status) if os.WIFEXITED(status) else None
    sig = os.WTERMSIG(status) if os.WIFSIGNALED(status) else None
    return ChildExit(exit_code, sig, usage.ru_utime + usage.ru_stime, usage.ru_maxrss * 1024)


def run_sandboxed(work: Callable[[int], None], limits: Limits, isolation: Isolation | None = None) -> ChildRun:
    """Fork a sandboxed child that runs `work(result_fd)` and collect what it sends.

    `work` writes its result to the file descriptor it is given; the child's stdout and stderr
    are captured (tail only). The child is killed at `limits.wall_seconds`."""
    result_r, result_w = os.pipe()
    log_r, log_w = os.pipe()
    start = time.monotonic()
    deadline = start + limits.wall_seconds
    try:
        pid = start_child(work, result_w, log_w, limits, isolation)
    finally:
        os.close(result_w)
        os.close(log_w)
    run = collect(result_r, log_r, limits, deadline, lambda: kill_child(pid))
    wait_child(pid, deadline + 5.0).apply(run)
    run.wall_seconds = time.monotonic() - start
    return run


def kill_child(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)  # the child leads its own session and process group
    except OSError:
        pass
    try:
        os.kill(pid, signal.SIGKILL)
    except OSError:
        pass


def _wait(pid: int, deadline: float):
    """waitpid with a deadline, killing the child if it outlives it (e.g. stuck closing pipes)."""
    while True:
        wpid, status, usage = os.wait4(pid, os.WNOHANG)
        if wpid == pid:
            return wpid, status, usage
        if time.monotonic() > deadline:
            kill_child(pid)
            return os.wait4(pid, 0)
        time.sleep(0.002)


def probe_isolation() -> Isolation:
    """Find out, in a throw-away child, which protections this machine allows."""
    import json

    limits = Limits(wall_seconds=20, cpu_seconds=20, memory_bytes=None)
    result_r, result_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(result_r)
        status: dict = {}
        try:
            namespaced, problems = _enter_namespaces(limits, None)
            status["problems"] = problems
            status["user_namespace"] = not any(p.startswith("no user namespace") for p in problems)
            status["namespaces"] = namespaced
            if namespaced:
                status["read_only"] = not any(p.startswith("could not make read-only") for p in problems)
                status["hidden_proc"] = not os.path.exists("/proc/self/status")
                status["private_tmp"] = _is_private_tmp()
                status["network_namespace"] = _only_loopback()
            if seccomp.supported():
                import socket

                seccomp.install(os.getpid())
                try:
                    socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                except OSError:
                    status["seccomp"] = True
        except BaseException as e:  # noqa: BLE001 - report, never return into the worker
            status.setdefault("problems", []).append(f"probe failed: {e!r}")
        os.write(result_w, json.dumps(status).encode())
        os._exit(0)
    os.close(result_w)
    data = b""
    while chunk := os.read(result_r, 65536):
        data += chunk
    os.close(result_r)
    os.waitpid(pid, 0)
    try:
        status = json.loads(data or b"{}")
    except ValueError:
        status = {"problems": ["probe child sent no report"]}
    namespaced = bool(status.get("namespaces"))
    problems = list(status.get("problems", []))
    if not status.get("seccomp"):
        problems.append("seccomp filter not available: sockets and process creation are not blocked")
    return Isolation(
        user_namespace=bool(status.get("user_namespace")),
        network_namespace=namespaced and bool(status.get("network_namespace")),
        mount_namespace=namespaced,
        read_only_filesystem=namespaced and bool(status.get("read_only")),
        private_tmp=namespaced and bool(status.get("private_tmp")),
        hidden_proc=namespaced and bool(status.get("hidden_proc")),
        seccomp=bool(status.get("seccomp")),
        problems=tuple(problems),
    )


def _is_private_tmp() -> bool:
    probe = os.path.join(SANDBOX_TMP, ".kuberft-probe")
    try:
        with open(probe, "w") as f:
            f.write("x")
        os.unlink(probe)
        return True
    except OSError:
        return False


def _only_loopback() -> bool:
    try:
        import socket

        names = [name for _, name in socket.if_nameindex()]
    except OSError:
        return False
    return names == ["lo"]
