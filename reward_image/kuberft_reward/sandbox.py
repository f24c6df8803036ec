"""Run one piece of untrusted work in a forked, locked-down child process.

A clean process that already imported torch and triton (the zygote, or a worker) forks a child
per evaluation, so no evaluation pays interpreter start-up. The child (`start_child`'s pid):

- runs as pid 1 of a PID namespace of its own where the kernel allows it: it sees no other
  process, and its end takes every process it started with it (the kernel kills a PID
  namespace with its first process). A forking process that may create PID namespaces (root,
  or after `prepare_zygote`) forks the child straight into a new one; otherwise the child
  unshares one and forks pid 1 of it, then only waits and ends the same way (same exit status,
  or killed by the same signal), and pid 1 dies with it (PR_SET_PDEATHSIG);
- starts a new session, so its whole process group can be killed, and closes every inherited
  file descriptor but the result pipe and its stdout/stderr pipe;
- enters new user, mount, network, IPC and UTS namespaces where the kernel allows it;
- builds a new root filesystem and pivots into it: a read-only tmpfs holding, bound read-only
  at their own paths, only what the Python runtime needs (`runtime_paths`: sys.prefix and
  friends, every sys.path entry, the directories of imported top-level packages and of loaded
  shared libraries, /lib and /usr/lib), /dev/null, /dev/zero, /dev/full, /dev/random,
  /dev/urandom, a private tmpfs on /tmp (the working directory) and an empty /proc. /etc,
  /root, /home, /var, the network and every other process are out of sight;
- drops its capabilities (inside the user namespace it is the worker's user, or nobody for a
  root worker), gets resource limits (CPU time, address space, file size, open files, no core
  dumps) and a scrubbed environment;
- installs a seccomp allowlist (see `seccomp.py`): no sockets, no new processes (unless
  allowed), no signals to anyone but itself, no limit changes, no session changes, no mounts
  or namespaces.

Whoever holds the pipes reads them with `collect` (size caps, kill at the deadline) and may
kill the sandbox with `kill_child` from any process of the same user; the child's parent reaps
it with `wait_child`, which also kills whatever is left of its process group. Where namespaces
are not available (some container runtimes), the seccomp filter, the limits and a private
directory still apply, and `Isolation.problems` says exactly what is lost.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import glob
import os
import platform
import resource
import select
import selectors
import shutil
import signal
import stat
import struct
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import asdict, dataclass, field
from typing import Callable

from . import seccomp

CLONE_NEWNS = 0x00020000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
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
MNT_DETACH = 2

_MOUNT_FLAGS = {
    "nosuid": MS_NOSUID,
    "nodev": MS_NODEV,
    "noexec": MS_NOEXEC,
    "noatime": MS_NOATIME,
    "nodiratime": MS_NODIRATIME,
    "relatime": MS_RELATIME,
    "strictatime": MS_STRICTATIME,
}

_AT_FDCWD = -100
_AT_RECURSIVE = 0x8000
_MOUNT_ATTR_RDONLY = 0x1
_MOUNT_ATTR_NOSUID = 0x2
_MOUNT_ATTR_NODEV = 0x4
_PR_SET_PDEATHSIG = 1
_LINUX_CAPABILITY_VERSION_3 = 0x20080522
_SYSCALL_NUMBERS = {  # not wrapped by every libc
    "x86_64": {"pivot_root": 155, "capget": 125, "capset": 126, "mount_setattr": 442},
    "aarch64": {"pivot_root": 41, "capget": 90, "capset": 91, "mount_setattr": 442},
}
_SYSCALL_NUMBERS["amd64"] = _SYSCALL_NUMBERS["x86_64"]
_SYSCALL_NUMBERS["arm64"] = _SYSCALL_NUMBERS["aarch64"]

# Exit statuses the child uses for its own failures (not the untrusted code's).
EXIT_SANDBOX_SETUP_FAILED = 97
EXIT_HARNESS_FAILED = 98

SANDBOX_TMP = "/tmp"
_STAGING = "/proc"
"""Where the new root is assembled before pivot_root: a directory that always exists and that no
path of the runtime lives under (the host's /proc is never shown to the child anyway)."""

_LIBRARY_DIRS = ("/lib", "/lib64", "/lib32", "/libx32", "/usr/lib", "/usr/lib64", "/usr/lib32", "/usr/libx32")
_DEVICES = ("/dev/null", "/dev/zero", "/dev/full", "/dev/random", "/dev/urandom")
_NEVER_WHOLE = {"/", "/etc", "/root", "/home", "/var", "/srv", "/tmp", "/proc", "/sys", "/dev", "/run", "/boot", "/mnt", "/media", "/opt"}
"""Directories that are never bound whole (a runtime path inside them is)."""
_NOT_FROM_MAPS = ("/dev/", "/proc/", "/sys/", "/tmp/", "/run/", "/var/")


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
    """Let the child start processes (needed on a GPU, where Triton calls ptxas). The child
    then also sees /usr, /bin, /sbin, /etc/ld.so.cache and the NVIDIA device nodes."""


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
    pid_namespace: bool = False
    """The work runs as pid 1 of its own PID namespace: it sees no other process, and every
    process it starts dies with it."""
    private_root: bool = False
    """The child's root is a new tmpfs with only the runtime's paths (read-only): the host's
    other files (/etc, /root, /home, /var...) do not exist for it."""

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


# Problems, one sentence each: what a child is exposed to without the mechanism.
LOST_PID_NAMESPACE = (
    "no PID namespace: the child can see other processes' pids (the seccomp filter still refuses to signal them), "
    "and processes it leaves behind are killed only through its process group"
)
LOST_MOUNT_NAMESPACE = (
    "no mount namespace: the host filesystem is readable, and writable wherever the worker's user may write; "
    "the child works in a private directory under the worker's temporary directory"
)
LOST_PROC = (
    "no private /proc: the child can read /proc, including other processes' command lines and the environment "
    "of processes running as the same user"
)
LOST_NETWORK_NAMESPACE = "no network namespace: only the seccomp filter (no sockets) keeps the child off the network"
LOST_USER_NAMESPACE_ROOT = (
    "no user namespace: namespaces are entered as the host's root, and the child then runs as nobody (65534)"
)
LOST_PRIVATE_ROOT = (
    "host filesystem readable: the private root could not be built, so the child can read (not write) every file "
    "the worker's user can read"
)
LOST_SECCOMP = (
    "no seccomp filter: the child may open sockets, start processes, signal other processes of the same user "
    "and change its own limits"
)

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
_libc.unshare.argtypes = [ctypes.c_int]
_libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
_libc.syscall.restype = ctypes.c_long

# What the child's set-up found (in the child's own copy of this module; `probe_isolation`
# reports it).
_setup: dict = {}


def _check(rc: int, what: str) -> None:
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _syscall(name: str, *args) -> int:
    return _libc.syscall(ctypes.c_long(_SYSCALL_NUMBERS[platform.machine().lower()][name]), *args)


def _mount(source: str | None, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    rc = _libc.mount(
        source.encode() if source else None,
        target.encode(),
        fstype.encode() if fstype else None,
        flags,
        data.encode() if data else None,
    )
    _check(rc, f"mount {target}")


def _mount_points(text: str) -> list[tuple[str, int]]:
    """(mount point, per-mount flags to keep) from the text of a mountinfo file, parents first."""
    points = []
    for line in text.splitlines():
        parts = line.split()
        target = parts[4].replace("\\040", " ").replace("\\011", "\t").replace("\\012", "\n").replace("\\134", "\\")
        flags = 0
        for option in parts[5].split(","):
            flags |= _MOUNT_FLAGS.get(option, 0)
        points.append((target, flags))
    return points


def _read_fd(fd: int) -> str:
    os.lseek(fd, 0, os.SEEK_SET)
    chunks = []
    while chunk := os.read(fd, 1 << 16):
        chunks.append(chunk)
    return b"".join(chunks).decode(errors="replace")


def _write(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


# --------------------------------------------------------------------------- what the child may see


@dataclass(frozen=True)
class _RootPlan:
    binds: tuple[tuple[str, bool], ...]
    """(real path, is a directory), bound read-only at the same path; no one inside another."""
    symlinks: tuple[tuple[str, str], ...]
    """(path, link text): the symlinks met on the way to a bound path (e.g. /lib -> usr/lib)."""
    devices: tuple[str, ...]


_plans: dict[tuple, _RootPlan] = {}


def runtime_paths(allow_processes: bool = False) -> list[str]:
    """Every host path the child is shown (read-only), before symlinks are resolved and nested
    paths merged: the interpreter's prefixes, sys.path, the imported top-level modules and
    packages (editable installs and custom reward modules included), the system library
    directories and those of every shared library already loaded, LD_LIBRARY_PATH."""
    paths = [sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix]
    paths += [os.path.abspath(p) for p in sys.path if isinstance(p, str) and p]
    for name, module in list(sys.modules.items()):
        if "." in name or module is None:
            continue
        namespace = getattr(module, "__dict__", {})  # never the module's __getattr__ (lazy imports)
        locations = namespace.get("__path__")
        if locations is not None:
            try:
                paths += [p for p in locations if isinstance(p, str)]
            except Exception:  # noqa: BLE001 - an exotic __path__
                pass
        elif isinstance(namespace.get("__file__"), str):
            paths.append(namespace["__file__"])
    paths += _LIBRARY_DIRS
    paths += sorted(_mapped_directories())
    paths += [p for p in os.environ.get("LD_LIBRARY_PATH", "").split(os.pathsep) if p]
    if allow_processes:  # the GPU path: ptxas, the C compiler Triton builds its launcher with, ldconfig
        paths += ["/usr", "/bin", "/sbin", "/etc/ld.so.cache"]
    return [os.path.normpath(p) for p in paths if os.path.isabs(p)]


def _mapped_directories() -> set[str]:
    """Directories of the files mapped into this process (shared libraries, the interpreter)."""
    directories = set()
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                parts = line.rstrip("\n").split(None, 5)
                if len(parts) == 6 and parts[5].startswith("/") and not parts[5].endswith(" (deleted)"):
                    if not parts[5].startswith(_NOT_FROM_MAPS):
                        directories.add(os.path.dirname(parts[5]))
    except OSError:
        pass
    return directories


def _symlinks_on(path: str, links: dict[str, str], depth: int = 0) -> None:
    """Record every symlink met while resolving `path`, so that it resolves the same way in the
    new root."""
    if depth > 20:
        return
    current = "/"
    for part in path.strip("/").split("/"):
        if not part:
            continue
        candidate = os.path.join(current, part)
        if os.path.islink(candidate):
            text = os.readlink(candidate)
            links[candidate] = text
            _symlinks_on(os.path.normpath(os.path.join(current, text)), links, depth + 1)
            current = os.path.realpath(candidate)
        else:
            current = candidate


def _root_plan(allow_processes: bool) -> _RootPlan:
    """What the child's root holds; computed in the forking process and cached while sys.path
    and the imported modules stay the same."""
    key = (allow_processes, tuple(p for p in sys.path if isinstance(p, str)), len(sys.modules))
    plan = _plans.get(key)
    if plan is not None:
        return plan
    real: dict[str, bool] = {}
    links: dict[str, str] = {}
    for path in runtime_paths(allow_processes):
        if path in _NEVER_WHOLE or not os.path.exists(path):
            continue
        resolved = os.path.realpath(path)
        if resolved in _NEVER_WHOLE or resolved.startswith(("/proc/", "/sys/", "/dev/")):
            continue
        _symlinks_on(path, links)
        real[resolved] = os.path.isdir(resolved)
    binds: list[tuple[str, bool]] = []
    for path in sorted(real):
        if not any(path.startswith(kept + "/") for kept, is_dir in binds if is_dir):
            binds.append((path, real[path]))

    def inside_a_bind(path: str) -> bool:
        return any(path == b or path.startswith(b + "/") for b, is_dir in binds if is_dir)

    symlinks = tuple(sorted((p, t) for p, t in links.items() if not inside_a_bind(os.path.dirname(p))))
    devices = [d for d in _DEVICES if _is_char_device(d)]
    if allow_processes:
        devices += sorted(d for d in glob.glob("/dev/nvidia*") if _is_char_device(d))
        devices += sorted(d for d in glob.glob("/dev/nvidia-caps/*") if _is_char_device(d))
    plan = _RootPlan(tuple(binds), symlinks, tuple(devices))
    _plans.clear()
    _plans[key] = plan
    return plan


def _is_char_device(path: str) -> bool:
    try:
        return stat.S_ISCHR(os.stat(path).st_mode)
    except OSError:
        return False


def _build_root(plan: _RootPlan, limits: Limits) -> None:
    """In the child's own mount namespace: assemble the new root on a tmpfs at _STAGING and
    pivot into it. Paths stay identical (modules are already imported from them)."""
    info = os.open("/proc/self/mountinfo", os.O_RDONLY | os.O_CLOEXEC)  # for kernels without mount_setattr
    try:
        new = _STAGING
        _mount("tmpfs", new, "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, "size=1m,mode=755")
        os.mkdir(new + SANDBOX_TMP)
        _mount("tmpfs", new + SANDBOX_TMP, "tmpfs", MS_NOSUID | MS_NODEV, f"size={limits.tmp_bytes},mode=1777")
        os.mkdir(new + "/proc", 0o555)
        os.mkdir(new + "/dev", 0o755)
        for path, text in plan.symlinks:
            os.makedirs(new + os.path.dirname(path), exist_ok=True)
            os.symlink(text, new + path)
        for path, is_dir in plan.binds:
            target = new + path
            if is_dir:
                os.makedirs(target, exist_ok=True)
            else:
                os.makedirs(os.path.dirname(target), exist_ok=True)
                os.close(os.open(target, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o644))
            _mount(path, target, None, MS_BIND | MS_REC)
            _make_read_only(target, info)
        for device in plan.devices:
            target = new + device
            os.makedirs(os.path.dirname(target), exist_ok=True)
            os.close(os.open(target, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o644))
            _mount(device, target, None, MS_BIND)
        os.chdir(new)
        _check(_syscall("pivot_root", b".", b"."), "pivot_root")
        _check(_libc.umount2(b".", MNT_DETACH), "umount the host's root")
        os.chdir("/")
        _mount(None, "/", None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC)
    finally:
        os.close(info)


def _make_read_only(target: str, info_fd: int) -> None:
    """Make the bind mount at `target` and every mount below it read-only (nosuid, nodev)."""
    attr = ctypes.create_string_buffer(struct.pack("QQQQ", _MOUNT_ATTR_RDONLY | _MOUNT_ATTR_NOSUID | _MOUNT_ATTR_NODEV, 0, 0, 0), 32)
    rc = _syscall("mount_setattr", ctypes.c_int(_AT_FDCWD), target.encode(), ctypes.c_uint(_AT_RECURSIVE), attr, ctypes.c_size_t(32))
    if rc == 0:
        return
    if ctypes.get_errno() not in (errno.ENOSYS, errno.EPERM):
        _check(rc, f"mount_setattr {target}")
    for point, keep in _mount_points(_read_fd(info_fd)):  # before Linux 5.12: one mount at a time
        if point == target or point.startswith(target + "/"):
            _mount(None, point, None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV | keep)


def _remount_host_read_only(limits: Limits) -> list[str]:
    """Fallback when no private root can be built: the host's mounts, read-only, with a private
    /tmp and an empty /proc. Returns the mount points that stayed writable."""
    with open("/proc/self/mountinfo") as f:
        points = _mount_points(f.read())
    failed = []
    for target, keep in points:
        try:
            _mount(None, target, None, MS_REMOUNT | MS_BIND | MS_RDONLY | keep)
        except OSError as e:
            if e.errno not in (errno.ENOENT, errno.EACCES, errno.EPERM, errno.EINVAL):
                raise
            failed.append(target)
    _mount("tmpfs", SANDBOX_TMP, "tmpfs", MS_NOSUID | MS_NODEV, f"size={limits.tmp_bytes},mode=1777")
    _mount("tmpfs", "/proc", "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC | MS_RDONLY, "size=4k,mode=555")
    return failed


# --------------------------------------------------------------------------- the child


def _enter_namespaces(want: Isolation | None, pid_done: bool) -> int:
    """Called in the child. Unshares every namespace that works and returns the CLONE_* flags
    it got (0: none). When `want` (the probed capabilities) says namespaces work, failing to
    enter them is fatal; with `want` None, the best available set is taken. `pid_done`: the
    child already is pid 1 of a new PID namespace."""
    base = CLONE_NEWNS | CLONE_NEWNET | CLONE_NEWIPC | CLONE_NEWUTS
    pid = 0 if pid_done else CLONE_NEWPID
    root = os.geteuid() == 0
    if want is None:
        attempts = [CLONE_NEWUSER | base | pid, CLONE_NEWUSER | base]
        if root:  # root without user namespaces (a privileged container): namespaces directly
            attempts += [base | pid, base]
    elif want.mount_namespace:
        attempts = [base | (CLONE_NEWUSER if want.user_namespace else 0) | (pid if want.pid_namespace else 0)]
    else:
        attempts = []
    uid, gid = os.getuid(), os.getgid()
    for flags in attempts:
        if _libc.unshare(flags) != 0:
            err = ctypes.get_errno()
            if want is not None:
                raise OSError(err, f"unshare({_flag_names(flags)}): {os.strerror(err)}")
            if flags == attempts[0]:  # what was refused first says the most
                _setup["problems"].append(f"unshare({_flag_names(flags)}) refused by the kernel or the container runtime: {os.strerror(err)}")
            continue
        if flags & CLONE_NEWUSER:
            # Inside, the child is the worker's own user (nobody for a root worker): never root,
            # so nothing it executes regains capabilities.
            _write("/proc/self/setgroups", "deny")
            _write("/proc/self/uid_map", f"{uid or 65534} {uid} 1")
            _write("/proc/self/gid_map", f"{gid or 65534} {gid} 1")
        _setup["flags"] = flags | (CLONE_NEWPID if pid_done else 0)
        return flags
    _setup["flags"] = CLONE_NEWPID if pid_done else 0
    return 0


def _flag_names(flags: int) -> str:
    names = [("CLONE_NEWUSER", CLONE_NEWUSER), ("CLONE_NEWNS", CLONE_NEWNS), ("CLONE_NEWNET", CLONE_NEWNET),
             ("CLONE_NEWIPC", CLONE_NEWIPC), ("CLONE_NEWUTS", CLONE_NEWUTS), ("CLONE_NEWPID", CLONE_NEWPID)]
    return "|".join(name for name, bit in names if flags & bit)


def _fork_pid_one(result_fd: int) -> None:
    """In the first child, after unshare(CLONE_NEWPID) (when the forking process could not
    fork it straight into a new PID namespace): fork pid 1 of the new namespace, which returns
    from here and runs the work. The first child waits for it and ends the same way (exit
    status, or the signal that killed it); it never returns."""
    alive_r, alive_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(alive_w)
        _setup["alive_fd"] = alive_r
        return
    os.close(alive_r)  # alive_w stays open while this process lives
    os.close(result_fd)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.dup2(devnull, 2)
    try:
        _, status = os.waitpid(pid, 0)
    except ChildProcessError:
        os._exit(EXIT_SANDBOX_SETUP_FAILED)
    if os.WIFEXITED(status):
        os._exit(os.WEXITSTATUS(status))
    sig = os.WTERMSIG(status)
    try:
        if sig not in (signal.SIGKILL, signal.SIGSTOP):
            signal.signal(sig, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {sig})
        os.kill(os.getpid(), sig)
    finally:
        os._exit(128 + sig)


def _guard_against_orphaning() -> None:
    """In pid 1 of the new namespace: die with the first child. Set after the last credential
    change (which would clear it); the pipe says whether the parent already died."""
    _check(_libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0), "prctl(PR_SET_PDEATHSIG)")
    alive = _setup.pop("alive_fd")
    readable, _, _ = select.select([alive], [], [], 0)
    if readable:  # end of file: the first child is gone
        os._exit(EXIT_SANDBOX_SETUP_FAILED)
    os.close(alive)


def _drop_capabilities() -> None:
    header = ctypes.create_string_buffer(struct.pack("Ii", _LINUX_CAPABILITY_VERSION_3, 0), 8)
    data = ctypes.create_string_buffer(bytes(24), 24)
    _check(_syscall("capset", header, data), "capset")


def _contain(
    limits: Limits, want: Isolation | None, flags: int, plan: _RootPlan | None, private_dir: str | None, relayed: bool
) -> None:
    """Called in the process that runs the work: filesystem, identity, limits, seccomp.
    `relayed`: its parent is the first child, which it must not outlive."""
    problems = _setup["problems"]
    root_built = remounted = False
    if flags & CLONE_NEWNS:
        _mount(None, "/", None, MS_REC | MS_PRIVATE)
        try:
            if want is not None and not want.private_root:
                raise OSError(errno.ENOTSUP, "the isolation probe found no private root")
            _build_root(plan, limits)
            root_built = True
        except OSError as e:
            if want is not None and want.private_root:
                raise
            problems.append(f"{LOST_PRIVATE_ROOT} ({e})")
            _libc.umount2(_STAGING.encode(), MNT_DETACH)
            failed = _remount_host_read_only(limits)
            remounted = not failed
            if failed:
                problems.append("host filesystem writable at " + ", ".join(failed[:5]) + ": these mounts could not be made read-only")
        home = SANDBOX_TMP
    else:
        home = private_dir
    _setup.update(root=root_built, remounted=remounted)
    os.chdir(home)
    env = scrubbed_environment(home)
    os.environ.clear()
    os.environ.update(env)
    if flags & CLONE_NEWUSER:
        _drop_capabilities()
    elif os.geteuid() == 0:  # root in the host's user namespace: drop to nobody
        os.setgroups([])
        os.setgid(65534)
        os.setuid(65534)
    if relayed:
        _guard_against_orphaning()
    _set_limits(limits)
    if seccomp.supported():
        seccomp.install(os.getpid(), allow_processes=limits.allow_processes)
        _setup["seccomp"] = True


def _set_limits(limits: Limits) -> None:
    cpu = max(1, int(limits.cpu_seconds))
    # SIGXCPU at the soft limit, SIGKILL a second later. Pid 1 of a PID namespace ignores
    # SIGXCPU (the kernel shields a namespace's init from signals it does not handle), so there
    # the SIGKILL ends it, with more than `cpu` seconds used: how a CPU timeout is recognised.
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
    for name in ("TRITON_INTERPRET", "CUDA_VISIBLE_DEVICES", "NVIDIA_VISIBLE_DEVICES", "TRITON_LIBCUDA_PATH", "TRITON_PTXAS_PATH"):
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
    work: Callable[[int], None],
    result_fd: int,
    log_fd: int,
    limits: Limits,
    want: Isolation | None,
    plan: _RootPlan,
    private_dir: str | None,
    pid_done: bool,
) -> None:
    """The forked child: lock down, then run `work(result_fd)`. Never returns. `pid_done`: it
    was forked straight into a new PID namespace (it is pid 1 there)."""
    code = EXIT_HARNESS_FAILED
    stage = "setup"
    try:
        _setup.clear()
        _setup["problems"] = []
        if result_fd < 3:  # keep it clear of the standard descriptors set below
            result_fd = fcntl.fcntl(result_fd, fcntl.F_DUPFD_CLOEXEC, 3)
        if log_fd < 3:
            log_fd = fcntl.fcntl(log_fd, fcntl.F_DUPFD_CLOEXEC, 3)
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)
        os.dup2(log_fd, 1)
        os.dup2(log_fd, 2)
        _close_fds({0, 1, 2, result_fd})
        os.setsid()
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGPIPE):
            signal.signal(sig, signal.SIG_DFL)
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        flags = _enter_namespaces(want, pid_done)
        relayed = bool(flags & CLONE_NEWPID)
        if relayed:
            _fork_pid_one(result_fd)  # returns only in pid 1 of the new namespace
        if pid_done:
            flags |= CLONE_NEWPID
        _contain(limits, want, flags, plan, private_dir, relayed)
        stage = "work"
        sys.stdout = os.fdopen(1, "w", buffering=1, closefd=False)
        sys.stderr = os.fdopen(2, "w", buffering=1, closefd=False)
        work(result_fd)
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    except BaseException as e:  # the child must never return into the worker's code
        try:
            text = traceback.format_exc()
            if stage == "setup":
                text += f"sandbox set-up failed: {type(e).__name__}: {e}\n"
            os.write(2, text.encode(errors="replace")[-4000:])
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
    returns its pid, which `kill_child` and `wait_child` take (killing it kills every process of
    the sandbox). The caller keeps (and closes) its own copies of the two descriptors."""
    plan = _root_plan(limits.allow_processes) if isolation is None or isolation.mount_namespace else None
    private_dir = None
    if isolation is None or not isolation.mount_namespace:
        private_dir = tempfile.mkdtemp(prefix="kuberft-sandbox-")
        os.chmod(private_dir, 0o777)
    pid = None
    if (isolation is None or isolation.pid_namespace) and _can_fork_into_new_pid_namespace():
        pid = _fork_in_new_pid_namespace(lambda: _child(work, result_w, log_w, limits, isolation, plan, private_dir, True))
    if pid is None:
        pid = os.fork()
        if pid == 0:
            _child(work, result_w, log_w, limits, isolation, plan, private_dir, False)
    # Without namespaces the child works in the private directory: removed once it is gone.
    if private_dir:
        _private_dirs[pid] = private_dir
    return pid


_private_dirs: dict[int, str] = {}


def _fork_in_new_pid_namespace(child: Callable[[], None]) -> int | None:
    """Fork from a short-lived thread that first unshares CLONE_NEWPID, which changes only that
    thread's namespace for children: the child is pid 1 of a new PID namespace, and the calling
    thread is untouched. None if the kernel refuses."""
    outcome: list = []

    def fork() -> None:
        try:
            _check(_libc.unshare(CLONE_NEWPID), "unshare(CLONE_NEWPID)")
        except OSError:
            outcome.append(None)
            return
        try:
            pid = os.fork()
        except BaseException as e:  # noqa: BLE001 - raised in the caller's thread
            outcome.append(e)
            return
        if pid == 0:
            child()  # never returns
        outcome.append(pid)

    thread = threading.Thread(target=fork, name="kuberft-sandbox-fork", daemon=True)
    thread.start()
    thread.join()
    if outcome and isinstance(outcome[0], BaseException):
        raise outcome[0]
    return outcome[0] if outcome else None


_pid_namespace_in_caller: dict[int, bool] = {}


def _can_fork_into_new_pid_namespace() -> bool:
    """Whether this process may create PID namespaces (CAP_SYS_ADMIN in its user namespace:
    root, or after `prepare_zygote`); found out once per process in a throw-away thread."""
    me = os.getpid()
    if me not in _pid_namespace_in_caller:
        works: list[bool] = []
        thread = threading.Thread(target=lambda: works.append(_libc.unshare(CLONE_NEWPID) == 0), daemon=True)
        thread.start()
        thread.join()
        _pid_namespace_in_caller.clear()
        _pid_namespace_in_caller[me] = bool(works and works[0])
    return _pid_namespace_in_caller[me]


def prepare_zygote() -> bool:
    """Optional: call once in the process that will call `start_child` (the zygote), while it is
    still single-threaded, before any child is started.

    A process without CAP_SYS_ADMIN cannot create PID namespaces, so each of its children needs
    one more fork of the whole process (an intermediate that unshares a PID namespace and waits
    for pid 1 of it): about as much time again as the fork itself. This moves the caller into a
    user namespace of its own, mapping its user and group to themselves (files, pids and
    signals work as before; a process without capabilities gives up nothing), where it may
    create PID namespaces and so fork children straight into them.

    Returns whether children will be forked straight into new PID namespaces. False (user
    namespaces refused, or the process is multi-threaded) leaves `start_child` working as
    without this call."""
    if not _has_cap_sys_admin():  # (checked without a thread: unshare needs a single-threaded caller)
        try:
            _enter_own_user_namespace()
        except OSError:
            return False
    _pid_namespace_in_caller.clear()
    return _can_fork_into_new_pid_namespace()


def _has_cap_sys_admin() -> bool:
    header = ctypes.create_string_buffer(struct.pack("Ii", _LINUX_CAPABILITY_VERSION_3, 0), 8)
    data = ctypes.create_string_buffer(24)
    if _syscall("capget", header, data) != 0:
        return False
    effective = struct.unpack("6I", data.raw)[0]
    return bool(effective & (1 << 21))


def _enter_own_user_namespace() -> None:
    uid, gid = os.getuid(), os.getgid()
    for attempt in range(50):
        if _libc.unshare(CLONE_NEWUSER) == 0:
            break
        err = ctypes.get_errno()
        if err != errno.EINVAL or attempt == 49:  # EINVAL: the process is multi-threaded
            raise OSError(err, f"unshare(CLONE_NEWUSER): {os.strerror(err)}")
        time.sleep(0.002)  # a thread (one of ours, just joined) may still be exiting
    _write("/proc/self/setgroups", "deny")
    _write("/proc/self/uid_map", f"{uid} {uid} 1")
    _write("/proc/self/gid_map", f"{gid} {gid} 1")


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
    """Reap a child started by `start_child` (in the process that started it), killing it if it
    outlives `deadline`. Whatever is left of its process group is killed before it is reaped."""
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
    """Kill a sandbox (from any process of the same user): its process group, which holds every
    process of it (none may leave: setsid and setpgid are refused); with a PID namespace, the
    kernel also kills everything in the namespace when its pid 1 dies."""
    try:
        os.killpg(pid, signal.SIGKILL)  # the child leads its own session and process group
    except OSError:
        pass
    try:
        os.kill(pid, signal.SIGKILL)
    except OSError:
        pass


def _wait(pid: int, deadline: float):
    """wait4 with a deadline, killing the child if it outlives it (e.g. stuck closing pipes).
    The child is seen to end without being reaped, so its pid (and process group id) cannot be
    reused until the rest of its group is killed."""
    if not _wait_until_ended(pid, deadline):
        kill_child(pid)
        os.waitid(os.P_PID, pid, os.WEXITED | os.WNOWAIT)
    try:  # processes it left behind (only possible without a PID namespace)
        os.killpg(pid, signal.SIGKILL)
    except OSError:
        pass
    return os.wait4(pid, 0)


def _wait_until_ended(pid: int, deadline: float) -> bool:
    def ended() -> bool:
        return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None

    try:
        pidfd = os.pidfd_open(pid)
    except (AttributeError, OSError):
        pidfd = None
    if pidfd is not None:
        try:
            while not ended():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                select.select([pidfd], [], [], remaining)
            return True
        finally:
            os.close(pidfd)
    while not ended():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.002)
    return True


# --------------------------------------------------------------------------- probing


def probe_isolation() -> Isolation:
    """Find out, in a throw-away sandboxed child set up with whatever works, which protections
    this machine allows."""
    import json
    import socket  # imported here: the child may not be able to read the standard library

    def report(fd: int) -> None:
        status = dict(_setup)
        status["pid_one"] = os.getpid() == 1
        status["hidden_proc"] = os.path.isdir("/proc") and not os.listdir("/proc")
        status["host_hidden"] = not any(os.path.exists(p) for p in ("/etc/passwd", "/etc/hostname"))
        status["private_tmp"] = bool(status.get("flags", 0) & CLONE_NEWNS) and _is_private_tmp()
        if status.get("seccomp"):
            try:
                socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                status["seccomp"] = False
            except OSError:
                pass
        os.write(fd, json.dumps(status).encode())

    run = run_sandboxed(report, Limits(wall_seconds=30, cpu_seconds=20, memory_bytes=None), None)
    try:
        status = json.loads(run.result or b"{}")
    except ValueError:
        status = {}
    problems = list(status.get("problems", []))
    if not status:
        tail = run.log.strip().splitlines()
        problems.append("the isolation probe failed" + (f": {tail[-1][:300]}" if tail else f" (exit status {run.exit_code})"))
    flags = int(status.get("flags", 0))
    user = bool(flags & CLONE_NEWUSER)
    mount = bool(flags & CLONE_NEWNS)
    pid = bool(flags & CLONE_NEWPID) and bool(status.get("pid_one"))
    private_root = mount and bool(status.get("root")) and bool(status.get("host_hidden"))
    hidden_proc = mount and bool(status.get("hidden_proc"))
    if status and not user and mount:
        problems.append(LOST_USER_NAMESPACE_ROOT)
    if status and not pid:
        problems.append(LOST_PID_NAMESPACE)
    if status and not mount:
        problems += [LOST_MOUNT_NAMESPACE, LOST_PROC, LOST_NETWORK_NAMESPACE]
    elif status and not hidden_proc:
        problems.append(LOST_PROC)
    if not status.get("seccomp"):
        problems.append(LOST_SECCOMP)
    return Isolation(
        user_namespace=user,
        network_namespace=mount,
        mount_namespace=mount,
        read_only_filesystem=private_root or (mount and bool(status.get("remounted"))),
        private_tmp=mount and bool(status.get("private_tmp")),
        hidden_proc=hidden_proc,
        seccomp=bool(status.get("seccomp")),
        problems=tuple(problems),
        pid_namespace=pid,
        private_root=private_root,
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
