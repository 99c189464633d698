"""Frozen, validated configuration for each node.

The CLI builds these from options and tests build them with ``inproc://`` endpoints; each is
checked once, at construction, so a node never starts with a value that cannot work.
"""

from __future__ import annotations

from dataclasses import dataclass

from zmqlab.errors import ConfigError
from zmqlab.exposure import check_exposure
from zmqlab.protocol import MAX_FRAME_BYTES, MAX_NAME_CHARS, MAX_PAYLOAD_BYTES

DEFAULT_FRONTEND = "tcp://127.0.0.1:5555"  # loopback: other hosts only when told (exposure)
DEFAULT_BACKEND = "tcp://127.0.0.1:5556"
DEFAULT_DB_URL = "sqlite:///zmqlab.db"


def _positive(name: str, value: int | float, minimum: int | float = 1) -> None:
    if value < minimum:
        raise ConfigError(f"{name} must be at least {minimum}, got {value}")


def _endpoint(name: str, value: str) -> None:
    if "://" not in value:
        raise ConfigError(f"{name} must be a ZeroMQ endpoint like tcp://127.0.0.1:5555, "
                          f"got {value!r}")


def _bind(name: str, value: str, insecure: bool) -> None:
    """An endpoint this node binds: well formed, and on this host unless ``insecure``."""
    _endpoint(name, value)
    check_exposure(value, insecure=insecure, what=name)


FSYNC_MODES = ("batch", "interval", "off")
REPLY_TIMEOUT_MS = 2500  # how long producers and clients wait for a reply before retrying


@dataclass(frozen=True, slots=True)
class BrokerConfig:
    frontend: str = DEFAULT_FRONTEND
    backend: str = DEFAULT_BACKEND
    partitions: int = 6
    capacity: int = 10_000
    heartbeat_ms: int = 1000
    liveness: int = 3
    expect_producers: int = 0
    expect_consumers: int = 0
    max_batch: int = 1000  # records per RECORDS message (over all of a consumer's partitions)
    max_payload_bytes: int = MAX_PAYLOAD_BYTES
    dedupe_window: int = 100_000  # acknowledged ids remembered for retries (up to twice this)
    drain_timeout_s: float = 10.0  # on stop: keep delivering until stored, at most this long
    put_wait_ms: int = 500  # a PUT that does not fit waits this long for room (0: refuse now);
    # keep it well under the producers' reply timeout (2500 ms by default)
    ack_timeout_ms: int = 30_000  # records in flight this long at one consumer are released
    data_dir: str | None = None  # the write-ahead log's directory; None keeps records in memory
    fsync: str = "batch"  # batch: ACK after fsync; interval: fsync every fsync_interval_ms;
    # off: the kernel decides (see zmqlab.wal.Fsync)
    fsync_interval_ms: int = 1000
    segment_bytes: int = 64 * 1_048_576  # a log segment is closed past this size
    tick_ms: int = 100
    insecure: bool = False  # allow binding other than loopback with nobody authenticated

    def __post_init__(self) -> None:
        _bind("frontend", self.frontend, self.insecure)
        _bind("backend", self.backend, self.insecure)
        _positive("partitions", self.partitions)
        _positive("capacity", self.capacity)
        _positive("heartbeat_ms", self.heartbeat_ms, 10)
        _positive("liveness", self.liveness)
        _positive("expect_producers", self.expect_producers, 0)
        _positive("expect_consumers", self.expect_consumers, 0)
        _positive("max_batch", self.max_batch)
        _positive("max_payload_bytes", self.max_payload_bytes, 2)
        _positive("dedupe_window", self.dedupe_window, 0)
        _positive("drain_timeout_s", self.drain_timeout_s, 0)
        _positive("put_wait_ms", self.put_wait_ms, 0)
        _positive("ack_timeout_ms", self.ack_timeout_ms, 10)
        if self.fsync not in FSYNC_MODES:
            raise ConfigError(f"fsync must be one of {', '.join(FSYNC_MODES)}, got {self.fsync!r}")
        _positive("fsync_interval_ms", self.fsync_interval_ms)
        _positive("segment_bytes", self.segment_bytes, 4096)
        _positive("tick_ms", self.tick_ms)
        if self.max_payload_bytes > MAX_FRAME_BYTES:
            raise ConfigError(f"max_payload_bytes must be at most {MAX_FRAME_BYTES} (one frame)")

    @property
    def expiry_s(self) -> float:
        return self.heartbeat_ms * self.liveness / 1000


