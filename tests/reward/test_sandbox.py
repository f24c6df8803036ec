"""The sandbox itself, without the static checks in front of it: hostile programs run in a
sandboxed child (as a completion that slipped past the checks would) and the host stays
intact. These run `exec` on purpose: the code under test is the sandbox."""

import os
import signal
import textwrap
import time

import pytest

from kuberft_reward.sandbox import Limits, probe_isolation, run_sandboxed

ISOLATION = probe_isolation()
needs_namespaces = pytest.mark.skipif(not ISOLATION.mount_namespace, reason="no user/mount namespaces on this kernel")
needs_seccomp = pytest.mark.skipif(not ISOLATION.seccomp, reason="no seccomp on this kernel")


def run(program: str, **limits):
    """Run `program` in a sandboxed child; it reports through `report(text)`."""

    def work(fd: int) -> None:
        def report(text: str) -> None:
            os.write(fd, (text + "\n").encode())

        exec(compile(textwrap.dedent(program), "<untrusted>", "exec"), {"report": report})  # noqa: S102

    options = {"wall_seconds": 10.0, "cpu_seconds": 10, "memory_bytes": None, **limits}
    return run_sandboxed(work, Limits(**options), ISOLATION)


def reports(child) -> list[str]:
    return child.result.decode().splitlines()


def test_this_machine_supports_the_full_sandbox():
    # Documents what CI machines give us; the other tests skip what is missing.
    assert ISOLATION.seccomp, ISOLATION.problems
    assert ISOLATION.network_namespace and ISOLATION.read_only_filesystem and ISOLATION.hidden_proc, ISOLATION.problems


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
        """
    )
    assert reports(child) == ["refused: Operation not permitted"] * 3


@needs_namespaces
def test_writes_outside_the_private_tmp_fail_and_tmp_is_private(tmp_path):
    host_tmp_file = tmp_path / "escaped.txt"  # the host's /tmp is not even visible
    child = run(
        f"""
        for path in ({str(host_tmp_file)!r}, "/etc/kuberft-escape", "/var/tmp/kuberft-escape.txt"):
            try:
                open(path, "w").write("x")
                report("wrote " + path)
            except OSError as e:
                report(e.strerror)
        open("/tmp/inside.txt", "w").write("private")
        report(open("/tmp/inside.txt").read())
        """
    )
    assert reports(child) == ["No such file or directory", "Read-only file system", "Read-only file system", "private"]
    # (a path outside /tmp that the host can write: inside, every mount but /tmp is read-only)
    assert not host_tmp_file.exists() and not os.path.exists("/tmp/inside.txt")
    assert not os.path.exists("/var/tmp/kuberft-escape.txt")


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


@needs_seccomp
def test_cannot_signal_the_parent_or_anyone_else():
    child = run(
        f"""
        import os, signal
        for pid in (os.getppid(), {os.getpid()}, -1, 1):
            try:
                os.kill(pid, signal.SIGKILL)
                report("killed")
            except OSError as e:
                report(e.strerror)
        """
    )
    assert reports(child) == ["Operation not permitted"] * 4
    assert child.exit_code == 0


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


@needs_seccomp
def test_without_namespaces_the_sandbox_still_blocks_network_and_processes():
    """As in a pod under the RuntimeDefault seccomp profile, where unshare is refused."""
    from kuberft_reward import seccomp

    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # an outer process whose own filter refuses unshare, like the container runtime's
        try:
            os.close(read_end)
            _refuse_unshare(seccomp)
            isolation = probe_isolation()

            def work(fd):
                import socket

                lines = [f"namespaces={isolation.mount_namespace} seccomp={isolation.seccomp}"]
                for attempt in (lambda: socket.socket(), lambda: os.fork()):
                    try:
                        attempt()
                        lines.append("allowed")
                    except OSError as e:
                        lines.append(e.strerror)
                lines.append(os.getcwd().startswith(("/tmp/kuberft-sandbox-", "/var/tmp/kuberft-sandbox-")) and "private dir" or os.getcwd())
                os.write(fd, "\n".join(lines).encode())

            child = run_sandboxed(work, Limits(wall_seconds=10, memory_bytes=None), isolation)
            os.write(write_end, child.result)
        finally:
            os._exit(0)
    os.close(write_end)
    report = b""
    while chunk := os.read(read_end, 4096):
        report += chunk
    os.close(read_end)
    os.waitpid(pid, 0)
    assert report.decode().splitlines() == [
        "namespaces=False seccomp=True", "Operation not permitted", "Operation not permitted", "private dir",
    ]


def _refuse_unshare(seccomp) -> None:
    """Install a filter that refuses only unshare(2), as container runtimes' default profiles do."""
    import ctypes
    import errno
    import platform

    arch = seccomp._ARCHES[platform.machine().lower()]
    program = b"".join(
        [
            seccomp._insn(seccomp._LD_W_ABS, 0, 0, seccomp._NR),
            seccomp._insn(seccomp._JEQ_K, 0, 1, arch.syscalls["unshare"]),
            seccomp._insn(seccomp._RET_K, 0, 0, seccomp._RET_ERRNO | errno.EPERM),
            seccomp._insn(seccomp._RET_K, 0, 0, seccomp._RET_ALLOW),
        ]
    )
    libc = ctypes.CDLL(None, use_errno=True)
    buf = ctypes.create_string_buffer(program, len(program))
    fprog = seccomp._SockFprog(len(program) // 8, ctypes.cast(buf, ctypes.c_void_p))
    assert libc.prctl(seccomp._PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) == 0
    assert libc.prctl(seccomp._PR_SET_SECCOMP, seccomp._SECCOMP_MODE_FILTER, ctypes.byref(fprog), 0, 0) == 0
