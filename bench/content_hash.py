"""Benchmark: what identifying the data by its content costs (identity.content_hash).

    .venv/bin/python bench/content_hash.py [--size_mb 1024] [--directory /tmp] [--repeats 3]

Writes a file of random bytes into a temporary directory under --directory (deleted at the
end), then times, with the code train_loop.py runs at every start:
  - hashing it after its pages were dropped from the page cache (read from the disk),
  - hashing it from the page cache (a restart shortly after the data was read),
  - only reading it from the page cache, without hashing (what any loader pays anyway),
  - a start that finds the hash in the cache file (a stat and a small JSON read).
Prints one Markdown table row per measurement (the median of --repeats).
"""

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cli import identity  # noqa: E402


def drop_from_page_cache(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())  # only clean pages can be dropped
        os.posix_fadvise(handle.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)


def read_only(path: Path) -> None:
    buffer = bytearray(8 << 20)
    with open(path, "rb", buffering=0) as handle:
        while handle.readinto(buffer):
            pass


def timed(action, repeats: int, before=lambda: None) -> tuple[float, float]:
    """Median wall seconds and median CPU seconds of this process (the CPU time is what the
    hashing costs even when other processes share the cores)."""
    walls, cpus = [], []
    for _ in range(repeats):
        before()
        began, began_cpu = time.perf_counter(), time.process_time()
        action()
        walls.append(time.perf_counter() - began)
        cpus.append(time.process_time() - began_cpu)
    return statistics.median(walls), statistics.median(cpus)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size_mb", type=int, default=1024, help="size of the data file in MiB")
    parser.add_argument("--directory", default="/tmp", help="where the temporary file is written")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(dir=args.directory) as scratch:
        data = Path(scratch) / "data.bin"
        with open(data, "wb") as handle:
            for _ in range(args.size_mb):
                handle.write(os.urandom(1 << 20))
        cache_file = Path(scratch) / "content-hashes.json"

        def fresh_hash():  # a cache that knows nothing: the file is read and hashed
            identity.content_hash([data], identity.HashCache(Path(scratch) / "empty.json", writable=False))

        cold = timed(fresh_hash, args.repeats, before=lambda: drop_from_page_cache(data))
        warm = timed(fresh_hash, args.repeats)
        reading = timed(lambda: read_only(data), args.repeats)
        # racy_seconds=0: the file was written a moment ago; here we time the lookup, not the policy.
        filling = identity.HashCache(cache_file, racy_seconds=0)
        identity.content_hash([data], filling)
        filling.save()
        hit = timed(lambda: identity.content_hash([data], identity.HashCache(cache_file, writable=False)), args.repeats)
    gib = args.size_mb / 1024
    print("| measurement | wall seconds | CPU seconds | GiB/s (wall) |")
    print("|---|---|---|---|")
    for name, (seconds, cpu) in (("hash, from the disk (page cache dropped)", cold), ("hash, from the page cache", warm),
                                 ("read only, from the page cache (no hash)", reading), ("hash found in the cache file", hit)):  # fmt: skip
        rate = "-" if name.startswith("hash found") else f"{gib / seconds:.1f}"
        print(f"| {name} ({args.size_mb:,} MiB) | {seconds:.4f} | {cpu:.4f} | {rate} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
