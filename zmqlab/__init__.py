"""zmqlab: a ZeroMQ message fabric from many producers, through a partitioned broker, into SQL.

The public names are imported on first use (PEP 562), so a client that imports
``zmqlab.producer`` does not pay for the consumer's SQLAlchemy and SQLModel.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # what mypy and IDEs see; at run time ``__getattr__`` imports on demand
    from zmqlab.assignment import round_robin
    from zmqlab.broker import Broker
    from zmqlab.config import BrokerConfig, ConsumerConfig, ProducerConfig
    from zmqlab.consumer import Consumer
    from zmqlab.errors import (
        BrokerRejected,
        BrokerUnavailable,
        ConfigError,
        ProtocolError,
        RecordsRefused,
        SinkUnavailable,
        ZmqlabError,
    )
    from zmqlab.pipelined import Completion, PipelinedProducer
    from zmqlab.producer import (
        Ack,
        Producer,
        ProducerService,
        PutOutcome,
        Refusal,
        make_record,
    )

__version__ = "0.1.0"

__all__ = [
    "Ack", "Broker", "BrokerConfig", "BrokerRejected", "BrokerUnavailable", "Completion",
    "ConfigError", "Consumer", "ConsumerConfig", "PipelinedProducer", "Producer",
    "ProducerConfig", "ProducerService", "ProtocolError", "PutOutcome", "RecordsRefused",
    "Refusal", "SinkUnavailable", "ZmqlabError", "make_record", "round_robin",
]

_MODULE_OF = {
    "round_robin": "zmqlab.assignment",
    "Broker": "zmqlab.broker",
    "BrokerConfig": "zmqlab.config",
    "ConsumerConfig": "zmqlab.config",
    "ProducerConfig": "zmqlab.config",
    "Consumer": "zmqlab.consumer",
    "BrokerRejected": "zmqlab.errors",
    "BrokerUnavailable": "zmqlab.errors",
    "ConfigError": "zmqlab.errors",
    "ProtocolError": "zmqlab.errors",
    "RecordsRefused": "zmqlab.errors",
    "SinkUnavailable": "zmqlab.errors",
    "ZmqlabError": "zmqlab.errors",
    "Completion": "zmqlab.pipelined",
    "PipelinedProducer": "zmqlab.pipelined",
    "Ack": "zmqlab.producer",
    "Producer": "zmqlab.producer",
    "ProducerService": "zmqlab.producer",
    "PutOutcome": "zmqlab.producer",
    "Refusal": "zmqlab.producer",
    "make_record": "zmqlab.producer",
}


def __getattr__(name: str) -> Any:
    """Import a public name's module on first use and keep the name here."""
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
