"""The documentation says what the program does: the README and docs/ are checked against the program.

- `--help` of train_loop.py, ./launch.sh, ./launch.sh status and ./launch.sh clean prints the flags and exits 0
  (the real commands, in subprocesses; they are most of this file's time).
- Every flag those print, and every ./launch.sh subcommand, is named in README.md or an English page of docs/.
- Every `--flag` the README or docs/ names exists: in those --help outputs, in the argparse flags of
  examples/*.py and bench/*.py, in tests/run.sh's options, or in EXTERNAL_FLAGS below (other programs' flags,
  listed by hand). Link targets are left out: an anchor such as #--streaming-a-2-gb-corpus is no flag.
- Every relative link in README.md, BENCHMARKS.md and docs/ resolves: the file exists, and a #anchor is a
  heading of that file by GitHub's rule (lowercase; punctuation and emoji dropped; spaces to hyphens; a
  repeated heading gets -1, -2, ...).
- Every line the docs say the program prints occurs in its source. The markup: a fenced block opened with
  ```text prints holds such lines, one per line (any page; docs/troubleshooting.md and the Chinese guide have
  them). In a quoted line, `<...>`, `{...}` and `...` stand for what the program fills in. The rule: a leading
  `error: ` is checked on its own (train_loop.py, status.py and cleaning.py put it before the message); the rest
  is cut at the placeholders, and each piece (stripped; pieces of under 4 characters, like `); `, are skipped)
  must occur whole in one string constant of the program: a plain string, or the text between two `{}` of an
  f-string (implicitly joined strings count as one), in the Python files of the repository's top level and
  resumable/, or a line of launch.sh or slurm/*.sbatch. A line needs one piece of 12 characters or more, so
  a line of placeholders cannot pass. So where the program fills in a value, the quote must have a placeholder.
- The README stays a five-minute read: at most 2,500 words, no line over 300 characters outside code blocks,
  and it shows the test command .ci/run runs.
"""

from __future__ import annotations

import ast
import dataclasses
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO

from cli.config import TrainingConfig

README = REPO / "README.md"
PAGES = sorted((REPO / "docs").rglob("*.md"))
ENGLISH = [README, *(page for page in PAGES if ".zh-" not in page.name)]
# Other programs' flags the docs name: accelerate launch, sbatch, pip and pytest. Keep this list short.
EXTERNAL_FLAGS = {
    "--config_file", "--num_processes", "--multi_gpu", "--num_machines", "--machine_rank", "--main_process_ip", "--main_process_port",  # accelerate launch
    "--signal", "--requeue", "--open-mode", "--nodes", "--ntasks", "--ntasks-per-node", "--gres", "--export",  # sbatch
    "--dist",  # pytest-xdist
    "--logdir",  # tensorboard
}  # fmt: skip
FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9_]*(?:-[a-z0-9_]+)*")
HELP_COMMANDS = {
    "train_loop": [sys.executable, "train_loop.py", "--help"],
    "launch.sh": ["./launch.sh", "--help"],
    "status": ["./launch.sh", "status", "--help"],
    "clean": ["./launch.sh", "clean", "--help"],
}


@pytest.fixture(scope="module")
def help_outputs():
    """Each command's (exit code, stdout, stderr) for --help, started together: they are independent."""
    running = {name: subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for name, command in HELP_COMMANDS.items()}
    outputs = {}
    for name, process in running.items():
        stdout, stderr = process.communicate(timeout=180)
        outputs[name] = (process.returncode, stdout, stderr)
    return outputs


def without_code(text: str) -> str:
    """The text outside fenced code blocks."""
    return re.sub(r"^```.*?^```[^\n]*$", "", text, flags=re.S | re.M)


def without_link_targets(text: str) -> str:
    return re.sub(r"\]\([^)]*\)", "]", text)


def named_flags(text: str) -> set[str]:
    return set(FLAG.findall(without_link_targets(text)))


def argparse_flags(paths) -> set[str]:
    return {flag for path in paths for flag in re.findall(r"add_argument\(\s*[\"'](--[\w-]+)", path.read_text())}


@pytest.mark.quick
@pytest.mark.parametrize("name", list(HELP_COMMANDS))
def test_help_prints_the_flags_and_exits_0(help_outputs, name):
    code, stdout, stderr = help_outputs[name]
    assert code == 0, stderr
    assert "Traceback" not in stderr
    if name in ("train_loop", "launch.sh"):
        for field in dataclasses.fields(TrainingConfig):
            assert f"--{field.name}" in stdout, field.name
        assert "~30 % more compute" in " ".join(stdout.split())  # the help text that once broke argparse's formatting
    if name == "launch.sh":
        assert "--retries" in stdout and "./launch.sh status" in stdout and "./launch.sh clean" in stdout
    else:
        assert "--output_dir" in stdout


