"""launch/launch_node.sh and launch/slurm_alps.sbatch in DRY_RUN mode: the exact commands they would run."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LAUNCH_NODE = REPO / "launch" / "launch_node.sh"
SBATCH = REPO / "launch" / "slurm_alps.sbatch"
CONFIGS = REPO / "recipes" / "accelerate_configs"

pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")


def run(script: Path, *args: str, env: dict[str, str] | None = None, path_prefix: Path | None = None):
    full_env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "NNODES", "NODE_RANK", "MASTER_"))}
    full_env.pop("GPUS_PER_NODE", None)
    full_env.update(env or {})
    if path_prefix is not None:
        full_env["PATH"] = f"{path_prefix}{os.pathsep}{full_env['PATH']}"
    return subprocess.run(["bash", str(script), *args], env=full_env, capture_output=True, text=True, timeout=60)


def printed_command(stdout: str) -> list[str]:
    lines = [line for line in stdout.splitlines() if line.startswith("+ ")]
    assert len(lines) == 1, stdout
    return shlex.split(lines[0][2:])


@pytest.mark.parametrize("script", [LAUNCH_NODE, SBATCH])
def test_scripts_are_valid_bash_and_executable(script):
    assert os.access(script, os.X_OK)
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0


def test_launch_node_dry_run_prints_the_exact_command():
    env = {
        "NNODES": "4",
        "NODE_RANK": "2",
        "MASTER_ADDR": "10.1.2.3",
        "MASTER_PORT": "29555",
        "GPUS_PER_NODE": "8",
        "ACCELERATE_CONFIG": str(CONFIGS / "fsdp2.yaml"),
        "RECIPE": str(REPO / "recipes" / "dpo_alps.py"),
        "RECIPE_CONFIG": str(CONFIGS / "fsdp2.yaml"),  # any existing file: only passed through as --config
        "DRY_RUN": "1",
    }
    proc = run(LAUNCH_NODE, "--alps_ratio", "0.2", "--output_dir", "out dir", env=env)
    assert proc.returncode == 0, proc.stderr
    assert printed_command(proc.stdout) == [
        "accelerate", "launch",
        "--config_file", str(CONFIGS / "fsdp2.yaml"),
        "--num_machines", "4",
        "--num_processes", "32",
        "--machine_rank", "2",
        "--main_process_ip", "10.1.2.3",
        "--main_process_port", "29555",
        str(REPO / "recipes" / "dpo_alps.py"),
        "--config", str(CONFIGS / "fsdp2.yaml"),
        "--alps_ratio", "0.2", "--output_dir", "out dir",
    ]  # fmt: skip


def test_launch_node_defaults_and_cpu_switch():
    proc = run(LAUNCH_NODE, env={"DRY_RUN": "1", "ALPS_USE_CPU": "1", "GPUS_PER_NODE": "2"})
    assert proc.returncode == 0, proc.stderr
    assert printed_command(proc.stdout) == [
        "env", "ACCELERATE_USE_CPU=true", "accelerate", "launch",
        "--config_file", str(CONFIGS / "multi_node.yaml"),
        "--num_machines", "1", "--num_processes", "2", "--machine_rank", "0",
        "--main_process_ip", "127.0.0.1", "--main_process_port", "29500",
        "--multi_gpu",
        str(REPO / "recipes" / "sft_alps.py"),
    ]  # fmt: skip


@pytest.mark.parametrize(
    "env, message",
    [
        ({"NNODES": "2", "NODE_RANK": "2"}, "NODE_RANK=2 must be smaller than NNODES=2"),
        ({"NNODES": "zero"}, "NNODES must be a positive integer"),
        ({"GPUS_PER_NODE": "0"}, "GPUS_PER_NODE must be a positive integer"),
        ({"MASTER_PORT": "70000"}, "MASTER_PORT must be a TCP port"),
        ({"ACCELERATE_CONFIG": "/nonexistent.yaml"}, "ACCELERATE_CONFIG '/nonexistent.yaml' does not exist"),
        ({"RECIPE": "/nonexistent.py"}, "RECIPE '/nonexistent.py' does not exist"),
    ],
)
def test_launch_node_refuses_bad_settings(env, message):
    proc = run(LAUNCH_NODE, env={"DRY_RUN": "1", "GPUS_PER_NODE": "1", **env})
    assert proc.returncode == 2
    assert message in proc.stderr
    assert not proc.stdout


@pytest.fixture
def fake_scontrol(tmp_path):
    """A `scontrol show hostnames` that expands the test's node list (no SLURM here)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    script = bin_dir / "scontrol"
    script.write_text('#!/usr/bin/env bash\n[[ "$1 $2" == "show hostnames" ]] || exit 1\necho gpu-a17\necho gpu-b03\n')
    script.chmod(0o755)
    return bin_dir


