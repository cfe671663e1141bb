"""When a run stops early: signals, deadlines, and the agreement that makes every rank stop together.

    StopRequests    signal handlers (SIGINT, SIGTERM, SIGUSR1) that only record the request;
                    a second Ctrl+C aborts at once (exit 130)
    Deadline        --max_time and a SLURM job's end time, with a margin measured from real saves
    StopAgreement   every rank stops at the same optimizer step (a collective off the hot path)
    StopCheck       the one question the loop asks at a step boundary: stop now?

Nothing here saves or prints: the loop does, at a step boundary, once every rank agrees.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time

from resumable.errors import EXIT_ABORTED, UsageError
from resumable.launch import record_exit_code


class StopRequests:
    """Signals and deadlines that ask the run to stop at the next step boundary.

    The handler only records the request: the loop saves and exits at a step boundary
    where every rank agrees to stop.
    """

    def __init__(self, on_abort=lambda: None):
        self.reason = None
        self._first_interrupt_at = None
        self._on_abort = on_abort  # records exit 130 for launch.sh before the process vanishes

    def install(self) -> None:
        for number in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1):
            signal.signal(number, self._on_signal)
        # resumable.launch (and launch.sh) starts us with them blocked: one that came meanwhile runs now.
        signal.pthread_sigmask(signal.SIG_UNBLOCK, (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1))

    def ignore_from_now(self) -> None:
        """The run has ended (saved, or failed): stop signals that still arrive change nothing.

        Why: Python's shutdown resets the handlers it installed to the default action, which for
        SIGTERM and SIGUSR1 is to die. A stop signal often comes twice (the scheduler signals every
        process and launch.sh forwards its own copy; SLURM's USR1 can repeat), and a copy arriving
        while the interpreter exits killed a rank by signal after its work was done; on several
        machines its peer then waited in the launcher's teardown until the allocation ran out.
        """
        for number in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1):
            signal.signal(number, signal.SIG_IGN)

    def _on_signal(self, number, frame) -> None:
        now = time.monotonic()
        if number == signal.SIGINT and self._first_interrupt_at is not None:
            # A second Ctrl+C aborts at once. torchrun forwards the terminal's SIGINT to
            # every worker, so the same key press can arrive twice within milliseconds:
            # only a press a moment later counts as the second one.
            if now - self._first_interrupt_at > 1.0:
                self._on_abort()
                record_exit_code(EXIT_ABORTED)  # for resumable.launch: os._exit skips run_script's record
                os._exit(EXIT_ABORTED)  # saves are atomic: the previous checkpoint stays valid
            return
        if number == signal.SIGINT:
            self._first_interrupt_at = now
        self.reason = self.reason or signal.Signals(number).name

    def request(self, reason: str) -> None:
        self.reason = self.reason or reason


class StopAgreement:
    """Makes every rank stop at the same optimizer step when any rank is asked to stop.

    `accelerator.check_trigger()` would do it with a blocking all-reduce and `.item()` at every
    step: on GPUs a host-device sync per step, which keeps the CPU from queueing the next step's
    kernels. Here the flags travel on a CPU (gloo) group instead: each rank contributes its flag
    at one step boundary and reads the sum at the next, so the all-reduce runs while the step
    computes. A request is acted on one step later; every rank reads the same sum at the same
    step, so all stop together. One process needs no collective at all.
    """

    def __init__(self, world_size: int):
        self.world_size = world_size
        self.group = None
        self.pending = None
        if world_size > 1:
            import torch.distributed as dist

            # On CPU the default group is gloo already; on GPUs (NCCL) a gloo group keeps the flags off the device.
            self.group = None if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")

    def _all_reduce(self, flags: tuple, wait: bool):
        import torch
        import torch.distributed as dist

        counts = torch.tensor([1 if flag else 0 for flag in flags], dtype=torch.int32)
        work = dist.all_reduce(counts, group=self.group, async_op=True)
        if wait:
            work.wait()
            return tuple(count > 0 for count in counts.tolist())
        return work, counts

    def now(self, asked: bool) -> bool:
        """Decide at once (blocking); for moments outside the step loop."""
        return asked if self.world_size == 1 else self._all_reduce((asked,), wait=True)[0]

    def at_step_boundary(self, asked: bool) -> bool:
        """True on every rank at the same call if any rank was asked at this call or the one before."""
        return self.flags_at_step_boundary((asked,))[0]

    def flags_at_step_boundary(self, flags: tuple) -> tuple:
        """Each flag (the first one: stop) true on every rank at the same call if any rank raised it at this call or the one before.

        After the stop flag is agreed no further round starts; a flag agreed on its own (a save that is due)
        is acted on by every rank at the same call, and the next round starts at once.
        """
        if self.world_size == 1:
            return tuple(flags)
        agreed = (False,) * len(flags)
        if self.pending is not None:
            work, counts = self.pending
            work.wait()  # long finished: it was started a whole step ago
            agreed = tuple(count > 0 for count in counts.tolist())
        # Every rank reads the same sums here, so either all start another round or none does.
        self.pending = None if agreed[0] else self._all_reduce(flags, wait=False)
        return agreed

    def settle(self) -> None:
        """Wait for the round in flight, before other collectives run or the group is torn down."""
        if self.pending is not None:
            self.pending[0].wait()
            self.pending = None


class Deadline:
    """The wall-clock time by which this process must have saved and exited, if any.

    The margin kept before it is derived from measured save and step times, so a run
    stops early enough to finish its last save.
    """

    def __init__(self, max_time_seconds: float | None, started_at: float, estimated_save_seconds: float):
        limits = []
        if max_time_seconds is not None:
            limits.append(started_at + max_time_seconds)
        slurm_end = slurm_job_end_time()
        if slurm_end is not None:
            limits.append(slurm_end)
        self.at = min(limits) if limits else None
        self.save_seconds = estimated_save_seconds  # replaced by the measured time of each save
        self.step_seconds = 0.0
        self.save_in_flight = False  # a background save (--async_save) the stop must wait for
        self.steps_timed = 0

    def record_step(self, seconds: float) -> None:
        """The last step's duration, for the margin. A process's first step is not counted: it is
        warm-up, and with --torch_compile it includes the compilation (minutes for a large model)."""
        if self.steps_timed > 0:
            self.step_seconds = seconds
        self.steps_timed += 1

    def reached(self, now: float | None = None) -> bool:
        """Is it time to stop, with the margin? `now` defaults to the clock, read only when there is a deadline."""
        if self.at is None:
            return False
        if now is None:
            now = time.time()
        saves_to_wait_for = 2 if self.save_in_flight else 1  # the one in flight, then the stop's own
        margin = 1.5 * self.save_seconds * saves_to_wait_for + 3 * self.step_seconds + 2.0
        return now + margin >= self.at

    def describe(self) -> str:
        return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.at))


def parse_duration(text: str, name: str = "--max_time") -> float:
    """Seconds in '5400', '90m', '1h30m', '2h', '45s' or '01:30:00'; UsageError naming `name` otherwise."""
    text = text.strip()
    if re.fullmatch(r"\d+(\.\d+)?", text):
        return float(text)
    if re.fullmatch(r"(\d+:)?\d+:\d+", text):
        seconds = 0.0
        for part in text.split(":"):
            seconds = seconds * 60 + int(part)
        return seconds
    match = re.fullmatch(r"(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?", text)
    if text and match:
        hours, minutes, seconds = (int(group or 0) for group in match.groups())
        return hours * 3600 + minutes * 60 + seconds
    raise UsageError(f"{name} {text!r}: use seconds (5400), 90m, 1h30m or 01:30:00")


def process_start_time() -> float:
    """When this process started (epoch seconds): --max_time counts from there, imports included."""
    import psutil  # a dependency of accelerate

    return psutil.Process().create_time()


def slurm_job_end_time() -> float | None:
    """The SLURM job's end time (epoch seconds), when running inside a SLURM job with a time limit."""
    if os.environ.get("SLURM_JOB_END_TIME", "").isdigit():
        return float(os.environ["SLURM_JOB_END_TIME"])
    job_id = os.environ.get("SLURM_JOB_ID")
    if not job_id:
        return None
    questions = [
        (["squeue", "-h", "-j", job_id, "-o", "%e"], lambda out: out.strip()),
        (["scontrol", "show", "job", job_id], lambda out: re.search(r"EndTime=(\S+)", out).group(1)),
    ]
    for command, read_end in questions:
        if not shutil.which(command[0]):
            continue
        try:
            answer = subprocess.run(command, capture_output=True, text=True, timeout=20)
            return time.mktime(time.strptime(read_end(answer.stdout), "%Y-%m-%dT%H:%M:%S"))
        except (subprocess.SubprocessError, OSError, ValueError, AttributeError):
            continue  # "NONE"/"Unknown" (no limit), or this tool is not usable here
    return None



class StopCheck:
    """The loop's one question, asked by every rank at the same moments: stop now?

    True on every rank at the same step when any rank was signalled or the deadline is
    near. `reason` says why, for the saved-line and trainer_state.json.
    """

    def __init__(self, requests: StopRequests, world_size: int, deadline: Deadline):
        self.requests = requests
        self.deadline = deadline
        self.agreement = StopAgreement(world_size)

    @property
    def reason(self) -> str:
        return self.requests.reason or "another rank was asked to stop"

    def requested(self, at_step_boundary: bool = True) -> bool:
        """A collective; `at_step_boundary=False` decides at once (outside the step loop)."""
        if self.deadline.reached():
            self.requests.request("deadline")
        asked = self.requests.reason is not None
        return self.agreement.at_step_boundary(asked) if at_step_boundary else self.agreement.now(asked)

    def requested_with(self, save_due: bool) -> tuple[bool, bool]:
        """(stop now?, save now?) at a step boundary: both agreed by every rank at the same step (a collective)."""
        if self.deadline.reached():
            self.requests.request("deadline")
        stop, save = self.agreement.flags_at_step_boundary((self.requests.reason is not None, save_due))
        return stop, save

    def settle(self) -> None:
        """Before other collectives run or the process group is torn down."""
        self.agreement.settle()
