"""The gateway as a real subprocess, the way an operator or Kubernetes runs it.

Why a subprocess and not the app in-process: kill -9, SIGTERM drain, restart with the same client
id, and the installed console script are only real from outside. The environment is built from
scratch (no AWS profile, no shell MQTT_*/USER leaking in) so a test states every setting it relies
on. `GATEWAY_COMMAND` (shlex-split) replaces `python -m gateway`, so CI can run the installed
`mqtt-kinesis-gateway` from a clean venv against the same tests.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from tests.support.services import FAKE_AWS_ENV, HOST, free_port, spawn, stop_process

REPO_ROOT = Path(__file__).resolve().parents[2]
METRIC_PREFIX = "mqtt_kinesis_gateway_"
_PASSTHROUGH_ENV = ("PATH", "LANG", "LC_ALL", "TMPDIR", "TZ", "SYSTEMROOT", "COVERAGE_PROCESS_START")


def write_routes(path: Path, text: str) -> Path:
    """A route file for a test gateway; returns its path."""
    path.write_text(text, encoding="utf-8")
    return path


def default_command() -> list[str]:
    cmd = os.environ.get("GATEWAY_COMMAND")
    return shlex.split(cmd) if cmd else [sys.executable, "-m", "gateway"]


class GatewayProcess:
    """Start/stop/observe one gateway process; stdout and stderr go to files in `workdir`."""

    def __init__(self, workdir: str | os.PathLike[str], *, mqtt_host: str = HOST,
                 mqtt_port: int | None = None, kinesis_url: str | None = None,
                 routes: str | os.PathLike[str] | None = None,
                 env_file: str | os.PathLike[str] | None = None,
                 client_id: str = "gw-test", http_port: int | None = None,
                 extra_env: Mapping[str, str | None] | None = None,
                 args: Sequence[str] | None = None, command: Sequence[str] | None = None,
                 cwd: str | os.PathLike[str] | None = None, base_env: bool = True) -> None:
        """`args` replaces the default `run [--routes R] [--env-file E]`; `extra_env` values of
        None delete a variable; `base_env=False` leaves out MQTT_*/AWS endpoint/HTTP settings (the
        seed .env case, where the file must supply them)."""
        self.dir = Path(workdir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.http_port = http_port or free_port()
        self.command = list(command) if command else default_command()
        self.args = list(args) if args is not None else (
            ["run"] + (["--routes", str(routes)] if routes else [])
            + (["--env-file", str(env_file)] if env_file else []))
        self.cwd = Path(cwd) if cwd else self.dir
        env = {k: os.environ[k] for k in _PASSTHROUGH_ENV if k in os.environ}
        env.update(HOME=str(self.dir), PYTHONUNBUFFERED="1",
                   AWS_CONFIG_FILE=str(self.dir / "no-aws-config"),
                   AWS_SHARED_CREDENTIALS_FILE=str(self.dir / "no-aws-credentials"),
                   AWS_EC2_METADATA_DISABLED="true")
        if not command and "GATEWAY_COMMAND" not in os.environ:
            env["PYTHONPATH"] = str(REPO_ROOT)
        if base_env:
            env.update(FAKE_AWS_ENV)
            env.update(MQTT_HOST=mqtt_host, HTTP_HOST=HOST, HTTP_PORT=str(self.http_port),
                       LOG_FORMAT="json", MQTT_CLIENT_ID=client_id)
            if mqtt_port is not None:
                env["MQTT_PORT"] = str(mqtt_port)
            if kinesis_url:
                env["AWS_ENDPOINT_URL_KINESIS"] = kinesis_url
        for k, v in (extra_env or {}).items():
            if v is None:
                env.pop(k, None)
            else:
                env[k] = v
        self.env = env
        self.stdout_path = self.dir / "gateway.stdout"
        self.stderr_path = self.dir / "gateway.stderr"
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def returncode(self) -> int | None:
        return self.proc.poll() if self.proc else None

    def start(self) -> GatewayProcess:
        if self.alive:
            raise RuntimeError("gateway already running")
        self.starts += 1
        self.proc = spawn(self.command + self.args, self.stdout_path, self.stderr_path,
                          env=self.env, cwd=self.cwd)
        return self

    def wait_ready(self, timeout: float = 30.0) -> GatewayProcess:
        """Poll /readyz until 200; fail fast with the log tail if the process dies."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.alive:
                raise RuntimeError(f"gateway exited with {self.returncode} before ready\n"
                                   f"{self.output_tail()}")
            if self.http_get("/readyz")[0] == 200:
                return self
            time.sleep(0.05)
        raise TimeoutError(f"gateway not ready after {timeout}s\n{self.output_tail()}")

    def terminate(self, timeout: float = 30.0) -> int | None:
        """SIGTERM and wait (the Kubernetes stop); SIGKILL only if it overstays `timeout`."""
        return stop_process(self.proc, timeout)

    def kill(self) -> int | None:
        return stop_process(self.proc, 10.0, signal.SIGKILL)

    def signal(self, sig: int) -> None:
        if self.proc is not None:
            self.proc.send_signal(sig)

    def restart(self, ready_timeout: float | None = 30.0) -> GatewayProcess:
        self.terminate()
        self.start()
        return self.wait_ready(ready_timeout) if ready_timeout else self

    def wait_exit(self, timeout: float) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout)

    # --- observation -------------------------------------------------------------------------

    def stdout_text(self) -> str:
        return self.stdout_path.read_text(errors="replace") if self.stdout_path.exists() else ""

    def stderr_text(self) -> str:
        return self.stderr_path.read_text(errors="replace") if self.stderr_path.exists() else ""

    def output_tail(self, chars: int = 3000) -> str:
        return f"--- stderr ---\n{self.stderr_text()[-chars:]}\n--- stdout ---\n" \
               f"{self.stdout_text()[-chars:]}"

    def logs(self) -> list[dict[str, Any]]:
        """JSON log lines of stderr and stdout (all starts); non-JSON lines become {"raw": line}."""
        out: list[dict[str, Any]] = []
        for text in (self.stderr_text(), self.stdout_text()):
            for line in text.splitlines():
                if not line.strip():
                    continue
                try:
                    value = json.loads(line)
                    out.append(value if isinstance(value, dict) else {"raw": line})
                except ValueError:
                    out.append({"raw": line})
        return out

    def http_get(self, path: str, timeout: float = 2.0) -> tuple[int, str]:
        """(status, body); status 0 when nothing answers."""
        try:
            with urllib.request.urlopen(f"http://{HOST}:{self.http_port}{path}",
                                        timeout=timeout) as r:
                return int(r.status), r.read().decode(errors="replace")
        except urllib.error.HTTPError as e:
            return int(e.code), e.read().decode(errors="replace")
        except OSError:
            return 0, ""

    def metrics(self) -> list[Any]:
        """Metric families parsed from /metrics (empty when it does not answer)."""
        from prometheus_client.parser import text_string_to_metric_families

        status, body = self.http_get("/metrics")
        return list(text_string_to_metric_families(body)) if status == 200 else []

    def metric(self, name: str, **labels: str) -> float:
        """Sum of samples called `name` (prefix optional) whose labels include `labels`; 0 if none."""
        full = name if name.startswith(METRIC_PREFIX) else METRIC_PREFIX + name
        total = 0.0
        for fam in self.metrics():
            for s in fam.samples:
                if s.name == full and all(s.labels.get(k) == v for k, v in labels.items()):
                    total += s.value
        return total

    def __enter__(self) -> GatewayProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.kill() if exc and exc[0] is not None else self.terminate()
