"""A seccomp-bpf filter for the sandboxed child, built with ctypes (no libseccomp needed).

The filter keeps the child inside its process: it may not create sockets (no network even
where network namespaces are unavailable), start processes (no fork bombs, no `execve` of a
shell), signal or trace any process but itself, change its session (so the worker can always
kill it), or touch namespaces, mounts, kernel keys, BPF and similar host-level facilities.
Everything else (memory, files inside the private temporary directory, threads) is allowed:
the interpreter and numpy need it.
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


_CLONE_THREAD = 0x00010000


@dataclass(frozen=True)
class _Arch:
    audit_arch: int
    syscalls: dict[str, int]
    x32_bit: int | None = None


# Numbers from the kernel headers (asm/unistd_64.h for x86_64, asm-generic/unistd.h for arm64).
_X86_64 = _Arch(
    0xC000003E,
    {
        "socket": 41, "socketpair": 53, "clone": 56, "fork": 57, "vfork": 58, "execve": 59, "kill": 62,
        "ptrace": 101, "setpgid": 109, "setsid": 112, "pivot_root": 155, "chroot": 161, "acct": 163,
        "settimeofday": 164, "mount": 165, "umount2": 166, "swapon": 167, "swapoff": 168, "reboot": 169,
        "sethostname": 170, "setdomainname": 171, "iopl": 172, "ioperm": 173, "init_module": 175,
        "delete_module": 176, "quotactl": 179, "tkill": 200, "clock_settime": 227, "tgkill": 234,
        "kexec_load": 246, "add_key": 248, "request_key": 249, "keyctl": 250, "unshare": 272,
        "perf_event_open": 298, "name_to_handle_at": 303, "open_by_handle_at": 304, "setns": 308,
        "process_vm_readv": 310, "process_vm_writev": 311, "finit_module": 313, "bpf": 321, "execveat": 322,
        "userfaultfd": 323, "pidfd_send_signal": 424, "io_uring_setup": 425, "io_uring_enter": 426,
        "io_uring_register": 427, "open_tree": 428, "move_mount": 429, "fsopen": 430, "fsconfig": 431,
        "fsmount": 432, "fspick": 433, "pidfd_open": 434, "clone3": 435, "pidfd_getfd": 438, "mount_setattr": 442,
    },
    x32_bit=0x40000000,
)
_AARCH64 = _Arch(
    0xC00000B7,
    {
        "umount2": 39, "mount": 40, "pivot_root": 41, "chroot": 51, "quotactl": 60, "acct": 89, "unshare": 97,
        "kexec_load": 104, "init_module": 105, "delete_module": 106, "clock_settime": 112, "ptrace": 117,
        "kill": 129, "tkill": 130, "tgkill": 131, "reboot": 142, "setpgid": 154, "setsid": 157,
        "sethostname": 161, "setdomainname": 162, "settimeofday": 170, "socket": 198, "socketpair": 199,
        "add_key": 217, "request_key": 218, "keyctl": 219, "clone": 220, "execve": 221, "swapon": 224,
        "swapoff": 225, "perf_event_open": 241, "name_to_handle_at": 264, "open_by_handle_at": 265, "setns": 268,
        "process_vm_readv": 270, "process_vm_writev": 271, "finit_module": 273, "bpf": 280, "execveat": 281,
        "userfaultfd": 282, "pidfd_send_signal": 424, "io_uring_setup": 425, "io_uring_enter": 426,
        "io_uring_register": 427, "open_tree": 428, "move_mount": 429, "fsopen": 430, "fsconfig": 431,
        "fsmount": 432, "fspick": 433, "pidfd_open": 434, "clone3": 435, "pidfd_getfd": 438, "mount_setattr": 442,
    },
)
_ARCHES = {"x86_64": _X86_64, "amd64": _X86_64, "aarch64": _AARCH64, "arm64": _AARCH64}

# Refused outright (EPERM). fork/vfork exist on x86_64 only.
_DENIED = (
    "socket", "socketpair", "fork", "vfork", "execve", "execveat", "ptrace", "setpgid", "setsid", "tkill",
    "pidfd_send_signal", "pidfd_open", "pidfd_getfd", "process_vm_readv", "process_vm_writev", "pivot_root",
    "chroot", "acct", "settimeofday", "clock_settime", "mount", "umount2", "swapon", "swapoff", "reboot",
    "sethostname", "setdomainname", "iopl", "ioperm", "init_module", "finit_module", "delete_module", "quotactl",
    "kexec_load", "add_key", "request_key", "keyctl", "unshare", "setns", "perf_event_open", "name_to_handle_at",
    "open_by_handle_at", "bpf", "userfaultfd", "io_uring_setup", "io_uring_enter", "io_uring_register",
    "open_tree", "move_mount", "fsopen", "fsconfig", "fsmount", "fspick", "mount_setattr",
)
# Allowed to start processes when the device needs a compiler (the GPU path: ptxas).
_PROCESS_CALLS = ("fork", "vfork", "execve", "execveat")


def supported() -> bool:
    return platform.system() == "Linux" and platform.machine().lower() in _ARCHES


def _insn(code: int, jt: int, jf: int, k: int) -> bytes:
    return struct.pack("HBBI", code, jt, jf, k)


def build_filter(own_pid: int, allow_processes: bool = False) -> bytes:
    """The BPF program for the calling process (whose pid the kill/tgkill rules allow)."""
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

    def deny(nr: int, ret: int = eperm) -> None:
        prog.extend([_insn(_JEQ_K, 0, 1, nr), _insn(_RET_K, 0, 0, ret)])

    def allow_if_arg0(nr: int, value: int) -> None:
        # if nr matches: allow when args[0] == value, else EPERM (the accumulator keeps nr otherwise).
        prog.extend(
            [
                _insn(_JEQ_K, 0, 4, nr),
                _insn(_LD_W_ABS, 0, 0, _arg_low(0)),
                _insn(_JEQ_K, 0, 1, value),
                _insn(_RET_K, 0, 0, _RET_ALLOW),
                _insn(_RET_K, 0, 0, eperm),
            ]
        )

    for name in _DENIED:
        if name in arch.syscalls and not (allow_processes and name in _PROCESS_CALLS):
            deny(arch.syscalls[name])
    # clone3 hides its flags in memory the filter cannot read: ENOSYS makes libc fall back to clone.
    deny(arch.syscalls["clone3"], _RET_ERRNO | errno.ENOSYS)
    if not allow_processes:
        # clone: threads only (CLONE_THREAD set in the flags, args[0] on both architectures).
        prog.extend(
            [
                _insn(_JEQ_K, 0, 4, arch.syscalls["clone"]),
                _insn(_LD_W_ABS, 0, 0, _arg_low(0)),
                _insn(_JSET_K, 0, 1, _CLONE_THREAD),
                _insn(_RET_K, 0, 0, _RET_ALLOW),
                _insn(_RET_K, 0, 0, eperm),
            ]
        )
    allow_if_arg0(arch.syscalls["kill"], own_pid)
    allow_if_arg0(arch.syscalls["tgkill"], own_pid)
    prog.append(_insn(_RET_K, 0, 0, _RET_ALLOW))
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
