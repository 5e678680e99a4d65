"""A registration pool: reuse registered buffers instead of registering per message.

Rules of this module:

1. Pure policy, generic over the buffer type: ``allocate(size)`` and ``release(buffer)`` are passed
   in (the adapter registers and deregisters pyverbs MRs; tests pass plain objects). No clock.
2. Sizes round up to a power of two, at least ``min_bytes``, so a buffer serves any message of its
   class. Released buffers are cached per class while the cache holds at most ``max_cached_bytes``;
   beyond that the oldest cached buffers of the largest classes are released first.
3. ``close()`` releases every cached buffer; buffers still lent out are released when returned.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

__all__ = ["PoolStatistics", "RegistrationPool", "size_class"]

B = TypeVar("B")


def size_class(size: int, *, min_bytes: int) -> int:
    """The buffer size serving a message of ``size`` bytes."""
    if size <= 0:
        raise ValueError("size must be positive")
    return max(min_bytes, 1 << (size - 1).bit_length())


@dataclass(frozen=True, slots=True)
class PoolStatistics:
    registrations: int
    """Buffers allocated (registered) so far."""
    reuses: int
    """Requests served from the cache."""
    cached_bytes: int
    """Bytes of registered buffers waiting in the cache."""
    lent_bytes: int
    """Bytes of registered buffers in use."""


class RegistrationPool(Generic[B]):
    def __init__(
        self,
        allocate: Callable[[int], B],
        release: Callable[[B], None],
        *,
        min_bytes: int,
        max_cached_bytes: int,
    ) -> None:
        if min_bytes <= 0 or max_cached_bytes < 0:
            raise ValueError("min_bytes must be positive and max_cached_bytes non-negative")
        self._allocate = allocate
        self._release = release
        self._min = min_bytes
        self._max_cached = max_cached_bytes
        self._free: dict[int, list[B]] = {}
        self._lent: dict[int, int] = {}  # id(buffer) -> size class
        self._cached = 0
        self._lent_bytes = 0
        self._registrations = 0
        self._reuses = 0
        self._closed = False

    def get(self, size: int) -> tuple[B, int]:
        """A buffer of at least ``size`` bytes and its capacity."""
        if self._closed:
            raise RuntimeError("pool is closed")
        cls = size_class(size, min_bytes=self._min)
        free = self._free.get(cls)
        if free:
            buf = free.pop()
            self._cached -= cls
            self._reuses += 1
        else:
            buf = self._allocate(cls)
            self._registrations += 1
        self._lent[id(buf)] = cls
        self._lent_bytes += cls
        return buf, cls

    def put(self, buf: B) -> None:
        cls = self._lent.pop(id(buf))
        self._lent_bytes -= cls
        if self._closed or cls > self._max_cached:
            self._release(buf)
            return
        self._free.setdefault(cls, []).append(buf)
        self._cached += cls
        self._trim()

    def _trim(self) -> None:
        while self._cached > self._max_cached:
            cls = max(c for c, bufs in self._free.items() if bufs)
            buf = self._free[cls].pop(0)
            self._cached -= cls
            self._release(buf)

    def close(self) -> None:
        """Release the cached buffers; later ``put`` calls release immediately."""
        self._closed = True
        for bufs in self._free.values():
            while bufs:
                self._release(bufs.pop())
        self._cached = 0

    def statistics(self) -> PoolStatistics:
        return PoolStatistics(self._registrations, self._reuses, self._cached, self._lent_bytes)
