"""The sandbox itself, without the static checks in front of it: hostile programs run in a
sandboxed child (as a completion that slipped past the checks would) and the host stays
intact. These run `exec` on purpose: the code under test is the sandbox."""

import ctypes
import errno
import os
import platform
import re
import resource
import select
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import pytest

from kuberft_reward import sandbox, seccomp
from kuberft_reward.sandbox import EXIT_SANDBOX_SETUP_FAILED, Limits, kill_child, probe_isolation, run_sandboxed, start_child, wait_child


def _kernel_allows(setup) -> bool:
    """Whether `setup` succeeds in a throw-away child: what this machine offers, found out
    without the code under test (which must then deliver it, not skip it)."""
    pid = os.fork()
    if pid == 0:
        try:
            os._exit(0 if setup(ctypes.CDLL(None)) == 0 else 1)
        finally:
            os._exit(1)
    return os.waitpid(pid, 0)[1] == 0


def _install_filter(instructions) -> int:
    """Install a seccomp filter given as (code, jt, jf, k) BPF instructions; 0 on success."""
    import struct

    program = b"".join(struct.pack("HBBI", *insn) for insn in instructions)
    libc = ctypes.CDLL(None, use_errno=True)

    class Fprog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]

    buf = ctypes.create_string_buffer(program, len(program))
    fprog = Fprog(len(instructions), ctypes.cast(buf, ctypes.c_void_p))
    if libc.prctl(38, 1, 0, 0, 0) != 0:  # PR_SET_NO_NEW_PRIVS
        return -1
    return libc.prctl(22, 2, ctypes.byref(fprog), 0, 0)  # PR_SET_SECCOMP, SECCOMP_MODE_FILTER


def _user_namespaces_with(flags):
    """unshare(flags), in a new user namespace unless root."""
    return lambda libc: libc.unshare(0x10000000 | flags) if os.geteuid() else libc.unshare(flags)


ISOLATION = probe_isolation()
KERNEL_NAMESPACES = _kernel_allows(_user_namespaces_with(0x00020000 | 0x40000000))  # mount, network
KERNEL_PID_NAMESPACES = KERNEL_NAMESPACES and _kernel_allows(_user_namespaces_with(0x20000000))
KERNEL_SECCOMP = seccomp.supported() and _kernel_allows(lambda libc: _install_filter([(0x06, 0, 0, 0x7FFF0000)]))  # allow all
needs_namespaces = pytest.mark.skipif(not KERNEL_NAMESPACES, reason="no user/mount namespaces on this kernel")
needs_seccomp = pytest.mark.skipif(not KERNEL_SECCOMP, reason="no seccomp on this kernel")
needs_pid_namespace = pytest.mark.skipif(not KERNEL_PID_NAMESPACES, reason="no PID namespaces on this kernel")
needs_private_root = needs_namespaces

# The system calls some attacks make directly (x86_64, aarch64).
NR = {
    "x86_64": {"ptrace": 101, "personality": 135, "unshare": 272, "setns": 308, "mount": 165, "pivot_root": 155,
               "bpf": 321, "io_uring_setup": 425, "keyctl": 250, "tkill": 200, "rt_tgsigqueueinfo": 297,
               "pidfd_open": 434, "getpid": 39, "clone": 56},
    "aarch64": {"ptrace": 117, "personality": 92, "unshare": 97, "setns": 268, "mount": 40, "pivot_root": 41,
                "bpf": 280, "io_uring_setup": 425, "keyctl": 219, "tkill": 130, "rt_tgsigqueueinfo": 240,
                "pidfd_open": 434, "getpid": 172, "clone": 220},
}[{"amd64": "x86_64", "arm64": "aarch64"}.get(platform.machine().lower(), platform.machine().lower())]


def run(program: str, isolation=None, **limits):
    """Run `program` in a sandboxed child; it reports through `report(text)`."""

    def work(fd: int) -> None:
        def report(text: str) -> None:
            os.write(fd, (text + "\n").encode())

        exec(compile(textwrap.dedent(program), "<untrusted>", "exec"), {"report": report, "NR": NR})  # noqa: S102

    options = {"wall_seconds": 10.0, "cpu_seconds": 10, "memory_bytes": None, **limits}
    return run_sandboxed(work, Limits(**options), isolation or ISOLATION)


def reports(child) -> list[str]:
    return child.result.decode().splitlines()


