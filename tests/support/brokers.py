"""Brokers other than Mosquitto, for the suites that prove delivery (docs/brokers.md#compatibility).

Why real, different brokers: the delivery promise rests on broker behaviour that differs between
implementations (in-flight windows, sessions, shared subscriptions), and Mosquitto alone hides
those differences. Two more run here, each on a free 127.0.0.1 port in its own directory, each
stopped by its pid (ejabberd: by its process group, led by that pid), also when a test fails:

* ejabberd (Debian's package, Erlang): MQTT 5 and 3.1.1 through its mod_mqtt module. It sends the
  next QoS 1 message only after the previous PUBACK (an in-flight window of one) and keeps its
  queues in RAM, so a broker restart loses sessions. ejabberdctl refuses every user but root and
  `ejabberd`, and as root it runs the VM through `su`, in a session of its own that our pid no
  longer leads; so as root we start ejabberdctl as the `ejabberd` user ourselves, in a new process
  group, with a run directory that user can write (pytest's tmp dirs are root-only: the run
  directory is a fresh one under the system tmp dir, its logs copied to the test's dir on close).
  The Erlang distribution listens on 127.0.0.1 on a port of our choosing (ERL_DIST_PORT), so no
  epmd is started and two brokers never share a node name.
* aedes (npm, Node.js): MQTT 3.1.1 only, in-memory sessions (they live as long as the process),
  from tests/support/node (`npm ci --prefix tests/support/node`, done by scripts/quickstart).

A broker that cannot start raises: CI fails instead of skipping what it could not run.
"""

from __future__ import annotations

import atexit
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from paho.mqtt.enums import MQTTProtocolVersion

from tests.support.services import HOST, _wait, free_port, port_open, spawn, stop_process

NODE_DIR = Path(__file__).resolve().parent / "node"
EJABBERD_USER = "ejabberd"


_LIVE_GROUPS: set[subprocess.Popen[bytes]] = set()


@atexit.register
def _kill_leftover_groups() -> None:
    """An aborted run still takes the VM down: services.spawn's own atexit reaches only our pid."""
    for proc in list(_LIVE_GROUPS):
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _stop_group(proc: subprocess.Popen[bytes] | None, timeout: float) -> int | None:
    """SIGTERM to the process group our pid leads (the shell script and the VM it started), then
    SIGKILL to the group if it overstays ``timeout``."""
    if proc is None:
        return None
    _LIVE_GROUPS.discard(proc)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                os.killpg(proc.pid, 0)  # anyone left in the group?
            except ProcessLookupError:
                return stop_process(proc, timeout)
            proc.poll()
            time.sleep(0.05)
    return stop_process(proc, timeout)


