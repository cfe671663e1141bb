"""How many threads each training process computes with, for the run's first line."""

import os


def threads_per_process_text() -> str:
    """E.g. '2 threads per process (OMP_NUM_THREADS=2)' or '2 threads per process (torch's default)'.

    torch reads OMP_NUM_THREADS when it starts, so the count it reports is the one in use; naming
    the source tells a user where a 1 came from (before launch.sh set it, `accelerate launch` did).
    """
    import torch

    count = torch.get_num_threads()
    source = f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']}" if os.environ.get("OMP_NUM_THREADS") else "torch's default"
    return f"{count} thread{'s' if count != 1 else ''} per process ({source})"
