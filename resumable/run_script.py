"""One training process of resumable.launch: runs the user's script as `python script.py` would, and records how it ended.

    accelerate launch --module resumable.run_script train.py [flags]     (resumable.launch starts this)

The exit code goes to the file the supervisor named (resumable.launch.record_exit_code): the
script's own `sys.exit(code)`, 0 when it returns, 1 for a traceback (printed as Python prints it).
A planned end (75 stopped, 2 refused) then leaves the process with 0, so that the launcher reports
no failure; the supervisor returns the recorded code.
An abort by a second Ctrl+C (os._exit(130)) records its code itself, in resumable.stopping.
Before the process exits, its process group is left in a safe order (leave_process_group).
"""

from __future__ import annotations

import os
import runpy
import sys

from resumable.launch import exit_status_for_the_launcher, record_exit_code


def run(script: str) -> int:
    """Run `script` as __main__; its exit status, as Python would give it (and print what Python would print)."""
    try:
        runpy.run_path(script, run_name="__main__")
        return 0
    except SystemExit as stop:
        if stop.code is None or isinstance(stop.code, int):
            return stop.code or 0
        print(stop.code, file=sys.stderr)  # sys.exit("message")
        return 1
    except KeyboardInterrupt:
        return 130
    except BaseException:
        sys.excepthook(*sys.exc_info())
        return 1
    # Leaving the handler drops the traceback, and with it the script's frames and globals (its model).


def leave_process_group() -> None:
    """Tear down torch.distributed after the model that uses it is gone, so that the teardown cannot deadlock or abort.

    DDP's reducer holds the process group from C++, and is freed with the GIL held. When it drops
    the last reference (as it did after accelerate's end_training() had destroyed the group),
    ~ProcessGroupGloo joins gloo's worker threads with the GIL held, while a worker still freeing
    an all-reduce's tensor waits for the GIL to free its Python object: the rank never exited
    (issue 26: the multi-node job that did not requeue). Left to the interpreter's shutdown, a rank
    of a user's script died of SIGABRT ("terminate called without an active exception") after its
    stop had been saved. Freed in this order, the last reference is the group's own Python object,
    which releases the GIL first.
    """
    if "torch" not in sys.modules:  # a script that never imported torch has no group to leave
        return
    import gc

    import torch.distributed

    gc.collect()  # the model, the accelerator and their reference cycles go while the group still exists
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def main() -> int:
    if len(sys.argv) < 2:
        print("usage: accelerate launch --module resumable.run_script SCRIPT [ARGS]", file=sys.stderr)
        return 2
    script = sys.argv[1]
    del sys.argv[0]  # the script sees the argv `python script.py ...` gives it; run_path sets argv[0]
    sys.path[0] = os.path.dirname(os.path.abspath(script))  # and its own folder first on the path, not ours
    code = run(script)
    leave_process_group()
    record_exit_code(code)
    return exit_status_for_the_launcher(code)


if __name__ == "__main__":
    sys.exit(main())