class Ejabberd:
    """ejabberd 23.01 with only an MQTT listener: anonymous login (any username and password)."""

    username, password = "gateway", "anything"  # login_anon still wants both in the CONNECT

    def __init__(self, workdir: str | os.PathLike[str], *, port: int | None = None,
                 session_expiry_s: int = 3600, max_queue: int = 100_000) -> None:
        if shutil.which("ejabberdctl") is None and not Path("/usr/sbin/ejabberdctl").exists():
            raise RuntimeError("ejabberdctl not found: install Debian's ejabberd (scripts/quickstart does)")
        self.dir = Path(workdir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.host = HOST
        self.port = port or free_port()
        self.dist_port = free_port()
        self.as_root = os.geteuid() == 0
        self.run_dir = Path(tempfile.mkdtemp(prefix="ejabberd-")) if self.as_root else self.dir
        (self.run_dir / "spool").mkdir(exist_ok=True)
        (self.run_dir / "logs").mkdir(exist_ok=True)
        self.config_path = self.run_dir / "ejabberd.yml"
        self.config_path.write_text(f"""\
hosts: ["localhost"]
loglevel: info
auth_method: [anonymous]
anonymous_protocol: login_anon
listen:
  - port: {self.port}
    ip: "{HOST}"
    module: mod_mqtt
    backlog: 1000
modules:
  mod_mqtt:
    max_queue: {max_queue}
    queue_type: ram
    session_expiry: {session_expiry_s}
""")
        self.ctl_path = self.run_dir / "ejabberdctl.cfg"
        self.ctl_path.write_text(f"ERLANG_NODE=mqtt{self.port}@localhost\nINET_DIST_INTERFACE={HOST}\n"
                                 f"ERL_DIST_PORT={self.dist_port}\n")
        if self.as_root:
            user = pwd.getpwnam(EJABBERD_USER)
            for path in [self.run_dir, *self.run_dir.rglob("*")]:
                os.chown(path, user.pw_uid, user.pw_gid)
        self.stdout_path = self.dir / "ejabberd.stdout"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, timeout: float = 60.0) -> Ejabberd:
        d = self.run_dir
        cmd = ["ejabberdctl", "--config", str(self.config_path), "--ctl-config", str(self.ctl_path),
               "--config-dir", str(d), "--logs", str(d / "logs"), "--spool", str(d / "spool"), "foreground"]
        env = {"PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin") + ":/usr/sbin",
               "HOME": str(d), "LANG": "C.UTF-8"}  # HOME: erl writes its .erlang.cookie there
        kw: dict[str, Any] = {"user": EJABBERD_USER, "group": EJABBERD_USER, "extra_groups": []} \
            if self.as_root else {}
        self.proc = spawn(cmd, self.stdout_path, env=env, cwd=d, start_new_session=True, **kw)
        _LIVE_GROUPS.add(self.proc)
        _wait(lambda: port_open(self.port), timeout, self.proc, "ejabberd", self.stdout_path)
        return self

    def stop(self, timeout: float = 20.0) -> int | None:
        """SIGTERM to the group: the VM stops ejabberd in order (its queues are in RAM: gone)."""
        rc, self.proc = _stop_group(self.proc, timeout), None
        deadline = time.monotonic() + timeout
        while port_open(self.port) and time.monotonic() < deadline:
            time.sleep(0.05)
        return rc

    def restart(self, timeout: float = 60.0) -> Ejabberd:
        self.stop()
        return self.start(timeout)

    def log_text(self) -> str:
        path = self.run_dir / "logs" / "ejabberd.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def close(self) -> None:
        """Stop, keep the logs in the test's dir, remove the run directory made for the user."""
        self.stop()
        if self.as_root:
            for log in (self.run_dir / "logs").glob("*.log"):
                shutil.copy(log, self.dir / log.name)
            shutil.rmtree(self.run_dir, ignore_errors=True)


class Aedes:
    """aedes (Node.js) on one port, in-memory persistence: a restart forgets every session."""

    def __init__(self, workdir: str | os.PathLike[str], *, port: int | None = None) -> None:
        self.node = shutil.which("node") or shutil.which("nodejs")
        if self.node is None:
            raise RuntimeError("node not found: install Debian's nodejs and npm (scripts/quickstart does)")
        if not (NODE_DIR / "node_modules" / "aedes").is_dir():
            raise RuntimeError(f"aedes is not installed: run `npm ci --prefix {NODE_DIR}` "
                               f"(scripts/quickstart test does)")
        self.dir = Path(workdir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.host = HOST
        self.port = port or free_port()
        self.log_path = self.dir / "aedes.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def start(self, timeout: float = 30.0) -> Aedes:
        assert self.node is not None
        self.proc = spawn([self.node, str(NODE_DIR / "server.mjs"), str(self.port)], self.log_path,
                          cwd=NODE_DIR)
        _wait(lambda: port_open(self.port), timeout, self.proc, "aedes", self.log_path)
        return self

    def stop(self, timeout: float = 10.0) -> int | None:
        rc, self.proc = stop_process(self.proc, timeout), None
        return rc

    def restart(self, timeout: float = 30.0) -> Aedes:
        self.stop()
        return self.start(timeout)

    def close(self) -> None:
        self.stop()


class Server(Protocol):
    @property
    def port(self) -> int: ...

    def restart(self) -> Any: ...


@dataclass
class BrokerUnderTest:
    """One broker and the protocol the gateway and publishers speak to it, with what it keeps."""

    name: str
    server: Server
    protocol: str                         # MQTT_PROTOCOL: "5" or "3.1.1"
    keeps_sessions_across_restart: bool   # a broker restart keeps queued messages and sessions
    window_of_one: bool = False           # sends the next QoS 1 message only after our PUBACK
    username: str | None = None
    password: str | None = None

    @property
    def port(self) -> int:
        return self.server.port

    def gateway_env(self, **extra: str) -> dict[str, str]:
        env = {"MQTT_PROTOCOL": self.protocol}
        if self.username is not None:
            env.update(MQTT_USERNAME=self.username, MQTT_PASSWORD=self.password or "")
        return {**env, **extra}

    def publisher_kwargs(self) -> dict[str, Any]:
        protocol = MQTTProtocolVersion.MQTTv5 if self.protocol == "5" else MQTTProtocolVersion.MQTTv311
        return {"port": self.port, "protocol": protocol, "username": self.username,
                "password": self.password}

    def restart(self) -> None:
        self.server.restart()
