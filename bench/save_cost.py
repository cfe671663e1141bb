"""Benchmark: how long a checkpoint stalls training, against a direct write of the same tensors and the disk's speed.

    .venv/bin/python bench/save_cost.py [--models 10M 100M] [--repeats 5] [--pause 0] [--dir DIR] [--device cuda]
    python3 bench/save_cost.py page_reuse [--megabytes 200] [--writes 12] [--pauses 0 0.5 1 3]   (see PAGE_REUSE below)

For each GPT-2-style model (random init, byte vocabulary; WIDTHxLAYERS also works, e.g. 64x2),
after one AdamW step so the optimizer state exists, and one untimed round of the first two, three
writes alternate --repeats times, each after --pause seconds of idling (0 by default):
  - state.save_checkpoint with a real Accelerator(cpu=True): what train_loop.py waits for at a save
    (accelerator.save_state, fsync of every file while it is hashed for the manifest, atomic rename,
    fsync of the parent);
  - direct: safetensors.torch.save_file(weights) + torch.save(optimizer.state_dict()) + os.fsync of both;
  - dd if=/dev/zero of=FILE bs=1M count=<checkpoint MiB> conv=fsync: the disk's sequential write speed.
The checksum column is state._file_checksum (XXH3-128) over the checkpoint's files one after the
other, timed separately right after the save (the files are in the page cache, as they are when the
manifest hashes them); inside the save it runs alongside the fsyncs. Prints medians.
"""

import argparse
import logging
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
MODELS = {"10M": (384, 6), "100M": (768, 14)}  # width x layers


