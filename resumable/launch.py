"""Run your training script on one or many processes so that a stop keeps its meaning: resumable.launch.

    python -m resumable.launch [--retries N] train.py [your flags]
    NUM_PROCESSES=2 python -m resumable.launch train.py --output_dir DIR

For a script that uses resumable (`resumable.Run`, or a Trainer with `ResumableCallback`). It starts
`accelerate launch` of the script and returns the script's own exit code: 0 done, 2 bad use, 75
stopped early (run it again), 130 aborted. `accelerate launch` alone turns every code of several
processes into 1, so a SLURM job could not tell a stop from a crash; here each machine's first
process records how the script ended (resumable/run_script.py) and the code is read back.
launch.sh's supervisor (supervisor.py) is this one, running train_loop.py.

Processes, from the environment (as launch.sh reads them):
    NUM_PROCESSES     processes in the whole job (default 1; it wins over your accelerate config's)
    NUM_MACHINES      machines in the job (default 1); with more than one, also:
    MACHINE_RANK      this machine's number, 0 on the main one
    MAIN_PROCESS_IP   the main machine's address, MAIN_PROCESS_PORT a free port on it (default 29500)
Accelerate's other settings (mixed precision, FSDP, ...) come from your `accelerate config`, as with
`accelerate launch`.

The contract:
- Signals. SIGINT, SIGTERM and SIGUSR1 get their handlers first thing, whatever the parent left
  (a script's background job starts with SIGINT ignored, which bash cannot undo; Python can).
  Each one received is passed to every training process (the launcher's children) once,
  including processes that appear after it came. A second Ctrl+C reaches the training as well.
- The launcher in between never acts on these signals. The training is started with them
  blocked; the block is inherited, so `accelerate launch` (and torchrun's agent, which would
  SIGKILL the ranks 30 s after a SIGTERM of its own) leaves them pending and never cuts a save
  short, whether the signal came from us or from a scheduler that signals every process at once.
  The training unblocks them once its handlers are installed (resumable's StopRequests): a signal
  that came while it was starting is delivered then, neither lost nor fatal.
- Waiting. It is the subreaper of everything it starts: a training process whose launcher died
  is adopted. It returns only when no process it started is left, or TEARDOWN_GRACE_SECONDS
  after the training recorded its exit code: then it ends (SIGKILL) what is left of this run,
  its own descendants only, and says so in one line. So each machine's supervisor exits with the
  training's code in bounded time, whatever the other machines do.
- Exit code: the training's own (read back from the exit code file), else the launcher's
  (128 + N for a death by signal N).
- --retries N: start again after any code but 0, 2 and 130, up to N times, with
  RESUMABLE_RETRY_PAUSE seconds between tries (default 5). Never after a signal: a signal that
  came before the training started, or during a pause, ends the run at once (exit 75 if
  nothing ran yet: run the same command again).

Linux only (prctl, /proc), like the rest of the project's process handling.
"""

from __future__ import annotations

import ctypes
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)
EXIT_DONE, EXIT_USAGE, EXIT_STOPPED_EARLY, EXIT_ABORTED = 0, 2, 75, 130  # resumable.errors's, without importing the package's torch users
EXIT_CODE_FILE_VARIABLE = "RESUMABLE_EXIT_CODE_FILE"  # where each machine's first training process records its exit code
POLL_SECONDS = 0.1  # how soon a signal reaches the training, and a finished training is noticed
# After the training recorded its exit code, its processes end within seconds; one that is still
# there after this long is stuck in a teardown below us (a torch/gloo deadlock, a launcher waiting
# for a machine that is gone), and would hold a multi-node job until its time limit.
TEARDOWN_GRACE_SECONDS = 30

received: list[int] = []  # every forwarded signal, in order of arrival


def on_signal(number, frame) -> None:
    received.append(number)  # acted on by the waiting loop, outside the handler


