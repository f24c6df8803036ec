"""The zygote: the clean process every sandboxed child is forked from.

A worker forks its zygote at start-up, after importing torch and triton and before any reference
output, comparison or other evaluation exists, so nothing of those is in the memory a child
inherits (walking frames or `gc.get_objects()` in a child finds only its own run). For each run
the worker sends a request (which harness entry point, its arguments, the inputs as encoded
bytes) with the write ends of the child's result and output pipes attached (SCM_RIGHTS). The
zygote forks the child, closes its own copies, tells the worker the child's pid, reaps it and
says how it ended. It never reads what a child sends: the worker reads the pipes itself, so no
output of one run can reach a later child through the zygote's memory.

Requests and replies are the channel's frames (a JSON header plus raw bytes) on a Unix socket.
"""

from __future__ import annotations

import gc
import importlib
import json
import os
import signal
import socket
import struct
import sys
import time
from dataclasses import asdict
from functools import partial
from typing import Any

from . import channel, harness
from .sandbox import ChildExit, ChildRun, Isolation, Limits, collect, kill_child, prepare_zygote, start_child, wait_child

_LENGTHS = struct.Struct("<IQ")
REPLY_GRACE_SECONDS = 10.0


class ZygoteFailed(RuntimeError):
    """The zygote died, stopped answering or answered nonsense: the worker must be replaced."""


def _send(sock: socket.socket, header: dict[str, Any], payload: bytes = b"", fds: tuple[int, ...] = ()) -> None:
    body = json.dumps(header).encode()
    data = _LENGTHS.pack(len(body), len(payload)) + body + payload
    first, rest = data[:_LENGTHS.size], data[_LENGTHS.size:]
    if fds:
        socket.send_fds(sock, [first], list(fds))
    else:
        sock.sendall(first)
    sock.sendall(rest)


def _recv_exact(sock: socket.socket, size: int) -> bytes:
    parts = bytearray()
    while len(parts) < size:
        chunk = sock.recv(min(size - len(parts), 1 << 20))
        if not chunk:
            raise EOFError("the zygote socket closed")
        parts += chunk
    return bytes(parts)


def _recv(sock: socket.socket, want_fds: int = 0) -> tuple[dict[str, Any], bytes, list[int]]:
    fds: list[int] = []
    if want_fds:
        first, fds, _, _ = socket.recv_fds(sock, _LENGTHS.size, want_fds)
        if not first:
            raise EOFError("the zygote socket closed")
        first += _recv_exact(sock, _LENGTHS.size - len(first))
    else:
        first = _recv_exact(sock, _LENGTHS.size)
    header_len, payload_len = _LENGTHS.unpack(first)
    header = json.loads(_recv_exact(sock, header_len))
    return header, _recv_exact(sock, payload_len), fds


# --------------------------------------------------------------------------- the zygote's side


def _work(header: dict[str, Any], payload: bytes, device: str):
    """The harness entry point a request names, with its arguments (decoded here, in the
    zygote, from the worker's own bytes)."""
    kind = header["kind"]
    if kind == "reference":
        return partial(harness.run_reference, task_source=header["task_source"], plan=header["plan"], device=device)
    if kind == "candidate":
        inits, inputs = channel.decode_values(header["values"], payload)
        cases = [{"index": index, "init": init, "inputs": case_inputs} for (index, init), case_inputs in zip(header["cases"], inputs)]
        inits = [{"args": args, "perturbed": perturbed} for args, perturbed in zip(inits, header["perturbed"])]
        return partial(
            harness.run_candidate, program=header["program"], inits=inits, cases=cases, plan=header["plan"],
            device=device, noop=header["noop"], policy=header["policy"],
        )
    if kind == "custom":
        module_name, _, function_name = header["module"].partition(":")
        function = getattr(importlib.import_module(module_name), function_name)
        return partial(harness.run_custom, function=function, completion=header["completion"], row=header["row"], args=header["args"])
    raise ValueError(f"unknown run kind {kind!r}")


