"""A send buffer for aioquic streams that never moves the bytes it holds.

aioquic 1.7.2 keeps a stream's unacknowledged and unsent data in one ``bytearray``: ``write`` appends,
``get_frame`` slices, and an ACK deletes from the front. CPython deletes from the front of a
bytearray by moving its start, but the next append that outgrows the allocation copies the whole
remaining buffer. A bulk sender holds one to two bandwidth-delay products there (8 MB at 100 Mbit/s
and 320 ms), so every 256 KiB write copied megabytes: 14% of the sender's CPU in a profile.

:class:`SendBuffer` answers the same three operations over a list of immutable chunks: an append
stores the caller's ``bytes`` as they are, a slice finds its chunk by bisection, and a deletion
drops whole chunks. :func:`adopt` swaps it in for one stream's sender before its first write.

Rules of this module:

1. Only what aioquic's ``QuicStreamSender`` does with ``_buffer`` is supported: ``+=``,
   ``del buf[:n]``, ``buf[a:b]`` (returns ``bytes``) and ``len``. Anything else raises.
2. Offsets given to ``[a:b]`` and ``del [:n]`` are relative to the current front, as for the
   bytearray it replaces.
"""

from __future__ import annotations

from bisect import bisect_right
from typing import Any

__all__ = ["SendBuffer", "adopt"]

K_COMPACT_AFTER = 64  # dropped chunk slots kept before the lists are compacted


class SendBuffer:
    """Chunks of stream data between the lowest unacknowledged offset and the last write."""

    __slots__ = ("_chunks", "_ends", "_front", "_head", "_stop_at")

    def __init__(self) -> None:
        self._chunks: list[bytes] = []
        self._ends: list[int] = []  # absolute end offset of each chunk, increasing
        self._head = 0  # index of the first live chunk
        self._front = 0  # absolute offset of the first byte still held
        # Absolute offset just past the last byte written. Kept apart from ``_ends``: a compaction
        # that drops every chunk empties that list, and the offsets must go on from here, not from 0.
        self._stop_at = 0

    def _stop(self) -> int:
        """Absolute offset just past the last byte written."""
        return self._stop_at

    def __len__(self) -> int:
        return self._stop() - self._front

    def __bool__(self) -> bool:
        return len(self) > 0

    def __iadd__(self, data: bytes | bytearray | memoryview) -> SendBuffer:
        if data:
            chunk = data if type(data) is bytes else bytes(data)
            self._stop_at += len(chunk)
            self._chunks.append(chunk)
            self._ends.append(self._stop_at)
        return self

    def __delitem__(self, key: Any) -> None:
        if not isinstance(key, slice) or key.start not in (None, 0) or key.step is not None or key.stop is None:
            raise TypeError("SendBuffer only deletes a prefix: del buf[:n]")
        self._front = min(self._front + max(key.stop, 0), self._stop())
        chunks, ends, head = self._chunks, self._ends, self._head
        while head < len(chunks) and ends[head] <= self._front:
            chunks[head] = b""  # release the memory now; the slot goes at the next compaction
            head += 1
        if head >= K_COMPACT_AFTER and head * 2 >= len(chunks):
            del chunks[:head]
            del ends[:head]
            head = 0
        self._head = head

    def __getitem__(self, key: Any) -> bytes:
        if not isinstance(key, slice) or key.step is not None or key.start is None or key.stop is None:
            raise TypeError("SendBuffer only takes a bounded slice: buf[a:b]")
        start = self._front + max(key.start, 0)
        stop = min(self._front + key.stop, self._stop())
        if stop <= start:
            return b""
        ends, chunks = self._ends, self._chunks
        i = bisect_right(ends, start, lo=self._head)
        chunk_start = ends[i] - len(chunks[i])
        if stop <= ends[i]:
            return chunks[i][start - chunk_start : stop - chunk_start]
        parts = [chunks[i][start - chunk_start :]]
        i += 1
        while ends[i] < stop:
            parts.append(chunks[i])
            i += 1
        parts.append(chunks[i][: stop - (ends[i] - len(chunks[i]))])
        return b"".join(parts)


def adopt(sender: Any) -> None:
    """Give an aioquic ``QuicStreamSender`` a :class:`SendBuffer` (once; keeps what it holds)."""
    try:
        current = sender._buffer
    except AttributeError:
        raise RuntimeError("unsupported aioquic version: QuicStreamSender._buffer not found") from None
    if isinstance(current, SendBuffer):
        return
    buffer = SendBuffer()
    buffer += bytes(current)
    sender._buffer = buffer
