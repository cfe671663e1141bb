"""Where training stands, without touching the run: python -m resumable.status [--output_dir DIR] [--json] [--plot]

Reads OUTPUT_DIR/trainer_state.json (rewritten at logging steps and saves), the lock, the
checkpoints (each verified against its manifest) and backup_to's progress, for any run of this
package: the CLI's, a resumable.Run loop's, a Trainer script's with resumable.trainer. Never writes
anything, except OUTPUT_DIR/loss.png with --plot (pip install matplotlib). The CLI's
`./launch.sh status` (status.py) is this plus a check of the data files its checkpoints name.
"""

from __future__ import annotations

import argparse
import os
import json
import shutil
import sys
import time
from pathlib import Path

from resumable import backup, state


def describe(output_dir: Path, describe_data=lambda checkpoint: []) -> dict:
    """Everything `status` knows about OUTPUT_DIR, as one JSON-ready record.

    describe_data(newest valid checkpoint) -> entries for the data files it names (the CLI's); none here.
    """
    live = state.read_live_state(output_dir) or {}
    holder = state.OutputDirLock.holder(output_dir) if output_dir.is_dir() else None
    step, total = live.get("global_step", 0), live.get("total_steps", 0)
    if "max_steps" in live and "total_steps" not in live:  # a Trainer script's trainer.save_state() wrote it, in the Trainer's form
        total = live["max_steps"]
        live["training_complete"] = live.get("training_complete") or (total > 0 and step >= total)
    last_log = (live.get("log_history") or [{}])[-1]
    steps_per_second = live.get("steps_per_second") or 0.0
    checkpoints = []
    for path in state.list_checkpoints(output_dir):
        # A running training rotates checkpoints away while we look: a vanished one is skipped.
        try:
            state.verify_checkpoint(path)
            problem = None
        except state.CheckpointError as error:
            problem = str(error)
        try:
            size = state.directory_size(path)
            modified = path.stat().st_mtime
        except FileNotFoundError:
            continue
        if not path.exists():
            continue
        checkpoints.append({
            "name": path.name, "step": state.checkpoint_step(path), "bytes": size,
            "age_seconds": round(time.time() - modified), "valid": problem is None, "problem": problem,
        })  # fmt: skip
    newest_valid = next((c["name"] for c in reversed(checkpoints) if c["valid"]), None)
    disk = shutil.disk_usage(output_dir if output_dir.is_dir() else Path.cwd())
    if live.get("training_complete"):
        situation = "complete"
    elif holder:
        situation = "running"
    elif live or checkpoints:
        situation = "interrupted"
    else:
        situation = "empty"
    return {
        "output_dir": str(output_dir), "situation": situation, "active_run": holder,
        "global_step": step, "total_steps": total, "percent": round(100 * step / total, 1) if total else 0.0,
        "epoch": live.get("epoch"), "samples_seen": live.get("samples_seen"),
        "last_loss": last_log.get("loss"), "last_learning_rate": last_log.get("learning_rate"),
        "steps_per_second": steps_per_second,
        "samples_per_second": steps_per_second * live.get("global_batch_size", 0),
        "eta_seconds": round((total - step) / steps_per_second) if steps_per_second and situation == "running" else None,
        "updated_at": live.get("updated_at"), "stop_reason": live.get("stop_reason"),
        "run_history": live.get("run_history", []), "checkpoints": checkpoints,
        "data": describe_data(output_dir / newest_valid) if newest_valid else [],
        "disk_free_bytes": disk.free, "backup": backup.read_status(output_dir),
        "corrupt": sorted(p.name for p in output_dir.glob("checkpoint-*.corrupt*")) if output_dir.is_dir() else [],
    }  # fmt: skip


