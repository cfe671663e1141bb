"""The checks only a GPU machine can make, run as far as this machine allows; one table at the end.

    bench/gpu_check.sh [--quick]          (sets up the environment, offline, then runs this)

  1. bf16: kill -9 at step 27 of 60 and resume, against an uninterrupted run (model.safetensors
     bytes, else the largest weight difference); with --full_determinism when train_loop.py has it.
  2. fp16 (CUDA only): the same kill and resume; the GradScaler's state in checkpoint-60/scaler.pt
     (scale and growth tracker) must equal the uninterrupted run's: the scale survived the resume.
  3. A save of a ~1.2 GB state (100M parameters: weights + two AdamW moments) against writing the
     same tensors directly (bench/save_cost.py; on CUDA the save includes the copy to the host).
  4. (2+ CUDA devices) two processes over NCCL, the launch killed -9 at step 27 and resumed with two.
  5. (2+ CUDA devices) the same killed run resumed with one process (elastic 2 -> 1).

Everything is local: a generated corpus, tests/tiny-gpt2.json, the byte-level tokenizer, HF_HUB_OFFLINE=1.
A check that cannot run here is listed as skipped, with the reason.
"""

import argparse
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))

from restart_preprocessing import write_corpus  # noqa: E402

TINY_MODEL = REPO / "tests" / "tiny-gpt2.json"
FLAGS = ["--config_name", str(TINY_MODEL), "--block_size", "32", "--per_device_train_batch_size", "4", "--max_train_samples", "400",
         "--max_steps", "60", "--save_steps", "10", "--logging_steps", "1", "--learning_rate", "1e-3"]  # fmt: skip
KILL_AT = 27


def launcher(processes: int) -> list[str]:
    command = [sys.executable, "-m", "accelerate.commands.launch", "--quiet", "--config_file", str(REPO / "accelerate_config.yaml"), "--num_processes", str(processes)]
    return [*command, *(["--multi_gpu"] if processes > 1 else []), str(REPO / "train_loop.py")]


def run_to_end(command: list[str], env: dict) -> None:
    result = subprocess.run(command, env=env, capture_output=True, text=True, cwd=REPO)
    if result.returncode != 0:
        raise RuntimeError(f"exit {result.returncode}: {(result.stderr or result.stdout).strip().splitlines()[-1:]}")


