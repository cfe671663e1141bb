"""The benchmarks' stopwatch: run a program and note when each line of its output arrives."""

import re
import subprocess
import threading
import time

STEP_LINE = re.compile(r"^step (\d+)/")  # train_loop.py's plain progress line (printed when not on a terminal)


def run_until(command, env, stop_when, timeout=600.0, cwd=None) -> list[tuple[float, str]]:
    """Start `command` and return [(seconds since launch, line), ...] up to the first line for which
    `stop_when(line)` is true; the program is then killed (SIGKILL: nothing it would do next is timed).

    Raises RuntimeError with the output's tail if the program ends or times out first.
    """
    launched = time.perf_counter()
    process = subprocess.Popen(command, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    watchdog = threading.Timer(timeout, process.kill)
    watchdog.start()
    lines = []
    try:
        for line in process.stdout:
            lines.append((time.perf_counter() - launched, line.rstrip("\n")))
            if stop_when(line):
                return lines
    finally:
        watchdog.cancel()
        process.kill()
        process.wait()
    tail = "\n".join(line for _, line in lines[-40:])
    raise RuntimeError(f"{command[1]} ended (exit {process.returncode}) before the awaited line:\n{tail}")


def step_times(lines) -> dict[int, float]:
    """{step: seconds since launch} of the 'step N/...' lines."""
    return {int(match[1]): seconds for seconds, line in lines if (match := STEP_LINE.match(line))}


def until_step(last: int):
    """A stop_when that waits for the progress line of step `last`."""
    return lambda line: (match := STEP_LINE.match(line)) is not None and int(match[1]) >= last


def run_to_end(command, env, timeout=1800.0, cwd=None) -> list[tuple[float, str]]:
    """Run `command` to its own end and return [(seconds since launch, line), ...].

    For programs that must not be killed part-way (launch.sh: its training runs in a session of
    its own and would live on). Raises RuntimeError with the output's tail on a non-zero exit.
    """
    launched = time.perf_counter()
    process = subprocess.Popen(command, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    watchdog = threading.Timer(timeout, process.terminate)  # launch.sh forwards SIGTERM to the training
    watchdog.start()
    lines = []
    try:
        for line in process.stdout:
            lines.append((time.perf_counter() - launched, line.rstrip("\n")))
    finally:
        watchdog.cancel()
        process.wait()
    if process.returncode != 0:
        tail = "\n".join(line for _, line in lines[-40:])
        raise RuntimeError(f"{command[0]} exited {process.returncode}:\n{tail}")
    return lines