def _serve(sock: socket.socket, isolation: Isolation, device: str) -> None:
    while True:
        try:
            header, payload, fds = _recv(sock, want_fds=2)
        except EOFError:
            return
        if len(fds) != 2:
            for fd in fds:
                os.close(fd)
            _send(sock, {"error": "a run request must carry the result and output pipes"})
            continue
        result_w, log_w = fds
        limits = Limits(**header["limits"])
        try:
            work = _work(header, payload, device)
        except Exception as e:  # noqa: BLE001 - e.g. a custom reward module that does not import
            os.close(result_w)
            os.close(log_w)
            _send(sock, {"error": f"{type(e).__name__}: {e}"})
            continue
        del payload
        try:
            pid = start_child(work, result_w, log_w, limits, isolation)
        finally:
            os.close(result_w)
            os.close(log_w)
        del work
        _send(sock, {"pid": pid})
        ended = wait_child(pid, time.monotonic() + limits.wall_seconds + REPLY_GRACE_SECONDS)
        _send(sock, {"exit": asdict(ended)})


def _zygote_main(sock: socket.socket, isolation: Isolation, device: str) -> None:
    """In the forked zygote: keep only the socket (and stderr), then serve."""
    keep = {sock.fileno(), 2}
    for fd in _open_fds():
        if fd not in keep:
            try:
                os.close(fd)
            except OSError:
                pass
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 0)
    os.dup2(2, 1)
    code = 0
    try:
        prepare_zygote()  # single-threaded now (just forked): children can go straight into PID namespaces
        # torch and triton's ~200k objects move to the permanent generation: the collection a
        # child runs after every forward (host_guard) then scans only the program's objects
        # (0.4 ms instead of 0.2-0.4 s), and no collection in a child touches the shared pages.
        gc.freeze()
        _serve(sock, isolation, device)
    except BaseException:  # noqa: BLE001 - the worker sees the socket close and is replaced
        import traceback

        traceback.print_exc()
        code = 1
    os._exit(code)


def _open_fds() -> list[int]:
    try:
        return [int(name) for name in os.listdir("/proc/self/fd")]
    except OSError:
        return list(range(3, 1024))


# --------------------------------------------------------------------------- the worker's side


class Zygote:
    """The worker's handle on its zygote."""

    def __init__(self, isolation: Isolation, device: str):
        self.isolation = isolation
        self.device = device
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            ours.close()
            _zygote_main(theirs, isolation, device)
        theirs.close()
        self.pid = pid
        self.sock = ours

    def run(self, header: dict[str, Any], payload: bytes, limits: Limits) -> ChildRun:
        """Run one sandboxed child from the zygote and collect what it sends and how it ended."""
        result_r, result_w = os.pipe()
        log_r, log_w = os.pipe()
        start = time.monotonic()
        deadline = start + limits.wall_seconds
        try:
            self.sock.settimeout(REPLY_GRACE_SECONDS)
            _send(self.sock, {**header, "limits": asdict(limits)}, payload, (result_w, log_w))
            reply, _, _ = _recv(self.sock)
        except (OSError, EOFError, ValueError) as e:
            os.close(result_r)
            os.close(log_r)
            raise ZygoteFailed(f"the zygote did not take the run ({e})") from None
        finally:
            os.close(result_w)
            os.close(log_w)
        if "error" in reply:
            os.close(result_r)
            os.close(log_r)
            raise RunRefused(reply["error"])
        pid = int(reply["pid"])
        run = collect(result_r, log_r, limits, deadline, lambda: kill_child(pid))
        try:
            self.sock.settimeout(max(deadline - time.monotonic(), 0) + 2 * REPLY_GRACE_SECONDS)
            ended, _, _ = _recv(self.sock)
            ChildExit(**ended["exit"]).apply(run)
        except (OSError, EOFError, ValueError, KeyError, TypeError) as e:
            kill_child(pid)
            raise ZygoteFailed(f"the zygote did not report how the child ended ({e})") from None
        run.wall_seconds = time.monotonic() - start
        return run

    def close(self) -> None:
        """Stop the zygote (it holds nothing worth a graceful end)."""
        self.sock.close()
        try:
            os.kill(self.pid, signal.SIGKILL)
            os.waitpid(self.pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass


class RunRefused(ValueError):
    """The zygote could not prepare the run (e.g. a custom reward's module does not import)."""

