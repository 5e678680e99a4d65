"""Credit-based flow control for SEND/RECV into pre-posted receive slots.

Rules of this module:

1. Pure: counts in, decisions out. No clock is needed (credits are not time based).
2. One credit is one receive slot the peer has posted for us. Every SEND we post consumes one; the
   peer returns credits when it reposts slots, piggybacked on any message it sends
   (``credits_returned`` in the header) or in a CREDIT message when it has nothing else to send.
3. The last credit is reserved: DATA, RTS, FIN and CLOSE need two credits, only a CREDIT message may
   use the last one. With the rule in 4 this cannot deadlock: a side whose data is blocked has at
   least ``window - 1`` messages sitting consumed at the peer, so the peer owes at least the
   threshold and can always send a CREDIT message with its own reserved credit; and a side only
   spends its last credit on a CREDIT message that returns at least the threshold (never zero),
   so both sides can never be at zero credits at once.
4. A standalone CREDIT message is due when the reposted-but-unreported count reaches the threshold
   ``max(2, window // 2)``. CREDIT messages consume a slot too, but one CREDIT message adds only 1
   to the peer's count, below the threshold of 2, so CREDIT messages never ping-pong forever.
5. Returned credits beyond the window are the peer's protocol error.
"""

from __future__ import annotations

from dataclasses import dataclass

from fedgate.errors import RemoteProtocolError

__all__ = ["CreditStatistics", "CreditWindow"]

K_MIN_WINDOW = 4  # slots; below this the reserve and threshold rules leave no room for data


@dataclass(frozen=True, slots=True)
class CreditStatistics:
    credits: int
    """Credits we hold towards the peer (its free receive slots)."""
    owed: int
    """Slots we reposted and have not yet reported to the peer."""
    credit_messages: int
    """Standalone CREDIT messages sent so far."""


class CreditWindow:
    """Both directions of one channel's credit accounting."""

    def __init__(self, *, send_window: int, recv_window: int) -> None:
        if send_window < K_MIN_WINDOW or recv_window < K_MIN_WINDOW:
            raise ValueError(f"credit windows must be >= {K_MIN_WINDOW}")
        self._send_window = send_window
        self._recv_window = recv_window
        self._credits = send_window
        self._owed = 0
        self._credit_messages = 0
        self._threshold = max(2, recv_window // 2)

    @property
    def credits(self) -> int:
        return self._credits

    @property
    def owed(self) -> int:
        return self._owed

    @property
    def threshold(self) -> int:
        return self._threshold

    def can_send(self, *, credit_only: bool = False) -> bool:
        """Whether a message may be posted now; everything but CREDIT keeps one credit in reserve."""
        return self._credits >= (1 if credit_only else 2)

    def credit_message_due(self) -> bool:
        """Whether a standalone CREDIT message should go now (and can)."""
        return self._owed >= self._threshold and self._credits >= 1

    def consume(self, *, credit_only: bool = False) -> int:
        """Spend a credit on one SEND; returns the count to piggyback in its header."""
        if not self.can_send(credit_only=credit_only):
            raise RuntimeError("no credit for this message")  # the caller checks can_send first
        if credit_only:
            if self._owed == 0:
                raise RuntimeError("a CREDIT message must return something")
            self._credit_messages += 1
        self._credits -= 1
        returned, self._owed = self._owed, 0
        return returned

    def on_returned(self, count: int) -> None:
        """The peer reported ``count`` reposted slots."""
        if count < 0 or self._credits + count > self._send_window:
            raise RemoteProtocolError(f"peer returned {count} credits; we hold {self._credits} of {self._send_window}")
        self._credits += count

    def on_reposted(self) -> None:
        """We reposted one receive slot; it is owed to the peer."""
        if self._owed >= self._recv_window:
            raise RuntimeError("more slots reposted than exist")
        self._owed += 1

    def statistics(self) -> CreditStatistics:
        return CreditStatistics(self._credits, self._owed, self._credit_messages)
