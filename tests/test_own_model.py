"""Bring your own model and data: a local pretrained causal LM, a sequence classifier on a CSV, evaluation."""

import csv
import json
import random

import pytest

from conftest import file_digest, kill_when, tiny_flags, train

pytestmark = pytest.mark.slow


@pytest.fixture(scope="session")
def local_causal_lm(tmp_path_factory):
    """A tiny GPT-2 and a byte tokenizer saved with save_pretrained, as a user's own model directory."""
    import torch
    from transformers import ByT5Tokenizer, GPT2Config, GPT2LMHeadModel

    directory = tmp_path_factory.mktemp("my-gpt2")
    config = GPT2Config(vocab_size=384, n_positions=64, n_embd=32, n_layer=2, n_head=2, bos_token_id=1, eos_token_id=1, pad_token_id=0)
    torch.manual_seed(0)  # the same weights whichever tests ran before in this process
    GPT2LMHeadModel(config).save_pretrained(directory)
    ByT5Tokenizer().save_pretrained(directory)
    return directory


WORDS = "the quick brown fox jumps over a lazy dog while training resumes at exact sample".split()


@pytest.fixture(scope="session")
def local_bert_and_csv(tmp_path_factory):
    """A tiny BERT with a word-piece vocabulary, and CSV files whose string labels depend on the text."""
    import torch
    from transformers import BertConfig, BertModel, BertTokenizerFast

    directory = tmp_path_factory.mktemp("my-bert")
    vocabulary = {token: index for index, token in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS])}
    BertTokenizerFast(vocab=vocabulary).save_pretrained(directory)
    config = BertConfig(vocab_size=5 + len(WORDS), hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, max_position_embeddings=64)
    torch.manual_seed(0)  # the same weights whichever tests ran before in this process (pytest-xdist orders them otherwise)
    BertModel(config).save_pretrained(directory)

    rng = random.Random(1)
    files = {}
    for name, rows in (("train", 400), ("validation", 80)):
        path = tmp_path_factory.mktemp("csv") / f"{name}.csv"
        with open(path, "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["sentence", "sentiment"])
            for _ in range(rows):
                words = [rng.choice(WORDS) for _ in range(rng.randint(3, 12))]
                writer.writerow([" ".join(words), "foxy" if "fox" in words else "plain"])
        files[name] = path
    return directory, files


def history(output_dir):
    return json.loads((output_dir / "trainer_state.json").read_text())


def test_causal_lm_from_a_local_directory_with_evaluation_resumes_exactly(tmp_path, session_env, corpus, local_causal_lm, reference_runs):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    flags = tiny_flags(corpus, config_name=None, model_name_or_path=local_causal_lm, max_train_samples=200, max_steps=60,
                       save_steps=10, eval_steps=15, validation_split_percentage=10, metric_for_best_model="eval_loss")  # fmt: skip
    reference = reference_runs(flags)
    output_dir = tmp_path / "run"
    kill_when(session_env, output_dir, flags, r"step 35/60")
    resumed = train(session_env, output_dir, flags)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert file_digest(output_dir / "model.safetensors") == file_digest(reference / "model.safetensors")
    evaluations = [entry for entry in history(output_dir)["log_history"] if "eval_loss" in entry]
    assert [entry["step"] for entry in evaluations] == [15, 30, 45, 60]  # none twice after the resume
    assert evaluations == [entry for entry in history(reference)["log_history"] if "eval_loss" in entry]
    assert all(entry["eval_perplexity"] > 1 for entry in evaluations)
    best = history(output_dir)["best_model_checkpoint"]
    assert (output_dir / best / "manifest.json").is_file()  # kept through rotation

    model = AutoModelForCausalLM.from_pretrained(output_dir)
    tokenizer = AutoTokenizer.from_pretrained(output_dir)
    generated = model.generate(**tokenizer("the fox", return_tensors="pt"), max_new_tokens=4, do_sample=False)
    assert generated.shape[1] == len(tokenizer("the fox")["input_ids"]) + 4


def test_sequence_classifier_on_a_csv_resumes_exactly_and_predicts_the_users_labels(tmp_path, session_env, local_bert_and_csv, reference_runs):
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model_dir, files = local_bert_and_csv
    flags = tiny_flags(files["train"], config_name=None, model_name_or_path=model_dir, task="sequence-classification",
                       text_column="sentence", label_column="sentiment", validation_file=files["validation"], max_steps=80,
                       save_steps=20, save_total_limit=1, eval_steps=10, metric_for_best_model="eval_accuracy",
                       load_best_model_at_end=True, learning_rate=3e-3)  # fmt: skip
    reference = reference_runs(flags)
    output_dir = tmp_path / "run"
    kill_when(session_env, output_dir, flags, r"step 45/80")
    resumed = train(session_env, output_dir, flags)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert file_digest(output_dir / "model.safetensors") == file_digest(reference / "model.safetensors")

    record = history(output_dir)
    evaluations = [entry for entry in record["log_history"] if "eval_accuracy" in entry]
    assert [entry["step"] for entry in evaluations] == list(range(10, 81, 10))
    best = max(evaluations, key=lambda entry: entry["eval_accuracy"])  # the first of equals wins
    assert record["best_model_checkpoint"] == f"checkpoint-{best['step']}" and record["best_metric"] == best["eval_accuracy"]
    assert (output_dir / record["best_model_checkpoint"]).is_dir()  # kept although --save_total_limit 1
    assert best["eval_accuracy"] > 0.8  # "fox" in the text decides the label: learnable

    model = AutoModelForSequenceClassification.from_pretrained(output_dir)
    tokenizer = AutoTokenizer.from_pretrained(output_dir)
    assert model.config.id2label == {0: "foxy", 1: "plain"}
    with torch.no_grad():
        logits = model(**tokenizer(["the quick fox jumps", "a lazy dog"], return_tensors="pt", padding=True)).logits
    assert [model.config.id2label[i] for i in logits.argmax(-1).tolist()] == ["foxy", "plain"]


def test_resume_is_exact_with_data_loading_workers(tmp_path, session_env, corpus, reference_runs):
    flags = tiny_flags(corpus, max_train_samples=200, max_steps=60, save_steps=10, dataloader_num_workers=2)
    reference = reference_runs(flags)
    output_dir = tmp_path / "run"
    kill_when(session_env, output_dir, flags, r"step 35/60")
    assert train(session_env, output_dir, flags).returncode == 0
    assert file_digest(output_dir / "model.safetensors") == file_digest(reference / "model.safetensors")
