"""The error hierarchy: one base class so callers can catch everything zmqlab raises.

Errors that come back from the broker carry its error code, so a caller can decide to retry
(``retryable``) without parsing text.
"""

from __future__ import annotations


class ZmqlabError(Exception):
    """Base class of every error zmqlab raises on purpose."""


class ConfigError(ZmqlabError, ValueError):
    """A node or client was configured with a value that cannot work."""


class ProtocolError(ZmqlabError):
    """A message broke the wire protocol; ``code`` is the error code sent back to its author."""

    def __init__(self, code: str, reason: str) -> None:
        super().__init__(f"{code}: {reason}")
        self.code = code
        self.reason = reason


class BrokerRejected(ZmqlabError):
    """The broker (or a producer service) answered ERR."""

    def __init__(self, code: str, reason: str, *, retryable: bool = False) -> None:
        super().__init__(f"{code}: {reason}")
        self.code = code
        self.reason = reason
        self.retryable = retryable


class BrokerUnavailable(ZmqlabError, TimeoutError):
    """No answer after every retry: the endpoint is down, unreachable or overloaded."""


class SinkUnavailable(ZmqlabError):
    """The database cannot be reached or is locked; the batch is kept and retried."""
