"""Real mosquitto and a real HTTP Kinesis endpoint (moto's server mode) for tests and the demo.

Why real processes: the gateway's promises (acks only after Kinesis holds the record, sessions
that survive restarts, backpressure) live in sockets, retries and broker queues; fakes inside the
test process would hide exactly the failures we test. Everything binds 127.0.0.1 and every process
is stopped by its pid (SIGTERM, wait, SIGKILL after a timeout), also when a test fails.

Running as root: mosquitto 2.0 drops privileges to the `mosquitto` user when started as root, and
then cannot write a persistence file or log into a root-owned tmp dir (the save fails silently until
shutdown, docs/delivery.md#the-brokers-limits-are-the-loss-points). Mosquitto 2.0.11 accepts `user root` (it only warns "should
not be run as root"), so the generated config says `user root` when we are root; as a normal user
the option is ignored by mosquitto and we leave it out.

Websockets: the Debian 2.0.11 build here fails to open a websockets listener ("Unable to start any
listening sockets"); `websockets_supported()` probes once so tests can skip instead of failing.

`python -m tests.support.services kinesis --port 4566 --stream sensor-data` runs moto as the local
Kinesis stand-in for the README quick-start and prints every record that arrives.
"""

from __future__ import annotations

import argparse
import atexit
import base64
import functools
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HOST = "127.0.0.1"
FAKE_AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_REGION": "us-east-1",
    "AWS_DEFAULT_REGION": "us-east-1",
}


_LIVE: set[subprocess.Popen[bytes]] = set()


def spawn(cmd: Sequence[str], log: Path, err_log: Path | None = None,
          **kw: Any) -> subprocess.Popen[bytes]:
    """Popen with output appended to `log` (stderr to `err_log` if given); remembered so an
    aborted test run still kills it at interpreter exit."""
    with open(log, "ab") as out, open(err_log or log, "ab") as err:
        proc = subprocess.Popen(list(cmd), stdout=out, stderr=err, stdin=subprocess.DEVNULL, **kw)
    _LIVE.add(proc)
    return proc


@atexit.register
def _kill_leftovers() -> None:
    for proc in list(_LIVE):
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def free_port() -> int:
    """A port the kernel just handed out on 127.0.0.1 (the race until our process binds it is
    accepted: the kernel hands ports out round-robin, so a reuse within ms is rare)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def free_port_range(count: int) -> int:
    """The first of `count` consecutive free ports (`run --workers N` serves HTTP_PORT+i)."""
    for _ in range(100):
        base = free_port()
        if base + count > 65536:
            continue
        held: list[socket.socket] = []
        try:
            for port in range(base, base + count):
                s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                held.append(s)
                s.bind((HOST, port))
            return base
        except OSError:
            continue
        finally:
            for s in held:
                s.close()
    raise RuntimeError(f"no {count} consecutive free ports on {HOST}")


def port_open(port: int, host: str = HOST) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def stop_process(proc: subprocess.Popen[Any] | None, timeout: float = 10.0,
                 sig: int = signal.SIGTERM) -> int | None:
    """Signal one process by pid, wait, SIGKILL if it ignores us; returns its exit code."""
    if proc is None:
        return None
    _LIVE.discard(proc)
    if proc.poll() is None:
        try:
            proc.send_signal(sig)
            return proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
        except ProcessLookupError:
            pass
    return proc.wait(timeout=timeout)


def _wait(predicate: Any, timeout: float, proc: subprocess.Popen[Any], what: str,
          log: Path | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        if proc.poll() is not None:
            tail = log.read_text(errors="replace")[-2000:] if log and log.exists() else ""
            raise RuntimeError(f"{what} exited with {proc.returncode} before it was ready\n{tail}")
        time.sleep(0.02)
    raise TimeoutError(f"{what} not ready after {timeout}s")


@dataclass(frozen=True)
class TlsFiles:
    """Paths of a listener's CA, certificate and key (see certs.make_test_pki)."""

    cafile: Path
    certfile: Path
    keyfile: Path


