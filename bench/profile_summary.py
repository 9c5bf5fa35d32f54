"""Summarise py-spy's collapsed stacks (`BENCH_PROFILE=1 python -m bench.run --keep`).

`python -m bench.profile_summary <file>.pyspy.txt [--top 25] [--idle]` prints the functions with
the most samples, self (leaf) and inclusive, as a share of the busy samples. Idle frames (threads
waiting in select/poll/sleep/lock acquire) are left out unless `--idle`, since py-spy samples every
thread and a waiting thread costs no CPU.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter

IDLE = ("select (", "poll (", "wait (", "sleep (", "acquire (", "_wait_for_tstate_lock", "epoll",
        "accept (", "sigwait", "get (queue.py", "readinto (socket.py", "recv_into (", "_recv_into")


LIBRARIES = (("paho/", "paho-mqtt"), ("botocore/", "botocore"), ("boto3/", "botocore"),
             ("urllib3/", "urllib3 + http.client"), ("http/client", "urllib3 + http.client"),
             ("prometheus_client/", "prometheus-client"), ("jmespath/", "jmespath"),
             ("gateway/sink/", "gateway sink"), ("gateway/source/", "gateway source + acks"),
             ("gateway/routing/", "gateway routing"), ("gateway/ops/", "gateway ops"),
             ("gateway/", "gateway other"), ("threading.py", "threading"), ("json/", "json (stdlib)"))


def library(frame: str) -> str:
    for mark, name in LIBRARIES:
        if mark in frame:
            return name
    return "other"


def summarise(path: str, top: int = 25, idle: bool = False) -> str:
    by_lib: Counter[str] = Counter()
    self_counts: Counter[str] = Counter()
    incl: Counter[str] = Counter()
    total = 0
    with open(path, errors="replace") as f:
        for line in f:
            stack, _, n = line.rstrip("\n").rpartition(" ")
            if not stack or not n.isdigit():
                continue
            frames = [fr for fr in stack.split(";") if fr]
            if not frames:
                continue
            if not idle and any(mark in frames[-1] for mark in IDLE):
                continue
            count = int(n)
            total += count
            self_counts[frames[-1]] += count
            by_lib[library(frames[-1])] += count
            for fr in set(frames):
                incl[fr] += count
    if not total:
        return "no busy samples"
    lines = [f"{total} busy samples", "", "self %  library (where the leaf frame lives)"]
    lines += [f"{100 * c / total:5.1f}  {lib}" for lib, c in by_lib.most_common()]
    lines += ["", "self %  function"]
    lines += [f"{100 * c / total:5.1f}  {fr}" for fr, c in self_counts.most_common(top)]
    lines += ["", "incl %  function"]
    lines += [f"{100 * c / total:5.1f}  {fr}" for fr, c in incl.most_common(top)]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.profile_summary")
    ap.add_argument("file")
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--idle", action="store_true", help="keep waiting threads' samples")
    args = ap.parse_args(argv)
    print(summarise(args.file, args.top, args.idle))
    return 0


if __name__ == "__main__":
    sys.exit(main())
