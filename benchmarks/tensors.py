"""Tensor throughput: memcpy vs tensor frames in-process vs ZeroMQ over TCP vs shared memory.

Why: multimodal tensors (and anything else big) move between the gateway and workers, and the
question per path is how close it gets to the cost of one memcpy. Paths, for float32 arrays of
1, 16, 64 and 256 MiB, interleaved per repeat so drift hits them all alike:

* memcpy: ``np.copyto`` into a preallocated, already-touched array (the yardstick);
* frames: ``encode`` + ``decode`` of `lmgw.transport.tensors` in one process (zero-copy, so this
  measures per-call overhead, reported as an equivalent rate);
* tcp: the full native-protocol path over tcp://127.0.0.1 with `ZmqSocket` under trio, one
  process, two PAIR sockets each in its own zmq.Context (so each side has its own I/O thread):
  ``pack_tensors`` + ``encode_frames(Encode(...))`` sent with ``copy=False``, received with
  ``copy=False``, ``decode_frames`` + ``unpack_tensors`` (the received array views the frame);
* socket: the ceiling of loopback TCP on this machine, no ZeroMQ and no protocol: a plain
  socket pair over 127.0.0.1, ``sendall`` of the array's buffer in this thread, ``recv_into``
  a preallocated, already-touched buffer in a second thread (both release the GIL, so the
  two copies the kernel makes run on two CPUs). ``tcp`` is also reported as a fraction of it;
* shm: `ShmPool.put` in this process (one copy into a warm segment), the msgpack'd handle over a
  pipe to a second process that runs ``from_shm`` (lock, map with MAP_POPULATE, decode), closes
  it and acks; one round trip per tensor. The first transfer of each size (a new segment, whose
  pages the kernel must allocate and zero) is reported separately as ``shm_cold``.

    .venv/bin/python benchmarks/tensors.py [--quick]

Prints medians of the repeats (GB/s = 1e9 bytes/s) and the median ratio to the memcpy of the same
repeat (the box is shared: pairing cancels most drift), and writes
benchmarks/results/tensors.json. OPENBLAS_CORETYPE / OPENBLAS_L2_SIZE are dropped for this process
only, by re-executing it, when set (they slow a current numpy; see the env README).
"""

from __future__ import annotations

import os
import sys

_BLAS_VARS = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")
if any(v in os.environ for v in _BLAS_VARS):  # before numpy is imported
    env = {k: v for k, v in os.environ.items() if k not in _BLAS_VARS}
    env["LMGW_BENCH_UNSET_BLAS"] = ",".join(v for v in _BLAS_VARS if v in os.environ)
    os.execve(sys.executable, [sys.executable, *sys.argv], env)

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import socket  # noqa: E402
import statistics  # noqa: E402
import struct  # noqa: E402
import subprocess  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import msgspec  # noqa: E402
import numpy as np  # noqa: E402
import trio  # noqa: E402
import zmq  # noqa: E402

from lmgw.protocol.messages import Encode, decode_frames, encode_frames  # noqa: E402
from lmgw.transport import shm, tensors  # noqa: E402
from lmgw.transport.zmq.socket import ZmqSocket  # noqa: E402

MIB = 1 << 20
SIZES_MIB = (1, 16, 64, 256)
PATHS = ("memcpy", "frames", "tcp", "socket", "shm")
TARGETS = {"shm": 0.5, "tcp": 0.3}
RESULTS = Path(__file__).parent / "results" / "tensors.json"
PREFIX = "lmgwbench"

RECEIVER = r"""
import struct, sys, msgspec
from lmgw.transport import shm
inp, out = sys.stdin.buffer, sys.stdout.buffer
while True:
    head = inp.read(4)
    if len(head) < 4:
        break
    handle = msgspec.msgpack.decode(inp.read(struct.unpack("<I", head)[0]), type=shm.ShmHandle)
    array, close = shm.from_shm(handle)
    ok = array.shape[0] > 0 and array[-1] == array.shape[0] - 1  # touches the last page
    del array
    close()
    out.write(b"k" if ok else b"x")
    out.flush()
"""


def rate(nbytes: int, seconds: float) -> float:
    return nbytes / seconds / 1e9