def test_slurm_dry_run_prints_srun_and_every_node_command(fake_scontrol, tmp_path):
    env = {
        "SLURM_JOB_NODELIST": "gpu-[a17,b03]",
        "SLURM_NNODES": "2",
        "SLURM_JOB_ID": "4242",
        "SLURM_JOB_NAME": "alps",
        "SLURM_GPUS_ON_NODE": "4",
        "SLURM_SUBMIT_DIR": str(REPO),
        "RECIPE_CONFIG": str(CONFIGS / "multi_gpu.yaml"),
        "LOG_DIR": str(tmp_path / "logs"),
        "DRY_RUN": "1",
    }
    proc = run(SBATCH, "--max_steps", "10", env=env, path_prefix=fake_scontrol)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == (
        f"ALPS job 4242: 2 nodes x 4 GPUs, rendezvous gpu-a17:{20000 + 4242}, logs in {tmp_path / 'logs'}"
    )
    srun = shlex.split(lines[1][2:])
    assert srun[:6] == [
        "srun", "--nodes=2", "--ntasks-per-node=1", "--kill-on-bad-exit=1",
        f"--output={tmp_path / 'logs'}/node%n.log", "bash",
    ]  # fmt: skip
    assert srun[6:] == ["-c", 'NODE_RANK="$SLURM_NODEID" exec "$0" "$@"', str(LAUNCH_NODE), "--max_steps", "10"]
    assert (tmp_path / "logs").is_dir()
    for rank, host in enumerate(["gpu-a17", "gpu-b03"]):
        index = lines.index(f"node {rank} ({host}):")
        assert shlex.split(lines[index + 1][2:]) == [
            "accelerate", "launch",
            "--config_file", str(CONFIGS / "multi_node.yaml"),
            "--num_machines", "2", "--num_processes", "8", "--machine_rank", str(rank),
            "--main_process_ip", "gpu-a17", "--main_process_port", str(20000 + 4242),
            str(REPO / "recipes" / "sft_alps.py"),
            "--config", str(CONFIGS / "multi_gpu.yaml"),
            "--max_steps", "10",
        ]  # fmt: skip


def test_slurm_script_needs_an_allocation():
    proc = run(SBATCH, env={"SLURM_SUBMIT_DIR": str(REPO), "DRY_RUN": "1"})
    assert proc.returncode == 2
    assert "SLURM_JOB_NODELIST is not set" in proc.stderr


def test_launch_readme_dry_run_commands_run_and_named_files_exist():
    import re

    readme = (REPO / "launch" / "README.md").read_text()
    for path in sorted(set(re.findall(r"(?:launch|recipes)/[\w./-]+\.(?:sh|sbatch|yaml|py)", readme))):
        assert (REPO / path).exists(), f"launch/README.md names {path}, which does not exist"
    commands = [line.strip() for line in readme.splitlines() if line.strip().startswith("DRY_RUN=1 ")]
    assert commands
    for command in commands:
        proc = subprocess.run(["bash", "-c", command], cwd=REPO, capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, (command, proc.stderr)
        assert printed_command(proc.stdout)[:2] == ["accelerate", "launch"]


def test_slurm_output_paths_exist_in_a_fresh_clone():
    """SLURM opens #SBATCH --output/--error before the script runs and cannot create their directory: they must
    name a file in the submit directory (or a directory the repository ships)."""
    import re

    for option, path in re.findall(r"^#SBATCH --(output|error)=(\S+)", SBATCH.read_text(), flags=re.M):
        folder = os.path.dirname(path)
        assert not folder or (REPO / folder).is_dir(), f"#SBATCH --{option}={path}: {folder}/ is not in the repository"


def test_launch_node_creates_its_log_dir(tmp_path):
    """LOG_DIR that does not exist yet is created, and the node's log written into it (accelerate faked)."""
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    (fake_bin / "accelerate").write_text('#!/usr/bin/env bash\necho fake accelerate "$@"\n')
    (fake_bin / "accelerate").chmod(0o755)
    log_dir = tmp_path / "new" / "logs"
    env = {"LOG_DIR": str(log_dir), "NNODES": "1", "NODE_RANK": "0", "MASTER_ADDR": "127.0.0.1"}
    proc = run(LAUNCH_NODE, env=env, path_prefix=fake_bin)
    assert proc.returncode == 0, proc.stderr
    assert "fake accelerate launch" in (log_dir / "node0.log").read_text()
