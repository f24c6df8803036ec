"""A seccomp-bpf ALLOWLIST for the sandboxed child, built with ctypes (no libseccomp needed).

Only the system calls a CPython process running torch (CPU), numpy and the Triton interpreter
needs once everything is imported are allowed; everything else fails with EPERM. The list was
found by tracing (strace) sandboxed children running every shipped kernel task, broken and
hostile programs and custom rewards, then widened with the calls glibc, CPython and OpenMP make
in situations those runs did not hit (threads, timers, waits, pipes, small file operations).

Some allowed calls are restricted by their arguments:

- `clone`: threads only (CLONE_THREAD), unless processes are allowed; never new namespaces.
  `clone3` hides its flags in memory the filter cannot read: it gets ENOSYS, so libc falls
  back to `clone`.
- `kill`, `tgkill`, `rt_sigqueueinfo`, `rt_tgsigqueueinfo`: only to the calling process
  itself (its pid as it sees it: 1 in its own PID namespace).
- `prlimit64`: only reading the caller's own limits (pid 0, no new limit); `setrlimit` is not
  allowed at all, so a child can neither raise its own limits nor lower anyone else's.
- `fcntl` and `ioctl`: anything but F_SETOWN, F_SETOWN_EX, F_SETSIG, FIOSETOWN and SIOCSPGRP,
  which would make the kernel signal a process of the child's choosing (the worker) whenever
  one of its pipes is ready.

Not allowed (EPERM): sockets of any family (AF_UNIX included), `ptrace`, `personality`,
namespaces (`unshare`, `setns`), mounts, `chroot`/`pivot_root`, session and process-group
changes, `tkill`/`pidfd_*`, `process_vm_*`, `bpf`, `perf_event_open`, `userfaultfd`,
`io_uring_*`, keyrings, kernel modules, and `execve`/`fork` unless processes are allowed (the
GPU path runs ptxas).

The default for a call outside the list is EPERM rather than killing the child: the call is
refused either way, and an error leaves libraries that probe optional features working and
the candidate's own traceback saying what it tried. Only a system call through another ABI
(i386 `int 0x80`, x32), which would be a way around every rule here, kills the process.
"""

from __future__ import annotations

import ctypes
import errno
import platform
import struct
from dataclasses import dataclass

# BPF instruction classes and fields (linux/filter.h, linux/bpf_common.h).
_LD_W_ABS = 0x20
_JEQ_K = 0x15
_JSET_K = 0x45
_JGE_K = 0x35
_RET_K = 0x06

_RET_KILL_PROCESS = 0x80000000
_RET_ALLOW = 0x7FFF0000
_RET_ERRNO = 0x00050000

_PR_SET_NO_NEW_PRIVS = 38
_PR_SET_SECCOMP = 22
_SECCOMP_MODE_FILTER = 2

# Offsets in struct seccomp_data: int nr; u32 arch; u64 ip; u64 args[6] (little-endian).
_NR = 0
_ARCH = 4


def _arg_low(i: int) -> int:
    return 16 + 8 * i


def _arg_high(i: int) -> int:
    return 16 + 8 * i + 4


_CLONE_THREAD = 0x00010000
_F_SETOWN, _F_SETSIG, _F_SETOWN_EX = 8, 10, 15
_FIOSETOWN, _SIOCSPGRP = 0x8901, 0x8902
"""Make the kernel signal a chosen process when a descriptor is ready (SIGIO, or any signal
with F_SETSIG): a way to signal the worker without kill()."""
_CLONE_NAMESPACES = 0x00020000 | 0x02000000 | 0x04000000 | 0x08000000 | 0x10000000 | 0x20000000 | 0x40000000
"""CLONE_NEWNS, NEWCGROUP, NEWUTS, NEWIPC, NEWUSER, NEWPID, NEWNET."""