def print_report(report: dict, start_command: str | None = None) -> None:
    print(f"📁 {report['output_dir']}: {report['situation']}")
    if report["situation"] == "empty":
        print(f"   nothing trained here yet; start with {start_command} --output_dir {report['output_dir']}" if start_command else "   nothing trained here yet")
    else:
        epoch = f", epoch {report['epoch']:.2f}" if report["epoch"] is not None else ""
        print(f"   step {report['global_step']} / {report['total_steps']} ({report['percent']}%){epoch}")
        if report["last_loss"] is not None:  # a library run logs the values its loop passes to run.step(): perhaps no learning rate
            rate = f", learning rate {report['last_learning_rate']:.2e}" if report["last_learning_rate"] is not None else ""
            print(f"   last loss {report['last_loss']:.4f}{rate}")
        if report["situation"] == "running":
            print(f"   🏃 active: {report['active_run']}; {report['samples_per_second']:.1f} samples/s, ETA {state.human_duration(report['eta_seconds'])}")
        elif report["situation"] == "interrupted":
            reason = report["stop_reason"] or "killed or crashed"
            print(f"   ⏸️  not running (last stop: {reason}); run the same command again to continue")
        else:
            print("   🏁 training complete; the final model is in the output directory")
    for entry in report["run_history"]:
        stopped = f" after {entry['previous_stop']}" if entry.get("previous_stop") else ""
        print(f"   {entry['time']}  {entry['event']} at step {entry['step']} on {entry['world_size']} process(es){stopped}")
    for checkpoint in report["checkpoints"]:
        mark = "✅" if checkpoint["valid"] else f"❌ {checkpoint['problem']}"
        print(f"   {checkpoint['name']:<20} step {checkpoint['step']:<8} {state.human_bytes(checkpoint['bytes']):>9}  {state.human_duration(checkpoint['age_seconds'])} old  {mark}")
    for name in report["corrupt"]:
        print(f"   {name:<20} moved aside (damaged)")
    for entry in report["data"]:
        where = f"   📄 --{entry['flag']} {entry['where']}: "
        print(where + {
            "matches": f"✅ same content as when {entry['checkpoint']} was saved",
            "changed": f"❌ its content changed since {entry['checkpoint']} was saved; a resume will be refused",
            "missing": f"❌ not there any more; resume with --{entry['flag']} at its new place (the same content resumes)",
            "unreadable": "❌ cannot be read (permissions? replaced by a directory?); a resume will stop with the reason",
            "hub": "from the hub (not checked)",
        }[entry["state"]])  # fmt: skip
    for line in backup.describe_status(Path(report["output_dir"])):  # --backup_to: newest there, how far behind, last error
        print(line)
    print(f"   💽 {state.human_bytes(report['disk_free_bytes'])} free")


def plot(output_dir: Path, report: dict) -> Path:
    """OUTPUT_DIR/loss.png: training (and evaluation) loss over steps, a dashed line at every resume."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    history = (state.read_live_state(output_dir) or {}).get("log_history", [])
    train = [(e["step"], e["loss"]) for e in history if "loss" in e]
    evaluation = [(e["step"], e["eval_loss"]) for e in history if "eval_loss" in e]
    figure, axes = plt.subplots(figsize=(9, 4.5))
    if train:
        axes.plot(*zip(*train), label="training loss")
    if evaluation:
        axes.plot(*zip(*evaluation), "o-", label="evaluation loss")
    resumes = [entry["step"] for entry in report["run_history"] if entry["event"] == "resume"]
    for index, step in enumerate(resumes):
        axes.axvline(step, color="grey", linestyle="--", linewidth=1, label="resume" if index == 0 else None)
    axes.set_xlabel("step")
    axes.set_ylabel("loss")
    axes.set_title(f"{output_dir.name}: step {report['global_step']} / {report['total_steps']}")
    axes.legend()
    figure.tight_layout()
    target = output_dir / "loss.png"
    figure.savefig(target, dpi=100, metadata={"Description": json.dumps({"resume_steps": resumes})})
    plt.close(figure)
    return target


def main(argv=None, prog: str = "python -m resumable.status", describe_data=lambda checkpoint: [], start_command: str | None = None) -> int:
    """The command line; the CLI's status.py calls it with its name, its data check and how to start a run."""
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    parser.add_argument("--output_dir", default="./results")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument("--plot", action="store_true", help="also write OUTPUT_DIR/loss.png")
    args = parser.parse_args(argv)
    output_dir = Path(args.output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        print(f"error: --output_dir {output_dir} is a file", file=sys.stderr)
        return 2
    report = describe(output_dir, describe_data)
    if args.plot:
        if report["situation"] == "empty":
            print(f"error: nothing to plot in {output_dir}", file=sys.stderr)
            return 2
        report["plot"] = str(plot(output_dir, report))
    try:
        if args.json:
            print(json.dumps(report, indent=2))
        else:
            print_report(report, start_command)
            if args.plot:
                print(f"   📈 {report['plot']}")
        sys.stdout.flush()
    except BrokenPipeError:  # `status | head`: the reader has what it wanted; no traceback, and none at exit either
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0


if __name__ == "__main__":
    sys.exit(main())
