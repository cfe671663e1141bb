"""--backup_to DEST: checkpoints and the final model copied to storage that outlives the machine.

DEST is a directory (another disk, an NFS home) or an object-store URL, `s3://bucket/prefix`
(S3 and S3-compatible servers through the standard AWS_ENDPOINT_URL; an http:// endpoint is
allowed). `gs://` and `az://` go through the same library and are untested. Credentials come
from the environment's standard chain (obstore: AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY /
AWS_SESSION_TOKEN, web identity, ECS and instance roles; with AWS_PROFILE set and boto3
installed, boto3's chain with profiles) and are never written anywhere by this program.

    url_problem(text)                   why --backup_to TEXT is refused (a secret in it), or None
    Destination(text).probe()           the start-up check: a small write and delete; raises BackupUnavailable
    committed_checkpoints(destination)  names of the checkpoints DEST holds completely (for `clean`)
    restore_newer(...)                  main process, at start: bring DEST's newest committed checkpoint
                                        (and the final model) into OUTPUT_DIR when OUTPUT_DIR has nothing as new
    BackupUploader                      the main process's background copier (its contract below)
    read_status(output_dir)             OUTPUT_DIR/backup_status.json, for `./launch.sh status`

Layout of DEST (the run's own prefix: nothing outside it is ever listed, written or deleted):

    DEST/
      checkpoint-<step>/<files>         the local checkpoint's files, byte for byte
      checkpoint-<step>/manifest.json   uploaded last: the commit. Without it, or with a file whose size
                                        differs from it, the checkpoint does not count
      final-model/<files>, final-model/manifest.json
                                        what OUTPUT_DIR holds at the end (final weights, tokenizer,
                                        trainer_state.json), manifest last, in the same format

Object stores have no rename, so a checkpoint is deleted by removing its manifest first (it stops
counting at once) and its files after. Files left without a manifest (a deletion or an upload cut
short) are removed by the next uploader once a newer checkpoint is committed; an uncommitted
checkpoint newer than every committed one is uploaded again if OUTPUT_DIR still has it, else removed.

The contract of the background upload (BackupUploader, main process only; other ranks never wait):

What it copies. `checkpoint_ready(path)` is called on the main process as soon as a checkpoint is
complete locally, before local rotation can delete it: the checkpoint's files are hard-linked into
OUTPUT_DIR/.backup-staging/<name> (milliseconds; the files never change after their manifest is
written), so the upload reads those exact bytes even after rotation removed the checkpoint.
There is no queue: a newer checkpoint replaces one still waiting, so a DEST that falls behind
skips straight to the newest. `final_ready(output_dir, step)` stages the final model the same way.

When it becomes visible. The worker thread uploads every file, then manifest.json: from then on
the checkpoint counts in DEST. Only then are older ones deleted (newest --backup_total_limit kept,
plus the best checkpoint under --load_best_model_at_end).

How its errors reach the run. A failure (DEST away, a refused request) never stops training: one
warning line when a streak of failures begins, retries with backoff (2 s doubling to 60 s), one
line when DEST is back; the last error is kept in backup_status.json. `wait(timeout)` (end of
training, a stop) returns whether everything handed over is committed; the caller decides.
A kill at any moment leaves at worst files without a manifest in DEST (never counted) and a
staging directory in OUTPUT_DIR, both cleared by the next start.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import threading
import time
from datetime import timedelta
from pathlib import Path
from urllib.parse import urlsplit

import xxhash

from resumable import state

URL_SCHEMES = ("s3", "gs", "az", "abfs", "abfss")  # gs/az: the same library, untested
FINAL_MODEL = "final-model"
STAGING = ".backup-staging"
STATUS_NAME = state.BACKUP_STATUS_NAME
_SECRET_QUERY = re.compile(r"(secret|signature|token|password|credential|key)", re.IGNORECASE)
_RETRY_FIRST, _RETRY_MAX = 2.0, 60.0


class BackupUnavailable(Exception):
    """DEST cannot be used: the message names the cause (no secret in it)."""


class DamagedInDestination(Exception):
    """A committed checkpoint in DEST whose bytes do not match its manifest."""


# --------------------------------------------------------------------------- the destination


def is_url(text: str) -> bool:
    return "://" in text


def url_problem(text: str) -> str | None:
    """Why --backup_to TEXT is refused, or None. A URL must not carry a secret (it would be logged)."""
    if not is_url(text):
        return None if text.strip() else "--backup_to is empty; give a directory or s3://bucket/prefix"
    parts = urlsplit(text)
    if parts.scheme not in URL_SCHEMES:
        return f"--backup_to {parts.scheme}://...: use a directory or s3://bucket/prefix (gs:// and az:// untested)"
    if parts.username or parts.password or "@" in parts.netloc:
        return "--backup_to must not hold credentials (user:secret@); set AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (or a profile) in the environment instead"
    if parts.query and _SECRET_QUERY.search(parts.query):
        return "--backup_to must not hold credentials in its query string; set them in the environment instead"
    if parts.query or parts.fragment:
        return f"--backup_to {parts.scheme}://{parts.netloc}{parts.path}: no ?query or #fragment, please"
    if not parts.netloc:
        return f"--backup_to {text}: name the bucket, e.g. s3://bucket/prefix"
    return None


def _scrub(text: str) -> str:
    """Defence in depth: no secret from the environment in a message, even if a library echoed one."""
    for name in ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ACCESS_KEY_ID"):
        value = os.environ.get(name)
        if value and len(value) >= 4:
            text = text.replace(value, "***")
    return text


def cause(error: BaseException) -> str:
    """A short reason for a failed request: the server's error code and message, else the first line."""
    text = str(error)
    code = re.search(r"<Code>(.*?)</Code>", text)
    message = re.search(r"<Message>(.*?)</Message>", text)
    if code:
        reason = code.group(1) + (f": {message.group(1)}" if message else "")
    else:
        first = text.strip().splitlines()[0] if text.strip() else type(error).__name__
        reason = re.sub(r"^Generic \w+ error: ", "", first)
        server = re.search(r"(https?://[^/\s]+)", text)
        if "error sending request" in text or "onnection refused" in text or "dns error" in text:
            reason = f"cannot reach {server.group(1) if server else 'the server'} (no answer: is the endpoint right and up?)"
        elif "timed out" in text:
            reason = f"{server.group(1) if server else 'the server'} timed out"
    return _scrub(reason[:300])