# name: (x86_64 number, aarch64 number); None where the architecture lacks the call.
# From the kernel's asm/unistd_64.h (x86_64) and asm-generic/unistd.h (arm64); the tests
# compare them with the headers when those are installed.
SYSCALLS: dict[str, tuple[int | None, int | None]] = {
    # file descriptors and files
    "read": (0, 63), "write": (1, 64), "readv": (19, 65), "writev": (20, 66), "pread64": (17, 67),
    "pwrite64": (18, 68), "preadv": (295, 69), "pwritev": (296, 70), "preadv2": (327, 286), "pwritev2": (328, 287),
    "lseek": (8, 62), "close": (3, 57), "close_range": (436, 436), "dup": (32, 23), "dup2": (33, None),
    "dup3": (292, 24), "fcntl": (72, 25), "ioctl": (16, 29), "flock": (73, 32), "fsync": (74, 82),
    "fdatasync": (75, 83), "ftruncate": (77, 46), "sendfile": (40, 71), "copy_file_range": (326, 285),
    "pipe": (22, None), "pipe2": (293, 59), "poll": (7, None), "ppoll": (271, 73), "select": (23, None),
    "pselect6": (270, 72), "epoll_create": (213, None), "epoll_create1": (291, 20), "epoll_ctl": (233, 21),
    "epoll_wait": (232, None), "epoll_pwait": (281, 22), "epoll_pwait2": (441, 441), "eventfd": (284, None),
    "eventfd2": (290, 19), "open": (2, None), "openat": (257, 56), "stat": (4, None), "fstat": (5, 80),
    "lstat": (6, None), "newfstatat": (262, 79), "statx": (332, 291), "access": (21, None), "faccessat": (269, 48),
    "faccessat2": (439, 439), "readlink": (89, None), "readlinkat": (267, 78), "getdents": (78, None),
    "getdents64": (217, 61), "getcwd": (79, 17), "chdir": (80, 49), "fchdir": (81, 50), "mkdir": (83, None),
    "mkdirat": (258, 34), "rmdir": (84, None), "unlink": (87, None), "unlinkat": (263, 35), "rename": (82, None),
    "renameat": (264, 38), "renameat2": (316, 276), "umask": (95, 166), "chmod": (90, None), "fchmod": (91, 52),
    "fchmodat": (268, 53), "utimensat": (280, 88), "statfs": (137, 43), "fstatfs": (138, 44),
    "fadvise64": (221, 223),
    # memory
    "brk": (12, 214), "mmap": (9, 222), "munmap": (11, 215), "mremap": (25, 216), "mprotect": (10, 226),
    "madvise": (28, 233), "msync": (26, 227), "mincore": (27, 232), "membarrier": (324, 283),
    "get_mempolicy": (239, 236), "mbind": (237, 235), "set_mempolicy": (238, 237), "memfd_create": (319, 279),
    # identity and information about the caller
    "getpid": (39, 172), "getppid": (110, 173), "gettid": (186, 178), "getuid": (102, 174), "geteuid": (107, 175),
    "getgid": (104, 176), "getegid": (108, 177), "getresuid": (118, 148), "getresgid": (120, 150),
    "getgroups": (115, 158), "getpgrp": (111, None), "getpgid": (121, 155), "getsid": (124, 156), "uname": (63, 160),
    "sysinfo": (99, 179), "getrusage": (98, 165), "times": (100, 153), "getpriority": (140, 141),
    "getcpu": (309, 168), "getrlimit": (97, 163), "prlimit64": (302, 261), "setrlimit": (160, 164),
    "capget": (125, 90), "prctl": (157, 167), "arch_prctl": (158, None),
    # scheduling
    "sched_yield": (24, 124), "sched_getaffinity": (204, 123), "sched_setaffinity": (203, 122),
    "sched_getparam": (143, 121), "sched_getscheduler": (145, 120), "sched_get_priority_max": (146, 125),
    "sched_get_priority_min": (147, 126), "sched_rr_get_interval": (148, 127),
    # threads, processes
    "clone": (56, 220), "clone3": (435, 435), "fork": (57, None), "vfork": (58, None), "execve": (59, 221),
    "execveat": (322, 281), "wait4": (61, 260), "waitid": (247, 95), "futex": (202, 98),
    "set_robust_list": (273, 99), "rseq": (334, 293), "set_tid_address": (218, 96), "exit": (60, 93),
    "exit_group": (231, 94), "restart_syscall": (219, 128),
    # signals and timers
    "rt_sigaction": (13, 134), "rt_sigprocmask": (14, 135), "rt_sigreturn": (15, 139), "rt_sigpending": (127, 136),
    "rt_sigsuspend": (130, 133), "rt_sigtimedwait": (128, 137), "sigaltstack": (131, 132), "pause": (34, None),
    "alarm": (37, None), "setitimer": (38, 103), "getitimer": (36, 102), "timer_create": (222, 107),
    "timer_settime": (223, 110), "timer_gettime": (224, 108), "timer_getoverrun": (225, 109),
    "timer_delete": (226, 111), "kill": (62, 129), "tgkill": (234, 131), "tkill": (200, 130),
    "rt_sigqueueinfo": (129, 138), "rt_tgsigqueueinfo": (297, 240), "pidfd_send_signal": (424, 424),
    # time, randomness
    "clock_gettime": (228, 113), "clock_getres": (229, 114), "clock_nanosleep": (230, 115), "nanosleep": (35, 101),
    "gettimeofday": (96, 169), "time": (201, None), "getrandom": (318, 278),
    # never allowed; named here for the tests and for readers
    "socket": (41, 198), "socketpair": (53, 199), "ptrace": (101, 117), "personality": (135, 92),
    "unshare": (272, 97), "setns": (308, 268), "mount": (165, 40), "umount2": (166, 39), "pivot_root": (155, 41),
    "chroot": (161, 51), "setsid": (112, 157), "setpgid": (109, 154), "process_vm_readv": (310, 270),
    "process_vm_writev": (311, 271), "bpf": (321, 280), "perf_event_open": (298, 241), "userfaultfd": (323, 282),
    "io_uring_setup": (425, 425), "keyctl": (250, 219), "add_key": (248, 217), "request_key": (249, 218),
}

