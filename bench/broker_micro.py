"""The broker's own cost per record, without sockets: its handlers driven directly.

A PUT of ``--batch`` records goes in through ``handle_frontend``, ``deliver`` hands the
records to three consumers, and each RECORDS message is acknowledged through
``handle_backend``, until ``--records`` records have made the round trip. What is timed is
the broker's Python (checks, dedupe, placement, delivery, ACK): no ZeroMQ, no kernel, no
database, so the figure moves only with the broker's code. It is this thread's CPU time,
so other processes on a busy machine slow it less than they would a wall clock.

``--against PATH`` runs the same workload on another checkout's ``zmqlab`` (for example a
``git worktree`` of the commit before a change) in alternating subprocesses, and prints both
medians and their ratio: a before/after measured in one run, as the machine's speed drifts.

    python bench/broker_micro.py
    git worktree add /tmp/before HEAD~1 && python bench/broker_micro.py --against /tmp/before
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import uuid
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
WORKLOADS = ("keyless", "keyed", "resend")


def run_once(records: int, batch: int, size: int, workload: str) -> dict[str, float]:
    """One pass of the workload in this process; µs of broker time per record, by phase."""
    from zmqlab import protocol as proto
    from zmqlab.broker import Broker
    from zmqlab.config import BrokerConfig
    from zmqlab.protocol import Command

    now = 1000.0
    broker = Broker(BrokerConfig(frontend="inproc://micro-f", backend="inproc://micro-b",
                                 partitions=6, capacity=20_000, put_wait_ms=0),
                    clock=lambda: now)
    producer = b"producer-1"
    consumers = [b"9090", b"9091", b"9092"]
    broker.handle_frontend([producer, b"", *proto.encode(
        Command.HELLO, {"role": "producer", "name": "8080"})], now)
    broker.outbox.clear()
    sessions: dict[bytes, dict[str, Any]] = {}  # what each consumer echoes (wire ZQL4)
    for name in consumers:
        broker.handle_backend([name, b"", *proto.encode(Command.HELLO)], now)
        welcome = proto.decode(broker.outbox[0][1][2:])
        broker.outbox.clear()
        token = welcome.header.get("session")
        sessions[name] = {"session": token, "seq": 1, "seen": 0} if token else {}
        broker.handle_backend([name, b"", *proto.encode(
            Command.FETCH, {"credit": 10_000, **sessions[name]})], now)
    broker.outbox.clear()

    def session_of(name: bytes, message: Any = None) -> dict[str, Any]:
        mine = sessions[name]
        if mine and message is not None:
            mine["seen"] = message.header.get("seq", mine["seen"])
        if mine:
            mine["seq"] += 1
        return dict(mine)

    payload = json.dumps({"pad": "x" * max(0, size - 10)}).encode()[:size]
    if not payload.endswith(b"}"):
        payload = b'{"p":1}'
    puts: list[list[bytes]] = []
    for start in range(0, records, batch):
        count = min(batch, records - start)
        ids = [uuid.uuid4().hex for _ in range(count)]
        keys: Any = [f"key-{(start + i) % 1000}" for i in range(count)] \
            if workload == "keyed" else None
        header = {"ids": ids, "keys": keys, "created_us": 1_700_000_000_000_000,
                  "sizes": size if len(payload) == size else [len(payload)] * count}
        frames = proto.encode(Command.PUT, header, [payload * count])
        puts.append([producer, b"", *frames])

    deliver = getattr(broker, "deliver", None) or broker.dispatch  # its name before the split
    put_s = deliver_s = ack_s = 0.0
    resend_s = 0.0
    clock = time.thread_time  # CPU time of this thread: what other processes take is not counted
    per_round = max(1, 3000 // batch)  # PUTs between deliveries: a few batches per consumer
    for first in range(0, len(puts), per_round):
        chunk = puts[first:first + per_round]
        t0 = clock()
        for frames in chunk:
            broker.handle_frontend(frames, now)
        t1 = clock()
        if workload == "resend":  # every PUT again: all duplicates, answered from the window
            for frames in chunk:
                broker.handle_frontend(frames, now)
        t2 = clock()
        broker.outbox.clear()
        while True:
            t3 = clock()
            deliver(now)
            out = broker.outbox
            broker.outbox = []
            t4 = clock()
            deliver_s += t4 - t3
            acks = [(frames[0], proto.decode(frames[2:])) for _, frames in out
                    if frames[0] in consumers]
            acks = [(who, m) for who, m in acks if m.command is Command.RECORDS]
            if not acks:
                break
            messages = []
            for who, message in acks:
                entries = [{"partition": b["partition"], "epoch": b["epoch"],
                            "offsets": b["offsets"]} for b in message.header["batches"]]
                messages.append([who, b"", *proto.encode(
                    Command.ACK, {"acks": entries, **session_of(who, message)})])
            t5 = clock()
            for frames in messages:
                broker.handle_backend(frames, now)
            ack_s += clock() - t5
            broker.outbox.clear()
        put_s += t1 - t0
        resend_s += t2 - t1
    held = sum(p.depth for p in broker.partitions)
    if held:
        raise SystemExit(f"the workload left {held} records in the broker")
    scale = 1e6 / records
    out = {"put": put_s * scale, "deliver": deliver_s * scale, "ack": ack_s * scale}
    if workload == "resend":
        out["resend"] = resend_s * scale
    out["total"] = sum(out.values())
    return out


def child(args: argparse.Namespace, root: str) -> dict[str, float]:
    """One pass in a fresh interpreter whose ``zmqlab`` is the one under ``root``."""
    env = dict(os.environ, PYTHONPATH=root)
    argv = [sys.executable, os.path.abspath(__file__), "--one", "--records", str(args.records),
            "--batch", str(args.batch), "--size", str(args.size), "--workload", args.workload]
    done = subprocess.run(argv, env=env, cwd=root, capture_output=True, text=True, timeout=600,
                          check=False)
    if done.returncode != 0:
        raise SystemExit(f"run under {root} failed:\n{done.stderr}")
    result: dict[str, float] = json.loads(done.stdout)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--records", type=int, default=300_000)
    parser.add_argument("--batch", type=int, default=100, help="records per PUT (the seed's)")
    parser.add_argument("--size", type=int, default=200, help="payload bytes")
    parser.add_argument("--workload", choices=WORKLOADS, default="keyless")
    parser.add_argument("--repeat", type=int, default=5, help="alternating rounds")
    parser.add_argument("--against", help="another checkout to compare with, in the same run")
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_once(args.records, args.batch, args.size, args.workload)))
        return
    trees = {"this": os.path.dirname(HERE)}
    if args.against:
        trees["against"] = os.path.abspath(args.against)
    results: dict[str, list[dict[str, float]]] = {name: [] for name in trees}
    for round_ in range(args.repeat):
        order = list(trees) if round_ % 2 == 0 else list(reversed(trees))
        for name in order:
            results[name].append(child(args, trees[name]))
    print(f"broker µs per record ({args.workload}, {args.records:,} records, "
          f"{args.batch} per PUT, {args.size} B payloads; median of {args.repeat})")
    phases = list(results["this"][0])
    print("| tree | " + " | ".join(phases) + " |")
    print("|---|" + "---|" * len(phases))
    medians = {}
    for name, runs in results.items():
        medians[name] = {p: statistics.median(r[p] for r in runs) for p in phases}
        print(f"| {name} ({trees[name]}) | "
              + " | ".join(f"{medians[name][p]:.2f}" for p in phases) + " |")
    if "against" in medians:
        ratio = medians["this"]["total"] / medians["against"]["total"]
        pairs = [a["total"] / b["total"]
                 for a, b in zip(results["this"], results["against"], strict=True)]
        print(f"this / against, total: {ratio:.3f} (per round: "
              + ", ".join(f"{p:.3f}" for p in pairs) + ")")


if __name__ == "__main__":
    main()