@pytest.mark.quick
def test_every_flag_and_subcommand_is_documented(help_outputs):
    documented = "\n".join(page.read_text() for page in ENGLISH)
    flags = set().union(*(FLAG.findall(help_outputs[name][1]) for name in HELP_COMMANDS)) - {"--help"}
    undocumented = sorted(flag for flag in flags if not re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", documented))
    assert not undocumented, f"flags in --help that README.md and docs/ never name: {undocumented}"
    subcommands = set(re.findall(r"\./launch\.sh ([a-z][\w-]*)", help_outputs["launch.sh"][1]))
    assert {"status", "clean", "setup"} <= subcommands
    assert not [sub for sub in subcommands if f"./launch.sh {sub}" not in documented]


@pytest.mark.quick
def test_every_flag_the_docs_name_exists(help_outputs):
    known = set().union(*(FLAG.findall(help_outputs[name][1]) for name in HELP_COMMANDS))
    known |= argparse_flags([*REPO.glob("examples/*.py"), *REPO.glob("bench/*.py")])
    known |= set(re.findall(r'"(--[a-z]+)"', (REPO / "tests" / "run.sh").read_text()))
    known |= EXTERNAL_FLAGS
    unknown = {f"{page.relative_to(REPO)}: {flag}" for page in [README, *PAGES] for flag in named_flags(page.read_text()) - known}
    assert not unknown, f"flags named in the docs that nothing takes: {sorted(unknown)}"


def github_slug(heading: str) -> str:
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip().lower())  # a link in a heading keeps its text
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    for heading in re.findall(r"^#{1,6} (.+)$", without_code(path.read_text()), flags=re.M):
        slug = github_slug(heading)
        seen[slug] = seen.get(slug, -1) + 1
        yield slug if seen[slug] == 0 else f"{slug}-{seen[slug]}"


@pytest.mark.quick
def test_every_relative_link_resolves():
    broken = []
    for page in [README, REPO / "BENCHMARKS.md", *PAGES]:
        text = re.sub(r"`[^`\n]*`", "", without_code(page.read_text()))  # inline code holds no links
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+:", target):
                continue  # https:, mailto:
            path, _, anchor = target.partition("#")
            resolved = (page.parent / path).resolve() if path else page
            if not resolved.exists():
                broken.append(f"{page.relative_to(REPO)}: {target} (no such file)")
            elif anchor and (resolved.suffix != ".md" or anchor not in set(anchors(resolved))):
                broken.append(f"{page.relative_to(REPO)}: {target} (no such heading)")
    assert not broken, broken


def program_strings() -> list[str]:
    """Every string constant of the program, cut at f-string placeholders; and each line of its shell scripts."""
    pieces = []
    for path in [*REPO.glob("*.py"), *REPO.glob("resumable/*.py"), *REPO.glob("cli/*.py")]:
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                pieces.append(node.value)  # an f-string's text between placeholders is such a Constant too
    for path in [REPO / "launch.sh", *REPO.glob("slurm/*.sbatch")]:
        pieces += path.read_text().splitlines()
    return pieces


PLACEHOLDER = re.compile(r"<[^<>]*>|\{[^{}]*\}|\.\.\.|…")


def quoted_lines(path: Path) -> list[str]:
    blocks = re.findall(r"^```text prints\n(.*?)^```", path.read_text(), flags=re.S | re.M)
    return [line for block in blocks for line in block.splitlines() if line.strip()]


def pieces_of(line: str) -> list[str]:
    head, rest = ("error:", line[len("error: ") :]) if line.startswith("error: ") else (None, line)
    pieces = [piece.strip() for piece in PLACEHOLDER.split(rest)]
    return ([head] if head else []) + [piece for piece in pieces if len(piece) >= 4]


@pytest.mark.quick
def test_every_line_the_docs_quote_occurs_in_the_source():
    strings = program_strings()
    quoted = {(page, line) for page in [README, *PAGES] for line in quoted_lines(page)}
    assert len(quoted) >= 40  # docs/troubleshooting.md and the Chinese guide quote many
    wrong = []
    for page, line in sorted(quoted):
        pieces = pieces_of(line)
        missing = [piece for piece in pieces if not any(piece in string for string in strings)]
        if missing or max(map(len, pieces), default=0) < 12:
            wrong.append(f"{page.relative_to(REPO)}: {line!r}: not in the source: {missing or 'no piece of 12 characters'}")
    assert not wrong, "\n".join(wrong)


@pytest.mark.quick
def test_the_readme_is_a_five_minute_read_and_shows_the_ci_test_command():
    text = README.read_text()
    assert len(text.split()) <= 2500
    long = [line[:60] for line in without_code(text).splitlines() if len(line) > 300]
    assert not long, long
    commands = [line.split("#")[0].strip() for block in re.findall(r"^```bash\n(.*?)^```", text, flags=re.S | re.M) for line in block.splitlines()]
    ci = (REPO / ".ci" / "run").read_text()
    assert "./tests/run.sh" in commands and "./tests/run.sh" in ci  # .ci/run runs the README's test command
    assert os.access(REPO / "launch.sh", os.X_OK) and "./launch.sh" in commands