ALLOWED = (
    # files and descriptors (what can be reached is the mounts' business: read-only binds and a
    # private /tmp)
    "read", "write", "readv", "writev", "pread64", "pwrite64", "preadv", "pwritev", "preadv2", "pwritev2", "lseek",
    "close", "close_range", "dup", "dup2", "dup3", "flock", "fsync", "fdatasync", "ftruncate",
    "sendfile", "copy_file_range", "pipe", "pipe2", "poll", "ppoll", "select", "pselect6", "epoll_create",
    "epoll_create1", "epoll_ctl", "epoll_wait", "epoll_pwait", "epoll_pwait2", "eventfd", "eventfd2", "open",
    "openat", "stat", "fstat", "lstat", "newfstatat", "statx", "access", "faccessat", "faccessat2", "readlink",
    "readlinkat", "getdents", "getdents64", "getcwd", "chdir", "fchdir", "mkdir", "mkdirat", "rmdir", "unlink",
    "unlinkat", "rename", "renameat", "renameat2", "umask", "chmod", "fchmod", "fchmodat", "utimensat", "statfs",
    "fstatfs", "fadvise64",
    # memory
    "brk", "mmap", "munmap", "mremap", "mprotect", "madvise", "msync", "mincore", "membarrier", "get_mempolicy",
    # about itself (getrlimit only reads)
    "getpid", "getppid", "gettid", "getuid", "geteuid", "getgid", "getegid", "getresuid", "getresgid", "getgroups",
    "getpgrp", "getpgid", "getsid", "uname", "sysinfo", "getrusage", "times", "getpriority", "getcpu", "getrlimit",
    "capget", "prctl", "arch_prctl",
    # scheduling (reading only)
    "sched_yield", "sched_getaffinity", "sched_getparam", "sched_getscheduler", "sched_get_priority_max",
    "sched_get_priority_min", "sched_rr_get_interval",
    # threads, waiting, exiting
    "wait4", "waitid", "futex", "set_robust_list", "rseq", "set_tid_address", "exit", "exit_group", "restart_syscall",
    # its own signal handling and timers
    "rt_sigaction", "rt_sigprocmask", "rt_sigreturn", "rt_sigpending", "rt_sigsuspend", "rt_sigtimedwait",
    "sigaltstack", "pause", "alarm", "setitimer", "getitimer", "timer_create", "timer_settime", "timer_gettime",
    "timer_getoverrun", "timer_delete",
    # time, randomness
    "clock_gettime", "clock_getres", "clock_nanosleep", "nanosleep", "gettimeofday", "time", "getrandom",
)
"""Allowed with any arguments."""