class Mosquitto:
    """One mosquitto process with a generated config in its own directory; restartable on its ports."""

    def __init__(self, workdir: str | os.PathLike[str], *, port: int | None = None,
                 allow_anonymous: bool = True, passwords: dict[str, str] | None = None,
                 persistence: bool = False, autosave_interval: int | None = None,
                 max_queued_messages: int = 1_000_000, max_inflight_messages: int | None = None,
                 tls: TlsFiles | None = None, require_certificate: bool = False,
                 websockets: bool = False, log_types: Sequence[str] = ("all",),
                 extra_conf: Sequence[str] = ()) -> None:
        self.dir = Path(workdir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.host = HOST
        self.port = port or free_port()
        self.tls_port = free_port() if tls else None
        self.ws_port = free_port() if websockets else None
        self.conf_path = self.dir / "mosquitto.conf"
        self.log_path = self.dir / "mosquitto.log"
        self.stderr_path = self.dir / "mosquitto.stderr"
        self.proc: subprocess.Popen[bytes] | None = None
        lines = []
        if os.geteuid() == 0:
            lines.append("user root")
        lines += [f"listener {self.port} {HOST}", f"allow_anonymous {str(allow_anonymous).lower()}",
                  f"max_queued_messages {max_queued_messages}", f"log_dest file {self.log_path}",
                  "connection_messages true", "log_timestamp true"]
        lines += [f"log_type {t}" for t in log_types]
        if max_inflight_messages is not None:
            lines.append(f"max_inflight_messages {max_inflight_messages}")
        if persistence:
            lines += ["persistence true", f"persistence_location {self.dir}/"]
            if autosave_interval is not None:
                lines.append(f"autosave_interval {autosave_interval}")
        if passwords:
            pwfile = self.dir / "passwords"
            pwfile.write_text("")
            for user, password in passwords.items():
                subprocess.run(["mosquitto_passwd", "-b", str(pwfile), user, password],
                               check=True, capture_output=True)
            lines.append(f"password_file {pwfile}")
        if tls:
            lines += [f"listener {self.tls_port} {HOST}", f"cafile {tls.cafile}",
                      f"certfile {tls.certfile}", f"keyfile {tls.keyfile}",
                      f"require_certificate {str(require_certificate).lower()}"]
        if websockets:
            lines += [f"listener {self.ws_port} {HOST}", "protocol websockets"]
        lines += list(extra_conf)
        self.conf_path.write_text("\n".join(lines) + "\n")

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def _ports(self) -> list[int]:
        return [p for p in (self.port, self.tls_port, self.ws_port) if p]

    def start(self, timeout: float = 10.0) -> Mosquitto:
        self.proc = spawn(["mosquitto", "-c", str(self.conf_path)], self.stderr_path)
        _wait(lambda: all(port_open(p) for p in self._ports()), timeout, self.proc,
              "mosquitto", self.stderr_path)
        return self

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM: mosquitto saves its persistence file on the way out."""
        rc, self.proc = stop_process(self.proc, timeout), None
        return rc

    def kill(self) -> int | None:
        """SIGKILL: no save, the crash case of docs/delivery.md#the-brokers-limits-are-the-loss-points."""
        rc, self.proc = stop_process(self.proc, 5.0, signal.SIGKILL), None
        return rc

    def restart(self, timeout: float = 10.0) -> Mosquitto:
        self.stop()
        return self.start(timeout)

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def pubacks_from(self, client_id: str) -> int:
        """PUBACKs the broker received from ``client_id``: a subscriber's acks, seen from the broker."""
        return self.log_text().count(f"Received PUBACK from {client_id} ")

    def dropped_messages_logged(self) -> bool:
        return "Outgoing messages are being dropped" in self.log_text()

    def __enter__(self) -> Mosquitto:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


@functools.cache
def websockets_supported() -> bool:
    """Whether this mosquitto build can open a websockets listener (probe once per session)."""
    with tempfile.TemporaryDirectory() as tmp:
        m = Mosquitto(tmp, websockets=True)
        try:
            m.start(timeout=5)
            return True
        except (RuntimeError, TimeoutError):
            return False
        finally:
            m.stop()


# moto 5.2's Shard.put_record numbers a record "highest sequence number + 1" and stores it in a
# dict under that number with no lock, while its server answers requests on parallel threads: two
# concurrent PutRecords on one shard overwrite each other's records after both got HTTP 200 with
# sequence numbers (4 threads x 5000 records: 19,719 of 20,000 kept). The gateway sends up to
# KINESIS_MAX_IN_FLIGHT requests at once, as it should against the real service, so the oracle
# would report losses that are moto's. The server therefore serialises each shard's reads and
# writes; moto's own code is otherwise unchanged.
_LOCKED_MOTO = """
import sys, threading
from moto.kinesis import models
lock = threading.RLock()
def locked(method):
    def call(self, *args, **kwargs):
        with lock:
            return method(self, *args, **kwargs)
    return call
models.Shard.put_record = locked(models.Shard.put_record)
models.Shard.get_records = locked(models.Shard.get_records)
from moto.server import main
main(sys.argv[1:])
"""


class MotoServer:
    """moto's server mode in its own process: a Kinesis endpoint spoken to over real HTTP."""

    def __init__(self, workdir: str | os.PathLike[str], port: int | None = None) -> None:
        self.dir = Path(workdir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.url = f"http://{HOST}:{self.port}"
        self.log_path = self.dir / "moto.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def _answers(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/moto-api/", timeout=1) as r:
                return bool(r.status == 200)
        except OSError:
            return False

    def start(self, timeout: float = 30.0) -> MotoServer:
        env = {**os.environ, **FAKE_AWS_ENV}
        self.proc = spawn([sys.executable, "-c", _LOCKED_MOTO, "-H", HOST, "-p", str(self.port)],
                          self.log_path, env=env)
        _wait(self._answers, timeout, self.proc, "moto server", self.log_path)
        return self

    def stop(self, timeout: float = 10.0) -> int | None:
        rc, self.proc = stop_process(self.proc, timeout), None
        return rc

    def reset(self) -> None:
        """Forget every stream (moto's own reset API)."""
        req = urllib.request.Request(f"{self.url}/moto-api/reset", method="POST", data=b"")
        urllib.request.urlopen(req, timeout=10).close()

    def client(self) -> Any:
        return kinesis_client(self.url)

    def __enter__(self) -> MotoServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def kinesis_client(url: str, attempts: int = 3, **config: Any) -> Any:
    """A boto3 Kinesis client with fake credentials aimed at `url` (moto or the fault proxy).

    `attempts` is the total number of tries (botocore's `total_max_attempts`; its `max_attempts`
    key counts retries only, so max_attempts=1 means two requests). `config` goes to botocore's
    Config (e.g. read_timeout=2)."""
    import boto3
    from botocore.config import Config

    config.setdefault("connect_timeout", 5)
    config.setdefault("read_timeout", 30)
    cfg = Config(retries={"mode": "standard", "total_max_attempts": attempts}, **config)
    return boto3.session.Session(
        aws_access_key_id="testing", aws_secret_access_key="testing", region_name="us-east-1",
    ).client("kinesis", endpoint_url=url, config=cfg)


def create_stream(client: Any, name: str, shards: int = 1, timeout: float = 30.0) -> str:
    """Create a provisioned stream and wait until ACTIVE; returns its ARN."""
    client.create_stream(StreamName=name, ShardCount=shards)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        desc = client.describe_stream_summary(StreamName=name)["StreamDescriptionSummary"]
        if desc["StreamStatus"] == "ACTIVE":
            return str(desc["StreamARN"])
        time.sleep(0.05)
    raise TimeoutError(f"stream {name} not ACTIVE after {timeout}s")


def read_all(client: Any, stream: str) -> list[dict[str, Any]]:
    """Every record of every shard from TRIM_HORIZON, read until caught up.

    Returns dicts with partition_key, data (bytes), shard_id, sequence_number, arrival. GetRecords
    does not return ExplicitHashKey; the shard a record landed in is the observable effect (the
    fault proxy's `entries_log` keeps what was sent, ExplicitHashKey included).
    """
    out: list[dict[str, Any]] = []
    shards = client.list_shards(StreamName=stream)["Shards"]
    for shard in shards:
        sid = shard["ShardId"]
        it = client.get_shard_iterator(StreamName=stream, ShardId=sid,
                                       ShardIteratorType="TRIM_HORIZON")["ShardIterator"]
        empty = 0
        while it and empty < 2:
            resp = client.get_records(ShardIterator=it, Limit=10000)
            for r in resp["Records"]:
                out.append({"partition_key": r["PartitionKey"], "data": r["Data"], "shard_id": sid,
                            "sequence_number": r["SequenceNumber"],
                            "arrival": r.get("ApproximateArrivalTimestamp")})
            it = resp.get("NextShardIterator")
            caught_up = resp.get("MillisBehindLatest", 0) == 0
            empty = empty + 1 if (not resp["Records"] and caught_up) else 0
    return out


def wait_for_records(client: Any, stream: str, count: int, timeout: float = 60.0,
                     poll_s: float = 0.5) -> list[dict[str, Any]]:
    """Poll read_all until at least `count` records are there (or timeout: returns what exists)."""
    deadline = time.monotonic() + timeout
    while True:
        records = read_all(client, stream)
        if len(records) >= count or time.monotonic() >= deadline:
            return records
        time.sleep(poll_s)


def _demo(argv: Sequence[str] | None = None) -> int:
    """Local Kinesis stand-in for the README quick-start: moto + streams + a live record printer."""
    ap = argparse.ArgumentParser(prog="python -m tests.support.services")
    sub = ap.add_subparsers(dest="cmd", required=True)
    k = sub.add_parser("kinesis", help="run moto as a local Kinesis endpoint and print records")
    k.add_argument("--port", type=int, default=4566)
    k.add_argument("--stream", action="append", default=[], help="stream to create (repeatable)")
    k.add_argument("--shards", type=int, default=1)
    args = ap.parse_args(argv)
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # `kill` stops moto like Ctrl-C
    with tempfile.TemporaryDirectory() as tmp, MotoServer(tmp, args.port) as moto:
        client = moto.client()
        for name in args.stream or ["sensor-data"]:
            create_stream(client, name, args.shards)
        print(f"Kinesis endpoint: AWS_ENDPOINT_URL_KINESIS={moto.url} "
              f"(streams: {', '.join(args.stream or ['sensor-data'])}); Ctrl-C to stop", flush=True)
        seen: dict[str, int] = {}
        try:
            while True:
                for name in args.stream or ["sensor-data"]:
                    records = read_all(client, name)
                    for r in records[seen.get(name, 0):]:
                        data = r["data"]
                        try:
                            shown = data.decode()
                        except UnicodeDecodeError:
                            shown = "base64:" + base64.b64encode(data).decode()
                        print(f"{name} {r['shard_id']} key={r['partition_key']} {shown.rstrip()}",
                              flush=True)
                    seen[name] = len(records)
                time.sleep(1)
        except KeyboardInterrupt:
            return 0


if __name__ == "__main__":
    raise SystemExit(_demo())
