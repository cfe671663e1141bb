"""The GPU user's switches, on CPU: mixed precision, gradient checkpointing, torch.compile.

Each one: kill -9 between two saves, run the same command again, and the final weights are
byte-identical to those of an uninterrupted run with the same flags. LoRA has its own file.
"""

import json
import subprocess

import pytest

from conftest import PYTHON, REPO, file_digest, kill_when, tiny_flags, train

# 200 blocks / global batch 4 = 50 steps per epoch; 60 steps cross one epoch boundary.
FLAGS = dict(max_train_samples=200, max_steps=60, save_steps=10, logging_steps=1)  # a line per step: kill at any step


def assert_kill_and_resume_is_exact(tmp_path, session_env, reference_runs, flags, kill_at=27, resumed_at=20, weights="model.safetensors"):
    reference = reference_runs(flags)
    output_dir = tmp_path / "run"
    kill_when(session_env, output_dir, flags, rf"step {kill_at}/60")
    resumed = train(session_env, output_dir, flags)
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-2000:]
    assert f"Resumed from checkpoint (step {resumed_at}," in resumed.stdout
    assert file_digest(output_dir / weights) == file_digest(reference / weights)
    return output_dir, reference, resumed


@pytest.mark.slow
def test_bf16_killed_and_resumed_ends_byte_identical(tmp_path, session_env, corpus, reference_runs):
    flags = tiny_flags(corpus, **FLAGS, bf16=True)
    output_dir, reference, resumed = assert_kill_and_resume_is_exact(tmp_path, session_env, reference_runs, flags)
    assert resumed.stdout.startswith("⚙️  single process, device cpu, 1 CPU thread(s) each, mixed precision bf16 (from --bf16)")
    # bf16 autocast really ran: the same run in fp32 has other losses.
    fp32 = reference_runs(tiny_flags(corpus, **FLAGS))
    assert file_digest(fp32 / "model.safetensors") != file_digest(reference / "model.safetensors")


def test_precision_flag_wins_over_the_accelerate_config_and_the_first_line_says_where_it_came_from(tmp_path, session_env, corpus):
    config = tmp_path / "accelerate_config.yaml"
    config.write_text((REPO / "accelerate_config.yaml").read_text().replace("mixed_precision: 'no'", "mixed_precision: bf16"))
    launcher = [PYTHON, "-m", "accelerate.commands.launch", "--quiet", "--config_file", str(config), "--num_processes", "1", str(REPO / "train_loop.py")]
    flags = tiny_flags(corpus, max_steps=1, save_steps=1)
    from_yaml = train(session_env, tmp_path / "yaml", flags, launcher=launcher)
    assert from_yaml.returncode == 0, from_yaml.stderr[-2000:]
    assert "mixed precision bf16 (from accelerate_config.yaml via accelerate launch)" in from_yaml.stdout.splitlines()[0]
    from_flag = train(session_env, tmp_path / "flag", [*flags, "--mixed_precision", "no"], launcher=launcher)
    assert from_flag.returncode == 0, from_flag.stderr[-2000:]
    assert "mixed precision no (from --mixed_precision)" in from_flag.stdout.splitlines()[0]


def test_fp16_on_cpu_is_refused_in_one_line_before_anything_is_written(tmp_path, session_env, corpus):
    result = train(session_env, tmp_path / "run", tiny_flags(corpus, fp16=True))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: fp16 needs a GPU: on CPU Accelerate has no gradient scaler and would silently train in fp32; use --bf16 (or --mixed_precision no) on CPU"
    ]
    assert not (tmp_path / "run").exists()


def test_a_resume_in_another_precision_is_refused(tmp_path, session_env, corpus):
    flags = tiny_flags(corpus, max_steps=2, save_steps=1)
    assert train(session_env, tmp_path / "run", [*flags, "--bf16"]).returncode == 0
    again = train(session_env, tmp_path / "run", [*flags, "--max_steps", "3"])
    assert again.returncode == 2 and "--mixed_precision  | bf16" in again.stderr, again.stderr


