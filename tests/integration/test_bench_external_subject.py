"""`python -m bench.run --subject`, for real: an external bridge in the same run as the gateway.

The stand-in bridge is the bench's own naive bridge reading the Go bridge's `.env` names from the
file the bench wrote (`--env-file {env_file}`), so the test proves the whole path a Go bridge
binary would take: option, .env, placeholder, its own stream at the bench endpoint, its records
read back, and ratios against the gateway of the same run. A 3 s steady run; no timed assertions.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import orjson
import pytest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


def test_external_bridge_runs_beside_the_gateway_and_is_reported_in_ratios(tmp_path: Path) -> None:
    command = f"{sys.executable} bench/baselines/naive_bridge.py --env-file {{env_file}}"
    out = subprocess.run([sys.executable, "-m", "bench.run", "--quick", "--only", "a", "--steady-s", "3",
                          "--wait-idle", "0", "--out", str(tmp_path), "--keep", "--subject", f"stand-in={command}"],
                         cwd=ROOT, capture_output=True, text=True, timeout=180,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    kept = next((line.split("work dir kept: ")[1] for line in out.stderr.splitlines() if "work dir kept: " in line),
                None)
    try:
        assert out.returncode == 0, out.stderr[-2000:]
        result = orjson.loads(next(tmp_path.glob("*.json")).read_bytes())
        assert result["subjects"] == {"stand-in": command}

        rows = {r.get("subject"): r for r in result["rows"] if r["scenario"] == "a steady QoS1"}
        ext, gateway = rows["ext-stand-in"], rows["gateway"]
        assert (ext["delivered"], ext["lost"], ext["duplicates"]) == (300, 0, 0)
        assert ext["kind"] == "stand-in (--subject)" and ext["peak_rss_mb"] > 0 and ext["cpu_s"] > 0
        assert gateway["delivered"] == 300

        checks = {c["check"]: c["value"] for c in result["checks"]}
        assert checks["a: gateway ÷ stand-in, CPU at 100 msg/s"] == pytest.approx(gateway["cpu_pct"] / ext["cpu_pct"])
        assert checks["a: gateway ÷ stand-in, peak RSS"] > 0
        assert "| stand-in (--subject) |" in out.stdout

        assert kept is not None, out.stderr[-2000:]
        env_file = Path(kept) / "steady" / "stand-in" / ".env"
        names = dict(line.split("=", 1) for line in env_file.read_text().splitlines())
        assert (names["KIN_STREAM_NAME"], names["QOS"], names["STDOUT"]) == ("bench-subject-stand-in", "1", "false")
    finally:
        if kept:
            shutil.rmtree(kept, ignore_errors=True)
