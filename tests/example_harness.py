"""Runs an example script as the real program would run, plus switches that only tests use.

    python tests/example_harness.py examples/NAME.py [the example's flags]

    EXAMPLE_KILL_IN_SAVE=N   SIGKILL this process inside the save of checkpoint-N: after every file of it
                             is written, before its manifest (the commit) is, as a power cut would

The switches live here, not in the library: production code reads no test-only environment.
"""

import os
import runpy
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the checkout's resumable package, as `pip install .` would give

from resumable import state  # noqa: E402

if kill_at := os.environ.get("EXAMPLE_KILL_IN_SAVE"):
    write_manifest = state.write_manifest

    def write_manifest_or_die(directory, global_step):
        if global_step == int(kill_at):
            os.kill(os.getpid(), signal.SIGKILL)
        return write_manifest(directory, global_step)

    state.write_manifest = write_manifest_or_die

script = sys.argv[1]
sys.argv = sys.argv[1:]
sys.path.insert(0, str(Path(script).resolve().parent))
runpy.run_path(script, run_name="__main__")