def per_run(size: int, budget: int) -> int:
    """Transfers per timed run: small tensors repeat so a run moves ~`budget` bytes."""
    return max(1, budget // size)


def bench_memcpy(src: np.ndarray, dst: np.ndarray, n: int) -> float:
    start = time.perf_counter()
    for _ in range(n):
        np.copyto(dst, src)
    return rate(src.nbytes * n, time.perf_counter() - start)


def bench_frames(src: np.ndarray, n: int) -> float:
    encode, decode = tensors.encode, tensors.decode
    start = time.perf_counter()
    for _ in range(n):
        header, buffer = encode(src)
        out = decode(header, buffer)
    elapsed = time.perf_counter() - start
    assert out.shape == src.shape
    return rate(src.nbytes * n, elapsed)


class TcpPair:
    """Two PAIR sockets over loopback TCP, each with its own context (own I/O thread)."""

    def __init__(self) -> None:
        self.contexts = [zmq.Context(io_threads=1), zmq.Context(io_threads=1)]
        self.rx = ZmqSocket.open(self.contexts[0], zmq.PAIR, send_timeout=60.0)
        self.tx = ZmqSocket.open(self.contexts[1], zmq.PAIR, send_timeout=60.0)
        self.tx.connect(self.rx.bind("tcp://127.0.0.1:*"))

    async def run(self, src: np.ndarray, n: int) -> float:
        async def receive(task_status=trio.TASK_STATUS_IGNORED) -> None:
            task_status.started()
            for _ in range(n):
                incoming = decode_frames(await self.rx.recv_multipart(copy=False))
                (out,) = tensors.unpack_tensors(incoming.msg.tensors, incoming.payload)
                assert out.shape == src.shape

        start = time.perf_counter()
        async with trio.open_nursery() as nursery:
            await nursery.start(receive)
            for i in range(n):
                refs, frames = tensors.pack_tensors([src])
                msg = Encode(f"r{i}", "bench", tensors=refs)
                await self.tx.send_multipart(encode_frames(msg, frames), copy=False)
        return rate(src.nbytes * n, time.perf_counter() - start)

    def close(self) -> None:
        self.tx.close()
        self.rx.close()
        for ctx in self.contexts:
            ctx.term()


class SocketPair:
    """Loopback TCP with nothing on top: what any TCP path on this box can reach at most."""

    def __init__(self, capacity: int) -> None:
        with socket.create_server(("127.0.0.1", 0)) as listener:
            self.tx = socket.create_connection(listener.getsockname())
            self.rx, _ = listener.accept()
        self.sink = bytearray(capacity)  # touched once: no page faults in the timed runs

    def run(self, src: np.ndarray, n: int) -> float:
        nbytes = src.nbytes
        view = memoryview(self.sink)[:nbytes]

        def receive() -> None:
            for _ in range(n):
                got = 0
                while got < nbytes:
                    got += self.rx.recv_into(view[got:], nbytes - got)

        reader = threading.Thread(target=receive)
        start = time.perf_counter()
        reader.start()
        data = memoryview(src).cast("B")
        for _ in range(n):
            self.tx.sendall(data)
        reader.join()
        return rate(nbytes * n, time.perf_counter() - start)

    def close(self) -> None:
        self.tx.close()
        self.rx.close()


class ShmPeer:
    """A receiver process: handles in over its stdin, one ack byte back per tensor."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", RECEIVER], stdin=subprocess.PIPE, stdout=subprocess.PIPE
        )
        self.pool = shm.ShmPool(PREFIX)

    def transfer(self, src: np.ndarray) -> None:
        data = msgspec.msgpack.encode(self.pool.put(src))
        self.proc.stdin.write(struct.pack("<I", len(data)) + data)
        self.proc.stdin.flush()
        if self.proc.stdout.read(1) != b"k":
            raise RuntimeError("the shm receiver failed")

    def warm_up(self) -> None:
        """Wait for the receiver to start, through a pool of its own (the cold runs stay cold)."""
        pool, self.pool = self.pool, shm.ShmPool(PREFIX + "_warmup")
        try:
            self.transfer(np.arange(4, dtype=np.float32))
        finally:
            self.pool.close()
            self.pool = pool

    def run(self, src: np.ndarray, n: int) -> float:
        start = time.perf_counter()
        for _ in range(n):
            self.transfer(src)
        return rate(src.nbytes * n, time.perf_counter() - start)

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=30)
        self.pool.close()


async def measure(
    arrays: dict[int, np.ndarray], repeats: int, budget: int
) -> tuple[dict[tuple[int, str], list[float]], dict[int, float], dict[str, int]]:
    """All paths, interleaved per repeat; returns the runs, the cold shm rates, the pool's stats.
    The synchronous paths simply block the loop: nothing else runs in this benchmark."""
    dsts = {mib: np.ones_like(a) for mib, a in arrays.items()}  # touched: no page faults
    runs: dict[tuple[int, str], list[float]] = {}
    cold: dict[int, float] = {}
    tcp, peer = TcpPair(), ShmPeer()
    raw = SocketPair(max(a.nbytes for a in arrays.values()))
    try:
        peer.warm_up()
        for mib, src in arrays.items():  # first transfer: a new segment (cold pages)
            start = time.perf_counter()
            peer.transfer(src)
            cold[mib] = rate(src.nbytes, time.perf_counter() - start)
            peer.pool.reclaim()
            await tcp.run(src, 1)  # warm the connection and allocator
            raw.run(src, 1)
        for _ in range(repeats):
            for mib, src in arrays.items():
                n = per_run(src.nbytes, budget)
                runs.setdefault((mib, "memcpy"), []).append(bench_memcpy(src, dsts[mib], n))
                runs.setdefault((mib, "frames"), []).append(bench_frames(src, n * 100))
                runs.setdefault((mib, "tcp"), []).append(await tcp.run(src, n))
                runs.setdefault((mib, "socket"), []).append(raw.run(src, n))
                runs.setdefault((mib, "shm"), []).append(peer.run(src, n))
        return runs, cold, peer.pool.statistics()
    finally:
        tcp.close()
        raw.close()
        peer.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 repeats, less data per run")
    parser.add_argument("--repeats", type=int, default=None)
    args = parser.parse_args()
    repeats = args.repeats or (3 if args.quick else 7)
    budget = (64 if args.quick else 256) * MIB
    shm.sweep_stale_segments(PREFIX)

    # distinct values: the receiver checks the last element
    arrays = {mib: np.arange(mib * MIB // 4, dtype=np.float32) for mib in SIZES_MIB}
    runs, cold, stats = trio.run(measure, arrays, repeats, budget)
    med = {key: statistics.median(v) for key, v in runs.items()}
    # The box is shared and noisy: the headline ratio pairs each path with the memcpy of the
    # same repeat (measured moments apart) and takes the median of those ratios.
    paired = {
        (mib, path): statistics.median(
            x / m for x, m in zip(runs[(mib, path)], runs[(mib, "memcpy")], strict=True)
        )
        for mib in SIZES_MIB
        for path in PATHS
    }
    print(
        f"tensor throughput, float32, GB/s (median of {repeats}); x = median ratio to the "
        f"same repeat's memcpy (shm_cold: to the median memcpy); "
        f"tensorframe={tensors.IMPLEMENTATION}; tcp = ZmqSocket under trio, 2 contexts"
    )
    head = ("memcpy", "frames", "tcp", "socket", "shm", "shm_cold")
    print(f"{'MiB':>4} {head[0]:>8} " + " ".join(f"{h:>14}" for h in head[1:]) + "   tcp/socket")
    rows = []
    for mib in SIZES_MIB:
        base = med[(mib, "memcpy")]
        cells = [f"{base:>8.2f}"]
        for path in ("frames", "tcp", "socket", "shm"):
            cells.append(f"{med[(mib, path)]:>7.1f} {paired[(mib, path)]:>5.2f}x")
        cells.append(f"{cold[mib]:>7.2f} {cold[mib] / base:>5.2f}x")
        of_socket = statistics.median(
            t / r for t, r in zip(runs[(mib, "tcp")], runs[(mib, "socket")], strict=True)
        )
        cells.append(f"{of_socket:>12.2f}")
        print(f"{mib:>4} " + " ".join(cells))
        rows.append(
            {
                "mib": mib,
                "median_gb_per_s": {p: med[(mib, p)] for p in PATHS} | {"shm_cold": cold[mib]},
                "ratio_to_memcpy_paired": {p: paired[(mib, p)] for p in PATHS},
                "ratio_of_medians": {p: med[(mib, p)] / base for p in PATHS}
                | {"shm_cold": cold[mib] / base},
                "runs_gb_per_s": {p: runs[(mib, p)] for p in PATHS},
                "meets_target": {p: paired[(mib, p)] >= t for p, t in TARGETS.items()},
                "tcp_to_socket_paired": of_socket,
                "socket_ceiling_meets_tcp_target": paired[(mib, "socket")] >= TARGETS["tcp"],
            }
        )
    for path, target in TARGETS.items():
        ok = [r["mib"] for r in rows if r["meets_target"][path]]
        print(f"target {path} >= {target:.0%} of memcpy: met at {ok or 'no'} MiB")
    ceiling = [r["mib"] for r in rows if r["socket_ceiling_meets_tcp_target"]]
    print(
        f"a bare loopback socket itself reaches {TARGETS['tcp']:.0%} of memcpy at"
        f" {ceiling or 'no'} MiB"
    )
    print(f"shm pool after the run: {stats}", file=sys.stderr)

    meta = {
        "python": platform.python_version(),
        "numpy": np.__version__,
        "pyzmq": zmq.__version__,
        "libzmq": zmq.zmq_version(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "tensorframe": tensors.IMPLEMENTATION,
        "repeats": repeats,
        "bytes_per_run": budget,
        "quick": args.quick,
        "unset_env": os.environ.get("LMGW_BENCH_UNSET_BLAS", ""),
        "tcp": "ZmqSocket under trio, PAIR over tcp://127.0.0.1, one zmq.Context per side",
        "socket": "plain loopback TCP socket pair, sendall / recv_into a touched buffer in a"
        " second thread: the ceiling of any TCP path here",
        "shm": "ShmPool.put + handle over a pipe to a second process: from_shm, close, ack",
        "frames_note": "zero-copy: the rate is nbytes over per-call overhead, not a data copy",
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"benchmark": "tensors", "meta": meta, "rows": rows}, indent=2))
    print(f"wrote {RESULTS}", file=sys.stderr)


if __name__ == "__main__":
    main()
