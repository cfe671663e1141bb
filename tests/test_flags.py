"""One way to say yes: every boolean flag takes --flag, --flag true and --flag false, as TrainingArguments does.
And flags are checked before the slow imports."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest
from conftest import REPO, tiny_flags, train

from cli.config import LR_SCHEDULER_TYPES, TrainingConfig, UsageError, parse_config

BOOLEAN_FLAGS = [field.name for field in dataclasses.fields(TrainingConfig) if field.type in ("bool", "bool | None")]


def test_the_boolean_flags_are_the_ones_users_know():
    assert {"bf16", "fp16", "streaming", "use_lora", "async_save", "greater_is_better", "allow_config_change"} <= set(BOOLEAN_FLAGS)


@pytest.mark.parametrize("name", BOOLEAN_FLAGS)
def test_every_boolean_flag_takes_nothing_true_or_false(name):
    default = getattr(TrainingConfig(), name)
    assert getattr(parse_config([]), name) is default
    assert getattr(parse_config([f"--{name}"]), name) is True
    for word, meaning in [("true", True), ("True", True), ("yes", True), ("1", True), ("false", False), ("False", False), ("no", False), ("0", False)]:
        assert getattr(parse_config([f"--{name}", word]), name) is meaning, word
    with pytest.raises(UsageError, match=rf"argument --{name}: takes true or false, or nothing for true \(got 'maybe'\)"):
        parse_config([f"--{name}", "maybe"])


def test_a_bare_boolean_flag_does_not_swallow_the_next_flag():
    config = parse_config(["--bf16", "--async_save", "--max_steps", "5", "--streaming"])
    assert (config.bf16, config.async_save, config.max_steps, config.streaming) == (True, True, 5, True)


@pytest.mark.quick
def test_a_bad_boolean_value_gets_one_line_and_exit_2_with_nothing_written(tmp_path, session_env, corpus):
    output_dir = tmp_path / "out"
    result = train(session_env, output_dir, tiny_flags(corpus) + ["--async_save", "maybe"])
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == "error: argument --async_save: takes true or false, or nothing for true (got 'maybe')"
    assert "Traceback" not in result.stderr
    assert not output_dir.exists()


def test_the_scheduler_names_are_transformers_and_a_wrong_one_is_refused_before_torch_is_imported(tmp_path):
    from transformers.trainer_utils import SchedulerType

    assert LR_SCHEDULER_TYPES == tuple(kind.value for kind in SchedulerType)
    probe = "\n".join([
        "import sys; from cli import config",
        f"try: config.parse_config(['--output_dir', {str(tmp_path / 'out')!r}, '--lr_scheduler_type', 'cosin']).validate()",
        "except config.UsageError as error: print(error)",
        "print(sorted(name for name in ('torch', 'transformers', 'datasets') if name in sys.modules))",
    ])  # fmt: skip
    result = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.stdout.splitlines() == [f"--lr_scheduler_type 'cosin': choose one of {', '.join(LR_SCHEDULER_TYPES)}", "[]"], result.stderr
