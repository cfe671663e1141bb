"""The GPU user's switches, on CPU: mixed precision, gradient checkpointing, torch.compile.

Each one: kill -9 between two saves, run the same command again, and the final weights are
byte-identical to those of an uninterrupted run with the same flags. LoRA has its own file.
"""

import subprocess

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
import state
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
