"""Runs and data that move (another directory, another machine, a backup): content decides, not paths."""

import json
import os
import shutil
import subprocess
import time

import pytest
import torch

from cli import identity
from cli.config import UsageError, compare_with_checkpoint
from resumable import state
from conftest import PYTHON, REPO, file_digest, kill_when, tiny_flags, train

FLAGS = dict(max_train_samples=200, max_steps=40, save_steps=10)


def copy_corpus(corpus, directory):
    directory.mkdir(parents=True, exist_ok=True)
    return shutil.copy(corpus, directory / "corpus.txt")


def test_a_run_moved_with_its_data_resumes_without_allow_config_change_byte_identical(tmp_path, session_env, corpus, reference_runs):
    reference = reference_runs(tiny_flags(corpus, **FLAGS))
    before, after = tmp_path / "before", tmp_path / "after"
    kill_when(session_env, before / "run", tiny_flags(copy_corpus(corpus, before), **FLAGS), "Saved checkpoint-20")
    shutil.copytree(before, after)  # as to another machine: new paths, new inodes
    shutil.rmtree(before)

    result = train(session_env, after / "run", tiny_flags(after / "corpus.txt", **FLAGS))
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"same content at another path): --train_file {before}/corpus.txt → {after}/corpus.txt" in result.stdout
    assert "Resumed from checkpoint (step 20," in result.stdout and "allow_config_change" not in result.stdout
    assert file_digest(after / "run" / "model.safetensors") == file_digest(reference / "model.safetensors")


