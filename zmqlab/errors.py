"""Every error zmqlab raises on purpose, and the codes that travel in ERR replies.

::

    ZmqlabError
    ├── ConfigError (ValueError)        a setting that cannot work; raised before anything runs
    ├── ReplyError                      what a node answers with ERR: ``code``, ``reason``
    │   ├── ProtocolError               the message itself is wrong: BAD_MESSAGE, BAD_VERSION,
    │   │                               UNKNOWN_COMMAND (resending it cannot help)
    │   ├── Refused                     a good message the node will not serve now or at all:
    │   │                               NOT_REGISTERED, NOT_READY, UNAVAILABLE, PARTITION_FULL,
    │   │                               INVALID_RECORD, TOO_LARGE, INTERNAL
    │   └── LeaseError                  an ACK outside the sender's lease: NOT_OWNER,
    │                                   STALE_EPOCH, UNKNOWN_OFFSET (it changed nothing);
    │                                   ACK_TIMEOUT tells an owner its lease was fenced
    ├── BrokerRejected                  a client's view: the node answered ERR
    │   └── RecordsRefused              some records of a send were refused (the rest stored)
    ├── BrokerUnavailable (TimeoutError) no answer after every retry
    └── SinkUnavailable                 the database cannot be reached; the batch is retried

Nodes raise ``ReplyError`` subclasses and one place per socket turns them into ERR replies;
clients see the other side's answer as ``BrokerRejected`` or ``RecordsRefused``. Whether to
retry is a property of the code (``RETRYABLE``), so nobody parses reasons.
"""

from __future__ import annotations

from enum import StrEnum
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # producer imports errors, not the other way round
    from zmqlab.producer import Ack, Refusal


class ErrorCode(StrEnum):
    """Error codes carried by ERR replies and per-record refusals."""

    BAD_MESSAGE = "BAD_MESSAGE"  # unparseable frames or header
    BAD_VERSION = "BAD_VERSION"
    UNKNOWN_COMMAND = "UNKNOWN_COMMAND"
    NOT_REGISTERED = "NOT_REGISTERED"  # HELLO first (retryable: say HELLO, then retry)
    NOT_READY = "NOT_READY"  # waiting for --expect-producers/--expect-consumers
    PARTITION_FULL = "PARTITION_FULL"  # backpressure: retry later
    INVALID_RECORD = "INVALID_RECORD"  # payload not a JSON object, bad id or key
    TOO_LARGE = "TOO_LARGE"
    STALE_EPOCH = "STALE_EPOCH"
    NOT_OWNER = "NOT_OWNER"
    UNKNOWN_OFFSET = "UNKNOWN_OFFSET"
    UNAVAILABLE = "UNAVAILABLE"  # a producer service could not reach the broker
    ACK_TIMEOUT = "ACK_TIMEOUT"  # records in flight too long were released (a notice)
    INTERNAL = "INTERNAL"


RETRYABLE = frozenset(
    {ErrorCode.NOT_REGISTERED, ErrorCode.NOT_READY, ErrorCode.PARTITION_FULL, ErrorCode.UNAVAILABLE}
)


class ZmqlabError(Exception):
    """Base class of every error zmqlab raises on purpose."""


class ConfigError(ZmqlabError, ValueError):
    """A node or client was configured with a value that cannot work."""


class ReplyError(ZmqlabError):
    """An error a node answers with ``[ERR, code, reason]``; it changed nothing."""

    def __init__(self, code: ErrorCode | str, reason: str) -> None:
        self.code = ErrorCode(code)
        self.reason = reason
        super().__init__(f"{self.code}: {reason}")

    @property
    def retryable(self) -> bool:
        return self.code in RETRYABLE


class ProtocolError(ReplyError):
    """A message broke the wire protocol (frames, header, field types)."""

    def __init__(self, code: ErrorCode | str = ErrorCode.BAD_MESSAGE, reason: str = "") -> None:
        super().__init__(code, reason)


class Refused(ReplyError):
    """A well-formed request the node will not serve: not registered, not ready, full, …"""


class LeaseError(ReplyError):
    """An ACK from outside the partition's lease (wrong owner, old epoch, unknown offset)."""


class BrokerRejected(ZmqlabError):
    """The broker (or a producer service) answered ERR."""

    def __init__(self, code: str, reason: str, *, retryable: bool = False) -> None:
        super().__init__(f"{code}: {reason}")
        self.code = code
        self.reason = reason
        self.retryable = retryable


class RecordsRefused(BrokerRejected):
    """Some records were refused for good (or still refused at the deadline); ``acks`` holds
    the ones that were stored."""

    def __init__(self, refusals: list[Refusal], acks: list[Ack]) -> None:
        first = refusals[0]
        more = f" (and {len(refusals) - 1} more)" if len(refusals) > 1 else ""
        super().__init__(first.code, f"record {first.id}: {first.reason}{more}",
                         retryable=first.retryable)
        self.refusals = refusals
        self.acks = acks


class BrokerUnavailable(ZmqlabError, TimeoutError):
    """No answer after every retry: the endpoint is down, unreachable or overloaded."""


class SinkUnavailable(ZmqlabError):
    """The database cannot be reached or is locked; the batch is kept and retried."""
