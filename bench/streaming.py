"""Benchmark: --streaming on a generated JSON Lines corpus of several GB.

    .venv/bin/python bench/streaming.py [--gigabytes 2.0 --small_gigabytes 0.5] [--parts resume,rss,throughput,trainer]

Writes the corpora into a temporary directory (deleted at the end; never committed), then:

  resume      (tiny test model, blocks of 64) time from launch to the first trained step when resuming at 1 % and at 95 % of the
              first epoch. The checkpoint is a real one (2 steps of training, shuffle buffer full); its
              data_stream_0.safetensors then gets the position of the line at 1 % or 95 % of the file
              and the manifest is rewritten (training through 95 % of 2 GB of bytes on a CPU is not
              feasible). What a resume does with the position is what is timed: nothing before it is read.
  rss         (tiny test model, blocks of 64) peak RSS (VmHWM, the training process plus its workers' sum) of a run from launch to step
              --rss_steps on the small and the large corpus, same flags.
  throughput  steps/s of the same model (--config_name, default the built-in gpt2-small-byte) between
              step 10 and step --measured_steps: the pre-tokenized path on a --slice_megabytes slice of the
              corpus (tokenized once, cached, not timed) against --streaming on the full corpus, with 0
              and with --workers tokenizing workers. Runs alternate, --repeats times; medians.
  trainer     what the HF Trainer's resume would cost on the same stream: with an IterableDataset it
              re-reads every batch up to the resume point (accelerate's skip_first_batches iterates
              them). Measured here: the rate at which a `datasets` streaming pipeline (json, tokenize,
              group into blocks, DataLoader) delivers blocks; the estimate is 95 % of an epoch at that rate.
"""

import argparse
import json
import os
import random
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from stopwatch import STEP_LINE, run_until, step_times, until_step

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def write_jsonl_corpus(path: Path, gigabytes: float, seed: int = 0) -> int:
    """~1 KB rows of random words until the file holds `gigabytes`; returns the row count."""
    rng = random.Random(seed)
    words = [w for w in "the of and to in is was for on that with as by at from his an were are which this be has or had it not first one their its new after but who they have".split()]
    pool = [" ".join(rng.choice(words) for _ in range(rng.randint(120, 230))) for _ in range(4096)]
    target, written, rows = int(gigabytes * 1e9), 0, 0
    with open(path, "w") as handle:
        while written < target:
            lines = "".join(json.dumps({"text": f"{rows + i} {pool[rng.randrange(4096)]}"}) + "\n" for i in range(10_000))
            handle.write(lines)
            written += len(lines)
            rows += 10_000
    return rows


def command(corpus: Path, output_dir: Path, *flags) -> list[str]:
    return [sys.executable, str(REPO / "train_loop.py"), "--output_dir", str(output_dir), "--train_file", str(corpus), *map(str, flags)]


def forge_position(checkpoint: Path, corpus: Path, fraction: float) -> None:
    """Set the stream position of a real checkpoint to the line starting at `fraction` of the file."""
    from resumable import state, streams

    record = streams.saved_stream_state(checkpoint, 0)
    with open(corpus, "rb") as handle:
        handle.seek(int(fraction * corpus.stat().st_size))
        handle.readline()
        offset = handle.tell()
    record["position"]["metadata"].update(epoch=0, file_slot=0, offset=offset, chunk_size=0, chunk_examples=0)
    streams.write_stream_state(checkpoint, 0, record)
    state.write_manifest(checkpoint, state.read_trainer_state(checkpoint / state.TRAINER_STATE_NAME)[0].global_step)