class Destination:
    """DEST as a flat key space under the run's prefix; every key is relative to it.

    A thin layer over obstore: LocalStore for a directory, S3Store (or GCS/Azure) for a URL.
    """

    def __init__(self, text: str):
        import obstore.store

        self.text = text
        self.local_root = None
        if is_url(text):
            endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or os.environ.get("AWS_ENDPOINT") or ""
            client = {"connect_timeout": timedelta(seconds=10), "timeout": timedelta(seconds=600)}
            if endpoint.startswith("http://"):
                client["allow_http"] = True
            # Few quick retries: our own loop retries with backoff and reports; a request never hangs for minutes.
            retry = {"max_retries": 2, "retry_timeout": timedelta(seconds=20),
                     "backoff": {"init_backoff": timedelta(milliseconds=200), "max_backoff": timedelta(seconds=2), "base": 2}}  # fmt: skip
            extra = {}
            if text.startswith("s3://"):
                extra = self._profile_credentials()
                if not os.environ.get("AWS_REGION") and not os.environ.get("AWS_DEFAULT_REGION"):
                    extra.setdefault("config", {})["region"] = "us-east-1"  # S3-compatible servers ignore it; AWS redirects
            self.store = obstore.store.from_url(text.rstrip("/"), client_options=client, retry_config=retry, **extra)
        else:
            self.local_root = Path(text).expanduser().absolute()
            self.store = None  # created by probe() (LocalStore needs the directory to exist)

    @staticmethod
    def _profile_credentials() -> dict:
        """AWS_PROFILE (~/.aws/config profiles, SSO) needs boto3's chain; obstore's own covers the rest."""
        if not os.environ.get("AWS_PROFILE"):
            return {}
        try:
            from obstore.auth.boto3 import Boto3CredentialProvider
        except ImportError:
            raise BackupUnavailable("AWS_PROFILE is set: pip install boto3 to read profiles (or set AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY)") from None
        return {"credential_provider": Boto3CredentialProvider()}

    def _local_store(self):
        import obstore.store

        if self.store is None:
            self.store = obstore.store.LocalStore(self.local_root)
        return self.store

    def probe(self) -> None:
        """Write and delete one small object; BackupUnavailable (naming the cause) if DEST refuses."""
        import obstore

        key = f".resumable-probe-{os.getpid()}"
        try:
            if self.local_root is not None:
                self.local_root.mkdir(parents=True, exist_ok=True)
                self._local_store()
            obstore.put(self.store, key, b"probe")
            obstore.delete(self.store, key)
        except BackupUnavailable:
            raise
        except Exception as error:  # obstore raises its own classes, OSError subclasses and plain ones
            raise BackupUnavailable(cause(error)) from None

    def listing(self, prefix: str = "") -> dict[str, int]:
        """key -> size of every object under `prefix` (relative to DEST)."""
        import obstore

        if self.local_root is not None:
            self._local_store()
            if prefix and not (self.local_root / prefix).exists():
                return {}
        found = {}
        for batch in obstore.list(self.store, prefix or None, chunk_size=1000):
            for meta in batch:
                found[meta["path"]] = meta["size"]
        return found

    def put_file(self, key: str, path: Path) -> None:
        import obstore

        obstore.put(self._local_store() if self.local_root else self.store, key, Path(path), chunk_size=16 << 20, max_concurrency=8)

    def put_bytes(self, key: str, data: bytes) -> None:
        import obstore

        obstore.put(self._local_store() if self.local_root else self.store, key, data)

    def get_bytes(self, key: str) -> bytes:
        import obstore

        return bytes(obstore.get(self._local_store() if self.local_root else self.store, key).bytes())

    def download(self, key: str, target: Path) -> str:
        """Write the object to `target` (fsynced); returns its XXH3-128, computed as it streams in."""
        import obstore

        digest = xxhash.xxh3_128()
        result = obstore.get(self._local_store() if self.local_root else self.store, key)
        with open(target, "wb") as handle:
            for chunk in result.stream(min_chunk_size=8 << 20):
                digest.update(chunk)
                handle.write(chunk)
            handle.flush()
            os.fsync(handle.fileno())
        return digest.hexdigest()

    def delete(self, keys: list[str]) -> None:
        import obstore

        if keys:
            obstore.delete(self._local_store() if self.local_root else self.store, keys)
        if self.local_root is not None:  # a directory keeps empty folders where an object store has none
            for folder in {(self.local_root / key).parent for key in keys}:
                try:
                    folder.rmdir()
                except OSError:
                    pass  # not empty yet (its manifest went first), or already gone


