"""launch.sh's supervisor: resumable.launch's, running train_loop.py.

    python supervisor.py [--retries N] [training flags]     (launch.sh runs this inside .venv)

The training runs as `accelerate launch --config_file accelerate_config.yaml ... train_loop.py [flags]`
with NUM_PROCESSES processes (default 1), on NUM_MACHINES machines; it records its exit code in the
file resumable.launch names in RESUMABLE_EXIT_CODE_FILE. Signals, waiting, the teardown grace, exit codes and
retries: resumable/launch.py's contract, the same one a user's own script gets from
`python -m resumable.launch`.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # the resumable package beside it, wherever python was started

from resumable import launch  # noqa: E402


def run(argv: list[str]) -> int:
    try:
        retries, argv = launch.parse_retries(argv)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return launch.EXIT_USAGE
    # train_loop.py records its exit code itself, when it has decided it (run_cli), in the file named in its environment.
    return launch.supervise([str(HERE / "train_loop.py"), *argv], retries, config_file=str(HERE / "accelerate_config.yaml"), who="launch.sh")


if __name__ == "__main__":
    launch.install_handlers()  # first: until then a signal kills us, but nothing has been started yet
    sys.exit(run(sys.argv[1:]))
