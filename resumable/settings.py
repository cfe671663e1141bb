"""The settings that define a run's result, recorded in each checkpoint and compared on resume.

    refuse_changed_settings(changed, before, now, kind, prefix, how_to_go_on)
                            UsageError with a `name | in checkpoint | now` table when any differ

A resumed run whose result-defining settings changed (learning rate, batch size, data) would
silently be a different run; it is refused with the table unless the user allows it knowingly.
The CLI compares its flags (config.py); a library user passes a dict to resumable.Run(settings=...).
"""

from __future__ import annotations

from resumable.errors import UsageError


def refuse_changed_settings(changed: list, before: dict, now: dict, kind: str, prefix: str, how_to_go_on: str) -> None:
    """Raise UsageError listing each name in `changed` with its value in the checkpoint and now; nothing if none."""
    if not changed:
        return
    width = max(len(str(name)) for name in changed) + 2
    column = max(24, *(min(len(str(before.get(name))), 32) + 1 for name in changed))  # a content hash fits
    label = {"flags": "flag"}.get(kind, kind.rstrip("s"))
    rows = "\n".join(f"  {prefix}{name!s:<{width}}| {before.get(name)!s:<{column}}| {now.get(name)}" for name in changed)
    raise UsageError(
        f"these {kind} differ from the checkpoint and would change the result:\n"
        f"  {label:<{width + len(prefix)}}| {'in checkpoint':<{column}}| now\n{rows}\n{how_to_go_on}"
    )
