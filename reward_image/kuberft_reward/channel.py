"""The result channel between a sandboxed child and its worker: length-prefixed frames of a
JSON header plus raw bytes, and a codec for tensors and plain values that never unpickles.

What arrives from a child running untrusted code is untrusted: `read_frames` and
`decode_values` check every length, dtype and shape and raise `ChannelError` on anything
malformed."""

from __future__ import annotations

import json
import math
import os
import struct
from typing import Any

_HEADER = struct.Struct("<IQ")  # header length, payload length
MAX_HEADER = 1 << 20
MAX_DEPTH = 8
MAX_ITEMS = 4096

# dtype name -> (torch attribute, item size)
DTYPES = {
    "float32": 4, "float64": 8, "float16": 2, "bfloat16": 2, "int64": 8, "int32": 4, "int16": 2, "int8": 1,
    "uint8": 1, "bool": 1, "complex64": 8,
}


class ChannelError(ValueError):
    """The child sent something that is not a well-formed result."""


def send(fd: int, header: dict[str, Any], payload: bytes = b"") -> None:
    body = json.dumps(header, allow_nan=False).encode()
    data = _HEADER.pack(len(body), len(payload)) + body + payload
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def read_frames(data: bytes) -> tuple[list[tuple[dict[str, Any], bytes]], bool]:
    """All complete frames in `data`, and whether the data ended cleanly (no partial frame)."""
    frames = []
    offset = 0
    while offset < len(data):
        if len(data) - offset < _HEADER.size:
            return frames, False
        header_len, payload_len = _HEADER.unpack_from(data, offset)
        if header_len > MAX_HEADER:
            raise ChannelError(f"frame header of {header_len} bytes")
        start = offset + _HEADER.size
        end = start + header_len + payload_len
        if end > len(data):
            return frames, False
        try:
            header = json.loads(data[start : start + header_len])
        except (ValueError, UnicodeDecodeError) as e:
            raise ChannelError(f"frame header is not JSON: {e}") from None
        except RecursionError:
            raise ChannelError("frame header nested too deeply") from None
        if not isinstance(header, dict):
            raise ChannelError("frame header is not an object")
        frames.append((header, data[start + header_len : end]))
        offset = end
    return frames, True


# --------------------------------------------------------------------------- values


def encode_values(value: Any) -> tuple[Any, bytes]:
    """(spec, payload) for a nest of tensors, numbers, strings, None, lists, tuples and dicts
    with string keys."""
    chunks: list[bytes] = []
    size = [0]

    def enc(v: Any, depth: int) -> Any:
        import torch

        if depth > MAX_DEPTH:
            raise ChannelError("value nested too deeply")
        if isinstance(v, torch.Tensor):
            t = v.detach()
            if t.device.type != "cpu":
                t = t.cpu()
            t = t.contiguous()
            dtype = str(t.dtype).removeprefix("torch.")
            if dtype not in DTYPES:
                raise ChannelError(f"tensor dtype {dtype} is not supported")
            raw = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
            spec = {"t": "tensor", "dtype": dtype, "shape": list(t.shape), "offset": size[0], "nbytes": len(raw)}
            chunks.append(raw)
            size[0] += len(raw)
            return spec
        if v is None:
            return {"t": "none"}
        if isinstance(v, bool):
            return {"t": "bool", "v": v}
        if isinstance(v, int):
            return {"t": "int", "v": v}
        if isinstance(v, float):
            return {"t": "float", "v": repr(v)}
        if isinstance(v, str):
            return {"t": "str", "v": v}
        if isinstance(v, (list, tuple)):
            if len(v) > MAX_ITEMS:
                raise ChannelError("sequence too long")
            return {"t": "tuple" if isinstance(v, tuple) else "list", "items": [enc(x, depth + 1) for x in v]}
        if isinstance(v, dict) and all(isinstance(k, str) for k in v):
            return {"t": "dict", "items": {k: enc(x, depth + 1) for k, x in v.items()}}
        if hasattr(v, "dtype") and hasattr(v, "item") and not hasattr(v, "shape"):
            return enc(v.item(), depth)
        raise ChannelError(f"cannot send a value of type {type(v).__name__}")

    spec = enc(value, 0)
    return spec, b"".join(chunks)


def decode_values(spec: Any, payload: bytes) -> Any:
    """The inverse of `encode_values`, validating everything."""
    import torch

    def dec(s: Any, depth: int) -> Any:
        if depth > MAX_DEPTH or not isinstance(s, dict):
            raise ChannelError("malformed value")
        kind = s.get("t")
        if kind == "tensor":
            dtype, shape, offset, nbytes = s.get("dtype"), s.get("shape"), s.get("offset"), s.get("nbytes")
            if dtype not in DTYPES:
                raise ChannelError(f"tensor dtype {dtype!r}")
            if not isinstance(shape, list) or len(shape) > 8 or not all(isinstance(d, int) and d >= 0 for d in shape):
                raise ChannelError("tensor shape")
            if not isinstance(offset, int) or not isinstance(nbytes, int) or offset < 0 or offset + nbytes > len(payload):
                raise ChannelError("tensor bytes out of range")
            if math.prod(shape) * DTYPES[dtype] != nbytes:
                raise ChannelError("tensor size does not match its shape")
            torch_dtype = getattr(torch, dtype)
            if nbytes == 0:
                return torch.empty(shape, dtype=torch_dtype)
            raw = bytearray(payload[offset : offset + nbytes])
            return torch.frombuffer(raw, dtype=torch.uint8).view(torch_dtype).reshape(shape)
        if kind == "none":
            return None
        if kind == "bool":
            return bool(s.get("v"))
        if kind == "int":
            if not isinstance(s.get("v"), int):
                raise ChannelError("int")
            return s["v"]
        if kind == "float":
            try:
                return float(s.get("v"))
            except (TypeError, ValueError):
                raise ChannelError("float") from None
        if kind == "str":
            if not isinstance(s.get("v"), str):
                raise ChannelError("str")
            return s["v"]
        if kind in ("list", "tuple"):
            items = s.get("items")
            if not isinstance(items, list) or len(items) > MAX_ITEMS:
                raise ChannelError("sequence")
            values = [dec(x, depth + 1) for x in items]
            return tuple(values) if kind == "tuple" else values
        if kind == "dict":
            items = s.get("items")
            if not isinstance(items, dict):
                raise ChannelError("dict")
            return {str(k): dec(x, depth + 1) for k, x in items.items()}
        raise ChannelError(f"unknown value kind {kind!r}")

    return dec(spec, 0)