ALLOWED_FOR_PROCESSES = ("execve", "execveat", "fork", "vfork", "mbind", "set_mempolicy", "memfd_create")
"""Added when the child may start processes (the GPU path: Triton runs ptxas, and the CUDA
driver places and pins host memory). Inside the child's own PID namespace these reach only
its own processes."""

CHECKED = ("clone", "clone3", "kill", "tgkill", "rt_sigqueueinfo", "rt_tgsigqueueinfo", "prlimit64", "fcntl", "ioctl")
"""Allowed only with the arguments described in the module docstring."""


@dataclass(frozen=True)
class _Arch:
    audit_arch: int
    index: int  # column in SYSCALLS
    x32_bit: int | None = None

    def number(self, name: str) -> int | None:
        return SYSCALLS[name][self.index]


_X86_64 = _Arch(0xC000003E, 0, x32_bit=0x40000000)
_AARCH64 = _Arch(0xC00000B7, 1)
_ARCHES = {"x86_64": _X86_64, "amd64": _X86_64, "aarch64": _AARCH64, "arm64": _AARCH64}


def supported() -> bool:
    return platform.system() == "Linux" and platform.machine().lower() in _ARCHES


def allowlist(allow_processes: bool = False) -> list[str]:
    """Names of the system calls the filter lets through (some only with checked arguments)
    on this architecture."""
    arch = _ARCHES[platform.machine().lower()]
    names = list(ALLOWED) + list(CHECKED) + (list(ALLOWED_FOR_PROCESSES) if allow_processes else [])
    return [n for n in names if arch.number(n) is not None and n != "clone3"]


def _insn(code: int, jt: int, jf: int, k: int) -> bytes:
    return struct.pack("HBBI", code, jt, jf, k)


