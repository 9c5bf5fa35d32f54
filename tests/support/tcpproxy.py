"""A TCP proxy between the gateway and mosquitto that cuts or partitions the network on command.

Why: the broker-side faults (6 network partition, 19 reconnect with acks
pending, 24 recovery) need a connection that breaks in the two ways networks break:
- `cut()`: every connection is reset (RST both ways) and the port refuses new ones, like a broker
  host that went away; the gateway notices at once.
- `blackhole()`: a partition. Connections stay open but no byte moves in either direction (the
  proxy stops reading, so bytes wait in kernel buffers as unacknowledged segments would); new
  connections are accepted and hang the same way. Only keepalive can detect it. `heal()` lets the
  held bytes flow again in order, so a connection that outlived the partition is intact, like TCP.
- `heal()`: back to pass-through (re-listening on the same port after a cut).
"""

from __future__ import annotations

import socket
import struct
import threading

HOST = "127.0.0.1"


def _rst_close(sock: socket.socket) -> None:
    """Close with RST. SHUT_RD first: a thread blocked in recv() keeps the socket alive through
    close() on Linux; SHUT_RD wakes it (sending nothing), so the close really happens, as RST."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.shutdown(socket.SHUT_RD)
    except OSError:
        pass
    sock.close()


class TcpProxy:
    """`TcpProxy(target_port).start()`; point the client at `.port`; then cut/blackhole/heal."""

    def __init__(self, target_port: int, target_host: str = HOST, port: int = 0) -> None:
        self.target = (target_host, target_port)
        self.port = port
        self.mode = "pass"
        self._flowing = threading.Event()
        self._flowing.set()
        self._lock = threading.Lock()
        self._conns: list[tuple[socket.socket, socket.socket]] = []
        self._listener: socket.socket | None = None
        self._threads: list[threading.Thread] = []
        self._half_closed: dict[int, int] = {}
        self.accepted = 0

    @property
    def connections(self) -> int:
        with self._lock:
            return len(self._conns)

    def start(self) -> TcpProxy:
        ls = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        ls.bind((HOST, self.port))
        ls.listen(64)
        self.port = ls.getsockname()[1]
        self._listener = ls
        t = threading.Thread(target=self._accept_loop, args=(ls,), daemon=True,
                             name=f"tcpproxy-{self.port}")
        t.start()
        self._threads.append(t)
        return self

    def _accept_loop(self, ls: socket.socket) -> None:
        while True:
            try:
                client, _ = ls.accept()
            except OSError:
                return  # listener closed (cut or stop)
            try:
                upstream = socket.create_connection(self.target, timeout=5)
                upstream.settimeout(None)
            except OSError:
                _rst_close(client)
                continue
            for s in (client, upstream):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                self._conns.append((client, upstream))
                self.accepted += 1
            for src, dst in ((client, upstream), (upstream, client)):
                t = threading.Thread(target=self._pump, args=(src, dst, client, upstream),
                                     daemon=True)
                t.start()

    def _pump(self, src: socket.socket, dst: socket.socket, a: socket.socket,
              b: socket.socket) -> None:
        try:
            while True:
                self._flowing.wait()
                data = src.recv(65536)
                self._flowing.wait()  # a partition that began during recv holds these bytes too
                if not data:  # orderly close: pass the FIN on; close both when both ended
                    with self._lock:
                        if (a, b) not in self._conns:
                            return  # woken by a cut, not by the peer
                    dst.shutdown(socket.SHUT_WR)
                    with self._lock:
                        self._half_closed[id(a)] = self._half_closed.get(id(a), 0) + 1
                        both = self._half_closed[id(a)] == 2
                    if both:
                        self._drop(a, b, reset=False)
                    return
                dst.sendall(data)
        except OSError:
            self._drop(a, b)

    def _drop(self, a: socket.socket, b: socket.socket, reset: bool = True) -> None:
        with self._lock:
            if (a, b) in self._conns:
                self._conns.remove((a, b))
            self._half_closed.pop(id(a), None)
        for s in (a, b):
            _rst_close(s) if reset else s.close()

    def cut(self) -> None:
        """Reset every connection and refuse new ones until heal()."""
        self.mode = "cut"
        if self._listener is not None:
            try:  # shutdown wakes the thread blocked in accept(); close alone does not on Linux
                self._listener.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self._listener.close()
            self._listener = None
        with self._lock:
            conns, self._conns = self._conns, []
        for a, b in conns:
            _rst_close(a)
            _rst_close(b)
        self._flowing.set()

    def blackhole(self) -> None:
        """Partition: nothing moves, nothing is reset."""
        self.mode = "blackhole"
        self._flowing.clear()

    def heal(self) -> None:
        self.mode = "pass"
        if self._listener is None:
            self.start()
        self._flowing.set()

    def stop(self) -> None:
        self.cut()
        self.mode = "stopped"

    def __enter__(self) -> TcpProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
