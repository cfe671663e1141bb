"""Experiment trackers (--report_to): one continuous tracker run per training run, across every resume.

    Trackers(accelerator, config, progress, checkpoint_state)   start or re-attach the runs (main process)
    Trackers.catch_up(log_history)                              log what a killed run logged but the tracker lost
    Trackers.log(values, step)                                  to every tracker, never a step twice
    check_trackers_can_start(names)                             at start-up, before anything is written: UsageError if one cannot

What "continuous" means for each tracker:

    tensorboard  OUTPUT_DIR/runs. A resume writes a new event file with purge_step = the checkpoint's
                 step + 1: TensorBoard hides the points an interrupted run wrote after its checkpoint,
                 and the resumed run writes those steps again.
    wandb        one run id, chosen at the first start; every start re-attaches to it (id, resume="allow").
                 Offline, every start writes its own offline-run-*-<id> directory; `wandb sync` uploads
                 them into that one run. W&B's rewind (resume_from) needs the server, so it is not used.
    mlflow       one run_id, created at the first start; every start re-opens it (start_run(run_id=...)).

W&B and MLflow cannot take points back (MLflow keeps every point logged at a step: logging a step
again duplicates it). So at every start the run asks the tracker which step it has for each metric:
MLflow its metric histories; W&B online the step the server resumes at, offline the earlier offline
directories of the run. It then logs a metric only at later steps. Resume is exact, so the steps it
skips hold the very values it computes again. What a kill lost before the tracker stored it (W&B
writes its offline file every 15 s) is logged again from log_history, which every checkpoint holds.

On disk:
    OUTPUT_DIR/trackers.json   {"wandb": RUN_ID, "mlflow": RUN_ID}, written durably when a run is created
    tracker_runs               the same ids in trainer_state.json and every checkpoint's copy (durable);
                               a resume takes them from its checkpoint first
"""

from __future__ import annotations

import configparser
import json
import os
import secrets
import struct
from pathlib import Path

from resumable import state
from cli.config import TrainingConfig
from resumable.errors import UsageError
from resumable.state import TrainingState

TRACKERS_NAME = "trackers.json"


class Trackers:
    """The run's trackers. Main process only; on the other ranks every method does nothing.

    A new tracker run is created when this output directory has none yet, or with
    --resume_from_checkpoint none; otherwise every start re-attaches to the same run.
    """

    def __init__(self, accelerator, config: TrainingConfig, progress: TrainingState, checkpoint_state: TrainingState | None):
        self.trackers = []
        self.has = {}  # tracker name -> (step it has per metric, step for metrics not listed); absent: TensorBoard
        if not accelerator.is_main_process or not config.trackers:
            return
        path = Path(config.output_dir) / TRACKERS_NAME
        recorded = {} if config.resume_from_checkpoint == "none" else _read_json(path)
        # The checkpoint's ids are durable; trackers.json also covers a run killed before its first checkpoint.
        run_ids = {**recorded, **(checkpoint_state.tracker_runs if checkpoint_state else {})}
        run_name = config.run_name or Path(config.output_dir).resolve().name
        for name in config.trackers:
            run_id = run_ids.get(name)
            if name == "tensorboard":
                from accelerate.tracking import TensorBoardTracker

                tracker = TensorBoardTracker("runs", config.output_dir, purge_step=progress.global_step + 1)
            elif name == "wandb":
                from accelerate.tracking import WandBTracker

                if run_id is None:  # chosen and recorded before W&B hears of it: a kill during init re-attaches
                    run_ids["wandb"] = secrets.token_hex(4)
                    state.write_json_atomic(path, run_ids)
                tracker = WandBTracker(None, id=run_ids["wandb"], resume="allow", name=run_name)  # project: WANDB_PROJECT or W&B's default
            else:
                from accelerate.tracking import MLflowTracker

                tracker = MLflowTracker("Default", run_id=run_id, run_name=run_name)  # MLFLOW_EXPERIMENT_NAME wins
            tracker.start()
            self.trackers.append(tracker)
            accelerator.trackers.append(tracker)  # accelerator.end_training() finishes it
            if name == "mlflow" and run_id is None:
                run_ids["mlflow"] = tracker.active_run.info.run_id  # MLflow's id exists only now
                state.write_json_atomic(path, run_ids)
            if run_id is None and name != "tensorboard":
                tracker.store_init_configuration(config.result_defining_args())  # once: MLflow refuses to change a param
            if name == "wandb":
                self.has[name] = _steps_wandb_has(tracker.run) if run_id else ({}, -1)
            elif name == "mlflow":
                self.has[name] = _steps_mlflow_has(tracker.active_run.info.run_id) if run_id else ({}, -1)
        progress.tracker_runs = {name: run_id for name, run_id in run_ids.items() if name in ("wandb", "mlflow")}

    def catch_up(self, log_history: list) -> None:
        """Log the entries of log_history (up to the checkpoint) that a tracker does not have."""
        if self.has:
            for entry in log_history:
                self.log(tracker_values(entry), entry["step"], only=("wandb", "mlflow"))

    def log(self, values: dict, step: int, only=None) -> None:
        """Log to every tracker; W&B and MLflow get only the metrics they do not have at this step yet."""
        for tracker in self.trackers:
            if only is not None and tracker.name not in only:
                continue
            if tracker.name in self.has:
                per_metric, otherwise = self.has[tracker.name]
                values_now = {key: value for key, value in values.items() if step > per_metric.get(key, otherwise)}
                if values_now:
                    tracker.log(values_now, step=step)
            else:
                tracker.log(values, step=step)


