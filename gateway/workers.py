"""`run --workers N`: N gateway processes in one container, sharing the subscriptions.

Python runs one message at a time per process (the GIL), so a container scales across its cores
the way a fleet scales across machines: every worker is a full gateway with its own client id and
its own persistent session, and the broker splits the messages between them through a shared
subscription group. The supervisor only starts them, forwards SIGTERM/SIGINT and reports the
worst exit code; it restarts nothing (that is the container supervisor's job).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import signal
import subprocess
import sys
from typing import Any

__all__ = ["DEFAULT_SHARE_GROUP", "supervise"]

log = logging.getLogger("gateway.workers")

DEFAULT_SHARE_GROUP = "mqtt-kinesis-gateway"


def _die_with_parent() -> None:
    """In the child, before exec: SIGTERM when the supervisor dies, even by SIGKILL, so no worker
    outlives it holding a client id (Linux prctl PR_SET_PDEATHSIG; elsewhere nothing)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _child_argv(argv: list[str]) -> list[str]:
    """The parent's `run` arguments without `--workers`, for a child."""
    out: list[str] = []
    skip = False
    for arg in argv[1:]:
        if skip:
            skip = False
            continue
        if arg == "--workers":
            skip = True
            continue
        if arg.startswith("--workers="):
            continue
        out.append(arg)
    return [sys.executable, "-m", "gateway", *out]


def supervise(workers: int, settings: Any, argv: list[str]) -> int:
    """Start ``workers`` children and wait for all of them; returns the worst exit code."""
    share_group = settings.mqtt.share_group or DEFAULT_SHARE_GROUP
    children: list[subprocess.Popen[bytes]] = []
    for index in range(workers):
        env = dict(os.environ)
        env.update({
            "GATEWAY_WORKERS": "1",
            "MQTT_CLIENT_ID": f"{settings.mqtt.client_id}-w{index}",
            "MQTT_SHARE_GROUP": share_group,
            "HTTP_PORT": str(settings.http.port + index) if settings.http.port else "0",
        })
        if settings.spool is not None:   # one spool per worker: a spool is one process's (its lock)
            env["GATEWAY_SPOOL_DIR"] = settings.spool.for_worker(index)
        children.append(subprocess.Popen(_child_argv(argv), env=env,  # noqa: S603 - our own command
                                         preexec_fn=_die_with_parent))  # noqa: PLW1509 - no threads here

    def forward(signum: int, _frame: Any) -> None:
        for child in children:
            if child.poll() is None:
                child.send_signal(signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    # A child killed by a signal reports -signum; a shell would say 128 + signum.
    codes = [code if code >= 0 else 128 - code for code in (child.wait() for child in children)]
    worst = max(codes)
    if worst:
        print(f"mqtt-kinesis-gateway: a worker exited with {worst}", file=sys.stderr)
    return worst
