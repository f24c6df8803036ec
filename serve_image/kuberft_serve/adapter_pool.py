"""Which LoRA adapters are served, and which of them are resident in memory now.

An adapter is *known* once registered with its directory (at start-up, or by
`POST /v1/load_lora_adapter`): requests may name it. It is *resident* while its weights are in
the runner. At most `max_loras` adapters are resident at once, and their weights take at most
`max_bytes`; to make room for another, the least recently used adapter that no running request
uses is evicted. A request naming a known adapter that was evicted reloads it from its directory;
when every resident adapter is in use and there is no room, the request waits for one to free up.

The pool is not thread-safe by itself: the engine calls it under its lock, from its own thread
(admission) and from the server's (load and unload).
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from pathlib import Path

from .lora import AdapterError

log = logging.getLogger(__name__)


class AdapterNameTaken(ValueError):
    """A name already served."""


class AdapterPool:
    def __init__(self, runner, *, max_loras: int | None = None, max_bytes: int | None = None):
        self.runner = runner
        self.max_loras = max_loras
        """Adapters resident at once (None: no limit)."""
        self.max_bytes = max_bytes
        """Memory the resident adapters' weights may take, in bytes (None: no limit)."""
        self.paths: dict[str, str] = {}
        """Known adapters: served name -> directory."""
        self.resident: OrderedDict[str, int] = OrderedDict()
        """Resident adapters -> their weights' bytes, least recently used first."""
        self.loads = 0
        """Adapters read into the runner since start (reloads after eviction included)."""
        self.evictions = 0

    # ------------------------------------------------------------------ the API's view
    def __contains__(self, name: str) -> bool:
        return name in self.paths

    @property
    def names(self) -> list[str]:
        return list(self.paths)

    def register(self, name: str, path: str, weights=None) -> None:
        """Make `name` servable from `path`. `weights` (the runner's `read_adapter(path)`, read
        beforehand, off the engine's lock) are put in memory now if they fit without evicting
        another adapter (so the first `max_loras` listed at start-up are the resident ones);
        otherwise the first request for `name` loads them."""
        if name in self.paths:
            raise AdapterNameTaken(f"The lora adapter '{name}' has already been loaded.")
        weights = self.runner.read_adapter(path) if weights is None else weights
        size = self._size(weights, path)
        if self.max_bytes is not None and size > self.max_bytes:
            raise AdapterError(f"adapter {name!r} takes {size / 2**20:.1f} MiB, more than the adapter memory budget "
                               f"of {self.max_bytes / 2**20:.1f} MiB")
        self.paths[name] = path
        if self._fits(size):
            self._put(name, weights, size)

    def unregister(self, name: str, busy: set) -> None:
        """Forget `name`: new requests cannot name it. Its weights leave memory now, or when the
        requests decoding with it finish (`release_forgotten`)."""
        del self.paths[name]
        self.release_forgotten(busy)

    def release_forgotten(self, busy: set) -> None:
        for name in [n for n in self.resident if n not in self.paths and n not in busy]:
            self._evict(name, reason="unloaded")

    # ------------------------------------------------------------------ admission
    def acquire(self, name: str, busy: set) -> bool:
        """Make `name` resident for a request (mark it most recently used), evicting idle
        adapters (not in `busy`) when needed. False when there is no room now."""
        if name in self.resident:
            self.resident.move_to_end(name)
            return True
        if name not in self.paths:
            raise KeyError(f"adapter {name!r} is not loaded")
        path = self.paths[name]
        weights = self.runner.read_adapter(path)
        size = self._size(weights, path)
        if not self._make_room(size, busy):
            return False
        self._put(name, weights, size)
        log.info("adapter %s reloaded from %s", name, path)
        return True

    # ------------------------------------------------------------------ helpers
    def _size(self, weights, path: str) -> int:
        nbytes = getattr(weights, "nbytes", None)
        if nbytes is not None:
            return nbytes
        # a peft directory: its weights file is what peft puts in memory
        files = [f for f in Path(path).glob("adapter_model.*") if f.is_file()]
        return sum(f.stat().st_size for f in files)

    def _fits(self, size: int) -> bool:
        count_ok = self.max_loras is None or len(self.resident) < self.max_loras
        bytes_ok = self.max_bytes is None or sum(self.resident.values()) + size <= self.max_bytes
        return count_ok and bytes_ok

    def _make_room(self, size: int, busy: set) -> bool:
        while not self._fits(size):
            idle = next((n for n in self.resident if n not in busy), None)
            if idle is None:
                return False
            self._evict(idle, reason="least recently used")
        return True

    def _put(self, name: str, weights, size: int) -> None:
        if name in self.resident:  # a new directory for a loaded name
            self.runner.remove_adapter(name)
            del self.resident[name]
        self.runner.add_adapter(name, weights)
        self.resident[name] = size
        self.loads += 1

    def _evict(self, name: str, reason: str) -> None:
        self.runner.remove_adapter(name)
        del self.resident[name]
        self.evictions += 1
        log.info("adapter %s left memory (%s)", name, reason)