def run_and_kill(command: list[str], env: dict, pattern: str) -> None:
    """Start a training in its own session; kill -9 it and all its processes when it prints `pattern`."""
    process = subprocess.Popen(command, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    for line in process.stdout:
        if re.search(pattern, line):
            os.killpg(process.pid, signal.SIGKILL)
            break
    process.wait()
    if process.returncode != -signal.SIGKILL:
        raise RuntimeError(f"never printed {pattern!r} (exit {process.returncode})")


def compare_weights(resumed: Path, reference: Path) -> tuple[bool, str]:
    from safetensors.torch import load_file

    if resumed.read_bytes() == reference.read_bytes():
        return True, "model.safetensors byte-identical"
    a, b = load_file(str(resumed)), load_file(str(reference))
    largest = max((a[name].float() - b[name].float()).abs().max().item() for name in a)
    return False, f"differs: largest weight difference {largest:.2e}"


def kill_and_resume(scratch: Path, env: dict, name: str, flags: list[str], processes=1, resume_processes=None) -> tuple[Path, Path, tuple[bool, str]]:
    """(resumed run, uninterrupted run, comparison of their final weights)."""
    reference, resumed = scratch / f"{name}-reference", scratch / f"{name}-resumed"
    run_to_end([*launcher(processes), "--output_dir", str(reference), *flags], env)
    run_and_kill([*launcher(processes), "--output_dir", str(resumed), *flags], env, rf"step {KILL_AT}/60")
    run_to_end([*launcher(resume_processes or processes), "--output_dir", str(resumed), *flags], env)
    return resumed, reference, compare_weights(resumed / "model.safetensors", reference / "model.safetensors")


def scaler_state(path: Path) -> dict:
    import torch

    return torch.load(path, weights_only=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="leave out the 1.2 GB save (check 3)")
    args = parser.parse_args(argv)
    import torch

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    device = f"cuda ({torch.cuda.get_device_name(0)})" if gpus else "cpu"
    help_text = subprocess.run([sys.executable, str(REPO / "train_loop.py"), "--help"], capture_output=True, text=True).stdout
    determinism = ["--full_determinism"] if "--full_determinism" in help_text else []
    rows = []  # (check, device, result, detail)

    def check(name: str, where: str, body) -> None:
        began = time.monotonic()
        print(f"▶ {name} ...", flush=True)
        try:
            passed, detail = body()
            result = "passed" if passed else "FAILED"
        except Exception as error:  # a check that breaks is a result to report, not a reason to stop the others
            result, detail = "FAILED", f"{type(error).__name__}: {error}"
        rows.append((name, where, result, f"{detail} ({time.monotonic() - began:.0f} s)"))

    def skip(name: str, reason: str) -> None:
        rows.append((name, "-", "skipped", reason))

    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        corpus = scratch / "corpus.txt"
        write_corpus(corpus, 3000)
        env = {**os.environ, "HF_HOME": str(scratch / "hf_home"), "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
        flags = ["--train_file", str(corpus), *FLAGS]

        note = " --full_determinism" if determinism else " (train_loop.py has no --full_determinism yet)"
        check(f"bf16 kill -9 + resume{note}", device, lambda: kill_and_resume(scratch, env, "bf16", [*flags, "--bf16", *determinism])[2])

        if gpus:
            def fp16_scaler():
                resumed, reference, (same, detail) = kill_and_resume(scratch, env, "fp16", [*flags, "--fp16", *determinism])
                before, after = (scaler_state(run / "checkpoint-60" / "scaler.pt") for run in (reference, resumed))
                return before == after, f"scale {after.get('scale')} (uninterrupted: {before.get('scale')}), growth tracker {after.get('_growth_tracker')} vs {before.get('_growth_tracker')}; weights: {detail}"

            check("fp16 kill -9 + resume: GradScaler state", device, fp16_scaler)
        else:
            skip("fp16 kill -9 + resume: GradScaler state", "no CUDA device: Accelerate makes no GradScaler on CPU (train_loop.py refuses --fp16 there); scaler.pt save/restore itself is tested on CPU (tests/test_gpu_switches.py)")

        if args.quick:
            skip("save of a ~1.2 GB state vs direct write", "--quick")
        else:
            def save_cost():
                command = [sys.executable, str(REPO / "bench" / "save_cost.py"), "--models", "100M", "--repeats", "3", "--device", "cuda" if gpus else "cpu"]
                output = subprocess.run(command, env=env, capture_output=True, text=True, check=True).stdout
                cells = [cell.strip() for cell in next(line for line in output.splitlines() if line.startswith("| 100M")).strip("|").split("|")]
                return True, f"{cells[2]} MB: save_checkpoint {cells[3]} s, direct write {cells[4]} s, save / direct {cells[5]}"

            check("save of a ~1.2 GB state vs direct write", device, save_cost)

        if gpus >= 2:
            check("2 processes (NCCL) kill -9 + resume", f"{device} x2", lambda: kill_and_resume(scratch, env, "nccl", flags, processes=2)[2])

            def elastic():
                _, _, (same, detail) = kill_and_resume(scratch, env, "elastic", flags, processes=2, resume_processes=1)
                return True, f"finished on 1 process; against the 2-process run: {detail} (not bit-exact by design: README, Elastic resume)"

            check("elastic 2 -> 1 resume", f"{device} x2 -> x1", elastic)
        else:
            reason = f"needs 2 CUDA devices, found {gpus} (the same flows run on 2 CPU ranks over gloo in tests/test_multiprocess.py)"
            skip("2 processes (NCCL) kill -9 + resume", reason)
            skip("elastic 2 -> 1 resume", reason)
        shutil.rmtree(scratch / "hf_home", ignore_errors=True)

    print(f"\ntorch {torch.__version__}, {gpus} CUDA device(s)\n")
    print("| check | device | result | detail |")
    print("|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    return 1 if any(row[2] == "FAILED" for row in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