def bench_resume(args, corpus, scratch, env, tiny):
    base = scratch / "resume-base"
    flags = ["--streaming", "--config_name", tiny, "--block_size", 64, "--per_device_train_batch_size", 8, "--save_total_limit", 1]
    run_until(command(corpus, base, *flags, "--max_steps", 2, "--save_steps", 2), env, lambda l: l.startswith("🏁"), timeout=1800, cwd=REPO)
    times = {0.01: [], 0.95: []}
    for fraction in times:
        shutil.copytree(base, scratch / f"at-{fraction}")
        forge_position(scratch / f"at-{fraction}" / "checkpoint-2", corpus, fraction)
    for repeat in range(args.repeats):
        for fraction in (0.01, 0.95) if repeat % 2 == 0 else (0.95, 0.01):
            out = scratch / f"at-{fraction}"
            lines = run_until(command(corpus, out, *flags, "--max_steps", 1000, "--save_steps", 10**6, "--logging_steps", 1), env, until_step(3), cwd=REPO)
            times[fraction].append(step_times(lines)[3])
            epoch = float(re.search(r"epoch ([\d.]+)", next(l for _, l in lines if STEP_LINE.match(l)))[1])
            assert abs(epoch - fraction) < 0.01, (fraction, epoch)  # the run really resumed there
    print("\n| resume at | launch → first step (s), median | each run (s) |\n|---|---|---|")
    for fraction, each in times.items():
        print(f"| {fraction:.0%} of epoch 1 | {statistics.median(each):.2f} | {', '.join(f'{t:.2f}' for t in each)} |")
    print(f"| 95% / 1% | {statistics.median(times[0.95]) / statistics.median(times[0.01]):.3f}x | |")


def peak_rss(pid: int) -> int:
    """VmHWM in bytes of `pid` plus its children (the tokenizing workers)."""
    total = 0
    children = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
    for process in [pid, *map(int, children)]:
        try:
            status = Path(f"/proc/{process}/status").read_text()
        except FileNotFoundError:
            continue
        total += int(re.search(r"VmHWM:\s+(\d+) kB", status)[1]) * 1024
    return total


def run_measuring_rss(cmd, env, last_step) -> int:
    process = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        for line in process.stdout:
            if (match := STEP_LINE.match(line)) and int(match[1]) >= last_step:
                return peak_rss(process.pid)
        raise RuntimeError(f"ended before step {last_step}")
    finally:
        process.kill()
        process.wait()


def bench_rss(args, corpora, scratch, env, tiny):
    print(f"\n| corpus | rows | peak RSS to step {args.rss_steps} (MB), workers 0 | workers {args.workers} |\n|---|---|---|---|")
    results = {}
    for name, (corpus, rows) in corpora.items():
        row = []
        for workers in (0, args.workers):
            flags = ["--streaming", "--config_name", tiny, "--block_size", 64, "--per_device_train_batch_size", 8,
                     "--max_steps", 10**6, "--save_steps", 10**6, "--logging_steps", 10, "--dataloader_num_workers", workers]  # fmt: skip
            row.append(run_measuring_rss(command(corpus, scratch / f"rss-{name}-{workers}", *flags), env, args.rss_steps))
        results[name] = row
        print(f"| {corpus.stat().st_size / 1e9:.2f} GB | {rows:,} | {row[0] / 1e6:.0f} | {row[1] / 1e6:.0f} |")
    large, small = results["large"], results["small"]
    print(f"| large / small | | {large[0] / small[0]:.3f} | {large[1] / small[1]:.3f} |")


def bench_throughput(args, corpus, scratch, env):
    piece = scratch / "slice.jsonl"
    with open(corpus, "rb") as source, open(piece, "wb") as target:
        target.write(source.read(int(args.slice_megabytes * 1e6)))
        target.write(source.readline())
    common = ["--config_name", args.config_name, "--block_size", args.block_size, "--per_device_train_batch_size", 8,
              "--max_steps", 10**6, "--save_steps", 10**6, "--logging_steps", 5]  # fmt: skip
    variants = {
        "pre-tokenized (map-style, cached)": (piece, []),
        "--streaming, 0 workers": (corpus, ["--streaming"]),
        f"--streaming, {args.workers} workers": (corpus, ["--streaming", "--dataloader_num_workers", args.workers]),
    }
    # The pre-tokenized path tokenizes the slice once into the cache first (not timed).
    run_until(command(piece, scratch / "warm", *common), env, until_step(5), timeout=3600, cwd=REPO)
    rates = {name: [] for name in variants}
    for repeat in range(args.repeats):
        for name, (data, extra) in (variants.items() if repeat % 2 == 0 else reversed(variants.items())):
            output_dir = scratch / "throughput"
            shutil.rmtree(output_dir, ignore_errors=True)
            lines = run_until(command(data, output_dir, *common, *extra), env, until_step(args.measured_steps), timeout=3600, cwd=REPO)
            times = step_times(lines)
            rates[name].append((args.measured_steps - 10) / (times[args.measured_steps] - times[10]))
    reference = statistics.median(rates["pre-tokenized (map-style, cached)"])
    print("\n| data path | steps/s (median) | tokens/s | vs pre-tokenized | each run (steps/s) |\n|---|---|---|---|---|")
    for name, each in rates.items():
        median = statistics.median(each)
        print(f"| {name} | {median:.3f} | {median * 8 * args.block_size:,.0f} | {median / reference:.3f}x | {', '.join(f'{r:.3f}' for r in each)} |")