def test_the_gradient_scaler_is_saved_in_the_checkpoint_and_restored(tmp_path):
    """What runs on CPU of the GPU's fp16 path: Accelerate's save_state/load_state, through our
    atomic save and strict load, write scaler.pt and restore the scale. A CPU Accelerator has no
    scaler of its own, so one is attached by hand (as Accelerate does on a GPU with fp16)."""
    script = f"""
import sys, torch
sys.path.insert(0, {str(REPO)!r})
from resumable import state
from accelerate import Accelerator
def run(scale):
    accelerator = Accelerator(cpu=True)
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model, optimizer = accelerator.prepare(model, optimizer)
    accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 16)
    accelerator.scaler.scale(torch.ones(()))  # creates the scale tensor, as the first backward does
    if scale is not None:
        accelerator.scaler.update(scale)
    return accelerator, model
accelerator, model = run(1234.0)
saved = state.save_checkpoint(accelerator, model, {str(tmp_path)!r}, state.TrainingState(global_step=7), [], [], {{}})
assert "scaler.pt" in state.json.loads((saved / "manifest.json").read_text())["files"]
accelerator, model = run(None)
assert accelerator.scaler.get_scale() == 2.0 ** 16
state.load_checkpoint(accelerator, saved)
print("restored scale", accelerator.scaler.get_scale())
"""
    result = subprocess.run([PYTHON, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "restored scale 1234.0" in result.stdout


@pytest.mark.slow
def test_gradient_checkpointing_killed_and_resumed_ends_byte_identical(tmp_path, session_env, corpus, reference_runs):
    from cli.config import parse_config
    from cli.model import apply_training_switches, build_model, build_tokenizer

    flags = tiny_flags(corpus, **FLAGS, gradient_checkpointing=True)
    config = parse_config(flags)
    switched, _ = apply_training_switches(build_model(config, build_tokenizer(config), None), config)
    assert switched.is_gradient_checkpointing  # the flag reaches the model
    _, reference, _ = assert_kill_and_resume_is_exact(tmp_path, session_env, reference_runs, flags)
    # Recomputation replays the RNG state, so the result is even that of a run without it.
    assert file_digest(reference / "model.safetensors") == file_digest(reference_runs(tiny_flags(corpus, **FLAGS)) / "model.safetensors")


def weight_names(path):
    from safetensors import safe_open

    with safe_open(str(path), "pt") as handle:
        return sorted(handle.keys())


@pytest.mark.slow
def test_torch_compile_killed_and_resumed_ends_byte_identical_and_writes_plain_keys(tmp_path, session_env, corpus, reference_runs):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    flags = tiny_flags(corpus, **FLAGS, torch_compile=True)
    _, reference, _ = assert_kill_and_resume_is_exact(tmp_path, session_env, reference_runs, flags)
    plain = reference_runs(tiny_flags(corpus, **FLAGS))
    assert file_digest(reference / "model.safetensors") != file_digest(plain / "model.safetensors")  # compiled kernels ran
    for name in ("model.safetensors", "checkpoint-60/model.safetensors"):
        assert weight_names(reference / name) == weight_names(plain / name)  # no `_orig_mod.` prefix
    model = AutoModelForCausalLM.from_pretrained(reference)
    inputs = AutoTokenizer.from_pretrained(reference)("the quick", return_tensors="pt")
    assert model.generate(**inputs, max_new_tokens=5, do_sample=False).shape[1] == inputs["input_ids"].shape[1] + 5


@pytest.mark.slow
@pytest.mark.parametrize("written_with, resumed_with", [("compiled", "plain"), ("plain", "compiled")])
def test_a_checkpoint_resumes_across_compile_and_no_compile(tmp_path, session_env, corpus, reference_runs, written_with, resumed_with):
    import shutil

    from safetensors.torch import load_file

    runs = {"compiled": tiny_flags(corpus, **FLAGS, torch_compile=True), "plain": tiny_flags(corpus, **FLAGS)}
    source = reference_runs(runs[written_with])
    output_dir = tmp_path / "run"
    output_dir.mkdir()
    shutil.copytree(source / "checkpoint-50", output_dir / "checkpoint-50")
    resumed = train(session_env, output_dir, runs[resumed_with])
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-2000:]
    assert "Resumed from checkpoint (step 50," in resumed.stdout
    assert f"--torch_compile {written_with == 'compiled'} → {resumed_with == 'compiled'}" in resumed.stdout
    assert weight_names(output_dir / "model.safetensors") == weight_names(source / "model.safetensors")
    # Ten steps on from step 50, nearer the run that never switched than to step 50 itself: it
    # continued, and did not start over. (Not byte-equal: compiled kernels round differently and
    # compiled dropout draws its masks another way.)
    final, unswitched, start = (load_file(str(p)) for p in (output_dir / "model.safetensors", source / "model.safetensors", source / "checkpoint-50" / "model.safetensors"))
    distance = lambda a, b: max((a[k] - b[k]).abs().max().item() for k in a)  # noqa: E731
    assert distance(final, unswitched) < distance(final, start) / 2
    steps_before = [entry for entry in json.loads((output_dir / "trainer_state.json").read_text())["log_history"] if entry["step"] <= 50]
    assert steps_before == [entry for entry in json.loads((source / "trainer_state.json").read_text())["log_history"] if entry["step"] <= 50]


def test_the_first_step_compilation_included_does_not_count_in_the_deadlines_step_estimate():
    from resumable.stopping import Deadline

    deadline = Deadline(max_time_seconds=100, started_at=0, estimated_save_seconds=1.0)  # margin 1.5 + 3 x step + 2
    deadline.record_step(60.0)  # the first step: torch.compile compiled the model in it
    assert deadline.step_seconds == 0.0 and not deadline.reached(96.0)
    deadline.record_step(0.5)  # an ordinary step counts
    assert deadline.step_seconds == 0.5 and deadline.reached(95.0) and not deadline.reached(94.0)


def test_what_a_resume_compares_old_checkpoints_precision_and_the_lora_base():
    from cli.config import UsageError, compare_with_checkpoint

    identities = {"data_content": "c0ffee"}  # recorded since inputs are compared by content (test_moving.py covers their absence)
    now = {"seed": 42, "mixed_precision": "no", "torch_compile": False, "gradient_checkpointing": False, **identities}
    older = {"seed": 42, **identities}  # written before these flags existed: the same run
    assert compare_with_checkpoint(now, older, allow_change=False) == []
    with pytest.raises(UsageError, match="mixed_precision"):
        compare_with_checkpoint({**now, "mixed_precision": "bf16"}, older, allow_change=False)
    assert "--torch_compile False → True" in compare_with_checkpoint({**now, "torch_compile": True}, older, allow_change=False)[0]

    lora = {**now, "lora": {"r": 8}, "base_model_fingerprint": "aaa"}
    assert compare_with_checkpoint(lora, lora, allow_change=False) == []
    for allow in (False, True):
        with pytest.raises(UsageError, match="the base model is not the one this LoRA run started from"):
            compare_with_checkpoint({**lora, "base_model_fingerprint": "bbb"}, lora, allow_change=allow)
    with pytest.raises(UsageError, match=r"--lora .*\| None"):  # a full-model checkpoint is no LoRA run to continue
        compare_with_checkpoint(lora, now, allow_change=False)
    # --allow_config_change cannot turn LoRA on or off: the weights in the checkpoint would not load.
    with pytest.raises(UsageError, match="holds a whole model trained without LoRA; resume it without --use_lora"):
        compare_with_checkpoint(lora, now, allow_change=True)
    with pytest.raises(UsageError, match="holds only a LoRA adapter; resume it with --use_lora"):
        compare_with_checkpoint(now, lora, allow_change=True)
