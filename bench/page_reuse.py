"""Benchmark: how long a write into the page cache takes, by how long ago the memory it lands in was freed.

    python3 bench/page_reuse.py [--megabytes 200] [--writes 12] [--pauses 0 0.5 1 3]

No torch, no project code: a file of --megabytes is written (write, then fsync) --writes times in a
row, each after --pauses seconds of idling, and deleted right after it is written, so the next
write can reuse the page-cache memory the deletion freed. The table gives the median time of the
write into the page cache (before fsync) and with fsync, after the first two writes.

Why it is here: on this project's CI machine (a Firecracker VM with a virtio-balloon device), memory
the guest frees is reported back to the host after a moment ("free page reporting", about 2 s in
Linux); touching it again costs a fault into the host per page. A benchmark that writes checkpoints
back to back reuses memory freed milliseconds earlier and measures a faster write than a training
run, whose saves are seconds to hours apart, ever meets. On a machine without free page reporting
(bare metal, most GPU servers) the pause should make no difference; run this to see which kind of
machine you have.
"""

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path


def timed_write(path: Path, data: bytes) -> tuple[float, float]:
    """(seconds to write `data` into the page cache, seconds including fsync)."""
    began = time.perf_counter()
    with open(path, "wb") as handle:
        handle.write(data)
        handle.flush()
        cached = time.perf_counter() - began
        os.fsync(handle.fileno())
    return cached, time.perf_counter() - began


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--megabytes", type=int, default=200)
    parser.add_argument("--writes", type=int, default=12)
    parser.add_argument("--pauses", type=float, nargs="+", default=[0, 0.5, 1, 3])
    parser.add_argument("--dir", default=None, help="where to write (default: a temporary directory under $TMPDIR)")
    args = parser.parse_args(argv)
    data = os.urandom(1 << 20) * args.megabytes
    print(f"{args.megabytes} MiB per write, {args.writes} writes per pause, each file deleted right after it is written; medians after the first two\n")
    print("| idle before each write (s) | write into the page cache (s) | MB/s | with fsync (s) |")
    print("|---|---|---|---|")
    with tempfile.TemporaryDirectory(dir=args.dir) as scratch:
        for pause in args.pauses:
            times = []
            for number in range(args.writes):
                time.sleep(pause)
                path = Path(scratch) / f"write-{number}"
                times.append(timed_write(path, data))
                path.unlink()
            cached = statistics.median(t for t, _ in times[2:])
            synced = statistics.median(t for _, t in times[2:])
            print(f"| {pause:g} | {cached:.4f} | {len(data) / 1e6 / cached:.0f} | {synced:.4f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
