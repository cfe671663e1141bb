"""slurm/train.sbatch's SCRATCH_OUTPUT_DIR, without a cluster: the flags it hands to launch.sh, and its refusals.

A real cluster job whose attempts restore their fresh scratch directory from --backup_to is the SLURM test of the
backup work (issue 24), not this file.
"""

import subprocess

from conftest import REPO


def run_script(tmp_path, env_extra, *flags):
    """Run train.sbatch as the job would, with a stand-in launch.sh that prints the flags it got."""
    project = tmp_path / "project"
    project.mkdir(exist_ok=True)
    (project / "launch.sh").write_text('#!/usr/bin/env bash\necho "flags: $*"\n')
    (project / "launch.sh").chmod(0o755)
    env = {"PATH": "/usr/bin:/bin", "RESUMABLE_HOME": str(project), **env_extra}
    return subprocess.run(["bash", str(REPO / "slurm" / "train.sbatch"), *flags], env=env, capture_output=True, text=True, timeout=60)


def test_scratch_output_dir_is_expanded_per_job_and_attempt(tmp_path):
    job = {"SCRATCH_OUTPUT_DIR": "/tmp/resumable-%j-%r", "SLURM_JOB_ID": "4711", "SLURM_RESTART_COUNT": "2"}
    result = run_script(tmp_path, job, "--backup_to", "/shared/backups/run1", "--max_steps", "10")
    assert result.returncode == 0, result.stderr
    assert "flags: --backup_to /shared/backups/run1 --max_steps 10 --output_dir /tmp/resumable-4711-2\n" in result.stdout


def test_without_scratch_output_dir_the_flags_pass_unchanged(tmp_path):
    result = run_script(tmp_path, {"SLURM_JOB_ID": "4711"}, "--output_dir", "/shared/run1", "--max_steps", "10")
    assert result.returncode == 0 and "flags: --output_dir /shared/run1 --max_steps 10\n" in result.stdout


def test_scratch_output_dir_refuses_without_backup_to_or_with_its_own_output_dir(tmp_path):
    job = {"SCRATCH_OUTPUT_DIR": "/tmp/resumable-%j", "SLURM_JOB_ID": "4711"}
    no_backup = run_script(tmp_path, job, "--max_steps", "10")
    assert no_backup.returncode == 2 and "flags:" not in no_backup.stdout
    assert no_backup.stderr.count("\n") == 1 and "needs --backup_to DEST on shared storage" in no_backup.stderr
    both = run_script(tmp_path, job, "--backup_to=/shared/b", "--output_dir", "/x")
    assert both.returncode == 2 and "flags:" not in both.stdout and "drop --output_dir from the flags" in both.stderr
