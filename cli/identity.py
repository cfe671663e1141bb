"""What a run's inputs are, by content: the same bytes are the same input wherever they live.

A checkpoint records these identities in its training_args.json, and a resume compares them,
so data, a tokenizer or a pretrained model moved to another directory (node-local $TMPDIR
under SLURM, scratch to home, a restored backup) resumes, while changed bytes are refused.

    content_hash(paths)           XXH3-128 of the files' bytes, in order; names and places ignored
    tokenizer_identity(...)       the tokenizer's class, size and the bytes of its files
    model_identity(path)          a --model_name_or_path directory's config and weight files
    model_config_text(path)       the model config's JSON text (a file, or DIR/config.json)

Hashing a file costs one read of it (BENCHMARKS.md: ~0.1 s per GB from the page cache), so
each file's hash is kept in HF_HOME/resumable/content-hashes.json, keyed by the file's real
path, device, inode, size, mtime and ctime. Any write to the file changes its ctime (which
no user tool can set back), so a changed file is always hashed again. A hash is only kept if
the file did not change while it was read and was last modified more than two seconds
before: a write within the filesystem's timestamp resolution could otherwise go unseen.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import xxhash

_READ_CHUNK = 8 << 20
_RACY_SECONDS = 2.0  # coarser than any common filesystem's mtime resolution (FAT: 2 s)
_CACHE_ENTRIES = 1000  # the newest ones are kept; an evicted file is simply hashed again


def cache_path() -> Path:
    from huggingface_hub import constants

    return Path(constants.HF_HOME) / "resumable" / "content-hashes.json"


def _file_key(stat: os.stat_result) -> list:
    return [stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns]


def _hash_file(path: Path) -> str:
    digest = xxhash.xxh3_128()
    buffer = bytearray(_READ_CHUNK)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as handle:
        while count := handle.readinto(buffer):
            digest.update(view[:count])
    return digest.hexdigest()


class HashCache:
    """File hashes already computed, valid only while the file's key (inode, size, times) is unchanged."""

    def __init__(self, path: Path | None = None, writable: bool = True, racy_seconds: float = _RACY_SECONDS):
        self.path = path or cache_path()
        self.writable = writable
        self.racy_ns = racy_seconds * 1e9
        self.changed = False
        self.this_process = {}  # also the hashes too fresh to keep on disk, for a second look by this process
        try:
            self.entries = json.loads(self.path.read_text())
        except (OSError, ValueError):  # none yet, or damaged: a cache only saves time, so start empty
            self.entries = {}
        if not isinstance(self.entries, dict):
            self.entries = {}

    def file_hash(self, path: Path) -> str:
        real = os.path.realpath(path)
        before = os.stat(real)
        for entries in (self.this_process, self.entries):
            entry = entries.get(real)
            if isinstance(entry, dict) and entry.get("key") == _file_key(before) and isinstance(entry.get("xxh3_128"), str):
                return entry["xxh3_128"]
        started_ns = time.time_ns()
        digest = _hash_file(Path(real))
        after = os.stat(real)
        if _file_key(after) != _file_key(before):
            return digest  # written while we read it: not worth remembering
        self.this_process[real] = {"key": _file_key(after), "xxh3_128": digest}
        if max(after.st_mtime_ns, after.st_ctime_ns) < started_ns - self.racy_ns:
            self.entries.pop(real, None)  # re-inserted last: the newest entries survive the trim
            self.entries[real] = self.this_process[real]
            self.changed = True
        return digest

    def save(self) -> None:
        """Write the cache atomically; a failure to write it costs only time on the next start."""
        if not (self.writable and self.changed):
            return
        entries = dict(list(self.entries.items())[-_CACHE_ENTRIES:])
        temporary = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            temporary.write_text(json.dumps(entries))
            os.replace(temporary, self.path)  # concurrent writers: the last one wins, each file is whole
        except OSError:
            temporary.unlink(missing_ok=True)
        self.changed = False


_process_cache = None


def content_hash(paths, cache: HashCache | None = None) -> str:
    """XXH3-128 of the files' contents in the given order: equal for equal bytes, whatever the paths.

    Without `cache`, the process's own cache (read from HF_HOME once) is used and saved.
    """
    global _process_cache
    if cache is None:
        _process_cache = _process_cache or HashCache()
        cache = _process_cache
    digests = [cache.file_hash(Path(path)) for path in paths]
    cache.save()
    if len(digests) == 1:
        return digests[0]
    return xxhash.xxh3_128("\n".join(digests).encode()).hexdigest()


# Files that define a tokenizer (transformers' names); a directory may hold any subset of them.
_TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "vocab.json",
    "vocab.txt", "merges.txt", "spiece.model", "sentencepiece.bpe.model", "tokenizer.model", "chat_template.jinja",
)  # fmt: skip


def tokenizer_identity(tokenizer, source: str | None) -> str:
    """Class, size and the bytes of the tokenizer's files; a hub id stands for itself."""
    described = f"{type(tokenizer).__name__}:{len(tokenizer)}"
    if source is None:
        return f"{described}:built-in"
    if not Path(source).is_dir():
        return f"{described}:hub:{source}"
    names = sorted(set(_TOKENIZER_FILES) | set(getattr(tokenizer, "vocab_files_names", {}).values()))
    present = [name for name in names if (Path(source) / name).is_file()]
    files = content_hash([Path(source) / name for name in present]) if present else "no files"
    return f"{described}:{','.join(present)}:{files}"


_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".h5", ".msgpack")


def model_identity(path: str | None) -> str | None:
    """A pretrained model directory's config.json and weight files, by content; a hub id stands for itself."""
    if path is None:
        return None
    directory = Path(path)
    if not directory.is_dir():
        return f"hub:{path}"
    files = sorted(
        file for file in directory.iterdir()
        if file.is_file() and (file.name == "config.json" or file.name.endswith(".index.json") or file.suffix in _WEIGHT_SUFFIXES)
    )  # fmt: skip
    return ",".join(file.name for file in files) + ":" + content_hash(files)


def model_config_text(path: str) -> str:
    """The model config's JSON text: the file, a directory's config.json, or a hub id itself."""
    file = Path(path) / "config.json" if Path(path).is_dir() else Path(path)
    return file.read_text() if file.is_file() else path