def test_data_moved_and_touched_resumes_byte_identical_and_one_changed_byte_is_refused(tmp_path, session_env, corpus, reference_runs):
    reference = reference_runs(tiny_flags(corpus, **FLAGS))
    output_dir = tmp_path / "run"
    data = copy_corpus(corpus, tmp_path / "scratch")
    kill_when(session_env, output_dir, tiny_flags(data, **FLAGS), "Saved checkpoint-20")
    checkpoints = {p.name: file_digest(p / "model.safetensors") for p in state.list_checkpoints(output_dir)}

    changed = copy_corpus(corpus, tmp_path / "changed")
    text = bytearray(changed.read_bytes())
    middle = len(text) // 2 + text[len(text) // 2 :].index(b"o")
    text[middle] = ord("0")  # one byte: same size, same path layout
    changed.write_bytes(bytes(text))
    refused = train(session_env, output_dir, tiny_flags(changed, **FLAGS))
    assert refused.returncode == 2
    assert "error: these flags differ from the checkpoint and would change the result:" in refused.stderr
    assert "--data_content" in refused.stderr and "--data_fingerprint" in refused.stderr and "| in checkpoint" in refused.stderr
    assert {p.name: file_digest(p / "model.safetensors") for p in state.list_checkpoints(output_dir)} == checkpoints

    moved = tmp_path / "home" / "corpus.txt"
    moved.parent.mkdir()
    shutil.move(data, moved)
    later = time.time() + 3600
    os.utime(moved, (later, later))  # touched: a new mtime, the same bytes
    result = train(session_env, output_dir, tiny_flags(moved, **FLAGS))
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"same content at another path): --train_file {data} → {moved}" in result.stdout
    assert file_digest(output_dir / "model.safetensors") == file_digest(reference / "model.safetensors")

    report = subprocess.run([PYTHON, str(REPO / "status.py"), "--output_dir", str(output_dir)],
                            env=session_env, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert f"📄 --train_file {moved}: ✅ same content as when checkpoint-40 was saved" in report.stdout, report.stdout
    moved.write_bytes(moved.read_bytes() + b"more\n")
    report = subprocess.run([PYTHON, str(REPO / "status.py"), "--output_dir", str(output_dir)],
                            env=session_env, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert f"📄 --train_file {moved}: ❌ its content changed since checkpoint-40 was saved" in report.stdout, report.stdout


def record_software(checkpoint, **versions):
    """Edit the checkpoint's software.json and rewrite its manifest, so the checkpoint stays valid."""
    path = checkpoint / state.SOFTWARE_NAME
    path.write_text(json.dumps({**json.loads(path.read_text()), **versions}))
    state.write_manifest(checkpoint, state.checkpoint_step(checkpoint))


def test_a_checkpoint_from_another_torch_resumes_with_one_line_and_a_failed_load_names_both_versions(tmp_path, session_env, corpus, reference_runs, interrupted_runs):
    flags = tiny_flags(corpus, **FLAGS)
    reference = reference_runs(flags)
    output_dir = tmp_path / "run"
    interrupted_runs(flags, "Saved checkpoint-20", output_dir)
    checkpoint = output_dir / "checkpoint-20"
    recorded = json.loads((checkpoint / state.SOFTWARE_NAME).read_text())
    assert recorded["torch"] == torch.__version__ and recorded["device_type"] == "cpu" and recorded["device_count"] == os.cpu_count()
    assert set(recorded) == {"python", "torch", "transformers", "accelerate", "datasets", "safetensors", "device_type", "device_count"}

    optimizer = (checkpoint / "optimizer.bin").read_bytes()
    torch.save({"state": {}, "param_groups": []}, checkpoint / "optimizer.bin")  # what another version might not read
    record_software(checkpoint, torch="2.12.0")
    failed = train(session_env, output_dir, flags)
    assert failed.returncode == 2
    line = failed.stderr.strip().splitlines()[-1]
    assert line.startswith("error: checkpoint: checkpoint-20 could not be loaded (ValueError: ")
    assert line.endswith(f"it was written with torch 2.12.0 (now {torch.__version__})")

    (checkpoint / "optimizer.bin").write_bytes(optimizer)
    record_software(checkpoint, torch="2.12.0")
    result = train(session_env, output_dir, flags)
    assert result.returncode == 0, result.stderr[-2000:]
    notes = [line for line in result.stdout.splitlines() if "results may differ" in line]
    assert notes == [f"ℹ️  torch 2.12.0 → {torch.__version__}: results may differ in the last bits"]
    assert file_digest(output_dir / "model.safetensors") == file_digest(reference / "model.safetensors")


def test_content_hash_ignores_the_path_and_a_cached_hash_is_never_used_for_changed_bytes(tmp_path, monkeypatch):
    first, second = tmp_path / "a.txt", tmp_path / "b.txt"
    first.write_bytes(b"the same bytes\n" * 1000)
    shutil.copy(first, second)
    cache = identity.HashCache(tmp_path / "cache.json", racy_seconds=0)
    assert identity.content_hash([first], cache) == identity.content_hash([second], cache)
    cache.save()

    reads = []
    real_hash = identity._hash_file
    monkeypatch.setattr(identity, "_hash_file", lambda path: reads.append(path) or real_hash(path))
    cached = identity.HashCache(tmp_path / "cache.json", racy_seconds=0)
    digest = identity.content_hash([first], cached)
    assert reads == []  # a hit: nothing read

    time.sleep(0.1)  # past the filesystem's timestamp granularity, which racy_seconds=0 does not wait for
    stat = first.stat()
    edited = bytearray(first.read_bytes())
    edited[7] ^= 1
    first.write_bytes(bytes(edited))  # the same size ...
    os.utime(first, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # ... and the old mtime; the ctime still moves
    assert identity.content_hash([first], cached) != digest and len(reads) == 1

    fresh = tmp_path / "fresh.txt"
    fresh.write_bytes(b"just written")
    careful = identity.HashCache(tmp_path / "careful.json")  # modified within 2 s: not kept on disk
    identity.content_hash([fresh], careful)
    careful.save()
    assert not (tmp_path / "careful.json").exists()


def test_a_checkpoint_from_before_content_identities_compares_its_inputs_by_path():

    common = {"seed": 42, "model_config": "{}", "train_file": "/data/a.txt", "tokenizer_name": None, "model_name_or_path": None}
    before = {**common, "data_fingerprint": "path-based"}  # what checkpoints recorded until now
    now = {**common, "data_fingerprint": "content-based", "data_content": "c0ffee", "tokenizer": "t", "model_weights": None}
    notes = compare_with_checkpoint(now, before, allow_change=False)
    assert notes == ["ℹ️  The checkpoint predates content identities: data, tokenizer and model are compared by path this once"]
    with pytest.raises(UsageError, match=r"--train_file +\| /data/a.txt +\| /data/b.txt"):
        compare_with_checkpoint({**now, "train_file": "/data/b.txt"}, before, allow_change=False)


def test_a_model_directory_and_its_tokenizer_are_identified_by_content_not_path(tmp_path, monkeypatch):
    monkeypatch.setattr(identity, "_process_cache", identity.HashCache(tmp_path / "cache.json"))  # not the user's HF_HOME

    class Tokenizer:  # what tokenizer_identity reads of a transformers tokenizer
        vocab_files_names = {"vocab_file": "vocab.json", "merges_file": "merges.txt"}

        def __len__(self):
            return 50257

    first = tmp_path / "first"
    first.mkdir()
    for name, content in [("config.json", b"{}"), ("model.safetensors", b"weights" * 100), ("vocab.json", b"{}"),
                          ("merges.txt", b"a b"), ("tokenizer_config.json", b"{}"), ("README.md", b"ignored")]:  # fmt: skip
        (first / name).write_bytes(content)
    second = tmp_path / "elsewhere" / "second"
    shutil.copytree(first, second)
    (second / "README.md").write_bytes(b"other words")  # not part of the model
    assert identity.model_identity(str(first)) == identity.model_identity(str(second))
    assert identity.tokenizer_identity(Tokenizer(), str(first)) == identity.tokenizer_identity(Tokenizer(), str(second))

    (second / "model.safetensors").write_bytes(b"weightz" * 100)
    (second / "merges.txt").write_bytes(b"a c")
    assert identity.model_identity(str(first)) != identity.model_identity(str(second))
    assert identity.tokenizer_identity(Tokenizer(), str(first)) != identity.tokenizer_identity(Tokenizer(), str(second))
    assert identity.model_identity("gpt2") == "hub:gpt2" and identity.model_identity(None) is None


def test_moved_inputs_are_a_note_and_changed_evaluation_data_is_refused():

    before = {"seed": 42, "data_content": "c0ffee", "validation_content": "beef", "train_file": "/a/t.txt",
              "validation_file": "/a/v.txt", "model_name_or_path": "/a/model", "model_weights": "w", "tokenizer": "t"}  # fmt: skip
    moved = {**before, "train_file": "/b/t.txt", "validation_file": "/b/v.txt", "model_name_or_path": "/b/model"}
    assert compare_with_checkpoint(moved, before, allow_change=False) == [
        "ℹ️  Inputs moved since the checkpoint (same content at another path): --train_file /a/t.txt → /b/t.txt, "
        "--validation_file /a/v.txt → /b/v.txt, --model_name_or_path /a/model → /b/model"
    ]
    with pytest.raises(UsageError, match=r"--validation_content +\| beef +\| f00d"):
        compare_with_checkpoint({**moved, "validation_content": "f00d"}, before, allow_change=False)
    with pytest.raises(UsageError, match=r"--model_weights +\| w +\| other"):
        compare_with_checkpoint({**moved, "model_weights": "other"}, before, allow_change=False)