def check_trackers_can_start(names: list[str]) -> None:
    """Raise UsageError (tracker, cause, fix in one line) if a tracker of --report_to cannot start. Writes nothing.

    Found before the run starts rather than as a traceback at the tracker's start: MLflow 3's default
    store (sqlite:///mlflow.db) needs packages that mlflow-skinny lacks, its file store is refused
    unless MLFLOW_ALLOW_FILE_STORE=true, and W&B online needs a login.
    """
    for name in names:  # each one's package is there: TrainingConfig.validate checked
        if name == "mlflow":
            _check_mlflow_store()
        elif name == "wandb":
            _check_wandb_login()


def _check_mlflow_store() -> None:
    import mlflow
    from mlflow.environment_variables import MLFLOW_ALLOW_FILE_STORE
    from mlflow.tracking._tracking_service.utils import _tracking_store_registry
    from mlflow.utils.uri import get_uri_scheme

    uri = mlflow.get_tracking_uri()  # MLFLOW_TRACKING_URI, else MLflow's default; reading it creates nothing
    where = "MLFLOW_TRACKING_URI" if os.environ.get("MLFLOW_TRACKING_URI") else "MLflow's default store"
    scheme = get_uri_scheme(uri)
    fix = "set MLFLOW_TRACKING_URI to a server (http://HOST:5000), or to file:///DIR with MLFLOW_ALLOW_FILE_STORE=true"
    if scheme in ("sqlite", "postgresql", "mysql", "mssql") and scheme not in _tracking_store_registry._registry:
        raise UsageError(f"--report_to mlflow: {where} {uri} is a database, which mlflow-skinny cannot use: pip install mlflow (the full package), or {fix}")
    if scheme not in _tracking_store_registry._registry:
        raise UsageError(f"--report_to mlflow: {where} {uri} is not a tracking store MLflow knows (schemes: {', '.join(sorted(s for s in _tracking_store_registry._registry if s))}); {fix}")
    if scheme in ("", "file") and not MLFLOW_ALLOW_FILE_STORE.get():
        raise UsageError(f"--report_to mlflow: MLflow 3 refuses its file store ({where} {uri}) unless MLFLOW_ALLOW_FILE_STORE=true: set it, or use a server (http://HOST:5000)")


def _check_wandb_login() -> None:
    settings = configparser.ConfigParser()  # `wandb offline` writes its mode here
    settings.read(Path(os.environ.get("WANDB_CONFIG_DIR", Path.home() / ".config" / "wandb")) / "settings")
    mode = os.environ.get("WANDB_MODE") or settings.get("default", "mode", fallback="online")
    if mode in ("offline", "dryrun", "disabled") or os.environ.get("WANDB_DISABLED", "").lower() in ("true", "1"):
        return
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return
    host = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")
    try:
        from wandb.sdk.lib.wbauth import read_netrc_auth  # where `wandb login` stores the key

        if read_netrc_auth(host=host):
            return
    except ImportError:  # another wandb version: let W&B decide at its start
        return
    raise UsageError("--report_to wandb: W&B is online but not logged in; run `wandb login`, set WANDB_API_KEY, or WANDB_MODE=offline (then `wandb sync`)")


def tracker_values(entry: dict) -> dict:
    """A log_history entry as the trackers show it: train/loss, train/learning_rate, eval/loss, ..."""
    if "loss" in entry:
        return {"train/loss": entry["loss"], "train/learning_rate": entry["learning_rate"]}
    return {key.replace("eval_", "eval/"): value for key, value in entry.items() if key.startswith("eval_")}


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return {}


def _steps_mlflow_has(run_id: str) -> tuple[dict, int]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    metrics = client.get_run(run_id).data.metrics
    return {key: max(point.step for point in client.get_metric_history(run_id, key)) for key in metrics}, -1


def _steps_wandb_has(run) -> tuple[dict, int]:
    """Online: the server's step, below which W&B itself drops points. Offline: what earlier offline directories hold."""
    if not run.offline:
        return {}, run.step - 1
    from wandb.proto import wandb_internal_pb2

    this_run = Path(run.settings.sync_dir)
    steps = {}
    for earlier in this_run.parent.glob(f"offline-run-*-{run.id}/run-{run.id}.wandb"):
        if earlier.parent == this_run:
            continue
        for data in _leveldb_log_records(earlier.read_bytes()):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(data)
            if record.WhichOneof("record_type") == "history":
                row = {item.key or "/".join(item.nested_key): item.value_json for item in record.history.item}
                step = int(json.loads(row.get("_step", "-1")))
                for key in row:
                    steps[key] = max(steps.get(key, -1), step)
    return steps, -1


def _leveldb_log_records(data: bytes):
    """The records of a .wandb file: LevelDB's log format (32 KiB blocks of chunks) after a 7-byte ':W&B' header.

    A file cut short by a kill ends in a partial chunk, which is ignored.
    """
    block, header = 32768, 7
    if data[:4] != b":W&B":
        return
    position, pending = header, b""
    while position + header <= len(data):
        if block - position % block < header:  # a block's tail too short for a chunk header is padding
            position += block - position % block
            continue
        _checksum, length, kind = struct.unpack("<IHB", data[position : position + header])
        if kind == 0 or position + header + length > len(data):
            return
        pending += data[position + header : position + header + length]
        position += header + length
        if kind in (1, 4):  # a FULL or LAST chunk completes a record
            yield pending
            pending = b""
