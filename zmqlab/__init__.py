"""zmqlab: a ZeroMQ message fabric from many producers, through a partitioned broker, into SQL."""

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