@dataclass(frozen=True, slots=True)
class ProducerConfig:
    """A producer service: an ingress for clients, one REQ socket to the broker."""

    name: str
    broker: str = "tcp://127.0.0.1:5555"
    ingress: str | None = None  # e.g. tcp://127.0.0.1:8080; None for an embedded forwarder
    timeout_ms: int = REPLY_TIMEOUT_MS
    retries: int = 3
    heartbeat_ms: int = 1000
    max_batch: int = 1000  # records per PUT to the broker
    max_pending: int = 50_000  # records waiting for the broker before clients are refused
    max_pending_bytes: int = 256 * 1_048_576  # the same bound in payload bytes
    tick_ms: int = 100
    insecure: bool = False  # allow an ingress other than loopback with nobody authenticated

    def __post_init__(self) -> None:
        if not 0 < len(self.name) <= MAX_NAME_CHARS or "\x00" in self.name:
            raise ConfigError(f"producer name must be 1 to {MAX_NAME_CHARS} characters without "
                              f"NUL, got {self.name!r:.60}")
        _endpoint("broker", self.broker)
        if self.ingress is not None:
            _bind("ingress", self.ingress, self.insecure)
        _positive("timeout_ms", self.timeout_ms, 10)
        _positive("retries", self.retries, 0)
        _positive("heartbeat_ms", self.heartbeat_ms, 10)
        _positive("max_batch", self.max_batch)
        _positive("max_pending", self.max_pending)
        _positive("max_pending_bytes", self.max_pending_bytes, MAX_FRAME_BYTES)
        _positive("tick_ms", self.tick_ms)


@dataclass(frozen=True, slots=True)
class ConsumerConfig:
    """A consumer: a DEALER identified by its port, a status endpoint, a database sink."""

    name: str  # the DEALER identity; the CLI uses the port ("9090")
    broker: str = "tcp://127.0.0.1:5556"
    status: str | None = None  # e.g. tcp://127.0.0.1:9090
    db_url: str = DEFAULT_DB_URL
    credit: int = 10_000  # records this consumer may hold at once (prefetch window): two
    # transactions of MAX_RECORDS_PER_TRANSACTION, so the next one arrives while one commits
    heartbeat_ms: int = 1000
    liveness: int = 3
    max_attempts: int = 5  # deliveries before a failing record goes to dead letters
    transform: str | None = None  # "package.module:function" run on each payload
    retry_initial_s: float = 0.1  # database retry backoff
    retry_max_s: float = 5.0
    drain_timeout_s: float = 10.0  # on stop: finish in-flight work for at most this long
    tick_ms: int = 100
    insecure: bool = False  # allow a status endpoint other than loopback, nobody authenticated

    def __post_init__(self) -> None:
        if not self.name or len(self.name.encode()) > 255:
            raise ConfigError("consumer name must be 1 to 255 bytes (it is the socket identity)")
        _endpoint("broker", self.broker)
        if self.status is not None:
            _bind("status", self.status, self.insecure)
        if "://" not in self.db_url:
            raise ConfigError("db_url must be a SQLAlchemy URL like sqlite:///zmqlab.db, "
                              f"got {self.db_url!r}")
        _positive("credit", self.credit)
        _positive("heartbeat_ms", self.heartbeat_ms, 10)
        _positive("liveness", self.liveness)
        _positive("max_attempts", self.max_attempts)
        _positive("drain_timeout_s", self.drain_timeout_s, 0)
        _positive("tick_ms", self.tick_ms)

    @property
    def expiry_s(self) -> float:
        return self.heartbeat_ms * self.liveness / 1000
