"""LoRA (--use_lora): checkpoints hold only what trains, kill -9 and resume is exact, the base
model is checked on resume, and the final adapter (and --merge_lora model) load and generate."""

import json

import pytest
from safetensors import safe_open

from conftest import file_digest, tiny_flags, train
from test_gpu_switches import FLAGS, assert_kill_and_resume_is_exact

pytestmark = pytest.mark.slow  # each runs 3 trainings (~20 s of CPU, minutes on a shared machine)


@pytest.fixture()
def local_gpt2(tmp_path):
    """A tiny pretrained GPT-2 with a byte tokenizer, as a user's own model directory."""
    from transformers import ByT5Tokenizer, GPT2Config, GPT2LMHeadModel

    directory = tmp_path / "my-gpt2"
    config = GPT2Config(vocab_size=384, n_positions=64, n_embd=32, n_layer=2, n_head=2, bos_token_id=1, eos_token_id=1, pad_token_id=0)
    GPT2LMHeadModel(config).save_pretrained(directory)
    ByT5Tokenizer().save_pretrained(directory)
    return directory


def tensor_names(path):
    with safe_open(str(path), "pt") as handle:
        return sorted(handle.keys())


def test_lora_killed_and_resumed_ends_byte_identical_and_checkpoints_hold_only_the_adapter(tmp_path, session_env, corpus, reference_runs):
    flags = tiny_flags(corpus, **FLAGS, use_lora=True)
    output_dir, reference, _ = assert_kill_and_resume_is_exact(tmp_path, session_env, reference_runs, flags, weights="adapter_model.safetensors")
    assert not (output_dir / "model.safetensors").exists()  # the final output is the adapter

    names = tensor_names(output_dir / "checkpoint-60" / "model.safetensors")
    assert names and all(".lora_A." in name or ".lora_B." in name for name in names), names
    assert len(names) == 2 * 2  # A and B for c_attn in each of the 2 layers (peft's default target for GPT-2)
    assert file_digest(output_dir / "checkpoint-60" / "model.safetensors") == file_digest(reference / "checkpoint-60" / "model.safetensors")
    assert file_digest(output_dir / "checkpoint-60" / "optimizer.bin") == file_digest(reference / "checkpoint-60" / "optimizer.bin")


def test_lora_on_a_local_model_loads_with_peft_and_merged_loads_with_from_pretrained(tmp_path, session_env, corpus, local_gpt2):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    flags = tiny_flags(corpus, config_name=None, model_name_or_path=local_gpt2, max_steps=30, save_steps=10,
                       use_lora=True, merge_lora=True, lora_r=4, lora_target_modules="c_attn,c_proj", learning_rate=1e-2)  # fmt: skip
    output_dir = tmp_path / "run"
    result = train(session_env, output_dir, flags)
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads((output_dir / "adapter_config.json").read_text())["r"] == 4

    tokenizer = AutoTokenizer.from_pretrained(output_dir)
    inputs = tokenizer("the quick", return_tensors="pt")
    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(local_gpt2), output_dir).eval()
    merged = AutoModelForCausalLM.from_pretrained(output_dir / "merged").eval()
    base = AutoModelForCausalLM.from_pretrained(local_gpt2).eval()
    with torch.no_grad():
        adapted_logits, merged_logits, base_logits = (m(**inputs).logits for m in (adapted, merged, base))
    assert torch.allclose(adapted_logits, merged_logits, atol=1e-4)  # the merge is the adapter, folded in
    assert not torch.allclose(adapted_logits, base_logits, atol=1e-3)  # and the adapter learned something
    generated = merged.generate(**inputs, max_new_tokens=5, do_sample=False)
    assert generated.shape[1] == inputs["input_ids"].shape[1] + 5

    # The base model changes under the adapter: a resume is refused, even with --allow_config_change.
    from transformers import GPT2LMHeadModel

    torch.manual_seed(1)
    GPT2LMHeadModel(base.config).save_pretrained(local_gpt2)
    for extra in ([], ["--allow_config_change"]):
        again = train(session_env, output_dir, [*flags, "--max_steps", "40", *extra])
        assert again.returncode == 2, again.stderr[-2000:]
        assert "error: the base model is not the one this LoRA run started from" in again.stderr
    assert sorted(p.name for p in output_dir.glob("checkpoint-*")) == ["checkpoint-10", "checkpoint-20", "checkpoint-30"]
