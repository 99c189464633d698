"""Round-robin assignment of partitions to consumers, as a pure function.

Consumers are ordered by their port identity (numerically when the identities are numbers) so
that every broker, test and the ``zmqlab assign`` table agree on who gets what: partition ``i``
(0-based; the seed calls it Q-(i+1)) goes to consumer ``i mod C``.
"""

from __future__ import annotations

from collections.abc import Sequence

from zmqlab.errors import ConfigError


def consumer_order(consumer: str) -> tuple[int, int, str]:
    """Sort key: numeric identities by value (9090 < 10000), then other names alphabetically.

    Only ASCII digits count as a number: ``"①".isdigit()`` is true but ``int("①")`` fails,
    and a name is data from the network, never trusted to be what it looks like."""
    if consumer.isascii() and consumer.isdigit():
        return (0, int(consumer), consumer)
    return (1, 0, consumer)


def round_robin(partitions: int, consumers: Sequence[str]) -> dict[int, str]:
    """Map every partition to a consumer; with no consumers nothing is assigned.

    More consumers than partitions leaves the extra consumers idle.
    """
    if partitions < 1:
        raise ConfigError(f"partitions must be at least 1, got {partitions}")
    if len(set(consumers)) != len(consumers):
        raise ConfigError(f"consumer identities must be unique, got {list(consumers)}")
    ordered = sorted(consumers, key=consumer_order)
    if not ordered:
        return {}
    return {p: ordered[p % len(ordered)] for p in range(partitions)}


def format_table(partitions: int, consumers: Sequence[str]) -> list[str]:
    """The seed's table: ``Q4 -> consumer-1 (9090)``, one line per partition."""
    table = round_robin(partitions, consumers)
    ordered = sorted(consumers, key=consumer_order)
    rank = {c: i + 1 for i, c in enumerate(ordered)}
    return [f"Q{p + 1} -> consumer-{rank[c]} ({c})" for p, c in sorted(table.items())]
