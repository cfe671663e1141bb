"""--report_to wandb and mlflow: one tracker run per training run, continuous across kills and resumes.

W&B runs offline (its .wandb files are read back here) and MLflow on a local file store: no network.
"""

import json
import os
import re
import signal
import struct
import time

import pytest

from conftest import Training, tiny_flags, train

FLAGS = dict(max_steps=40, save_steps=10, logging_steps=5, report_to="wandb,mlflow")


@pytest.fixture
def tracker_env(tmp_path, session_env, monkeypatch):
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # this process reads the MLflow store too
    return {
        **session_env,
        "WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path / "wandb"), "WANDB_CONFIG_DIR": str(tmp_path / "wandb-config"),
        "WANDB_CACHE_DIR": str(tmp_path / "wandb-cache"), "WANDB_DATA_DIR": str(tmp_path / "wandb-data"),
        "WANDB_SILENT": "true", "WANDB_DISABLE_CODE": "true", "WANDB_DISABLE_GIT": "true",
        "MLFLOW_TRACKING_URI": (tmp_path / "mlruns").as_uri(), "MLFLOW_ALLOW_FILE_STORE": "true",  # MLflow 3 wants it for file:
    }  # fmt: skip


def wandb_runs(wandb_dir):
    """{run id: [(step, {key: value}), ...]} from every offline run directory, in the order they were written."""
    runs = {}
    for path in sorted(wandb_dir.glob("wandb/offline-run-*/run-*.wandb")):  # names start with the start time
        runs.setdefault(path.stem.removeprefix("run-"), []).extend(wandb_runs_in(path))
    return runs


def wandb_runs_in(path):
    """[(step, {key: value}), ...] of one .wandb file."""
    from wandb.proto import wandb_internal_pb2

    rows = []
    for record in leveldb_log_records(path.read_bytes()):
        message = wandb_internal_pb2.Record()
        message.ParseFromString(record)
        if message.WhichOneof("record_type") == "history":
            row = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in message.history.item}
            rows.append((row.pop("_step"), row))
    return rows


def leveldb_log_records(data: bytes):
    """The records of a .wandb file: LevelDB's log format (32 KiB blocks of chunks) after a 7-byte ':W&B' header."""
    block, chunk_header = 32768, 7
    assert data[:4] == b":W&B" and struct.unpack("<H", data[4:6])[0] == 0xBEE1
    position, pending = 7, b""
    while position + chunk_header <= len(data):
        if block - position % block < chunk_header:  # a block's tail too short for a header is padding
            position += block - position % block
            continue
        _checksum, length, kind = struct.unpack("<IHB", data[position:position + chunk_header])
        if kind == 0:
            break
        pending += data[position + chunk_header:position + chunk_header + length]
        position += chunk_header + length
        if kind in (1, 4):  # FULL or LAST chunk: a record is complete
            yield pending
            pending = b""


def mlflow_runs(tracking_uri):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    return {run.info.run_id: run for experiment in client.search_experiments() for run in client.search_runs([experiment.experiment_id])}


def train_losses(output_dir):
    history = json.loads((output_dir / "trainer_state.json").read_text())["log_history"]
    return {entry["step"]: entry["loss"] for entry in history if "loss" in entry}


# W&B writes its offline file every 15 s (WANDB_X_TRANSACTION_LOG_FLUSH_INTERVAL): a kill loses what it logged
# since, and the resumed run must log it again from log_history. Every 600 s: the killed runs leave nothing.
# Every 0.1 s: their points are on disk, and the resumed runs must not log them again.
@pytest.mark.parametrize("wandb_writes_every", ["600", "0.1"])
def test_one_wandb_and_one_mlflow_run_across_two_kills_with_no_step_logged_twice(tmp_path, tracker_env, corpus, wandb_writes_every):
    from mlflow.tracking import MlflowClient

    output_dir = tmp_path / "run"
    flags = tiny_flags(corpus, **FLAGS, run_name="kill-twice")
    tracker_env["WANDB_X_TRANSACTION_LOG_FLUSH_INTERVAL"] = wandb_writes_every
    for killed_at in ("step 25/40", "step 35/40"):  # after checkpoint-20 and -30: the resumes compute 25 and 35 again
        run = Training(tracker_env, output_dir, flags)
        run.wait_for(killed_at)
        # Freeze the training (not W&B's own service process), so the kill lands at this step on a fast
        # machine too, and give the service the time its write interval asks for.
        os.kill(run.process.pid, signal.SIGSTOP)
        time.sleep(2)
        run.signal_group()
        run.finish()
    final = train(tracker_env, output_dir, flags)
    assert final.returncode == 0 and "Resumed from checkpoint (step 30," in final.stdout, final.stdout + final.stderr
    losses = train_losses(output_dir)
    assert sorted(losses) == list(range(5, 41, 5))
    recorded = json.loads((output_dir / "trackers.json").read_text())

    # W&B: three offline run directories (one per start), all the same run.
    runs = wandb_runs(tmp_path / "wandb")
    assert list(runs) == [recorded["wandb"]] and len(list((tmp_path / "wandb").glob("wandb/offline-run-*"))) == 3
    rows = [(step, row) for step, row in runs[recorded["wandb"]] if "train/loss" in row]
    assert [step for step, _ in rows] == list(range(5, 41, 5))  # strictly increasing: no step logged twice
    assert [round(row["train/loss"], 6) for _, row in rows] == [losses[step] for step, _ in rows]
    first_start, second_start, _ = sorted((tmp_path / "wandb").glob("wandb/offline-run-*/run-*.wandb"))
    if wandb_writes_every == "0.1":  # the first run's points are on disk (not the newest, sent just before the kill)
        assert [step for step, row in wandb_runs_in(first_start) if "train/loss" in row][:3] == [5, 10, 15]
    else:  # nothing was on disk: the last start logged them all again, from log_history
        assert wandb_runs_in(first_start) == wandb_runs_in(second_start) == []

    # MLflow: one run, which MLflow would show with a point twice had a step been logged again.
    uri = tracker_env["MLFLOW_TRACKING_URI"]
    (run_id, mlflow_run), = mlflow_runs(uri).items()
    assert run_id == recorded["mlflow"] and mlflow_run.info.run_name == "kill-twice" and mlflow_run.info.status == "FINISHED"
    points = MlflowClient(uri).get_metric_history(run_id, "train/loss")
    assert [point.step for point in points] == list(range(5, 41, 5))
    assert [round(point.value, 6) for point in points] == [losses[point.step] for point in points]
    assert mlflow_run.data.params["learning_rate"] == "0.001"

    # Every checkpoint carries the ids (durable), as does the live trainer_state.json.
    assert json.loads((output_dir / "checkpoint-40" / "trainer_state.json").read_text())["tracker_runs"] == recorded
    assert json.loads((output_dir / "trainer_state.json").read_text())["tracker_runs"] == recorded

    if wandb_writes_every == "600":
        return  # the rest once
    # A fresh output directory, and --resume_from_checkpoint none, each start a new run in both trackers.
    short = tiny_flags(corpus, **{**FLAGS, "max_steps": 5})
    assert train(tracker_env, tmp_path / "other", short).returncode == 0
    assert train(tracker_env, output_dir, [*short, "--resume_from_checkpoint", "none"]).returncode == 0
    other = json.loads((tmp_path / "other" / "trackers.json").read_text())
    again = json.loads((output_dir / "trackers.json").read_text())
    for name in ("wandb", "mlflow"):
        assert len({recorded[name], other[name], again[name]}) == 3
    assert set(wandb_runs(tmp_path / "wandb")) == {recorded["wandb"], other["wandb"], again["wandb"]}
    assert len(mlflow_runs(uri)) == 3


