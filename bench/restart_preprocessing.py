"""Benchmark: data preparation time of a first start against a restart (the tokenization cache).

    .venv/bin/python bench/restart_preprocessing.py [--samples 100000] [--task causal-lm]

Writes a corpus of N lines, then runs the real data preparation (data.prepare_datasets, as
train_loop.py calls it) in two fresh processes that share an empty `datasets` cache:
the first tokenizes, the second should only read the cache. Prints one Markdown table row.
"""

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

ONE_START = """
import sys, time, json
sys.path.insert(0, {repo!r})
started = time.perf_counter()
from accelerate import PartialState
from cli.config import parse_config
from cli.data import prepare_datasets
from cli.model import build_tokenizer
config = parse_config({flags!r})
tokenizer = build_tokenizer(config)
imported = time.perf_counter()
train, validation, names = prepare_datasets(config, tokenizer, PartialState())
done = time.perf_counter()
print(json.dumps({{"prepare_seconds": done - imported, "samples": len(train)}}))
"""


def write_corpus(path: Path, lines: int) -> None:
    rng = random.Random(0)
    words = "the quick brown fox jumps over a lazy dog while training resumes at the exact sample".split()
    with open(path, "w") as handle:
        for _ in range(lines):
            handle.write(" ".join(rng.choice(words) for _ in range(rng.randint(5, 25))) + "\n")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=100_000, help="lines in the corpus")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as scratch:
        corpus = Path(scratch) / "corpus.txt"
        write_corpus(corpus, args.samples)
        env = {**os.environ, "HF_HOME": str(Path(scratch) / "hf_home"), "HF_HUB_OFFLINE": "1"}
        flags = ["--train_file", str(corpus), "--output_dir", str(Path(scratch) / "out")]
        code = ONE_START.format(repo=str(REPO), flags=flags)
        results = []
        for _ in ("first start", "restart"):
            answer = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
            results.append(json.loads(answer.stdout.strip().splitlines()[-1]))
    first, second = results[0]["prepare_seconds"], results[1]["prepare_seconds"]
    print("| corpus lines | blocks | first start (s) | restart (s) | restart / first |")
    print("|---|---|---|---|---|")
    print(f"| {args.samples:,} | {results[0]['samples']:,} | {first:.2f} | {second:.2f} | {second / first:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
