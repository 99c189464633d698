"""A consumer's registration at the broker: a session with sequence numbers both ways.

A ZeroMQ identity is not a session: ZeroMQ reconnects on its own after a TCP reset, neither
side hears of it, and what sat in the socket buffers is gone. So each registration gets an
unguessable token, the broker numbers what it sends (``seq``) and the consumer reports the
last number it received (``seen``) with its own numbered messages. A gap either way, or a
message the consumer has not seen ``heartbeat × liveness`` after it was sent, ends the session:
what it held in flight is released and delivered again (docs/sessions.md).
"""

from __future__ import annotations

import secrets
from collections import deque
from dataclasses import dataclass, field
from typing import Any


def new_token() -> str:
    return secrets.token_hex(16)


@dataclass
class ConsumerSession:
    """One registration of consumer ``name``; replaced whole when it says HELLO again."""

    name: str
    registered_at: float
    last_seen: float
    token: str = field(default_factory=new_token)
    credit: int = 0
    assigned: list[int] = field(default_factory=list)
    delivered: int = 0
    acked: int = 0
    next_partition: int = 0  # round-robin start among its partitions when delivering
    sent: int = 0  # the broker's last seq in this session
    received: int = 0  # the consumer's last seq in this session
    _unseen: deque[tuple[int, float]] = field(default_factory=deque)  # (seq, sent at)

    def stamp(self, header: dict[str, Any], now: float) -> dict[str, Any]:
        """Number an outgoing message of this session (the header is changed and returned)."""
        self.sent += 1
        header["session"] = self.token
        header["seq"] = self.sent
        self._unseen.append((self.sent, now))
        return header

    def receive(self, header: dict[str, Any]) -> str | None:
        """Take a consumer message's ``seq`` and ``seen``; why the session is broken, or None.

        The caller checked ``header["session"]`` already."""
        seq, seen = header.get("seq"), header.get("seen")
        if type(seq) is not int or seq != self.received + 1:
            return f"consumer message {self.received + 1} was lost (the next one was {seq!r})"
        if type(seen) is not int or not 0 <= seen <= self.sent:
            return f"the consumer reported seeing message {seen!r} of {self.sent} sent"
        self.received = seq
        unseen = self._unseen
        while unseen and unseen[0][0] <= seen:
            unseen.popleft()
        return None

    def overdue(self, now: float, expiry_s: float) -> str | None:
        """Why a message sent to the consumer counts as lost, or None."""
        if self._unseen and now - self._unseen[0][1] > expiry_s:
            seq, sent_at = self._unseen[0]
            return (f"message {seq} was not seen {now - sent_at:.1f} s after it was sent "
                    f"(the consumer reported up to {seq - 1})")
        return None
