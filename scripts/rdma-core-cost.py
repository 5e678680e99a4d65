#!/usr/bin/env python3
"""CPU cost of the RDMA carrier's sans-IO core per message (both ends, no device, no pyverbs).

Drives two RdmaSession cores back to back: queue a message, post it, receive it, deliver it,
return the credit. Prints CPU microseconds (process_time, so a loaded machine does not inflate it)
per message for each size. The pyverbs work-request calls and the memcpy come on top of this.
Usage: .venv/bin/python scripts/rdma-core-cost.py [messages]
"""

from __future__ import annotations

import sys
import time

from fedgate.rdma._session import PostSend, RdmaSession


def cost(messages: int, size: int) -> float:
    def make() -> RdmaSession:
        return RdmaSession(recv_slots=64, send_slots=64, peer_recv_slots=64, max_eager=65520,
                           chunk_bytes=1 << 20, max_reads=8, max_rendezvous=4)  # fmt: skip

    a, b = make(), make()
    a.actions(now=0.0)
    b.actions(now=0.0)
    start = time.process_time()
    for token in range(messages):
        a.queue_eager(token, size)
        for action in a.actions(now=0.0):
            if isinstance(action, PostSend):
                b.on_recv(0, action.header, 16 + size)
                a.on_send_complete(action.slot)
        delivery = b.next_delivery()
        assert delivery is not None
        b.consumed(delivery)
        for action in b.actions(now=0.0):
            if isinstance(action, PostSend):
                a.on_recv(0, action.header, 16)
                b.on_send_complete(action.slot)
    return (time.process_time() - start) / messages * 1e6


if __name__ == "__main__":
    count = int(sys.argv[1]) if len(sys.argv) > 1 else 100_000
    for size in (1024, 65520):
        print(f"sans-IO core, {size} B eager message, send+receive: {cost(count, size):.2f} us CPU")
