"""A client the network-namespace test runs inside a namespace (``ip netns exec``).

  send ENDPOINT COUNT TAG      send COUNT records, print the acked ids as one JSON list
  gone ENDPOINT NAME TIMEOUT   poll STATS until consumer NAME is gone; print the Unix time
  back ENDPOINT NAME TIMEOUT   poll STATS until consumer NAME owns a partition again
"""

from __future__ import annotations

import json
import sys
import threading
import time

from zmqlab.producer import Producer, make_record
from zmqlab.topology import query_status


def main(argv: list[str]) -> int:
    command, endpoint = argv[0], argv[1]
    if command == "send":
        count, tag = int(argv[2]), argv[3]
        with Producer(endpoint, timeout_ms=1000, retries=5) as client:
            acks = client.send_batch([make_record({"tag": tag, "n": n}, key=f"{tag}{n}")
                                      for n in range(count)])
        print(json.dumps([a.id for a in acks]))
        return 0
    name, timeout = argv[2], float(argv[3])
    deadline = time.monotonic() + timeout
    pause = threading.Event()
    query_status(endpoint, timeout_ms=2000)
    print("watching", flush=True)  # the test cuts the link only once we poll
    while time.monotonic() < deadline:
        snap = query_status(endpoint, timeout_ms=500)
        consumers = {c["name"]: c for c in snap["consumers"]}
        if command == "gone" and name not in consumers:
            print(time.time())
            return 0
        if command == "back" and consumers.get(name, {}).get("partitions"):
            print(time.time())
            return 0
        pause.wait(0.02)
    print(f"timed out waiting for {name} to be {command}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
