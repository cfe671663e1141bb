"""The text-training CLI built on the resumable library: flags named as in TrainingArguments, text data, HF models,
LoRA, streaming, trackers. Its entry points stand beside launch.sh (train_loop.py, supervisor.py, status.py,
cleaning.py); only it knows TrainingConfig, and the library (resumable/) imports nothing of it."""