@pytest.fixture(params=["direct", "relayed"])
def pid_path(request, monkeypatch):
    """Both ways into a PID namespace: forked straight into it (the forking process may create
    PID namespaces), or through an intermediate process that unshares and forks pid 1."""
    if request.param == "direct" and not sandbox._can_fork_into_new_pid_namespace():
        pytest.skip("this process may not create PID namespaces")
    monkeypatch.setitem(sandbox._pid_namespace_in_caller, os.getpid(), request.param == "direct")
    return request.param


def processes_named(name: str) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if Path(f"/proc/{entry}/comm").read_text().strip() == name:
                    found.append(int(entry))
            except OSError:
                pass
    return found


def gone_within(name: str, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while processes_named(name):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def kill_all_named(name: str) -> None:
    for pid in processes_named(name):
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass


# A program that leaves a daemon behind (fork, fork again, the middle one exits): the daemon
# renames itself to MARKER, lets go of every pipe and sleeps.
LEAVE_A_DAEMON = """
    import ctypes, os, time
    r, w = os.pipe()
    if os.fork() == 0:
        if os.fork() == 0:
            ctypes.CDLL(None).prctl(15, MARKER.encode(), 0, 0, 0)  # PR_SET_NAME
            os.write(w, b"daemon started")
            os.closerange(0, 1024)
            time.sleep(60)
            os._exit(0)
        os._exit(0)
    os.close(w)
    report(os.read(r, 100).decode())
"""


def test_this_machine_supports_the_full_sandbox():
    # Documents what CI machines give us; the other tests skip what is missing.
    assert ISOLATION.seccomp, ISOLATION.problems
    assert ISOLATION.network_namespace and ISOLATION.read_only_filesystem and ISOLATION.hidden_proc, ISOLATION.problems
    assert ISOLATION.pid_namespace and ISOLATION.private_root, ISOLATION.problems
    assert ISOLATION.problems == ()


@needs_seccomp
def test_no_network():
    child = run(
        """
        import socket
        for family in (socket.AF_INET, socket.AF_INET6, socket.AF_UNIX):
            try:
                socket.socket(family, socket.SOCK_STREAM)
                report("socket created")
            except OSError as e:
                report(f"refused: {e.strerror}")
        try:
            socket.socketpair()
            report("socketpair created")
        except OSError as e:
            report(f"refused: {e.strerror}")
        """
    )
    assert reports(child) == ["refused: Operation not permitted"] * 4


@needs_namespaces
def test_writes_outside_the_private_tmp_fail_and_tmp_is_private(tmp_path):
    name = f"kuberft-escape-{uuid.uuid4().hex}"
    host_tmp_file = tmp_path / "escaped.txt"  # the host's /tmp is not even visible
    targets = [str(host_tmp_file), f"/etc/{name}", f"/var/tmp/{name}", f"/{name}", f"{sys.prefix}/{name}"]
    try:
        child = run(
            f"""
            for path in {targets!r}:
                try:
                    open(path, "w").write("x")
                    report("wrote " + path)
                except OSError as e:
                    report(e.strerror)
            open("/tmp/inside.txt", "w").write("private")
            report(open("/tmp/inside.txt").read())
            """
        )
        assert reports(child) == ["No such file or directory"] * 3 + ["Read-only file system"] * 2 + ["private"]
        assert not os.path.exists("/tmp/inside.txt")
        assert not any(os.path.exists(path) for path in targets)
    finally:
        for path in targets:
            if os.path.isfile(path):
                os.unlink(path)


@needs_namespaces
def test_the_environment_and_other_processes_are_invisible(monkeypatch):
    monkeypatch.setenv("KUBERFT_TEST_SECRET", "s3cr3t-value-123")
    child = run(
        f"""
        import os
        report(str(sorted(os.environ)))
        report(str(os.listdir("/proc")))
        try:
            report(open("/proc/{os.getpid()}/environ").read())
        except OSError as e:
            report(e.strerror)
        """
    )
    env_names, proc, environ = reports(child)
    assert "KUBERFT_TEST_SECRET" not in env_names and "s3cr3t" not in child.result.decode()
    assert proc == "[]"
    assert environ == "No such file or directory"


@needs_pid_namespace
def test_the_child_is_alone_in_its_own_pid_namespace(pid_path):
    child = run(
        f"""
        import ctypes, os
        report(f"pid={{os.getpid()}} ppid={{os.getppid()}} proc={{os.listdir('/proc')}}")
        header, data = (ctypes.c_uint32 * 2)(0x20080522, 0), (ctypes.c_uint32 * 6)()
        ctypes.CDLL(None).capget(header, data)
        report(f"uid={{os.getuid()}} capabilities={{list(data)}}")
        for pid in ({os.getpid()}, 2):
            try:
                os.kill(pid, 0)
                report(f"{{pid}} exists")
            except OSError as e:
                report(e.strerror)
        """
    )
    assert reports(child) == [
        "pid=1 ppid=0 proc=[]", f"uid={os.getuid() or 65534} capabilities=[0, 0, 0, 0, 0, 0]",
        "Operation not permitted", "Operation not permitted",
    ]


@needs_seccomp
def test_a_child_cannot_signal_its_worker_or_siblings():
    # The worker is this process; a sibling is another process of the same user.
    received = []
    previous = signal.signal(signal.SIGUSR1, lambda *_: received.append(1))
    sibling = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        child = run(
            f"""
            import ctypes, os, signal
            libc = ctypes.CDLL(None, use_errno=True)
            libc.sigqueue.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_void_p]
            worker, sibling = {os.getpid()}, {sibling.pid}
            info = ctypes.create_string_buffer(128)
            ctypes.memmove(info, (ctypes.c_int * 3)(signal.SIGSTOP, 0, -1), 12)  # si_code SI_QUEUE

            def attempt(what, call):
                try:
                    result = call()
                    if result == -1:
                        raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))
                    report(what + ": sent")
                except OSError as e:
                    report(what + ": " + e.strerror)

            attempt("kill worker", lambda: os.kill(worker, signal.SIGUSR1))
            attempt("kill sibling", lambda: os.kill(sibling, signal.SIGSTOP))
            attempt("kill group", lambda: os.kill(0, signal.SIGUSR1))
            attempt("sigqueue worker", lambda: libc.sigqueue(worker, signal.SIGUSR1, None))
            attempt("sigqueue sibling", lambda: libc.sigqueue(sibling, signal.SIGSTOP, None))
            attempt("tgsigqueue sibling", lambda: libc.syscall(NR["rt_tgsigqueueinfo"], sibling, sibling, signal.SIGSTOP, info))
            attempt("tkill sibling", lambda: libc.syscall(NR["tkill"], sibling, signal.SIGSTOP))
            attempt("pidfd_open sibling", lambda: libc.syscall(NR["pidfd_open"], sibling, 0))
            # have the kernel signal the worker when a pipe is ready (SIGIO, or any with F_SETSIG)
            import fcntl
            r, w = os.pipe()
            attempt("F_SETOWN worker", lambda: fcntl.fcntl(w, fcntl.F_SETOWN, worker))
            attempt("F_SETSIG", lambda: fcntl.fcntl(w, 10, signal.SIGSTOP))
            attempt("FIOSETOWN worker", lambda: libc.ioctl(w, 0x8901, ctypes.byref(ctypes.c_int(worker))))
            # signals to itself still work (its pid as it sees it)
            handled = []
            signal.signal(signal.SIGUSR1, lambda *_: handled.append(1))
            signal.raise_signal(signal.SIGUSR1)
            report(f"to itself: {{handled}}")
            """
        )
        time.sleep(0.2)
        state = Path(f"/proc/{sibling.pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    finally:
        sibling.kill()
        sibling.wait()
        signal.signal(signal.SIGUSR1, previous)
    assert reports(child) == [
        "kill worker: Operation not permitted",
        "kill sibling: Operation not permitted",
        "kill group: Operation not permitted",
        "sigqueue worker: Operation not permitted",
        "sigqueue sibling: Operation not permitted",
        "tgsigqueue sibling: Operation not permitted",
        "tkill sibling: Operation not permitted",
        "pidfd_open sibling: Operation not permitted",
        "F_SETOWN worker: Operation not permitted",
        "F_SETSIG: Operation not permitted",
        "FIOSETOWN worker: Operation not permitted",
        "to itself: [1]",
    ]
    assert received == [] and state in ("S", "R")  # the worker got nothing; the sibling is not stopped


@needs_seccomp
def test_a_child_cannot_change_anyones_limits():
    before = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        child = run(
            f"""
            import resource
            for what, call in (
                ("lower the worker's open files", lambda: resource.prlimit({os.getpid()}, resource.RLIMIT_NOFILE, (16, 16))),
                ("lower its own open files", lambda: resource.prlimit(0, resource.RLIMIT_NOFILE, (16, 16))),
                ("raise its own CPU time", lambda: resource.prlimit(0, resource.RLIMIT_CPU, (100000, 100000))),
                ("set its own memory limit", lambda: resource.setrlimit(resource.RLIMIT_AS, (-1, -1))),
            ):
                try:
                    call()
                    report(what + ": done")
                except (OSError, ValueError) as e:  # setrlimit turns EPERM into ValueError
                    report(what + ": " + (e.strerror if isinstance(e, OSError) else str(e)))
            report(f"reads {{resource.getrlimit(resource.RLIMIT_NOFILE)}} {{resource.prlimit(0, resource.RLIMIT_NOFILE)}}")
            """,
            open_files=100,
        )
        after = resource.getrlimit(resource.RLIMIT_NOFILE)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, before)
    assert reports(child) == [
        "lower the worker's open files: Operation not permitted",
        "lower its own open files: Operation not permitted",
        "raise its own CPU time: Operation not permitted",
        "set its own memory limit: not allowed to raise maximum limit",
        "reads (100, 100) (100, 100)",
    ]
    assert after == before


@needs_seccomp
def test_system_calls_outside_the_allowlist_fail():
    child = run(
        """
        import ctypes, os
        libc = ctypes.CDLL(None, use_errno=True)
        calls = {
            "ptrace": (0, 0, 0, 0),              # PTRACE_TRACEME
            "personality": (0xFFFFFFFF,),        # only asks
            "unshare": (0x10000000,),            # CLONE_NEWUSER
            "setns": (0, 0),
            "mount": (None, b"/tmp", b"tmpfs", 0, None),
            "pivot_root": (b"/tmp", b"/tmp"),
            "bpf": (0, None, 0),
            "io_uring_setup": (1, None),
            "keyctl": (0, 0),
        }
        for name, args in calls.items():
            ctypes.set_errno(0)
            rc = libc.syscall(NR[name], *args)
            report(name + ": " + (os.strerror(ctypes.get_errno()) if rc == -1 else "allowed"))
        report("getpid: " + str(libc.syscall(NR["getpid"]) == os.getpid()))
        """
    )
    assert reports(child) == [
        f"{name}: Operation not permitted"
        for name in ("ptrace", "personality", "unshare", "setns", "mount", "pivot_root", "bpf", "io_uring_setup", "keyctl")
    ] + ["getpid: True"]


def _kernel_numbers(text: str) -> dict[str, int]:
    """Syscall numbers from a unistd header (aliases such as __NR3264_* resolved)."""
    raw = dict(re.findall(r"^#define __NR(?:3264)?_(\w+)\s+(\S+)", text, re.M) + re.findall(r"^#define (__NR3264_\w+)\s+(\d+)", text, re.M))
    numbers = {}
    for name, value in raw.items():
        if name.startswith("__NR3264_"):
            continue
        value = raw.get(value, value)
        if value.isdigit():
            numbers[name] = int(value)
    return numbers


@pytest.mark.parametrize(
    "column, headers",
    [
        (0, ["/usr/include/x86_64-linux-gnu/asm/unistd_64.h", "/usr/include/asm/unistd_64.h"]),
        (1, ["/usr/include/asm-generic/unistd.h"]),
    ],
    ids=["x86_64", "aarch64"],
)
def test_the_system_call_numbers_match_the_kernel_headers(column, headers):
    header = next((h for h in headers if os.path.exists(h)), None)
    if header is None:
        pytest.skip("kernel headers not installed")
    numbers = _kernel_numbers(Path(header).read_text())
    for name, both in seccomp.SYSCALLS.items():
        if both[column] is None:
            assert numbers.get(name, 1 << 20) >= 1024, name  # not on this architecture
        else:
            assert numbers.get(name) == both[column], name


def test_the_allowlist_is_an_allowlist():
    allowed = set(seccomp.allowlist())
    assert 100 < len(allowed) < 200
    assert not allowed & {"socket", "socketpair", "ptrace", "personality", "unshare", "setns", "mount", "setrlimit",
                          "execve", "fork", "vfork", "setsid", "setpgid", "tkill", "pidfd_send_signal", "bpf"}
    assert {"execve"} <= set(seccomp.allowlist(allow_processes=True))


@needs_pid_namespace
def test_processes_the_child_leaves_behind_do_not_survive(pid_path):
    marker = "kbo-" + uuid.uuid4().hex[:8]
    try:
        start = time.monotonic()
        child = run(f"MARKER = {marker!r}\n" + textwrap.dedent(LEAVE_A_DAEMON), allow_processes=True)
        assert reports(child) == ["daemon started"] and child.exit_code == 0, child.log
        assert time.monotonic() - start < 10
        assert gone_within(marker, 2.0), "the daemon survived the sandbox"
    finally:
        kill_all_named(marker)


@needs_pid_namespace
def test_killing_the_child_from_another_process_takes_down_the_whole_sandbox(pid_path):
    """As the worker does at the deadline, while the zygote (here, this process) reaps."""
    marker = "kbk-" + uuid.uuid4().hex[:8]
    program = f"MARKER = {marker!r}\n" + textwrap.dedent(LEAVE_A_DAEMON) + "import time\ntime.sleep(60)\n"

    def work(fd: int) -> None:
        exec(program, {"report": lambda text: os.write(fd, (text + "\n").encode())})  # noqa: S102

    result_r, result_w = os.pipe()
    log_r, log_w = os.pipe()
    try:
        pid = start_child(work, result_w, log_w, Limits(wall_seconds=30, memory_bytes=None, allow_processes=True), ISOLATION)
        os.close(result_w)
        os.close(log_w)
        assert select.select([result_r], [], [], 10)[0] and os.read(result_r, 100) == b"daemon started\n"
        assert processes_named(marker)
        killer = os.fork()
        if killer == 0:  # the worker: not the child's parent
            kill_child(pid)
            os._exit(0)
        os.waitpid(killer, 0)
        ended = wait_child(pid, time.monotonic() + 10)
        assert ended.signal == signal.SIGKILL
        assert gone_within(marker, 2.0)
        assert os.read(result_r, 100) == b""  # no process of the sandbox holds the pipe any more
    finally:
        os.close(result_r)
        os.close(log_r)
        kill_all_named(marker)


def test_the_child_ends_the_way_its_work_ends(pid_path):
    assert run("import os\nos._exit(7)\n").exit_code == 7
    crashed = run("import ctypes\nctypes.string_at(0)\n")
    assert (crashed.exit_code, crashed.signal) == (None, signal.SIGSEGV)
    assert run("raise SystemExit(3)\n").exit_code == 3


@needs_private_root
def test_the_host_filesystem_is_invisible():
    secret = "kuberft-secret-" + uuid.uuid4().hex
    secret_file = Path("/var/tmp") / f"kuberft-test-{uuid.uuid4().hex}.txt"
    secret_file.write_text(secret + "\n")
    try:
        child = run(
            f"""
            import os
            for path in ("/etc/shadow", "/etc/hostname", "/etc/passwd", {str(secret_file)!r}):
                try:
                    report(path + ": " + open(path).read()[:200].replace(chr(10), " "))
                except OSError as e:
                    report(path + ": " + e.strerror)
            report("dirs: " + str([d for d in ("/etc", "/var", "/home", "/srv", "/sys") if os.path.exists(d)]))
            report("/: " + " ".join(sorted(os.listdir("/"))))
            report("/root: " + (" ".join(sorted(os.listdir("/root"))) if os.path.isdir("/root") else "-"))
            print(open({str(secret_file)!r}).read())
            """
        )
    finally:
        secret_file.unlink()
    lines = reports(child)
    assert lines[:5] == [
        "/etc/shadow: No such file or directory",
        "/etc/hostname: No such file or directory",
        "/etc/passwd: No such file or directory",
        f"{secret_file}: No such file or directory",
        "dirs: []",
    ]
    assert secret not in child.result.decode() + child.log
    # Only what the runtime needs: the first path components of the interpreter's and its
    # libraries' paths (here /usr, /lib, /work, /root/.pyenv...), /dev, /proc and /tmp.
    runtime = sandbox.runtime_paths()
    runtime += [os.path.realpath(p) for p in runtime if os.path.exists(p)]
    tops = {p.strip("/").split("/")[0] for p in runtime} | {"dev", "proc", "tmp"}
    assert set(lines[5].removeprefix("/: ").split()) <= tops
    under_root = {p.split("/")[2] for p in runtime if p.startswith("/root/")}
    assert lines[6] == "/root: -" or set(lines[6].removeprefix("/root: ").split()) <= under_root


@needs_private_root
def test_without_mount_setattr_the_runtime_is_still_read_only(monkeypatch, tmp_path):
    """Kernels before 5.12 lack mount_setattr: every mount under a bound path is remounted."""
    monkeypatch.setitem(sandbox._SYSCALL_NUMBERS[platform.machine().lower()], "mount_setattr", 100000)  # ENOSYS
    monkeypatch.syspath_prepend(str(tmp_path))
    targets = [f"{sys.prefix}/kuberft-escape-{uuid.uuid4().hex}", str(tmp_path / "kuberft-escape")]
    try:
        child = run(
            f"""
            for path in {targets!r}:
                try:
                    open(path, "w").write("x")
                    report("wrote " + path)
                except OSError as e:
                    report(e.strerror)
            """
        )
        assert reports(child) == ["Read-only file system"] * 2, child.log
    finally:
        for path in targets:
            if os.path.isfile(path):
                os.unlink(path)


@needs_private_root
def test_modules_on_the_path_and_imported_ones_stay_readable(tmp_path, monkeypatch):
    # a package on sys.path (as a PYTHONPATH entry would be), with a submodule imported lazily
    root = tmp_path / "site"
    (root / "kbtest_pkg").mkdir(parents=True)
    (root / "kbtest_pkg" / "__init__.py").write_text("")
    (root / "kbtest_pkg" / "lazy.py").write_text("VALUE = 42\n")
    (root / "kbtest_late.py").write_text("LATE = 7\n")  # imported by the child only
    (tmp_path / "not-on-the-path.txt").write_text("hidden")
    monkeypatch.syspath_prepend(str(root))
    # a custom reward module imported from outside sys.path (as an editable install's finder does)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "kbtest_custom.py").write_text("def reward():\n    return 1.0\n")
    import importlib.util

    spec = importlib.util.spec_from_file_location("kbtest_custom", elsewhere / "kbtest_custom.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "kbtest_custom", module)
    spec.loader.exec_module(module)
    import kbtest_pkg  # noqa: F401

    child = run(
        f"""
        import inspect, os, sys
        import kbtest_pkg.lazy, kbtest_late
        report(str(kbtest_pkg.lazy.VALUE + kbtest_late.LATE))
        report(inspect.getsource(sys.modules["kbtest_custom"].reward).splitlines()[0])
        report(str(os.path.exists({str(tmp_path / "not-on-the-path.txt")!r})))
        """
    )
    assert reports(child) == ["49", "def reward():", "False"], child.log


@pytest.fixture(scope="module")
def triton_interpreter():
    """Triton imported and warmed up in this process (as the worker does), in interpreter mode."""
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        import torch
        import triton
        import triton.language as tl

        @triton.jit
        def _warm(x_ptr, n, BLOCK: tl.constexpr):
            offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
            tl.store(x_ptr + offsets, tl.load(x_ptr + offsets, mask=offsets < n) + 1.0, mask=offsets < n)

        x = torch.zeros(10)
        _warm[(1,)](x, 10, BLOCK=16)
        assert float(x.sum()) == 10.0
        yield
    finally:
        del os.environ["TRITON_INTERPRET"]


KERNEL_MODULE = '''
import torch
import triton
import triton.language as tl


@triton.jit
def add_kernel(x_ptr, y_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n
    tl.store(out_ptr + offsets, tl.load(x_ptr + offsets, mask=mask) * 2.0 + tl.load(y_ptr + offsets, mask=mask), mask=mask)


def add(x, y):
    out = torch.empty_like(x)
    add_kernel[(triton.cdiv(x.numel(), 128),)](x, y, out, x.numel(), BLOCK=128)
    return out
'''


def test_a_triton_kernel_runs_in_the_interpreter_inside(triton_interpreter):
    child = run(
        f"""
        import importlib.util, os, sys, torch
        path = os.path.join(os.getcwd(), "kuberft_candidate.py")  # as the harness loads candidates
        with open(path, "w") as f:
            f.write({KERNEL_MODULE!r})
        spec = importlib.util.spec_from_file_location("kuberft_candidate", path)
        module = importlib.util.module_from_spec(spec)
        sys.modules["kuberft_candidate"] = module
        spec.loader.exec_module(module)
        torch.manual_seed(0)
        x, y = torch.randn(1000), torch.randn(1000)
        report(f"{{path}} {{torch.equal(module.add(x, y), x * 2.0 + y)}}")
        """,
        wall_seconds=60,
        cpu_seconds=60,
    )
    assert reports(child) == ["/tmp/kuberft_candidate.py True"], child.log


@needs_seccomp
def test_fork_bombs_and_shells_go_nowhere():
    child = run(
        """
        import os, subprocess
        try:
            while True:
                os.fork()
        except OSError as e:
            report("fork: " + e.strerror)
        report("system: " + str(os.system("echo pwned > /tmp/pwned")))
        try:
            subprocess.run(["/bin/sh", "-c", "true"])
        except OSError as e:
            report("subprocess: " + e.strerror)
        try:
            os.setsid()
        except OSError as e:
            report("setsid: " + e.strerror)
        """
    )
    assert reports(child) == [
        "fork: Operation not permitted",
        "system: 32512",
        "subprocess: Operation not permitted",
        "setsid: Operation not permitted",
    ]


@needs_seccomp
def test_with_processes_allowed_programs_run_but_namespaces_stay_refused():
    """The GPU path: Triton runs ptxas (and its C compiler, and /sbin/ldconfig -p)."""
    child = run(
        """
        import ctypes, os, subprocess, sys
        report(subprocess.run(["/bin/sh", "-c", "echo shell"], capture_output=True, text=True).stdout.strip())
        report(subprocess.run([sys.executable, "-c", "import os; print('python', os.getpid() > 1)"], capture_output=True, text=True).stdout.strip())
        report("ldconfig: " + str(subprocess.run(["/sbin/ldconfig", "-p"], capture_output=True).returncode))
        libc = ctypes.CDLL(None, use_errno=True)
        for name, flags in (("user", 0x10000000), ("pid", 0x20000000), ("mount", 0x00020000)):
            rc = libc.syscall(NR["clone"], flags | 17, 0, 0, 0, 0)  # | SIGCHLD
            report(f"clone new {name} namespace: " + (os.strerror(ctypes.get_errno()) if rc == -1 else "allowed"))
        """,
        allow_processes=True,
        wall_seconds=30,
    )
    assert reports(child) == [
        "shell", "python True", "ldconfig: 0",
        "clone new user namespace: Operation not permitted",
        "clone new pid namespace: Operation not permitted",
        "clone new mount namespace: Operation not permitted",
    ], child.log


def test_threads_still_work():
    child = run(
        """
        import threading
        box = []
        t = threading.Thread(target=lambda: box.append(1))
        t.start(); t.join()
        report(str(box))
        """
    )
    assert reports(child) == ["[1]"]


def test_an_infinite_loop_is_stopped_at_the_wall_clock_limit():
    start = time.monotonic()
    child = run("while True:\n    pass\n", wall_seconds=1.5)
    assert child.timed_out and child.signal == signal.SIGKILL
    assert time.monotonic() - start < 6


def test_cpu_time_is_limited():
    child = run("while True:\n    pass\n", wall_seconds=20, cpu_seconds=1)
    assert not child.timed_out
    assert child.signal in (signal.SIGXCPU, signal.SIGKILL)
    assert child.cpu_seconds >= 1  # (SIGKILL with the limit used up is how a CPU timeout is recognised)
    assert child.wall_seconds < 10


def test_a_memory_bomb_hits_the_address_space_limit():
    child = run(
        """
        try:
            blocks = [bytearray(256 << 20) for _ in range(64)]
            report("allocated 16 GiB")
        except MemoryError:
            report("MemoryError")
        """,
        memory_bytes=1 << 30,
    )
    assert reports(child) == ["MemoryError"]


def test_output_is_capped_and_a_result_flood_is_cut_off():
    child = run("print('x' * (20 << 20))\nreport('done')\n")
    assert reports(child) == ["done"] and len(child.log) <= (16 << 10) + 100
    assert "bytes of output dropped" in child.log
    flood = run("while True:\n    report('y' * 65536)\n", result_bytes=1 << 20)
    assert flood.result_overflow and len(flood.result) <= 1 << 20


def test_os_exit_ends_only_the_child():
    child = run("import os\nos._exit(0)\n")
    assert child.exit_code == 0 and child.result == b""


@needs_namespaces
def test_a_failed_set_up_says_what_failed_and_nothing_else(monkeypatch):
    monkeypatch.setenv("KUBERFT_TEST_SECRET", "s3cr3t-value-456")

    def refuse(plan, limits):
        raise OSError(errno.EPERM, "mount /usr/lib: Operation not permitted")

    monkeypatch.setattr(sandbox, "_build_root", refuse)
    child = run("report('ran')\n")
    assert child.exit_code == EXIT_SANDBOX_SETUP_FAILED and child.result == b""
    assert child.log.strip().splitlines()[-1] == "sandbox set-up failed: PermissionError: [Errno 1] mount /usr/lib: Operation not permitted"
    assert "s3cr3t" not in child.log


@pytest.mark.skipif(not ISOLATION.user_namespace, reason="no user namespaces on this kernel")
def test_a_prepared_zygote_forks_children_straight_into_pid_namespaces():
    """`prepare_zygote` in a process without CAP_SYS_ADMIN (this one drops it first)."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(read_end)
            libc = ctypes.CDLL(None, use_errno=True)
            header, data = (ctypes.c_uint32 * 2)(0x20080522, 0), (ctypes.c_uint32 * 6)()
            assert libc.capget(header, data) == 0
            data[0] &= ~(1 << 21)  # CAP_SYS_ADMIN, effective
            data[1] &= ~(1 << 21)  # permitted
            assert libc.capset(header, data) == 0
            uid = os.getuid()
            sandbox._pid_namespace_in_caller.clear()
            lines = [f"before: {sandbox._can_fork_into_new_pid_namespace()}", f"prepared: {sandbox.prepare_zygote()}"]
            lines.append(f"uid kept: {os.getuid() == uid}")
            isolation = probe_isolation()
            lines.append(f"isolation: {isolation.pid_namespace and isolation.private_root}")
            lines += reports(run("import os\nreport(f'pid {os.getpid()} {os.listdir(\"/proc\")}')\n", isolation=isolation))
            # the pid start_child returns is pid 1 of the new namespace itself: no intermediate
            result_r, result_w = os.pipe()
            log_r, log_w = os.pipe()
            child_pid = start_child(lambda fd: time.sleep(1), result_w, log_w, Limits(memory_bytes=None), isolation)
            status = Path(f"/proc/{child_pid}/status").read_text().splitlines()
            lines.append(f"namespace pids: {next(line for line in status if line.startswith('NSpid:')).split()[1:] == [str(child_pid), '1']}")
            lines.append(f"exit: {wait_child(child_pid, time.monotonic() + 10).exit_code}")
            os.write(write_end, "\n".join(lines).encode())
        finally:
            os._exit(0)
    os.close(write_end)
    report = b""
    while chunk := os.read(read_end, 4096):
        report += chunk
    os.close(read_end)
    os.waitpid(pid, 0)
    assert report.decode().splitlines() == [
        "before: False", "prepared: True", "uid kept: True", "isolation: True", "pid 1 []", "namespace pids: True", "exit: 0",
    ]


@needs_seccomp
def test_without_namespaces_the_sandbox_still_blocks_network_processes_and_signals():
    """As in a pod under the RuntimeDefault seccomp profile, where unshare is refused."""
    marker = "kbn-" + uuid.uuid4().hex[:8]
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # an outer process whose own filter refuses unshare, like the container runtime's
        try:
            os.close(read_end)
            _refuse_unshare()
            isolation = probe_isolation()

            def work(fd):
                import socket

                lines = [f"namespaces={isolation.mount_namespace} pid={isolation.pid_namespace} seccomp={isolation.seccomp}"]
                for attempt in (
                    lambda: socket.socket(),
                    lambda: os.fork(),
                    lambda: os.kill(os.getppid(), signal.SIGUSR1),
                    lambda: resource.prlimit(os.getppid(), resource.RLIMIT_NOFILE, (16, 16)),
                ):
                    try:
                        attempt()
                        lines.append("allowed")
                    except OSError as e:
                        lines.append(e.strerror)
                lines.append(os.getcwd().startswith(("/tmp/kuberft-sandbox-", "/var/tmp/kuberft-sandbox-")) and "private dir" or os.getcwd())
                os.write(fd, "\n".join(lines).encode())

            child = run_sandboxed(work, Limits(wall_seconds=10, memory_bytes=None), isolation)
            lines = [child.result.decode()]
            lines += [str(p in isolation.problems) for p in (sandbox.LOST_PID_NAMESPACE, sandbox.LOST_MOUNT_NAMESPACE, sandbox.LOST_PROC, sandbox.LOST_NETWORK_NAMESPACE)]
            # a daemon left behind dies with the sandbox's process group
            daemon = run(f"MARKER = {marker!r}\n" + textwrap.dedent(LEAVE_A_DAEMON), isolation=isolation, allow_processes=True)
            lines += reports(daemon) + [f"daemon gone: {gone_within(marker, 2.0)}"]
            os.write(write_end, "\n".join(lines).encode())
        finally:
            os._exit(0)
    os.close(write_end)
    report = b""
    while chunk := os.read(read_end, 4096):
        report += chunk
    os.close(read_end)
    os.waitpid(pid, 0)
    kill_all_named(marker)
    assert report.decode().splitlines() == [
        "namespaces=False pid=False seccomp=True", "Operation not permitted", "Operation not permitted",
        "Operation not permitted", "Operation not permitted", "private dir",
        "True", "True", "True", "True",
        "daemon started", "daemon gone: True",
    ]


def _refuse_unshare() -> None:
    """Install a filter that refuses only unshare(2), as container runtimes' default profiles do."""
    unshare = {"x86_64": 272, "amd64": 272, "aarch64": 97, "arm64": 97}[platform.machine().lower()]
    assert _install_filter([(0x20, 0, 0, 0), (0x15, 0, 1, unshare), (0x06, 0, 0, 0x00050000 | errno.EPERM), (0x06, 0, 0, 0x7FFF0000)]) == 0