def startup_problem(text: str) -> str | None:
    """The start-up probe: None if DEST takes a small write, else one line naming DEST and the cause."""
    try:
        Destination(text).probe()
    except BackupUnavailable as refused:
        return f"--backup_to {text} cannot be used: {refused}. Check the bucket or directory and the credentials in the environment"
    return None


def newer_than_the_start(text: str, step: int | None) -> str | None:
    """With --resume_from_checkpoint none (step None) or PATH (its step): a line if DEST holds committed
    checkpoints past it. They would be restored by the next start, and retention would keep them over
    this run's own, so a new run needs a prefix of its own."""
    try:
        names = committed_checkpoints(text)
    except BackupUnavailable as away:
        return f"--backup_to {text} cannot be read ({away})"
    newer = [name for name in _newest_first(names) if step is None or state.checkpoint_step(Path(name)) > step]
    if not newer:
        return None
    return (f"--backup_to {text} holds {', '.join(reversed(newer))} of an earlier run, which the next start would restore; "
            "give this run a --backup_to prefix of its own (or delete them there)")  # fmt: skip


def _as_destination(destination) -> Destination:
    return destination if isinstance(destination, Destination) else Destination(str(destination))


# --------------------------------------------------------------------------- what DEST holds


def _group(listing: dict[str, int]) -> dict[str, dict[str, int]]:
    """Top-level name -> {path inside it: size}, for checkpoint-N and final-model only."""
    groups: dict[str, dict[str, int]] = {}
    for key, size in listing.items():
        top, _, inside = key.partition("/")
        if inside and (state.checkpoint_step(Path(top)) is not None or top == FINAL_MODEL):
            groups.setdefault(top, {})[inside] = size
    return groups


