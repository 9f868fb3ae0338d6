"""A TCP proxy on loopback that delays every byte sent from client to server by a fixed time.

Loopback answers in microseconds and hides what concurrency buys against real S3 (tens of milliseconds to the first
byte). Delaying the requests by D ms adds D ms to every request/response round trip, in order, without touching the
bytes (SigV4 signatures still verify: the Host header is the proxy's, as the client signed it). `tc netem` would do
this in the kernel, but this machine's kernel has no netem qdisc.

    python bench/latency_proxy.py --target 127.0.0.1:8333 --delay-ms 25   # prints "listening PORT"

Run it as its own process so it does not share the benchmark's interpreter lock.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib

CHUNK = 1 << 16


async def _forward(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay: float) -> None:
    """Copy `reader` to `writer`, each chunk written `delay` seconds after it arrived (order kept)."""
    if delay <= 0:
        with contextlib.suppress(ConnectionError):
            while data := await reader.read(CHUNK):
                writer.write(data)
                await writer.drain()
        writer.close()
        return
    loop = asyncio.get_running_loop()
    chunks: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

    async def deliver() -> None:
        while True:
            due, data = await chunks.get()
            if not data:
                break
            wait = due - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
            writer.write(data)
            await writer.drain()

    delivering = asyncio.create_task(deliver())
    try:
        while data := await reader.read(CHUNK):
            chunks.put_nowait((loop.time() + delay, data))
    except ConnectionError:
        pass
    chunks.put_nowait((0.0, b""))
    with contextlib.suppress(ConnectionError):
        await delivering
    writer.close()


async def _handle(
    client_reader: asyncio.StreamReader,
    client_writer: asyncio.StreamWriter,
    host: str,
    port: int,
    delay: float,
) -> None:
    try:
        server_reader, server_writer = await asyncio.open_connection(host, port)
    except OSError:
        client_writer.close()
        return
    await asyncio.gather(
        _forward(client_reader, server_writer, delay),
        _forward(server_reader, client_writer, 0.0),
        return_exceptions=True,
    )


async def serve(target: str, delay_ms: float, listen_port: int) -> None:
    host, port = target.rsplit(":", 1)
    server = await asyncio.start_server(
        lambda r, w: _handle(r, w, host, int(port), delay_ms / 1000), "127.0.0.1", listen_port, backlog=1024
    )
    print(f"listening {server.sockets[0].getsockname()[1]}", flush=True)
    async with server:
        await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", required=True, help="HOST:PORT to forward to")
    parser.add_argument("--delay-ms", type=float, default=25.0, help="added to every request (default 25)")
    parser.add_argument("--listen-port", type=int, default=0, help="0 picks a free port (printed)")
    args = parser.parse_args()
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(args.target, args.delay_ms, args.listen_port))


if __name__ == "__main__":
    main()
