"""The real program, killed with SIGKILL at real moments and restarted: the result must not change."""

import json
import shutil
import time

from conftest import SAVE_MODES, Training, file_digest, tiny_flags, train

# 200 blocks / global batch 8 = 25 steps per epoch: 120 steps cross four epoch boundaries.
FLAGS = dict(max_train_samples=200, gradient_accumulation_steps=2, per_device_train_batch_size=4, save_steps=10)


def log_history(output_dir):
    return json.loads((output_dir / "trainer_state.json").read_text())["log_history"]


@SAVE_MODES
def test_kill_9_at_arbitrary_moments_ends_byte_identical(tmp_path, session_env, corpus, reference_runs, save_mode):
    flags = tiny_flags(corpus, **FLAGS)
    reference = reference_runs(flags)  # synchronous saves
    output_dir = tmp_path / "run"
    resumed_from = []
    for kill_after_step in (15, 40, 40, 85):  # the second kill lands soon after a resume
        run = Training(session_env, output_dir, flags + save_mode)
        match = run.wait_for(r"(✅ Resumed from checkpoint \(step (\d+)|🆕 Starting new training)")
        resumed_from.append(int(match.group(2) or 0))
        if kill_after_step > resumed_from[-1]:
            run.wait_for(rf"step {kill_after_step}/120")
            # A background save commits some time after its step; on a busy machine, after the step line we
            # kill at. Without this, the next start may find nothing to resume from, which proves nothing.
            committed = output_dir / f"checkpoint-{kill_after_step // 10 * 10}" / "manifest.json"
            deadline = time.monotonic() + 120
            while not committed.is_file() and time.monotonic() < deadline:
                time.sleep(0.05)
        run.signal_group()
        assert run.finish() == -9
    final = train(session_env, output_dir, flags + save_mode)
    assert final.returncode == 0, final.stderr
    assert resumed_from[0] == 0 and all(step > 0 for step in resumed_from[1:]), resumed_from

    assert file_digest(output_dir / "model.safetensors") == file_digest(reference / "model.safetensors")
    assert file_digest(output_dir / "checkpoint-120" / "model.safetensors") == file_digest(reference / "checkpoint-120" / "model.safetensors")
    history = log_history(output_dir)
    assert [entry["step"] for entry in history] == list(range(5, 121, 5))  # no step twice, none missing
    assert history == log_history(reference)  # same losses and learning rates for the same steps


@SAVE_MODES
def test_kill_inside_a_save_leaves_previous_checkpoint_and_result_unchanged(tmp_path, session_env, corpus, reference_runs, save_mode):
    flags = tiny_flags(corpus, **FLAGS)
    reference = reference_runs(flags)
    output_dir = tmp_path / "run"
    killed = train(session_env, output_dir, flags + save_mode, harness_env={"HARNESS_KILL_IN_SAVE": "30"})
    assert killed.returncode == -9
    assert (output_dir / ".tmp-checkpoint-30").is_dir() and not (output_dir / "checkpoint-30").exists()
    assert (output_dir / "checkpoint-20" / "manifest.json").is_file()

    final = train(session_env, output_dir, flags + save_mode)
    assert final.returncode == 0, final.stderr
    assert "Removed .tmp-checkpoint-30" in final.stdout
    assert "Resumed from checkpoint (step 20, epoch 0.80)" in final.stdout
    assert file_digest(output_dir / "model.safetensors") == file_digest(reference / "model.safetensors")


def checkpoint_names(output_dir):
    return sorted((p.name for p in output_dir.iterdir() if "checkpoint-" in p.name), key=lambda name: (len(name), name))


def test_kill_inside_a_rotation_deletion_leaks_nothing(tmp_path, session_env, corpus, reference_runs):
    flags = tiny_flags(corpus, **{**FLAGS, "max_steps": 60, "save_total_limit": 3})
    reference = reference_runs(flags)
    output_dir = tmp_path / "run"
    # Saving checkpoint-50 rotates checkpoint-20 away; the process dies with two of its files gone.
    killed = train(session_env, output_dir, flags, harness_env={"HARNESS_KILL_IN_DELETE": "20"})
    assert killed.returncode == -9
    assert "💾 Saved checkpoint-40" in killed.stdout and not (output_dir / "checkpoint-20").exists()

    final = train(session_env, output_dir, flags)
    assert final.returncode == 0, final.stderr[-2000:]
    assert "🧹 Removed .deleting-checkpoint-20, left by a deletion that was interrupted" in final.stdout
    assert "Resumed from checkpoint (step 50," in final.stdout
    assert checkpoint_names(output_dir) == ["checkpoint-40", "checkpoint-50", "checkpoint-60"]
    assert file_digest(output_dir / "model.safetensors") == file_digest(reference / "model.safetensors")


