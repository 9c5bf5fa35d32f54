"""The probe and metrics listener under hostile load: thousands of stalled sockets, a scrape storm.

The listener runs in this process on 127.0.0.1 (real sockets, real kernel accept queue), so its
threads and memory can be read with psutil from the same process. A stalled socket sends one
byte of a request and then nothing; the listener must keep answering probes at once, hold at most
its cap of sockets, add no thread per connection, and stop within a second whatever is connected.
"""

from __future__ import annotations

import asyncio
import http.client
import resource
import selectors
import socket
import threading
import time
from collections.abc import Iterator

import psutil
import pytest

from gateway.ops.http import HealthServer
from gateway.ops.metrics import Metrics

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

STALLED = 2000
SCRAPERS = 200
CAP = 256
# this process holds both ends: the stalled sockets, the scrapers, the listener's share, and slack
FDS_NEEDED = STALLED + 2 * SCRAPERS + CAP + 256


@pytest.fixture(scope="module", autouse=True)
def enough_file_descriptors() -> Iterator[None]:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < FDS_NEEDED:
        if hard != resource.RLIM_INFINITY and hard < FDS_NEEDED:
            pytest.fail(f"RLIMIT_NOFILE hard limit is {hard}; this test needs {FDS_NEEDED} file descriptors "
                        f"(raise it, e.g. `ulimit -Hn {FDS_NEEDED}`, and run again)")
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


class Counted:
    """A real ``Metrics`` exposition (20 routes, ~70 KB) that counts how often it was rendered."""

    def __init__(self) -> None:
        self.metrics = Metrics()
        self.metrics.declare_routes((f"route-{i}", f"stream-{i}", ()) for i in range(20))
        self.renders = 0

    def render(self) -> bytes:
        self.renders += 1
        return self.metrics.render()


class Footprint:
    """Threads (Python's count and the kernel's) and resident memory of this process."""

    def __init__(self) -> None:
        process = psutil.Process()
        self.threads, self.os_threads = threading.active_count(), process.num_threads()
        self.rss = process.memory_info().rss

    def __str__(self) -> str:
        return f"threads {self.threads} (os {self.os_threads}), rss {self.rss / 2**20:.1f} MiB"


@pytest.fixture
def counted() -> Counted:
    return Counted()


@pytest.fixture
def before() -> Footprint:
    """Taken before the listener starts, so its own threads count as growth."""
    return Footprint()


@pytest.fixture
def server(before: Footprint, counted: Counted) -> Iterator[HealthServer]:
    srv = HealthServer("127.0.0.1", 0, counted, lambda: True, lambda: (True, {"routes_loaded": True}),
                       max_connections=CAP)
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()


def open_stalled(port: int, count: int) -> list[socket.socket]:
    sockets = []
    for _ in range(count):
        sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        try:
            sock.send(b"G")
        except OSError:  # already closed to make room for a newer one: still a socket we hold
            pass
        sockets.append(sock)
    return sockets


@pytest.fixture
def stalled(server: HealthServer) -> Iterator[list[socket.socket]]:
    sockets = open_stalled(server.port, STALLED)
    try:
        yield sockets
    finally:
        for sock in sockets:
            sock.close()


def get(port: int, path: str, timeout: float = 5) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def closed_of(sockets: list[socket.socket], seconds: float) -> list[socket.socket]:
    """Those of ``sockets`` the server closed (end of stream or reset) within ``seconds``."""
    remaining = {sock.fileno(): sock for sock in sockets}
    closed = []
    deadline = time.monotonic() + seconds
    with selectors.DefaultSelector() as selector:
        for sock in sockets:
            selector.register(sock, selectors.EVENT_READ)
        while remaining and (left := deadline - time.monotonic()) > 0:
            for key, _ in selector.select(left):
                sock = remaining.pop(key.fd)
                selector.unregister(sock)
                try:
                    data = sock.recv(1, socket.MSG_PEEK)
                except ConnectionResetError:
                    data = b""
                if data == b"":
                    closed.append(sock)
    return closed


