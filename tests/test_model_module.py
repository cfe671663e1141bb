"""Your own model (--model_module): the shipped plain-PyTorch example trains through ./launch.sh,
survives kill -9 byte-identical, and loads again from the final output."""

import subprocess

from conftest import PYTHON, REPO, file_digest, kill_when, tiny_flags, train

LAUNCH = [str(REPO / "launch.sh")]
EXAMPLE = REPO / "examples" / "tiny_transformer.py"


def own_model_flags(corpus, **overrides):
    return tiny_flags(corpus, config_name=None, model_module=EXAMPLE, max_steps=40, **overrides)


def test_example_model_killed_and_resumed_through_launch_sh_ends_byte_identical(tmp_path, session_env, corpus, reference_runs):
    flags = own_model_flags(corpus)
    reference = reference_runs(flags, launcher=LAUNCH)
    output_dir = tmp_path / "run"
    kill_when(session_env, output_dir, flags, r"step 25/40", launcher=LAUNCH)  # mid-way between saves at 20 and 30
    assert not (output_dir / "model.safetensors").exists()

    resumed = train(session_env, output_dir, flags, launcher=LAUNCH)
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-2000:]
    assert "Resumed from checkpoint (step 20," in resumed.stdout
    assert file_digest(output_dir / "model.safetensors") == file_digest(reference / "model.safetensors")
    assert file_digest(output_dir / "checkpoint-40" / "optimizer.bin") == file_digest(reference / "checkpoint-40" / "optimizer.bin")

    # The final directory builds the model again with its trained weights, in a fresh process.
    probe = (
        "import sys, torch; sys.path.insert(0, %r); from cli.model import load_own_model; from safetensors.torch import load_file\n"
        "model = load_own_model(%r); saved = load_file(%r)\n"
        "assert all(torch.equal(value, saved[name]) for name, value in model.state_dict().items())\n"
        "print(type(model).__name__, model(torch.tensor([[104, 101, 108, 108, 111]])).argmax(-1).tolist())"
    ) % (str(REPO), str(output_dir), str(output_dir / "model.safetensors"))
    loaded = subprocess.run([PYTHON, "-c", probe], capture_output=True, text=True, env=session_env)
    assert loaded.returncode == 0 and loaded.stdout.startswith("TinyTransformer [["), loaded.stderr[-2000:]


def test_a_model_module_without_build_model_is_one_line_and_exit_2(tmp_path, session_env, corpus):
    broken = tmp_path / "my_model.py"
    broken.write_text("import torch\nMODEL = torch.nn.Linear(2, 2)\n")
    result = train(session_env, tmp_path / "run", tiny_flags(corpus, config_name=None, model_module=broken))
    assert result.returncode == 2
    # the last line (the data's progress bars come first when no earlier test of this worker filled the tokenization cache)
    assert result.stderr.strip().splitlines()[-1] == f"error: --model_module {broken}: define build_model(vocab_size, block_size) returning a torch.nn.Module"
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "run").exists()  # nothing written


def test_the_copy_beside_the_final_weights_is_the_code_the_run_built_even_if_the_file_changed(tmp_path):
    import sys

    sys.path.insert(0, str(REPO))
    from cli.config import TrainingConfig
    from cli.model import OWN_MODEL_SOURCE, import_model_module, model_identity, own_model_files

    module_file = tmp_path / "my_model.py"
    module_file.write_text(EXAMPLE.read_text())
    config = TrainingConfig(model_module=str(module_file))
    import_model_module(str(module_file))  # the start of a run: built, then recorded
    recorded = model_identity(config)
    module_file.write_text(EXAMPLE.read_text() + "\n# edited for the next experiment while this run trains\n")
    assert own_model_files(config)[OWN_MODEL_SOURCE] == EXAMPLE.read_text()  # the end of the run
    assert model_identity(config) == recorded