@pytest.mark.parametrize("report_to, package", [("wandb", "wandb"), ("tensorboard,mlflow", "mlflow"), ("all", None)])
def test_a_tracker_that_is_not_installed_is_one_line_and_exit_2_before_anything_is_written(tmp_path, tracker_env, corpus, report_to, package):
    output_dir = tmp_path / "run"
    flags = tiny_flags(corpus, max_steps=5, report_to=report_to)
    result = train(tracker_env, output_dir, flags, harness_env={"HARNESS_HIDE_PACKAGES": "wandb,mlflow"})
    if package is None:  # all: the installed ones, here only TensorBoard
        assert result.returncode == 0, result.stderr
        assert (output_dir / "runs").is_dir() and not (output_dir / "trackers.json").exists()
        return
    assert result.returncode == 2
    assert result.stderr.strip() == f"error: --report_to {package}: the {package} package is not installed; pip install {package}"
    assert not output_dir.exists()


def test_report_to_rejects_unknown_names(tmp_path, tracker_env, corpus):
    result = train(tracker_env, tmp_path / "run", tiny_flags(corpus, report_to="wandb,comet"))
    assert result.returncode == 2 and "--report_to 'wandb,comet': choose none, all, or one or more of tensorboard, wandb, mlflow" in result.stderr


def mlflow_has_a_database_store():
    import importlib.util

    return importlib.util.find_spec("sqlalchemy") is not None  # the full mlflow package, not mlflow-skinny


@pytest.mark.parametrize(
    "tracker, env, message",
    [
        ("mlflow", {"MLFLOW_TRACKING_URI": None}, r"MLflow's default store sqlite:///\S+/mlflow\.db is a database, which mlflow-skinny cannot use: pip install mlflow \(the full package\), or set MLFLOW_TRACKING_URI"),
        pytest.param("mlflow", {"MLFLOW_ALLOW_FILE_STORE": None}, r"MLflow 3 refuses its file store \(MLFLOW_TRACKING_URI file://\S+/mlruns\) unless MLFLOW_ALLOW_FILE_STORE=true: set it, or use a server", marks=pytest.mark.quick),
        ("mlflow", {"MLFLOW_TRACKING_URI": "mlfow+typo://host/x"}, r"MLFLOW_TRACKING_URI mlfow\+typo://host/x is not a tracking store MLflow knows \(schemes: .*file.*http.*\); set MLFLOW_TRACKING_URI to a server"),
        ("wandb", {"WANDB_MODE": "online", "WANDB_API_KEY": None}, r"W&B is online but not logged in; run `wandb login`, set WANDB_API_KEY, or WANDB_MODE=offline"),
    ],
    ids=["mlflow-default-sqlite-store", "mlflow-file-store-not-allowed", "mlflow-unknown-uri", "wandb-online-no-login"],
)
def test_a_tracker_that_cannot_start_is_one_line_and_exit_2_before_anything_is_written(tmp_path, tracker_env, corpus, tracker, env, message):
    if "MLflow's default store" in message and mlflow_has_a_database_store():
        pytest.skip("the full mlflow package is installed: its default store works")
    run_env = {**tracker_env, "NETRC": str(tmp_path / "no-netrc")}  # no W&B login from this machine's ~/.netrc
    for name, value in env.items():
        run_env.pop(name, None) if value is None else run_env.update({name: value})
    output_dir = tmp_path / "run"
    result = train(run_env, output_dir, tiny_flags(corpus, max_steps=5, report_to=tracker))
    assert result.returncode == 2, result.stderr[-2000:]
    [line] = result.stderr.strip().splitlines()
    assert re.fullmatch(rf"error: --report_to {tracker}: {message}.*", line), line
    assert not output_dir.exists() and not (tmp_path / "mlruns").exists() and not (tmp_path / "wandb").exists()