def install_handlers() -> None:
    for number in FORWARDED:
        signal.signal(number, on_signal)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, FORWARDED)  # a parent may have blocked them


def become_subreaper() -> None:
    """Orphaned descendants (a rank whose launcher died) become our children, so we can wait for them."""
    PR_SET_CHILD_SUBREAPER = 36
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER) failed")


def children_of(parents: set[int]) -> list[int]:
    children = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as handle:
                fields = handle.read().rsplit(b")", 1)[1].split()  # the name in (...) may hold spaces
        except OSError:  # gone meanwhile
            continue
        if int(fields[1]) in parents:
            children.append(int(entry.name))
    return children


def start(command: list[str]) -> subprocess.Popen:
    """Start the launcher with the forwarded signals blocked (inherited by it and the training)."""
    signal.pthread_sigmask(signal.SIG_BLOCK, FORWARDED)
    try:
        # Its own session: a Ctrl+C on the terminal reaches only us, and we pass it on once.
        return subprocess.Popen(command, start_new_session=True)
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, FORWARDED)  # ours again; pending ones run now


def descendants_of(pid: int) -> list[int]:
    found, parents = [], {pid}
    while parents:
        parents = set(children_of(parents))
        found += parents
    return found


def wait_for_everything(launcher: subprocess.Popen, exit_code_file: Path, who: str) -> int:
    """Pass signals on until no process we started is left; the launcher's exit code."""
    launcher_code = None
    passed_on = {}  # training pid -> how many of `received` it has been sent
    code_recorded_at = None
    while True:
        if code_recorded_at is None and read_exit_code(exit_code_file) is not None:
            code_recorded_at = time.monotonic()
        elif code_recorded_at is not None and time.monotonic() - code_recorded_at > TEARDOWN_GRACE_SECONDS:
            stuck = descendants_of(os.getpid())
            print(f"{who}: {len(stuck)} process(es) of this run still running {TEARDOWN_GRACE_SECONDS} s after the training "
                  f"recorded its exit code; ending them (SIGKILL, pids {' '.join(map(str, stuck))})", file=sys.stderr, flush=True)  # fmt: skip
            for pid in stuck:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            code_recorded_at = float("inf")  # once
        while True:  # reap whatever has ended: the launcher, adopted ranks, their adopted children
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                launcher.returncode = launcher_code
                return launcher_code
            if pid == 0:
                break
            if pid == launcher.pid:
                launcher_code = os.waitstatus_to_exitcode(status)
        if received:
            # The training processes: the launcher's children, and its orphans, which are now ours.
            training = [pid for pid in children_of({launcher.pid, os.getpid()}) if pid != launcher.pid]
            for pid in training:
                for number in received[passed_on.get(pid, 0) :]:
                    try:
                        os.kill(pid, number)
                    except ProcessLookupError:
                        pass
                passed_on[pid] = len(received)
        time.sleep(POLL_SECONDS)


def read_exit_code(path: Path) -> int | None:
    text = path.read_text().strip()
    return int(text) if text else None


def stop_message(who: str, number: int, code: int) -> str:
    return f"{who}: stopped by {signal.Signals(number).name} (exit {code}); run the same command again to continue."


def pause(seconds: float) -> None:
    """Sleep, but wake as soon as a signal comes."""
    until = time.monotonic() + seconds
    while not received and time.monotonic() < until:
        time.sleep(min(POLL_SECONDS, max(0.0, until - time.monotonic())))