def test_a_probe_is_answered_within_a_second_while_2000_sockets_stall(
        server: HealthServer, before: Footprint, stalled: list[socket.socket]) -> None:
    started = time.monotonic()
    status, _ = get(server.port, "/readyz", timeout=1)
    took = time.monotonic() - started
    after = Footprint()
    print(f"\n{STALLED} stalled sockets: /readyz {status} in {took * 1000:.1f} ms; before: {before}; after: {after};"
          f" listener holds {server.open_connections} sockets")
    assert status == 200 and took < 1
    assert server.open_connections <= CAP
    assert after.threads - before.threads <= 2, f"{before} -> {after}"  # the loop and the metrics renderer
    assert after.os_threads - before.os_threads <= 2, f"{before} -> {after}"
    assert after.rss - before.rss < 32 * 2**20, f"{before} -> {after}"


def test_200_concurrent_scrapes_all_succeed_while_2000_sockets_stall(
        server: HealthServer, counted: Counted, stalled: list[socket.socket]) -> None:
    async def scrape() -> tuple[int, int, float]:
        started = time.monotonic()
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(b"GET /metrics HTTP/1.1\r\nHost: gateway\r\n\r\n")
        answer = await reader.read()
        writer.close()
        head, _, body = answer.partition(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1]) if head.startswith(b"HTTP/1.1 ") else 0
        ok = status == 200 and b"mqtt_kinesis_gateway_records_put_total" in body
        return (status if ok else 0), len(body), time.monotonic() - started

    async def storm() -> list[tuple[int, int, float] | BaseException]:
        return await asyncio.wait_for(asyncio.gather(*(scrape() for _ in range(SCRAPERS)),
                                                     return_exceptions=True), 30)

    results = asyncio.run(storm())
    failures = [r for r in results if isinstance(r, BaseException) or r[0] != 200]
    worst = max(r[2] for r in results if not isinstance(r, BaseException))
    print(f"\n{SCRAPERS} concurrent scrapes: {SCRAPERS - len(failures)} ok, worst {worst * 1000:.0f} ms,"
          f" {counted.renders} renders")
    assert failures == []


def test_stop_returns_within_2_seconds_while_2000_sockets_stall(
        server: HealthServer, stalled: list[socket.socket]) -> None:
    port = server.port
    assert get(port, "/healthz")[0] == 200
    started = time.monotonic()
    server.stop()
    took = time.monotonic() - started
    print(f"\nstop() with {STALLED} stalled sockets took {took * 1000:.1f} ms")
    assert took < 2
    assert not server.alive
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=1).close()


def test_a_client_trickling_a_byte_at_a_time_is_cut_at_the_deadline(counted: Counted) -> None:
    srv = HealthServer("127.0.0.1", 0, counted, request_timeout_s=1.0)
    srv.start()
    trickling = [socket.create_connection(("127.0.0.1", srv.port), timeout=5) for _ in range(10)]
    try:
        started = time.monotonic()
        left = list(trickling)
        while left and time.monotonic() - started < 5:  # each sends one byte every 0.25 s
            for sock in left:
                try:
                    sock.send(b"G")
                except OSError:
                    pass
            gone = closed_of(left, 0.25)
            left = [sock for sock in left if sock not in gone]
        took = time.monotonic() - started
        print(f"\n10 clients sending a byte every 0.25 s: {10 - len(left)} cut after {took:.2f} s (deadline 1 s)")
        assert left == [] and took < 2.5
    finally:
        for sock in trickling:
            sock.close()
        srv.stop()


def test_every_stalled_socket_is_closed_by_the_deadline(counted: Counted) -> None:
    srv = HealthServer("127.0.0.1", 0, counted, max_connections=CAP, request_timeout_s=1.0)
    srv.start()
    sockets = open_stalled(srv.port, STALLED)
    try:
        closed = len(closed_of(sockets, 4.0))
        print(f"\n{closed} of {STALLED} stalled sockets closed by the server within 4 s (deadline 1 s)")
        assert closed == STALLED
        assert srv.open_connections == 0 and srv.alive
    finally:
        for sock in sockets:
            sock.close()
        srv.stop()
