"""resumable: training that survives every interruption, in your own Accelerate loop.

    import resumable

    run = resumable.Run(accelerator, "out", max_steps=1000, save_steps=100)
    run.start()                               # resume from the newest verified checkpoint, or start
    for batch in run.batches(train_loader):   # exactly the batches still to train
        ...                                   # your forward, backward, optimizer step
        run.step(loss=loss)                   # count, log, save, stop when asked
    sys.exit(run.finish(model))               # 0 complete, 75 stopped early: run it again

`import resumable` is cheap: torch, accelerate and the rest load when a Run is made. The CLI
(./launch.sh, train_loop.py) is built on the same package; its text-training extras
(transformers, datasets, peft, trackers, object stores) are never imported from here.
"""

from resumable.errors import EXIT_ABORTED, EXIT_DONE, EXIT_FAILED, EXIT_STOPPED_EARLY, EXIT_USAGE, UsageError

__all__ = ["Run", "UsageError", "EXIT_DONE", "EXIT_FAILED", "EXIT_USAGE", "EXIT_STOPPED_EARLY", "EXIT_ABORTED"]


def __getattr__(name):  # PEP 562: Run (and with it torch) is imported on first use, not by `import resumable`
    if name == "Run":
        from resumable.run import Run

        return Run
    raise AttributeError(f"module 'resumable' has no attribute {name!r}")
