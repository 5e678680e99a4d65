"""systemd's notify protocol, written directly on the ``NOTIFY_SOCKET`` datagram socket (sd_notify(3)).

Rules of this module:

1. No dependency on libsystemd: one ``AF_UNIX``/``SOCK_DGRAM`` datagram per notification, fields
   ``KEY=VALUE`` separated by newlines. ``NOTIFY_SOCKET`` is an absolute path or, with a leading ``@``,
   a name in the abstract namespace. Anything else (``vsock:``, relative paths) disables notifications.
2. No-op without ``NOTIFY_SOCKET`` (not started by systemd, or ``Type=`` is not ``notify``).
3. Notifying never raises: a failed send returns False and is logged at debug level. The service
   keeps running; systemd's own timeouts (start, watchdog) report the problem.
4. ``RELOADING=1`` carries ``MONOTONIC_USEC`` (CLOCK_MONOTONIC in microseconds), as systemd >= 253
   requires for ``Type=notify-reload``; after a reload, send ``READY=1`` again.
5. The watchdog interval is half of ``WATCHDOG_USEC`` and applies only when ``WATCHDOG_PID`` is unset
   or names this process (systemd sets both for the main process).
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Mapping

__all__ = ["SystemdNotifier", "notify_address", "watchdog_interval"]

K_SEND_TIMEOUT = 0.5  # seconds a notification may block when systemd's queue is full

log = logging.getLogger("fedgate.sdnotify")


def notify_address(value: str | None) -> str | None:
    """The socket address for ``NOTIFY_SOCKET``'s value, or None when notifications are off."""
    if not value:
        return None
    if value.startswith("@") and len(value) > 1:
        return "\0" + value[1:]
    if value.startswith("/"):
        return value
    return None


def watchdog_interval(environ: Mapping[str, str], *, pid: int) -> float | None:
    """Seconds between ``WATCHDOG=1`` pings (half the timeout), or None when no watchdog applies."""
    usec_text = environ.get("WATCHDOG_USEC", "")
    if not (usec_text.isascii() and usec_text.isdigit()) or int(usec_text) == 0:
        return None
    pid_text = environ.get("WATCHDOG_PID")
    if pid_text is not None and pid_text != str(pid):
        return None
    return int(usec_text) / 2 / 1e6


class SystemdNotifier:
    """Sends notifications to systemd; every method returns whether the datagram was sent."""

    def __init__(self, address: str | None, *, watchdog_s: float | None = None) -> None:
        self._address = address
        self._watchdog_s = watchdog_s
        self._sock: socket.socket | None = None

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] | None = None) -> SystemdNotifier:
        env = os.environ if environ is None else environ
        raw = env.get("NOTIFY_SOCKET")
        address = notify_address(raw)
        if raw and address is None:
            log.warning("NOTIFY_SOCKET=%r is not supported (absolute path or @abstract only): not notifying",
                        raw)
        return cls(address, watchdog_s=watchdog_interval(env, pid=os.getpid()) if address else None)

    @property
    def enabled(self) -> bool:
        return self._address is not None

    def watchdog_interval(self) -> float | None:
        """Seconds between ``WATCHDOG=1`` pings, or None when systemd set no watchdog for us."""
        return self._watchdog_s

    def notify(self, fields: Mapping[str, str | int]) -> bool:
        """Send ``fields`` as one datagram (newlines inside values become spaces)."""
        if self._address is None:
            return False
        message = "\n".join(f"{k}={str(v).replace(chr(10), ' ')}" for k, v in fields.items())
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                self._sock.settimeout(K_SEND_TIMEOUT)
            self._sock.sendto(message.encode(), self._address)
        except OSError as exc:
            log.debug("systemd notification failed: %s", exc)
            return False
        return True

    def ready(self, status: str | None = None) -> bool:
        return self.notify(_with_status({"READY": 1}, status))

    def status(self, text: str) -> bool:
        return self.notify({"STATUS": text})

    def reloading(self, status: str | None = None) -> bool:
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        return self.notify(_with_status({"RELOADING": 1, "MONOTONIC_USEC": usec}, status))

    def stopping(self, status: str | None = None) -> bool:
        return self.notify(_with_status({"STOPPING": 1}, status))

    def watchdog(self) -> bool:
        """Ping the watchdog; a no-op (False) when systemd set none."""
        if self._watchdog_s is None:
            return False
        return self.notify({"WATCHDOG": 1})

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def _with_status(fields: dict[str, str | int], status: str | None) -> dict[str, str | int]:
    if status is not None:
        fields["STATUS"] = status
    return fields
