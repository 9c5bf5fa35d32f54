"""The spool: records between routing and Kinesis, on local disk (docs/spool.md).

``store`` keeps them (SQLite; its statements are in ``steps``), ``check`` checks a spool at start
and moves a damaged one aside, ``inspect`` reports on a spool without changing it.
"""

from gateway.spool.schema import SpooledRecord, SpoolRow, SpoolUnavailable
from gateway.spool.store import OpenReport, SpoolFull, SpoolStore

__all__ = ["OpenReport", "SpoolFull", "SpoolRow", "SpoolStore", "SpoolUnavailable", "SpooledRecord"]
