"""node helpers: the frame loop and the GC setting the CLI applies to its own processes."""

from __future__ import annotations

import subprocess
import sys

import zmq

from zmqlab.node import recv_frames, send_frames


def test_send_frames_and_recv_frames_carry_a_multipart_message_whole(ctx):
    a, b = ctx.socket(zmq.PAIR), ctx.socket(zmq.PAIR)
    a.bind("inproc://node-frames")
    b.connect("inproc://node-frames")
    try:
        send_frames(a, [b"one", b"", b"x" * 100_000])
        assert b.poll(2000)
        assert recv_frames(b) == [b"one", b"", b"x" * 100_000]
    finally:
        a.close(0)
        b.close(0)


def test_tune_gc_raises_the_thresholds_and_cycles_are_still_collected():
    script = (
        "import gc, weakref\n"
        "from zmqlab.node import GC_THRESHOLDS, tune_gc\n"
        "tune_gc()\n"
        "assert gc.get_threshold() == GC_THRESHOLDS, gc.get_threshold()\n"
        "assert gc.get_freeze_count() > 10_000, gc.get_freeze_count()\n"
        "class Node: pass\n"
        "a, b = Node(), Node(); a.other, b.other = b, a\n"
        "alive = weakref.ref(a); del a, b\n"
        "gc.collect()\n"
        "assert alive() is None\n"
        "print('ok')\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"