def launcher_command(environ, config_file: str | None = None) -> list[str]:
    """`accelerate launch ...` for this machine, from the environment; ValueError names a bad variable.

    NUM_PROCESSES     processes in the whole job (default 1)
    NUM_MACHINES      machines in the job (default 1); with more than one, also:
    MACHINE_RANK      this machine's number, 0 on the main one
    MAIN_PROCESS_IP   the main machine's address, MAIN_PROCESS_PORT a free port on it (default 29500)
    """

    def whole_number(name: str, default: str, smallest: int) -> int:
        text = environ.get(name, default)
        if not re.fullmatch(r"[0-9]+", text) or int(text) < smallest:
            raise ValueError(f"{name} must be a whole number of at least {smallest} (got '{text}')")
        return int(text)

    processes = whole_number("NUM_PROCESSES", "1", 1)
    machines = whole_number("NUM_MACHINES", "1", 1)
    # accelerate's own launch module, not the `accelerate` command: that one imports every subcommand
    # first (`estimate-memory` imports transformers): 2.3-2.5 s of CPU against 1.5-1.6 s before the training starts.
    command = [sys.executable, "-m", "accelerate.commands.launch", "--quiet"]
    if config_file:
        command += ["--config_file", config_file]
    elif not os.path.isfile(accelerate_default_config(environ)):
        # No `accelerate config` on this machine: accelerate's own defaults, said, so that it does not warn about each.
        command += ["--mixed_precision", "no", "--dynamo_backend", "no"] + (["--num_machines", "1"] if machines == 1 else [])
    command += ["--num_processes", str(processes)]
    if machines > 1:
        rank = whole_number("MACHINE_RANK", "", 0)
        port = whole_number("MAIN_PROCESS_PORT", "29500", 1)
        address = environ.get("MAIN_PROCESS_IP", "")
        if rank >= machines:
            raise ValueError(f"MACHINE_RANK {rank} is not below NUM_MACHINES {machines} (the main machine is 0)")
        if not address:
            raise ValueError("MAIN_PROCESS_IP: set it to the address of the machine with MACHINE_RANK=0")
        if processes % machines:
            raise ValueError(f"NUM_PROCESSES counts the processes of all machines: {processes} is not a multiple of NUM_MACHINES {machines}")
        command += ["--num_machines", str(machines), "--machine_rank", str(rank), "--main_process_ip", address, "--main_process_port", str(port)]
    if processes > 1:
        command.append("--multi_gpu")  # without it, accelerate starts one process on a machine with no GPU
    return command


def accelerate_default_config(environ) -> str:
    """Where `accelerate config` writes the file `accelerate launch` reads when given none (accelerate/commands/config/config_args.py)."""
    cache = environ.get("XDG_CACHE_HOME", "~/.cache")
    return os.path.join(os.path.expanduser(environ.get("HF_HOME", os.path.join(cache, "huggingface"))), "accelerate", "default_config.yaml")


