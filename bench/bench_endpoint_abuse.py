"""Benchmark: the local endpoint under abuse — its peak memory and a normal request's latency meanwhile.

    .venv/bin/python bench/bench_endpoint_abuse.py [--model model.tar.gz] [--seconds 20]

Serves `--model` (default: the tests' tiny ResNet-18, trained for one epoch) with tagflow.local.endpoint at its
default limits, then runs each scenario for `--seconds` while one normal client sends 96-px JPEGs back to back on a
keep-alive connection (its latency p50/p99 and errors are reported) and the server's RSS is sampled (peak: VmHWM,
reset before each scenario through /proc/PID/clear_refs):

- baseline: the normal client alone;
- bomb: 3 clients each sending a 20000 x 20000 8-bit grey PNG (~390 KB on the wire, 400 M pixels) repeatedly;
- largest accepted: one client per decode slot sending a 4096 x 4096 PNG (the pixel limit exactly): the most
  decoding memory the server may need, i.e. the per-worker bound;
- idle + slow: 200 idle connections and 20 slow clients (request headers at one byte per second, reconnecting
  when cut off) held open.

Prints one block per scenario, then the machine line. Numbers in BENCHMARKS.md ("Local endpoint under abuse").
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import os
import socket
import statistics
import struct
import sys
import tempfile
import threading
import time
import zlib
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "bench"))

from machine import machine_line  # noqa: E402
from tagflow.local import endpoint  # noqa: E402
from tagflow.pack import mxnet_python  # noqa: E402
from test_local_endpoint import render, train_tiny_model  # noqa: E402 - the tests' model recipe, on purpose


def png_grey(width: int, height: int) -> bytes:
    """An 8-bit grey PNG of black pixels, compressed a block of rows at a time."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    packer = zlib.compressobj(9)
    block = max(1, (1 << 24) // (width + 1))
    data = b"".join(
        packer.compress(b"\x00" * (width + 1) * min(block, height - row)) for row in range(0, height, block)
    )
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", data + packer.flush()) + chunk(b"IEND", b"")


def status_kb(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{key}:"):
            return int(line.split()[1])
    return 0


class Sampler(threading.Thread):
    """The server's RSS and thread count, every 50 ms, until stopped."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid, self.stop, self.rss, self.threads = pid, threading.Event(), [], []

    def run(self) -> None:
        while not self.stop.is_set():
            self.rss.append(status_kb(self.pid, "VmRSS"))
            self.threads.append(status_kb(self.pid, "Threads"))
            time.sleep(0.05)


def sender(host: str, port: int, body: bytes, content_type: str, stop: threading.Event, out: list, errors: list):
    """POST `body` to /invocations back to back on one keep-alive connection; latencies and statuses to `out`."""
    conn = http.client.HTTPConnection(host, port, timeout=60)
    while not stop.is_set():
        started = time.perf_counter()
        try:
            conn.request("POST", "/invocations", body=body, headers={"Content-Type": content_type})
            resp = conn.getresponse()
            resp.read()
            out.append((time.perf_counter() - started, resp.status))
            if resp.getheader("Connection", "").lower() == "close":
                conn.close()
                conn = http.client.HTTPConnection(host, port, timeout=60)
        except (OSError, http.client.HTTPException) as err:
            errors.append(repr(err))
            conn.close()
            conn = http.client.HTTPConnection(host, port, timeout=60)
    conn.close()


def slow_client(host: str, port: int, stop: threading.Event, cut_off: list) -> None:
    """Send request headers at one byte per second, forever; count the times the server cuts it off."""
    request = b"POST /invocations HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"a" * 100000
    while not stop.is_set():
        try:
            with socket.create_connection((host, port), timeout=10) as sock:
                for byte in request:
                    if stop.is_set():
                        return
                    sock.sendall(bytes([byte]))
                    time.sleep(1)
        except OSError:
            cut_off.append(1)


def scenario(info: endpoint.EndpointInfo, name: str, seconds: float, setup) -> None:
    Path(f"/proc/{info.pid}/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    rss_before = status_kb(info.pid, "VmRSS")
    stop = threading.Event()
    sampler = Sampler(info.pid)
    sampler.start()
    extra = setup(stop)
    normal: list = []
    errors: list = []
    image = render(7)[0]
    client = threading.Thread(target=sender, args=(info.host, info.port, image, "image/jpeg", stop, normal, errors))
    client.start()
    time.sleep(seconds)
    stop.set()
    client.join()
    report = extra() if extra else ""
    sampler.stop.set()
    sampler.join()
    peak = status_kb(info.pid, "VmHWM")
    ok = sorted(t for t, status in normal if status == 200)
    q = statistics.quantiles(ok, n=100) if len(ok) >= 2 else [float("nan")] * 99
    statuses = Counter(status for _, status in normal)
    print(f"== {name} ({seconds:.0f} s)")
    print(f"   normal requests: {len(ok)} answered 200, p50 {q[49] * 1000:.1f} ms, p99 {q[98] * 1000:.1f} ms; "
          f"other statuses {dict(statuses - Counter({200: len(ok)}))}, errors {len(errors)}")  # fmt: skip
    print(f"   server RSS: {rss_before / 1024:.0f} MB before, peak {peak / 1024:.0f} MB "
          f"(sampled max {max(sampler.rss) / 1024:.0f} MB); threads max {max(sampler.threads)}")  # fmt: skip
    if report:
        print(f"   {report}")


def flood(info: endpoint.EndpointInfo, body: bytes, clients: int):
    def setup(stop: threading.Event):
        out: list = []
        errors: list = []
        threads = [
            threading.Thread(target=sender, args=(info.host, info.port, body, "image/png", stop, out, errors))
            for _ in range(clients)
        ]
        for t in threads:
            t.start()

        def report() -> str:
            for t in threads:
                t.join()
            times = sorted(t for t, _ in out)
            median = statistics.median(times) * 1000 if times else float("nan")
            statuses = dict(Counter(s for _, s in out))
            return (f"{clients} clients sent {len(out)} requests ({len(body)} B each): statuses {statuses}, "
                    f"median answer {median:.1f} ms, errors {len(errors)}")  # fmt: skip

        return report

    return setup


def idle_and_slow(info: endpoint.EndpointInfo, idle: int = 200, slow: int = 20):
    def setup(stop: threading.Event):
        sockets = []
        refused = 0
        for _ in range(idle):
            try:
                sockets.append(socket.create_connection((info.host, info.port), timeout=10))
            except OSError:
                refused += 1
        cut_off: list = []
        threads = [
            threading.Thread(target=slow_client, args=(info.host, info.port, stop, cut_off)) for _ in range(slow)
        ]
        for t in threads:
            t.start()

        def report() -> str:
            closed = 0
            for sock in sockets:
                sock.setblocking(False)
                with contextlib.suppress(BlockingIOError):
                    closed += sock.recv(1) == b""
                sock.close()
            for t in threads:
                t.join()
            return (f"{idle} idle connections opened ({refused} refused), {closed} closed by the server (idle "
                    f"timeout, or to make room); {slow} slow clients cut off {len(cut_off)} times")  # fmt: skip

        return report

    return setup


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="a model.tar.gz (default: train a tiny one)")
    parser.add_argument("--seconds", type=float, default=20)
    args = parser.parse_args()
    decode_slots = len(os.sched_getaffinity(0))  # the server's DECODE_SLOTS: one decode per core at a time
    bomb, largest = png_grey(20000, 20000), png_grey(4096, 4096)
    with tempfile.TemporaryDirectory(prefix="bench-abuse-") as tmp:
        work = Path(tmp)
        model = args.model or train_tiny_model(work, mxnet_python())
        state = work / "endpoint"
        info = endpoint.start(model, name="bench", state_dir=state)
        print(f"server: default limits, 1 worker, {decode_slots} decode slots (pid {info.pid})")
        try:
            scenario(info, "baseline", args.seconds, lambda stop: None)
            scenario(info, "bomb: 3 clients, 20000x20000 PNG", args.seconds, flood(info, bomb, 3))
            scenario(
                info, f"largest accepted: {decode_slots} clients, 4096x4096 PNG", args.seconds,
                flood(info, largest, decode_slots),
            )  # fmt: skip
            scenario(info, "200 idle connections + 20 slow clients", args.seconds, idle_and_slow(info))
        finally:
            endpoint.stop(state)
    print(machine_line())
    return 0


if __name__ == "__main__":
    sys.exit(main())