def test_a_half_deleted_old_checkpoint_is_removed_by_the_next_rotation(tmp_path, session_env, corpus, reference_runs):
    flags = tiny_flags(corpus, **{**FLAGS, "max_steps": 60, "save_total_limit": 3})
    reference = reference_runs(flags)
    output_dir = tmp_path / "run"
    run = Training(session_env, output_dir, flags)
    run.wait_for(r"Saved checkpoint-30")
    run.signal_group()
    run.finish()
    # What a kill inside a deletion left before deletions were crash-safe: the big files and the manifest gone.
    for name in ("manifest.json", "model.safetensors"):
        (output_dir / "checkpoint-10" / name).unlink()

    final = train(session_env, output_dir, flags)
    assert final.returncode == 0, final.stderr[-2000:]
    assert "Resumed from checkpoint (step 30," in final.stdout
    assert "💾 Saved checkpoint-40 (every --save_steps" in final.stdout
    assert "removed checkpoint-10)" in final.stdout.split("Saved checkpoint-40")[1].splitlines()[0]
    assert checkpoint_names(output_dir) == ["checkpoint-40", "checkpoint-50", "checkpoint-60"]
    assert file_digest(output_dir / "model.safetensors") == file_digest(reference / "model.safetensors")


def test_batches_after_a_resume_are_the_ones_the_uninterrupted_run_took(tmp_path, session_env, corpus):
    flags = tiny_flags(corpus, **{**FLAGS, "max_steps": 60, "save_steps": 7})
    reference_dir, resumed_dir = tmp_path / "reference", tmp_path / "resumed"
    record = {"HARNESS_RECORD_BATCHES": str(tmp_path / "reference.batches")}
    assert train(session_env, reference_dir, flags, harness_env=record).returncode == 0
    record = {"HARNESS_RECORD_BATCHES": str(tmp_path / "resumed.batches")}
    run = Training(session_env, resumed_dir, flags, harness_env=record)
    run.wait_for(r"Saved checkpoint-35")  # mid-epoch: step 35 is step 10 of the second epoch
    run.signal_group()
    run.finish()
    second = train(session_env, resumed_dir, flags, harness_env=record)
    assert second.returncode == 0 and "Resumed from checkpoint (step 35, epoch 1.40)" in second.stdout

    def steps(name):
        lines = (tmp_path / f"{name}.batches.rank0").read_text().splitlines()
        return [line.split("\t") for line in lines]

    expected = dict(steps("reference"))
    assert len(expected) == 60
    resumed = steps("resumed")
    for step, digests in resumed:
        assert digests == expected[step], f"step {step} trained on other samples after the resume"
    assert {step for step, _ in resumed} == set(expected)


def test_finished_run_is_not_trained_again(tmp_path, session_env, corpus, reference_runs):
    flags = tiny_flags(corpus, **FLAGS)
    output_dir = tmp_path / "done"
    shutil.copytree(reference_runs(flags), output_dir)
    before = file_digest(output_dir / "checkpoint-120" / "model.safetensors")
    started = time.monotonic()
    again = train(session_env, output_dir, flags)
    assert again.returncode == 0, again.stderr
    assert "Training is already complete (120 of 120 steps)" in again.stdout
    assert "Saved" not in again.stdout and time.monotonic() - started < 60
    assert file_digest(output_dir / "checkpoint-120" / "model.safetensors") == before


def test_final_model_loads_with_from_pretrained_and_generates(session_env, corpus, reference_runs):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    output_dir = reference_runs(tiny_flags(corpus, **FLAGS))
    model = AutoModelForCausalLM.from_pretrained(output_dir)
    tokenizer = AutoTokenizer.from_pretrained(output_dir)
    inputs = tokenizer("the quick", return_tensors="pt")
    generated = model.generate(**inputs, max_new_tokens=5, do_sample=False)
    assert generated.shape[1] == inputs["input_ids"].shape[1] + 5
    record = json.loads((output_dir / "trainer_state.json").read_text())
    assert record["training_complete"] and record["global_step"] == 120 and record["samples_seen"] == 960
    assert record["epoch"] == 4.8 and record["total_steps"] == 120
    assert sorted(p.name for p in output_dir.glob("checkpoint-*")) == ["checkpoint-100", "checkpoint-110", "checkpoint-120"]
