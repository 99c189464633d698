"""Safe defaults: a node binds loopback unless told otherwise (``--insecure``, later CURVE)."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
from typing import Any

import pytest
from helpers import free_port, wait_until

from zmqlab import exposure as exposure_module
from zmqlab.config import (
    DEFAULT_BACKEND,
    DEFAULT_FRONTEND,
    BrokerConfig,
    ConsumerConfig,
    ProducerConfig,
)
from zmqlab.errors import BrokerUnavailable, ConfigError
from zmqlab.exposure import check_exposure

ZMQLAB = [sys.executable, "-m", "zmqlab"]
LOCAL = ["tcp://127.0.0.1:5555", "tcp://127.8.9.10:5555", "tcp://[::1]:5555",
         "tcp://[::ffff:127.0.0.1]:5555", "tcp://127.0.0.1:*", "tcp://localhost:5555",
         "inproc://fabric", "ipc:///tmp/zmqlab.sock", "ws://127.0.0.1:8080/path"]
EXPOSED = {
    "tcp://*:5555": "* is every interface",
    "tcp://0.0.0.0:5555": "0.0.0.0 is every interface",
    "tcp://[::]:5555": ":: is every interface",
    "tcp://10.1.2.3:5555": "10.1.2.3 is not a loopback address",
    "tcp://[2001:db8::1]:5555": "2001:db8::1 is not a loopback address",
    "tcp://lo:5555": "lo is a network interface",
    "tcp://nosuch.invalid:5555": "nosuch.invalid does not resolve",
    "tcp://mixed.example:5555": "mixed.example resolves to 192.0.2.7",
    "pgm://239.1.1.1:5555": "pgm:// reaches the network",
}


@pytest.fixture(autouse=True)
def hosts(monkeypatch):
    """Name lookups without DNS: localhost is loopback, a mixed name is not, lo is the only
    interface (whatever this machine has)."""
    table = {"localhost": ["127.0.0.1", "::1"], "mixed.example": ["127.0.0.1", "192.0.2.7"]}

    def getaddrinfo(host: str, *_: Any, **__: Any) -> list[Any]:
        if host not in table:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (a, 0)) for a in table[host]]

    monkeypatch.setattr(exposure_module.socket, "getaddrinfo", getaddrinfo)
    monkeypatch.setattr(exposure_module, "_interface_names", lambda: {"lo"})


@pytest.mark.parametrize("endpoint", LOCAL)
def test_loopback_and_local_endpoints_are_allowed(endpoint):
    check_exposure(endpoint, insecure=False)


@pytest.mark.parametrize("endpoint, why", EXPOSED.items())
def test_other_endpoints_are_refused_with_one_line_naming_both_ways_out(endpoint, why):
    with pytest.raises(ConfigError) as refused:
        check_exposure(endpoint, insecure=False, what="frontend")
    message = str(refused.value)
    assert message.startswith(f"refusing to bind frontend {endpoint}: {why}")
    assert "bind 127.0.0.1" in message and "--insecure" in message and "\n" not in message


@pytest.mark.parametrize("endpoint", EXPOSED)
@pytest.mark.parametrize("insecure, curve", [(True, False), (False, True), (True, True)])
def test_insecure_or_curve_accepts_any_endpoint(endpoint, insecure, curve):
    check_exposure(endpoint, insecure=insecure, curve=curve)


def test_the_defaults_are_loopback():
    assert DEFAULT_FRONTEND == "tcp://127.0.0.1:5555" and DEFAULT_BACKEND.startswith("tcp://127.")
    BrokerConfig()  # the defaults pass their own check


@pytest.mark.parametrize("make, field", [
    (lambda **kw: BrokerConfig(frontend="tcp://0.0.0.0:5555", **kw), "frontend"),
    (lambda **kw: BrokerConfig(backend="tcp://*:5556", **kw), "backend"),
    (lambda **kw: ProducerConfig("p", ingress="tcp://10.0.0.1:8080", **kw), "ingress"),
    (lambda **kw: ConsumerConfig("c", status="tcp://[::]:9090", **kw), "status"),
])
def test_a_config_refuses_an_exposed_bind_at_construction_unless_insecure(make, field):
    with pytest.raises(ConfigError, match=f"refusing to bind {field} "):
        make()
    make(insecure=True)


def test_a_config_only_checks_what_it_binds():
    # the broker endpoint a producer or consumer connects to may be anywhere
    ProducerConfig("p", broker="tcp://10.0.0.1:5555", ingress="tcp://127.0.0.1:8080")
    ConsumerConfig("c", broker="tcp://10.0.0.1:5556", status="tcp://127.0.0.1:9090")


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*ZMQLAB, *args], capture_output=True, text=True, timeout=60,
                          stdin=subprocess.DEVNULL)


def one_line(stderr: str) -> str:
    return " ".join(stderr.split())  # the console folds long lines at its width


@pytest.mark.e2e
@pytest.mark.parametrize("args, endpoint", [
    (["broker", "--frontend", "tcp://0.0.0.0:{port}"], "frontend tcp://0.0.0.0:{port}"),
    (["producer", "--port", "{port}", "--host", "0.0.0.0"], "ingress tcp://0.0.0.0:{port}"),
    (["consumer", "--port", "{port}", "--host", "*"], "status tcp://*:{port}"),
    (["up", "--host", "0.0.0.0", "--status-port", "{port}"], "status tcp://0.0.0.0:{port}"),
])
def test_the_cli_refuses_an_exposed_bind_with_exit_2_and_no_traceback(args, endpoint):
    port = str(free_port())
    result = run(*(a.replace("{port}", port) for a in args))
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert f"refusing to bind {endpoint.replace('{port}', port)}: " in one_line(result.stderr)
    assert "--insecure" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.e2e
def test_the_broker_binds_every_interface_when_told_insecure():
    # Given a broker asked to bind every interface, with --insecure
    front = free_port()
    process = subprocess.Popen(
        [*ZMQLAB, "broker", "--frontend", f"tcp://0.0.0.0:{front}",
         "--backend", f"tcp://127.0.0.1:{free_port()}", "--insecure", "--log-level", "warning"],
        stdin=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        from zmqlab.topology import query_status

        def status() -> Any:
            try:
                return query_status(f"tcp://127.0.0.1:{front}", timeout_ms=300)
            except BrokerUnavailable:
                assert process.poll() is None, process.stderr and process.stderr.read()
                return None

        # Then it starts and answers
        assert "partitions" in wait_until(status, 30, "the broker to answer")
    finally:
        process.send_signal(signal.SIGTERM)
        _, err = process.communicate(timeout=30)
    assert process.returncode == 0, err


def test_up_passes_insecure_to_every_node_it_starts():
    from zmqlab.topology import Topology

    exposed = Topology(host="0.0.0.0", producers=1, consumers=1, insecure=True).commands()
    assert all("--insecure" in argv for _, _, argv in exposed)
    assert not any("--insecure" in argv for _, _, argv in Topology().commands())