def bench_trainer_skip(args, corpus, env):
    """Blocks/s at which a `datasets` streaming pipeline feeds a DataLoader: the HF Trainer's skip rate on resume."""
    code = f"""
import itertools, time, datasets, torch
from transformers import ByT5Tokenizer
tokenizer = ByT5Tokenizer()
stream = datasets.load_dataset("json", data_files={str(corpus)!r}, split="train", streaming=True)
tokenized = stream.map(lambda b: {{"input_ids": tokenizer(b["text"])["input_ids"]}}, batched=True, remove_columns=["text"])
def group(batch):
    tokens = list(itertools.chain.from_iterable(batch["input_ids"]))
    usable = len(tokens) - len(tokens) % 128
    return {{"input_ids": [tokens[i:i + 128] for i in range(0, usable, 128)]}}
blocks = tokenized.map(group, batched=True)
loader = torch.utils.data.DataLoader(blocks.with_format("torch"), batch_size=8)
started, count = time.perf_counter(), 0
for batch in loader:
    count += len(batch["input_ids"])
    if time.perf_counter() - started > {args.trainer_seconds}:
        break
print(count / (time.perf_counter() - started))
"""
    rate = float(subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout.split()[-1])
    blocks_per_epoch = corpus.stat().st_size / 128  # ByT5: one token per byte (the JSON quoting aside)
    skip_seconds = 0.95 * blocks_per_epoch / rate
    print("\n| HF Trainer on the same stream | value |\n|---|---|")
    print(f"| skip rate measured ({args.trainer_seconds} s, datasets streaming json → tokenize → blocks → DataLoader) | {rate:,.0f} blocks/s |")
    print(f"| blocks in one epoch (~bytes / 128) | {blocks_per_epoch:,.0f} |")
    print(f"| estimated resume at 95 % of epoch 1 | {skip_seconds:,.0f} s ({skip_seconds / 3600:.1f} h) before the first step |")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gigabytes", type=float, default=2.0)
    parser.add_argument("--small_gigabytes", type=float, default=0.5)
    parser.add_argument("--parts", default="resume,rss,throughput,trainer")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--rss_steps", type=int, default=200)
    parser.add_argument("--measured_steps", type=int, default=60)
    parser.add_argument("--slice_megabytes", type=float, default=20)
    parser.add_argument("--trainer_seconds", type=float, default=30)
    parser.add_argument("--config_name", default=str(REPO / "configs" / "gpt2-small-byte.json"), help="the throughput part's model")
    parser.add_argument("--block_size", type=int, default=128, help="the throughput part's (resume and rss: the tiny test model, 64)")
    args = parser.parse_args(argv)
    parts = args.parts.split(",")
    tiny = str(REPO / "tests" / "tiny-gpt2.json")

    with tempfile.TemporaryDirectory(dir="/tmp") as scratch:
        scratch = Path(scratch)
        env = {**os.environ, "HF_HOME": str(scratch / "hf_home"), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
        began = time.perf_counter()
        corpora = {"large": (scratch / "large.jsonl", 0)}
        corpora["large"] = (corpora["large"][0], write_jsonl_corpus(corpora["large"][0], args.gigabytes))
        if "rss" in parts:
            corpora["small"] = (scratch / "small.jsonl", write_jsonl_corpus(scratch / "small.jsonl", args.small_gigabytes, seed=1))
        large = corpora["large"][0]
        print(f"corpus: {large.stat().st_size / 1e9:.2f} GB, {corpora['large'][1]:,} JSON Lines rows "
              f"(written in {time.perf_counter() - began:.0f} s); load: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")  # fmt: skip
        if "resume" in parts:
            bench_resume(args, large, scratch, env, tiny)
        if "rss" in parts:
            bench_rss(args, {"small": corpora["small"], "large": corpora["large"]}, scratch, env, tiny)
        if "throughput" in parts:
            bench_throughput(args, large, scratch, env)
        if "trainer" in parts:
            bench_trainer_skip(args, large, env)
        print(f"\nload at the end: {os.getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