def threads_per_process(environ, cores: int) -> str | None:
    """OMP_NUM_THREADS for the training, unless the user set it: this machine's cores shared by its processes.

    Unless the config says use_cpu, `accelerate launch` sets OMP_NUM_THREADS=1 when it is unset
    (accelerate/commands/launch.py), so on a CPU-only machine one process computed on one core of
    all of them: 0.80x a plain `python` loop on 2 cores (issue 19). `cores` honours taskset and
    SLURM's allocation (os.sched_getaffinity). On GPUs this only sizes the CPU-side thread pools.
    """
    if environ.get("OMP_NUM_THREADS"):
        return None
    on_this_machine = int(environ.get("NUM_PROCESSES", "1")) // int(environ.get("NUM_MACHINES", "1"))
    return str(max(1, cores // max(1, on_this_machine)))


def record_exit_code(code: int, path: str | None = None) -> None:
    """In a training process: record how it ended, for the supervisor (first process of each machine only).

    `path` defaults to the file the supervisor named in RESUMABLE_EXIT_CODE_FILE; without one, nothing.
    """
    path = path or os.environ.get(EXIT_CODE_FILE_VARIABLE)
    if path and os.environ.get("LOCAL_RANK", "0") == "0":  # set by accelerate launch / torchrun
        Path(path).write_text(f"{code}\n")


def exit_status_for_the_launcher(code: int) -> int:
    """What a training process exits with, once record_exit_code has recorded `code` for the supervisor.

    0 for a planned end (75 stopped early, 2 refused), which every rank reaches alike: to the launcher it is
    then a success, where torchrun would print a ChildFailedError traceback for a normal stop. Any other
    code is kept, so that torchrun still ends the other ranks after a crash. Without a supervisor, `code`.
    """
    if code in (EXIT_STOPPED_EARLY, EXIT_USAGE) and os.environ.get(EXIT_CODE_FILE_VARIABLE):
        return EXIT_DONE
    return code


def supervise(training: list[str], retries: int = 0, *, config_file: str | None = None, who: str = "resumable.launch") -> int:
    """Run `accelerate launch [config] TRAINING...` until it has really ended (retried up to `retries` times); its exit code.

    `training` is what follows accelerate launch's own options: a script and its arguments, or
    `--module NAME ...`. The exit code file is named to the training in RESUMABLE_EXIT_CODE_FILE.
    `who` begins the supervisor's own lines. Call install_handlers() first thing in the process.
    """
    try:
        launcher = launcher_command(os.environ, config_file)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_USAGE
    threads = threads_per_process(os.environ, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count())
    if threads:
        os.environ["OMP_NUM_THREADS"] = threads  # inherited by the launcher and the training
    if sys.platform == "linux":
        become_subreaper()

    # accelerate launch turns every failure of the training into exit 1, so the training
    # writes its own exit code where we can read it.
    handle, name = tempfile.mkstemp(prefix="resumable-exit.")
    os.close(handle)
    exit_code_file = Path(name)
    os.environ[EXIT_CODE_FILE_VARIABLE] = name  # inherited by the training
    code = None
    try:
        for attempt in range(retries + 1):
            if attempt > 0:
                pause_seconds = float(os.environ.get("RESUMABLE_RETRY_PAUSE", "5"))
                print(f"🔁 {who}: training exited with {code}; retry {attempt} of {retries} in {pause_seconds:g} s...", file=sys.stderr, flush=True)
                pause(pause_seconds)
            if received:  # before the training started, or during the pause: do not start it
                code = EXIT_STOPPED_EARLY if code is None else code
                print(stop_message(who, received[0], code), file=sys.stderr, flush=True)
                return code
            exit_code_file.write_text("")
            process = start([*launcher, *training])
            launcher_code = wait_for_everything(process, exit_code_file, who)
            written = read_exit_code(exit_code_file)
            code = written if written is not None else (128 - launcher_code if launcher_code < 0 else launcher_code)
            if code in (EXIT_DONE, EXIT_USAGE, EXIT_ABORTED):
                return code
            if received:
                print(stop_message(who, received[0], code), file=sys.stderr, flush=True)
                return code
        return code
    finally:
        exit_code_file.unlink(missing_ok=True)


def parse_retries(argv: list[str]) -> tuple[int, list[str]]:
    """`--retries N` at the front of argv, and the rest; ValueError for a bad N."""
    if argv[:1] != ["--retries"]:
        return 0, argv
    value = argv[1] if len(argv) > 1 else ""
    if not re.fullmatch(r"[0-9]+", value):
        raise ValueError(f"--retries takes a whole number (got '{value}')")
    return int(value), argv[2:]


def main(argv: list[str]) -> int:
    try:
        retries, argv = parse_retries(argv)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_USAGE
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.split("\n\nThe contract:")[0].strip(), file=sys.stderr if not argv else sys.stdout)
        return EXIT_USAGE if not argv else EXIT_DONE
    script = argv[0]
    if not os.path.isfile(script):
        print(f"error: {script}: no such script; give your training script's path: python -m resumable.launch train.py [flags]", file=sys.stderr)
        return EXIT_USAGE
    # The script runs inside resumable/run_script.py, which records how it ended (exit code, or 1 for a traceback).
    return supervise(["--module", "resumable.run_script", script, *argv[1:]], retries)


if __name__ == "__main__":
    install_handlers()  # first: until then a signal kills us, but nothing has been started yet
    sys.exit(main(sys.argv[1:]))