def build(accelerator, width: int, layers: int):
    """A GPT-2-style model and AdamW (prepared), after one training step."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, get_scheduler

    torch.manual_seed(0)
    shape = dict(n_embd=width, n_layer=layers, n_head=max(1, width // 64), n_positions=512)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=384, bos_token_id=1, eos_token_id=1, pad_token_id=0, **shape))
    model.loss_type = "ForCausalLM"  # as train_loop.py does (silences a warning)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    scheduler = get_scheduler("linear", optimizer, num_warmup_steps=0, num_training_steps=10)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    tokens = torch.randint(0, 384, (1, 32), device=accelerator.device)
    accelerator.backward(model(input_ids=tokens, labels=tokens).loss)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return model, optimizer


def time_checkpoint(accelerator, model, directory: Path) -> tuple[float, float, int]:
    """(seconds in state.save_checkpoint, seconds to checksum its files, bytes written)."""
    from resumable import state

    progress = state.TrainingState(global_step=1, total_steps=10, steps_per_epoch=10, global_batch_size=1, per_device_train_batch_size=1)
    began = time.perf_counter()
    path = state.save_checkpoint(accelerator, model, directory, progress, [], [], {"benchmark": "save_cost"})
    saving = time.perf_counter() - began
    files = [file for file in path.iterdir() if file.name != state.MANIFEST_NAME]
    began = time.perf_counter()
    for file in files:
        state._file_checksum(file)
    return saving, time.perf_counter() - began, sum(file.stat().st_size for file in path.iterdir())


def time_direct_write(model, optimizer, directory: Path) -> float:
    import torch
    from safetensors.torch import save_file

    began = time.perf_counter()
    weights, seen = {}, set()
    for name, tensor in model.state_dict().items():
        if tensor.data_ptr() not in seen:  # tied embeddings are stored once, as save_state does
            seen.add(tensor.data_ptr())
            weights[name] = tensor.contiguous()
    save_file(weights, directory / "model.safetensors")
    torch.save(optimizer.state_dict(), directory / "optimizer.bin")
    for name in ("model.safetensors", "optimizer.bin"):
        with open(directory / name, "rb") as handle:
            os.fsync(handle.fileno())
    return time.perf_counter() - began


def time_dd(path: Path, mebibytes: int) -> float:
    began = time.perf_counter()
    subprocess.run(["dd", "if=/dev/zero", f"of={path}", "bs=1M", f"count={mebibytes}", "conv=fsync"], check=True, capture_output=True)
    return time.perf_counter() - began


def measure(accelerator, width: int, layers: int, repeats: int, scratch: Path, pause: float = 0.0) -> dict:
    model, optimizer = build(accelerator, width, layers)
    # One untimed round of each write first: a process's first save of a model takes 2-3x longer
    # than the next ones (measured: 2.9 s, then 0.87-1.0 s at 100M), and training saves many times.
    for kind in ("save", "direct"):
        directory = scratch / f"warm-up-{kind}"
        directory.mkdir()
        time_checkpoint(accelerator, model, directory) if kind == "save" else time_direct_write(model, optimizer, directory)
        shutil.rmtree(directory)
    times = {"save": [], "hash": [], "direct": [], "dd": []}
    size = None
    for run in range(repeats):
        for kind in ("save", "direct", "dd")[run % 3 :] + ("save", "direct", "dd")[: run % 3]:  # the save comes first in run 0: dd needs its size
            directory = scratch / f"{kind}-{run}"
            directory.mkdir()
            time.sleep(pause)
            if kind == "save":
                saving, hashing, size = time_checkpoint(accelerator, model, directory)
                times["save"].append(saving)
                times["hash"].append(hashing)
            elif kind == "direct":
                times["direct"].append(time_direct_write(model, optimizer, directory))
            else:
                times["dd"].append(time_dd(directory / "zeros", max(1, round(size / 2**20))))
            shutil.rmtree(directory)
    parameters = sum(p.numel() for p in model.parameters())
    accelerator.free_memory(model, optimizer)  # the next model gets an empty accelerator
    return {"parameters": parameters, "bytes": size, **{kind: statistics.median(values) for kind, values in times.items()}}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else [str(argument) for argument in argv]
    if argv[:1] == ["page_reuse"]:
        return page_reuse_main(argv[1:])
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), help="10M, 100M or WIDTHxLAYERS")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dir", default=None, help="where to write (default: a temporary directory under $TMPDIR)")
    parser.add_argument("--pause", type=float, default=0.0,
                        help="seconds to wait before each timed write, as training waits between saves (see BENCHMARKS.md: memory freed "
                             "a few seconds earlier costs more to write into on a virtual machine)")  # fmt: skip
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where the model and optimizer live (cuda: the save includes the copy to the host)")
    args = parser.parse_args(argv)
    from accelerate import Accelerator

    logging.getLogger("accelerate.utils.other").setLevel(logging.ERROR)  # as train_loop.py: the tied-embeddings note at every save
    accelerator = Accelerator(cpu=args.device == "cpu")
    rows = []
    with tempfile.TemporaryDirectory(dir=args.dir) as scratch:
        for name in args.models:
            width, layers = MODELS.get(name) or map(int, name.split("x"))
            result = measure(accelerator, width, layers, args.repeats, Path(scratch), args.pause)
            rows.append((name, result))
    print(f"medians of {args.repeats} runs each, {args.pause:g} s before each write, written to {Path(args.dir or tempfile.gettempdir()).resolve()}\n")
    print("| model | parameters | checkpoint MB | save_checkpoint (s) | direct write (s) | save / direct "
          "| dd same size (s) | dd MB/s | save / dd | checksum alone (s) | checksum / save |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name, r in rows:
        print(f"| {name} | {r['parameters']:,} | {r['bytes'] / 1e6:.1f} | {r['save']:.3f} | {r['direct']:.3f} | "
              f"{r['save'] / r['direct']:.2f}x | {r['dd']:.3f} | {r['bytes'] / 1e6 / r['dd']:.0f} | {r['save'] / r['dd']:.2f}x | "
              f"{r['hash']:.3f} | {100 * r['hash'] / r['save']:.0f}% |")  # fmt: skip
    return 0



# --------------------------------------------------------------------------- why a save's time depends on the pause before it

PAGE_REUSE = """How long a write into the page cache takes, by how long ago the memory it lands in was freed.

    python3 bench/save_cost.py page_reuse [--megabytes 200] [--writes 12] [--pauses 0 0.5 1 3]

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


def timed_write(path: Path, data: bytes) -> tuple[float, float]:
    """(seconds to write `data` into the page cache, seconds including fsync)."""
    began = time.perf_counter()
    with open(path, "wb") as handle:
        handle.write(data)
        handle.flush()
        cached = time.perf_counter() - began
        os.fsync(handle.fileno())
    return cached, time.perf_counter() - began


def page_reuse_main(argv) -> int:
    """No torch, no project code: runs with any python3."""
    parser = argparse.ArgumentParser(prog="save_cost.py page_reuse", description=PAGE_REUSE.split("\n\n")[0])
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