def build_filter(own_pid: int, allow_processes: bool = False) -> bytes:
    """The BPF program for the calling process (whose pid the signal rules allow)."""
    arch = _ARCHES[platform.machine().lower()]
    eperm = _RET_ERRNO | errno.EPERM
    prog: list[bytes] = [
        _insn(_LD_W_ABS, 0, 0, _ARCH),
        _insn(_JEQ_K, 1, 0, arch.audit_arch),
        _insn(_RET_K, 0, 0, _RET_KILL_PROCESS),  # another ABI (i386 via int 0x80): no way around the rules
        _insn(_LD_W_ABS, 0, 0, _NR),
    ]
    if arch.x32_bit is not None:
        prog += [_insn(_JGE_K, 0, 1, arch.x32_bit), _insn(_RET_K, 0, 0, _RET_KILL_PROCESS)]

    def allow(name: str) -> None:
        nr = arch.number(name)
        if nr is not None:
            prog.extend([_insn(_JEQ_K, 0, 1, nr), _insn(_RET_K, 0, 0, _RET_ALLOW)])

    def checked(name: str, body: list[bytes]) -> None:
        """`body` runs with the accumulator free when the call is `name`; it must end in RET."""
        nr = arch.number(name)
        if nr is not None:
            prog.append(_insn(_JEQ_K, 0, len(body), nr))
            prog.extend(body)

    def only_self(name: str) -> None:
        # args[0] (a pid_t: the kernel reads the low 32 bits) must be the caller's own pid.
        checked(name, [
            _insn(_LD_W_ABS, 0, 0, _arg_low(0)),
            _insn(_JEQ_K, 0, 1, own_pid),
            _insn(_RET_K, 0, 0, _RET_ALLOW),
            _insn(_RET_K, 0, 0, eperm),
        ])

    # Rules that read arguments first: the kernel caches the verdict of the others per system
    # call number (Linux 5.11+), but runs the program for these.
    checked("clone3", [_insn(_RET_K, 0, 0, _RET_ERRNO | errno.ENOSYS)])
    # clone(flags, ...): flags are args[0] on both architectures; the kernel uses their low 32 bits.
    clone_body = [
        _insn(_LD_W_ABS, 0, 0, _arg_low(0)),
        _insn(_JSET_K, 0, 1, _CLONE_NAMESPACES),
        _insn(_RET_K, 0, 0, eperm),
    ]
    if allow_processes:
        clone_body.append(_insn(_RET_K, 0, 0, _RET_ALLOW))
    else:
        clone_body += [
            _insn(_JSET_K, 0, 1, _CLONE_THREAD),
            _insn(_RET_K, 0, 0, _RET_ALLOW),
            _insn(_RET_K, 0, 0, eperm),
        ]
    checked("clone", clone_body)
    for name in ("kill", "tgkill", "rt_sigqueueinfo", "rt_tgsigqueueinfo"):
        only_self(name)
    # fcntl(fd, cmd, ...) and ioctl(fd, request, ...): everything but naming the process the
    # kernel signals when the descriptor is ready (the kernel reads the low 32 bits of both).
    checked("fcntl", [
        _insn(_LD_W_ABS, 0, 0, _arg_low(1)),
        _insn(_JEQ_K, 2, 0, _F_SETOWN),
        _insn(_JEQ_K, 1, 0, _F_SETSIG),
        _insn(_JEQ_K, 0, 1, _F_SETOWN_EX),
        _insn(_RET_K, 0, 0, eperm),
        _insn(_RET_K, 0, 0, _RET_ALLOW),
    ])
    checked("ioctl", [
        _insn(_LD_W_ABS, 0, 0, _arg_low(1)),
        _insn(_JEQ_K, 1, 0, _FIOSETOWN),
        _insn(_JEQ_K, 0, 1, _SIOCSPGRP),
        _insn(_RET_K, 0, 0, eperm),
        _insn(_RET_K, 0, 0, _RET_ALLOW),
    ])
    # prlimit64(pid, resource, new_limit, old_limit): reading its own limits only.
    checked("prlimit64", [
        _insn(_LD_W_ABS, 0, 0, _arg_low(0)),
        _insn(_JEQ_K, 0, 5, 0),
        _insn(_LD_W_ABS, 0, 0, _arg_low(2)),
        _insn(_JEQ_K, 0, 3, 0),
        _insn(_LD_W_ABS, 0, 0, _arg_high(2)),
        _insn(_JEQ_K, 0, 1, 0),
        _insn(_RET_K, 0, 0, _RET_ALLOW),
        _insn(_RET_K, 0, 0, eperm),
    ])
    for name in ALLOWED:
        allow(name)
    if allow_processes:
        for name in ALLOWED_FOR_PROCESSES:
            allow(name)
    prog.append(_insn(_RET_K, 0, 0, eperm))
    return b"".join(prog)


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def install(own_pid: int, allow_processes: bool = False) -> None:
    """Install the filter on the calling thread's process; irreversible. Raises OSError."""
    program = build_filter(own_pid, allow_processes)
    libc = ctypes.CDLL(None, use_errno=True)
    buf = ctypes.create_string_buffer(program, len(program))
    fprog = _SockFprog(len(program) // 8, ctypes.cast(buf, ctypes.c_void_p))
    if libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"prctl(PR_SET_NO_NEW_PRIVS): {errno.errorcode.get(err, err)}")
    if libc.prctl(_PR_SET_SECCOMP, _SECCOMP_MODE_FILTER, ctypes.byref(fprog), 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"prctl(PR_SET_SECCOMP): {errno.errorcode.get(err, err)}")