def _committed_manifest(destination: Destination, name: str, files: dict[str, int]) -> dict | None:
    """The manifest if `name` is committed in DEST (manifest there, every file there at its size), else None."""
    if state.MANIFEST_NAME not in files:
        return None
    try:
        manifest = json.loads(destination.get_bytes(f"{name}/{state.MANIFEST_NAME}"))
        listed = manifest["files"]
    except (json.JSONDecodeError, KeyError, TypeError, FileNotFoundError):
        return None
    if any(files.get(path) != entry.get("size") for path, entry in listed.items()):
        return None
    return manifest


def scan(destination) -> tuple[dict[str, dict], dict[str, dict[str, int]]]:
    """(committed: name -> manifest, everything: name -> {file: size}) in DEST."""
    destination = _as_destination(destination)
    groups = _group(destination.listing())
    committed = {}
    for name, files in groups.items():
        manifest = _committed_manifest(destination, name, files)
        if manifest is not None:
            committed[name] = manifest
    return committed, groups


def committed_checkpoints(destination) -> set[str]:
    """Names (`checkpoint-N`) of the checkpoints DEST holds completely: manifest there, every size matching.

    `destination` is the --backup_to text or a Destination. Raises BackupUnavailable if DEST cannot be read.
    """
    try:
        committed, _ = scan(destination)
    except BackupUnavailable:
        raise
    except Exception as error:  # obstore's classes; a missing directory; a refused request
        raise BackupUnavailable(cause(error)) from None
    return {name for name in committed if name != FINAL_MODEL}


def _newest_first(names) -> list[str]:
    return sorted((n for n in names if state.checkpoint_step(Path(n)) is not None), key=lambda n: -state.checkpoint_step(Path(n)))


# --------------------------------------------------------------------------- restore


