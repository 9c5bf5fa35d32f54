"""CPU and memory of a process tree, sampled from outside so the subject runs unmodified.

CPU: user+system seconds summed over the process and all its descendants (`run --workers N`
forks), with each pid's last reading kept after it exits, so a worker that ends early still counts.
Memory: the tree's summed RSS sampled every 50 ms, plus each process's kernel high-water mark
(VmHWM from /proc/<pid>/status), which catches peaks shorter than the sampling interval; and the
root process's own sampled peak, the figure for a long-running process without its short-lived
children (the gateway's schema check runs in one for a tenth of a second at start).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

import psutil

MB = 1024 * 1024


def vm_hwm(pid: int) -> int:
    """Peak resident set size of one process in bytes (0 if unknown)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


@dataclass
class Tree:
    """One watched process tree."""

    root: psutil.Process
    cpu: dict[int, float] = field(default_factory=dict)
    hwm: dict[int, int] = field(default_factory=dict)
    peak_rss: int = 0
    root_peak_rss: int = 0

    def sample(self) -> None:
        try:
            procs = [self.root] + self.root.children(recursive=True)
        except psutil.Error:
            return
        rss = 0
        for p in procs:
            try:
                with p.oneshot():
                    t = p.cpu_times()
                    self.cpu[p.pid] = t.user + t.system
                    own = p.memory_info().rss
                    rss += own
                    if p.pid == self.root.pid:
                        self.root_peak_rss = max(self.root_peak_rss, own)
                self.hwm[p.pid] = max(self.hwm.get(p.pid, 0), vm_hwm(p.pid))
            except psutil.Error:
                continue
        self.peak_rss = max(self.peak_rss, rss)

    def cpu_seconds(self) -> float:
        return sum(self.cpu.values())

    def peak_bytes(self) -> int:
        """Peak tree RSS: the sampled sum, or the largest single high-water mark if higher."""
        return max(self.peak_rss, max(self.hwm.values(), default=0))


class Monitor:
    """A background sampler for named process trees; `snapshot` forces a fresh reading."""

    def __init__(self, interval_s: float = 0.05) -> None:
        self.interval_s = interval_s
        self.trees: dict[str, Tree] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bench-monitor", daemon=True)

    def __enter__(self) -> Monitor:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=2)

    def watch(self, name: str, pid: int) -> Tree:
        tree = Tree(psutil.Process(pid))
        with self._lock:
            self.trees[name] = tree
        tree.sample()
        return tree

    def forget(self, name: str) -> None:
        with self._lock:
            self.trees.pop(name, None)

    def snapshot(self, name: str) -> Tree:
        with self._lock:
            tree = self.trees[name]
            tree.sample()
        return tree

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            with self._lock:
                for tree in self.trees.values():
                    tree.sample()


def cpu_now(pid: int) -> float:
    try:
        t = psutil.Process(pid).cpu_times()
        return t.user + t.system
    except psutil.Error:
        return 0.0


def wall() -> float:
    return time.monotonic()


def machine_busy_s() -> float:
    """CPU seconds the whole machine has spent not idle, summed over cores, since boot."""
    t = psutil.cpu_times()
    return sum(t) - t.idle - getattr(t, "iowait", 0.0)


def wait_idle(max_wait_s: float, threshold_pct: float = 15.0, window_s: float = 1.0) -> float:
    """Wait (bounded) for a window in which the machine's busy CPU stays under `threshold_pct` of
    one core; returns the last busy % seen. Other work on a 2-core machine skews every figure."""
    deadline = time.monotonic() + max_wait_s
    pct = 0.0
    while True:
        b0, t0 = machine_busy_s(), time.monotonic()
        time.sleep(window_s)
        pct = 100 * (machine_busy_s() - b0) / (time.monotonic() - t0)
        if pct < threshold_pct or time.monotonic() >= deadline:
            return pct
