"""The spool's settings: where it lives, how big it may grow, and what a full spool does.

Apart from ``settings.py`` because the spool is optional: without ``GATEWAY_SPOOL_DIR`` there are
no spool settings at all (``None``), and the gateway behaves exactly as without a spool (an MQTT
message is acknowledged once Kinesis holds its records; docs/settings.md#spool).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final, Literal, cast

from gateway.settings.environment import Source, words

__all__ = ["DEFAULT_SPOOL_MAX_BYTES", "MIN_SPOOL_MAX_BYTES", "SpoolSettings", "spool_ignored", "spool_settings"]

_MIB: Final = 1024 * 1024
DEFAULT_SPOOL_MAX_BYTES: Final = 1024 * _MIB
MIN_SPOOL_MAX_BYTES: Final = 16 * _MIB   # room for a few of the largest records (10 MiB with KINESIS_MAX_RECORD_BYTES)
_WhenFull = Literal["block", "drop_oldest"]


@dataclass(frozen=True, kw_only=True)
class SpoolSettings:
    directory: str
    max_bytes: int = DEFAULT_SPOOL_MAX_BYTES
    when_full: _WhenFull = "block"

    def for_worker(self, index: int) -> str:
        """The spool directory of worker ``index`` of ``run --workers N``: one spool per process."""
        return f"{self.directory.rstrip('/')}/worker-{index}"


def spool_settings(src: Source) -> SpoolSettings | None:
    """``None`` unless ``GATEWAY_SPOOL_DIR`` is set; every bad value is one line naming the variable."""
    directory = src.text("GATEWAY_SPOOL_DIR")
    if not directory:
        return None
    if "\0" in directory:
        value = src.get("GATEWAY_SPOOL_DIR")
        assert value is not None
        raise src.error(value, "expected a directory path", show=False)
    max_bytes = src.integer("GATEWAY_SPOOL_MAX_BYTES", default=DEFAULT_SPOOL_MAX_BYTES, lo=MIN_SPOOL_MAX_BYTES,
                            hi=2**50)
    when_full = src.choice("GATEWAY_SPOOL_WHEN_FULL", "block", words("block drop_oldest"))
    return SpoolSettings(directory=directory, max_bytes=max_bytes, when_full=cast(_WhenFull, when_full))


def spool_ignored(src: Source) -> list[str]:
    """Start-up warnings for spool settings that are set while the spool is off."""
    if src.text("GATEWAY_SPOOL_DIR"):
        return []
    return [f"{name} is ignored: GATEWAY_SPOOL_DIR is not set, so there is no spool"
            for name in ("GATEWAY_SPOOL_MAX_BYTES", "GATEWAY_SPOOL_WHEN_FULL") if src.get(name) is not None]