def _download_checkpoint(destination: Destination, name: str, manifest: dict, output_dir: Path) -> int:
    """Download a committed checkpoint into OUTPUT_DIR/.tmp-checkpoint-N, verify every byte, rename; its size.

    Raises DamagedInDestination naming the file if one does not match the manifest (the temporary
    directory is removed; DEST is untouched). A kill leaves only `.tmp-checkpoint-N` (cleared at start).
    """
    temporary = output_dir / (state.TEMPORARY_PREFIX + name[len(state.CHECKPOINT_PREFIX):])
    final = output_dir / name
    shutil.rmtree(temporary, ignore_errors=True)
    temporary.mkdir()
    total = 0
    try:
        for path, entry in manifest["files"].items():
            target = temporary / path
            target.parent.mkdir(parents=True, exist_ok=True)
            digest = destination.download(f"{name}/{path}", target)
            algorithm = state.CHECKSUM_ALGORITHM
            if entry.get(algorithm) != digest or target.stat().st_size != entry["size"]:
                raise DamagedInDestination(f"{path}: checksum mismatch")
            total += entry["size"]
        (temporary / state.MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n")
        os.replace(temporary, final)
        state._fsync_path(output_dir)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    return total


def _download_final_model(destination: Destination, manifest: dict, output_dir: Path) -> int:
    """The final model's files into OUTPUT_DIR, each verified in a temporary name, then renamed into place."""
    temporary = output_dir / ".tmp-final-model"  # state.clean_leftovers removes it after a kill
    shutil.rmtree(temporary, ignore_errors=True)
    temporary.mkdir()
    total = 0
    for path, entry in manifest["files"].items():
        target = temporary / path
        target.parent.mkdir(parents=True, exist_ok=True)
        if destination.download(f"{FINAL_MODEL}/{path}", target) != entry.get(state.CHECKSUM_ALGORITHM):
            shutil.rmtree(temporary, ignore_errors=True)
            raise DamagedInDestination(f"{FINAL_MODEL}/{path}: checksum mismatch")
        total += entry["size"]
    for path in manifest["files"]:
        (output_dir / path).parent.mkdir(parents=True, exist_ok=True)
        os.replace(temporary / path, output_dir / path)
    shutil.rmtree(temporary, ignore_errors=True)
    return total


def restore_newer(destination_text: str, output_dir: Path) -> list[str]:
    """Main process, under the lock, at start: if DEST's newest committed checkpoint is newer than
    OUTPUT_DIR's newest, download it (verified) and say so; damaged ones are named and passed over,
    never deleted. When DEST holds the final model of that step, it is downloaded too.
    Returns the lines to print. Raises BackupUnavailable if DEST cannot be read."""
    destination = Destination(destination_text)
    output_dir = Path(output_dir)
    notes = []
    try:
        committed, _ = scan(destination)
        local = [p for p in state.list_checkpoints(output_dir) if (p / state.MANIFEST_NAME).is_file()]
        local_step = state.checkpoint_step(local[-1]) if local else -1
        restored = None
        for name in _newest_first(committed):
            if state.checkpoint_step(Path(name)) <= local_step:
                break
            began = time.monotonic()
            try:
                size = _download_checkpoint(destination, name, committed[name], output_dir)
            except DamagedInDestination as damaged:
                notes.append(f"⚠️  {name} in {destination_text} is damaged ({damaged}); passed over (left in place)")
                continue
            seconds = time.monotonic() - began
            notes.append(f"☁️  restored {name} from {destination_text} ({size / 1e6:.1f} MB in {seconds:.1f} s)")
            restored = name
            break
        if restored:
            notes += _restore_best(destination, destination_text, committed, output_dir / restored, output_dir)
        newest_local = restored or (local[-1].name if local else None)
        final = committed.get(FINAL_MODEL)
        if final and newest_local and final.get("global_step") == state.checkpoint_step(Path(newest_local)) and not _final_model_matches(output_dir, final):
            began = time.monotonic()
            try:
                size = _download_final_model(destination, final, output_dir)
            except DamagedInDestination as damaged:
                return notes + [f"⚠️  the final model in {destination_text} is damaged ({damaged}); left in place, written again from the checkpoint"]
            notes.append(f"☁️  restored the final model from {destination_text} ({size / 1e6:.1f} MB in {time.monotonic() - began:.1f} s)")
    except BackupUnavailable:
        raise
    except Exception as error:  # obstore's own classes; a connection lost while downloading
        raise BackupUnavailable(cause(error)) from None
    return notes


def _restore_best(destination, destination_text, committed, checkpoint: Path, output_dir: Path) -> list[str]:
    """--load_best_model_at_end needs the best checkpoint too; bring it if DEST has it and OUTPUT_DIR not."""
    best = state.read_trainer_state(checkpoint / state.TRAINER_STATE_NAME)[0].best_model_checkpoint
    if not best or best == checkpoint.name or (output_dir / best).is_dir() or best not in committed:
        return []
    try:
        size = _download_checkpoint(destination, best, committed[best], output_dir)
    except DamagedInDestination as damaged:
        return [f"⚠️  {best} (the best model) in {destination_text} is damaged ({damaged}); left in place"]
    return [f"☁️  restored {best} (the best model) from {destination_text} ({size / 1e6:.1f} MB)"]


def _final_model_matches(output_dir: Path, manifest: dict) -> bool:
    for path, entry in manifest["files"].items():
        local = Path(output_dir) / path
        if not local.is_file() or local.stat().st_size != entry["size"]:
            return False
        if state._file_checksum(local) != entry.get(state.CHECKSUM_ALGORITHM):
            return False
    return True


# --------------------------------------------------------------------------- the background upload


def _link_tree(files: list[tuple[Path, str]], target: Path) -> None:
    """Hard-link each (source, relative name) into `target` (a copy where linking is refused)."""
    shutil.rmtree(target, ignore_errors=True)
    for source, relative in files:
        destination = target / relative
        destination.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(source, destination)
        except OSError:
            shutil.copy2(source, destination)


def final_model_files(output_dir: Path) -> list[tuple[Path, str]]:
    """(file, name relative to OUTPUT_DIR) of every file of state.final_model_paths, hidden ones left out."""
    output_dir = Path(output_dir)
    found = []
    for top in state.final_model_paths(output_dir):
        for path in [top] if top.is_file() else sorted(top.rglob("*")):
            relative = path.relative_to(output_dir)
            if path.is_file() and not any(part.startswith(".") for part in relative.parts):
                found.append((path, str(relative)))
    return found


class BackupUploader:
    """The main process's background copier to DEST; see the module docstring for its contract."""

    def __init__(self, destination_text: str, output_dir: Path, keep: int, best_checkpoint=lambda: None, say=print):
        self.destination = Destination(destination_text)
        self.text = destination_text
        self.output_dir = Path(output_dir)
        self.staging = self.output_dir / STAGING
        self.keep = keep
        self.best_checkpoint = best_checkpoint  # a function: the name of the best checkpoint now, or None
        self.say = say
        self._condition = threading.Condition()
        self._waiting_checkpoint: Path | None = None  # staged, not yet started
        self._waiting_final: tuple[Path, int] | None = None
        self._busy = False
        self._uploading: Path | None = None  # the staged checkpoint the worker is uploading now
        self._closing = False
        self._failing = False
        self._tidied = False
        self.status = {"destination": destination_text, "newest_committed": None, "newest_local": None, "final_committed": False,
                       "last_error": None, "last_error_at": None, "last_upload_at": None, "uploaded_bytes": 0, "upload_seconds": 0.0}  # fmt: skip
        previous = read_status(self.output_dir) or {}
        if previous.get("destination") == destination_text:
            for key in ("newest_committed", "final_committed", "last_error", "last_error_at", "last_upload_at"):
                self.status[key] = previous.get(key)
        shutil.rmtree(self.staging, ignore_errors=True)  # left by a kill; what it held is re-staged below if needed
        self._thread = threading.Thread(target=self._run, name="backup-upload", daemon=True)
        self._thread.start()

    # ---- the main thread's side

    def checkpoint_ready(self, checkpoint: Path) -> None:
        """A checkpoint is complete locally: stage it (hard links) and hand it over, replacing one still waiting."""
        checkpoint = Path(checkpoint)
        staged = self.staging / checkpoint.name
        with self._condition:
            if staged in (self._waiting_checkpoint, self._uploading):
                return  # handed over already (the worker's start-up check and the loop may both offer it)
        manifest = json.loads((checkpoint / state.MANIFEST_NAME).read_text())
        _link_tree([(checkpoint / name, name) for name in manifest["files"]] + [(checkpoint / state.MANIFEST_NAME, state.MANIFEST_NAME)], staged)
        with self._condition:
            replaced = self._waiting_checkpoint
            self._waiting_checkpoint = staged
            self.status["newest_local"] = checkpoint.name
            self._condition.notify_all()
        if replaced is not None and replaced != staged:
            shutil.rmtree(replaced, ignore_errors=True)  # skipped: a newer one is complete
        self._write_status()

    def final_ready(self, global_step: int) -> None:
        """Training is complete and the final model is in OUTPUT_DIR: stage it with a manifest and hand it over."""
        staged = self.staging / FINAL_MODEL
        files = final_model_files(self.output_dir)
        _link_tree(files, staged)
        state.write_manifest(staged, global_step)
        with self._condition:
            self._waiting_final = (staged, global_step)
            self._condition.notify_all()

    def wait(self, timeout: float) -> bool:
        """True once everything handed over is committed in DEST; False after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        with self._condition:
            while self._waiting_checkpoint is not None or self._waiting_final is not None or self._busy:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._condition.wait(min(left, 1.0))
        return True

    def close(self) -> None:
        with self._condition:
            self._closing = True
            self._condition.notify_all()

    # ---- the worker thread

    def _run(self) -> None:
        delay = _RETRY_FIRST
        while True:
            with self._condition:
                while not self._closing and self._waiting_checkpoint is None and self._waiting_final is None and self._tidied:
                    self._condition.wait()
                if self._closing:
                    return
                job = self._waiting_checkpoint or self._waiting_final
                is_final = job is self._waiting_final
                if is_final:
                    self._waiting_final = None
                elif job is not None:
                    self._waiting_checkpoint = None
                    self._uploading = job
                self._busy = True
            try:
                if not self._tidied:
                    self._tidy()
                if job is not None:
                    self._upload_final(*job) if is_final else self._upload_checkpoint(job)
                if self._failing:
                    self.say(f"☁️  backup to {self.text} works again; it has caught up")
                self._failing = False
                delay = _RETRY_FIRST
                with self._condition:
                    self._busy, self._uploading = False, None
                    self._condition.notify_all()
            except Exception as error:  # any failure of DEST: warn, keep the job unless a newer one came, retry
                reason = cause(error)
                self.status["last_error"], self.status["last_error_at"] = reason, round(time.time(), 1)
                self._write_status()  # `status` shows the error during the wait below
                if not self._failing:
                    self.say(f"⚠️  backup to {self.text} failed ({reason}); training continues, retrying in the background")
                self._failing = True
                with self._condition:
                    self._uploading = None
                    if job is not None:
                        if is_final and self._waiting_final is None:
                            self._waiting_final = job
                        elif not is_final and self._waiting_checkpoint is None:
                            self._waiting_checkpoint = job
                    self._busy = False
                    self._condition.notify_all()
                    self._condition.wait(delay)  # woken early only by close()
                delay = min(delay * 2, _RETRY_MAX)
            self._write_status()

    def _upload_checkpoint(self, staged: Path) -> None:
        if not staged.is_dir():
            return  # replaced by a newer checkpoint after it was taken: nothing of it to upload
        manifest_bytes = (staged / state.MANIFEST_NAME).read_bytes()
        manifest = json.loads(manifest_bytes)
        began, size = time.monotonic(), 0
        for name, entry in manifest["files"].items():
            self.destination.put_file(f"{staged.name}/{name}", staged / name)
            size += entry["size"]
        self.destination.put_bytes(f"{staged.name}/{state.MANIFEST_NAME}", manifest_bytes)  # the commit, last
        self.status["upload_seconds"] = round(time.monotonic() - began, 2)
        self.status["uploaded_bytes"] = size
        self.status["newest_committed"] = staged.name
        self.status["last_upload_at"] = round(time.time(), 1)
        self.status["last_error"] = None
        shutil.rmtree(staged, ignore_errors=True)
        self._retain()

    def _upload_final(self, staged: Path, global_step: int) -> None:
        manifest_bytes = (staged / state.MANIFEST_NAME).read_bytes()
        manifest = json.loads(manifest_bytes)
        committed, groups = scan(self.destination)
        if committed.get(FINAL_MODEL, {}).get("files") != manifest["files"]:  # a rerun after a complete upload skips it
            # The previous final model stops counting before any of its files is replaced.
            self.destination.delete([f"{FINAL_MODEL}/{state.MANIFEST_NAME}"] if state.MANIFEST_NAME in groups.get(FINAL_MODEL, {}) else [])
            for name in manifest["files"]:
                self.destination.put_file(f"{FINAL_MODEL}/{name}", staged / name)
            stale = [f"{FINAL_MODEL}/{name}" for name in groups.get(FINAL_MODEL, {}) if name not in manifest["files"] and name != state.MANIFEST_NAME]
            self.destination.delete(stale)
            self.destination.put_bytes(f"{FINAL_MODEL}/{state.MANIFEST_NAME}", manifest_bytes)
        self.status["final_committed"] = True
        self.status["last_error"] = None
        shutil.rmtree(staged, ignore_errors=True)

    def _tidy(self) -> None:
        """First thing in the worker: finish interrupted deletions and clear partial uploads (or re-upload them)."""
        committed, groups = scan(self.destination)
        steps = [state.checkpoint_step(Path(n)) for n in committed if n != FINAL_MODEL]
        newest = max(steps) if steps else -1
        for name, files in groups.items():
            if name in committed or name == FINAL_MODEL:
                continue
            local = self.output_dir / name
            if state.checkpoint_step(Path(name)) > newest and (local / state.MANIFEST_NAME).is_file():
                continue  # a cut-short upload of a checkpoint OUTPUT_DIR still has: handed over again below
            self.destination.delete([f"{name}/{path}" for path in files])
        self.status["newest_committed"] = _newest_first(n for n in committed if n != FINAL_MODEL)[0] if steps else None
        self.status["final_committed"] = FINAL_MODEL in committed and self.status.get("final_committed", False)
        self._tidied = True
        local = [p for p in state.list_checkpoints(self.output_dir) if (p / state.MANIFEST_NAME).is_file()]
        if local and state.checkpoint_step(local[-1]) > newest:
            with self._condition:
                waiting = self._waiting_checkpoint is not None
            if not waiting:
                self.checkpoint_ready(local[-1])  # OUTPUT_DIR is ahead of DEST (a kill mid-upload, or DEST was away)
        self._retain()

    def _retain(self) -> None:
        """Keep the newest `keep` committed checkpoints (and the best); older ones go, manifest first.
        Files without a manifest older than the newest committed checkpoint (a deletion cut short) go too."""
        committed, groups = scan(self.destination)
        names = _newest_first(n for n in committed if n != FINAL_MODEL)
        if not names:
            return
        kept = set(names[: self.keep]) | ({self.best_checkpoint()} - {None})
        newest_step = state.checkpoint_step(Path(names[0]))
        for name in _newest_first(groups):
            if name in kept or state.checkpoint_step(Path(name)) >= newest_step:
                continue
            files = groups[name]
            if state.MANIFEST_NAME in files:
                self.destination.delete([f"{name}/{state.MANIFEST_NAME}"])  # it stops counting first
            self.destination.delete([f"{name}/{path}" for path in files if path != state.MANIFEST_NAME])

    def _write_status(self) -> None:
        record = {**self.status, "updated_at": round(time.time(), 1)}
        try:
            state.write_json_atomic(self.output_dir / STATUS_NAME, record, durable=False)
        except OSError:
            pass  # a status window only; the next write tries again


def read_status(output_dir: Path) -> dict | None:
    """OUTPUT_DIR/backup_status.json as the uploader last wrote it, or None."""
    try:
        return json.loads((Path(output_dir) / STATUS_NAME).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def describe_status(output_dir: Path) -> list[str]:
    """`./launch.sh status` lines about --backup_to (none when the run never used it)."""
    record = read_status(output_dir)
    if not record:
        return []
    newest, local = record.get("newest_committed"), record.get("newest_local")
    lines = []
    if newest:
        behind = ""
        if local and local != newest:
            gap = (state.checkpoint_step(Path(local)) or 0) - (state.checkpoint_step(Path(newest)) or 0)
            behind = f", {gap} step(s) behind {local}" if gap > 0 else ""
        else:
            behind = ", up to date"
        lines.append(f"   ☁️  backup {record['destination']}: newest {newest}{behind}" + (", final model ✅" if record.get("final_committed") else ""))
    else:
        lines.append(f"   ☁️  backup {record['destination']}: no checkpoint there yet")
    if record.get("last_error"):
        when = time.strftime("%H:%M:%S", time.localtime(record["last_error_at"])) if record.get("last_error_at") else "?"
        lines.append(f"   ⚠️  last backup error ({when}): {record['last_error']}")
    return lines


# --------------------------------------------------------------------------- the run's entry points


def start_uploader(accelerator, backup_to: str | None, output_dir: Path, keep: int, best_checkpoint=lambda: None) -> BackupUploader | None:
    """The uploader on the global main process when backing up to `backup_to`; None elsewhere (other ranks never wait).

    keep: how many committed checkpoints DEST retains; best_checkpoint: a function naming the checkpoint to keep besides them.
    """
    if not backup_to or not accelerator.is_main_process:
        return None
    say = lambda line: print(line, flush=True)  # noqa: E731 (the worker thread's lines)
    return BackupUploader(backup_to, Path(output_dir), keep, best_checkpoint, say)


def wait_at_stop(uploader: BackupUploader | None, timeout: float, timeout_name: str = "--backup_timeout") -> None:
    """A stop (signal, deadline): give the stop's checkpoint up to `timeout` seconds to reach DEST."""
    if uploader is None:
        return
    if uploader.wait(timeout):
        if uploader.status.get("newest_committed"):  # nothing to say when the stop came before the first save
            print(f"☁️  {uploader.status['newest_committed']} is in {uploader.text}", flush=True)
    else:
        print(f"⚠️  the newest checkpoint did not reach {uploader.text} within {timeout_name} {timeout:g} s; it is complete locally", flush=True)
    uploader.close()


def finish(uploader: BackupUploader | None, timeout: float, global_step: int, exit_done: int, exit_failed: int, timeout_name: str = "--backup_timeout") -> int:
    """End of training: the final model and trainer_state.json to DEST; exit_done only once DEST holds them."""
    if uploader is None:
        return exit_done
    uploader.final_ready(global_step)
    if not uploader.wait(timeout):
        uploader.close()
        print(f"error: training is complete locally, but the backup to {uploader.text} is not (not done within {timeout_name} "
              f"{timeout:g} s; last error: {uploader.status.get('last_error') or 'none'}); run the same command again to finish the upload",
              file=sys.stderr, flush=True)  # fmt: skip
        return exit_failed
    uploader.close()
    print(f"☁️  final model and {uploader.status.get('newest_committed')} are in {uploader.text}", flush=True)
    return exit_done
