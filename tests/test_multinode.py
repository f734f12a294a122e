"""Two "machines" on loopback, each started with the repo's launch/launch_node.sh (one process per machine).

The nodes rendezvous through a fresh port, run the real SFT recipe on the toy model (recipes/demo/toy_sft.yaml: a
small random Llama whose heads come from a short probe run, scored on the main process and broadcast to the other
node), and save one standard checkpoint.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import time

import pytest
from distributed_helpers import ACCELERATE_CLI, LAUNCH_NODE, REPO, child_env, free_port

pytestmark = pytest.mark.distributed


# torch's gloo backend now and then aborts a worker at interpreter exit, after the recipe has finished and destroyed
# its process group ("terminate called without an active exception": gloo threads still holding work objects while
# Python finalizes); the other node's launcher then waits out torchelastic's exit barrier. The run's own work is done
# by then, so that one signature is retried once, on a fresh port and output directory; any other failure is not.
EXIT_ABORT = "terminate called without an active exception"


def _run_two_nodes(tmp_path, attempt: int) -> tuple[list, dict, int, object]:
    """Start both nodes; (exit codes of nodes 1 and 0, their logs by rank, the port, the output directory)."""
    out = tmp_path / f"out{attempt}"
    port = free_port()
    recipe_args = [
        "--output_dir", str(out), "--max_steps", "3", "--per_device_train_batch_size", "2",
        "--gradient_accumulation_steps", "1", "--bf16", "false", "--report_to", "none", "--save_strategy", "no",
        "--log_level", "info", "--ddp_timeout", "180",
    ]  # fmt: skip
    procs, logs, paths = [], [], {}
    for rank in (1, 0):
        env = child_env(
            NNODES="2",
            NODE_RANK=str(rank),
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
            GPUS_PER_NODE="1",
            RECIPE_CONFIG=str(REPO / "recipes" / "demo" / "toy_sft.yaml"),
            ALPS_USE_CPU="1",
            ACCELERATE_CMD=shlex.join(ACCELERATE_CLI),
        )
        paths[rank] = tmp_path / f"node{rank}.attempt{attempt}.log"
        log = open(paths[rank], "w")  # noqa: SIM115 - closed below
        logs.append(log)
        procs.append(
            subprocess.Popen([str(LAUNCH_NODE), *recipe_args], cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
        )
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and any(p.poll() is None for p in procs):
            if any(p.poll() not in (None, 0) for p in procs):  # one node failed: the other would wait it out
                break
            time.sleep(0.5)
        codes = [p.poll() for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        for log in logs:
            log.close()
    return codes, {rank: path.read_text() for rank, path in paths.items()}, port, out


def test_two_nodes_on_loopback_rendezvous_train_and_save_once(tmp_path):
    from transformers import AutoModelForCausalLM

    from alps_trl.localization.selection import HeadSelection

    codes, text, port, out = _run_two_nodes(tmp_path, 0)
    if codes != [0, 0] and any(EXIT_ABORT in t and "Done in" in t for t in text.values()):
        codes, text, port, out = _run_two_nodes(tmp_path, 1)
    assert codes == [0, 0], f"node 1 rc={codes[0]}, node 0 rc={codes[1]}\n{text[1][-3000:]}\n{text[0][-3000:]}"

    for rank in (0, 1):
        command = text[rank].splitlines()[0]
        assert command.startswith("+ env ACCELERATE_USE_CPU=true "), command
        assert f"--num_machines 2 --num_processes 2 --machine_rank {rank} " in command, command
        assert f"--main_process_ip 127.0.0.1 --main_process_port {port} --multi_gpu " in command, command
        assert os.fspath(REPO / "recipes" / "sft_alps.py") in command
    # 2 examples per device x 2 processes (one per node): both nodes joined one gloo (DDP) process group; two
    # independent single-process jobs would each report 2.
    assert "Instantaneous batch size per device = 2" in text[0], text[0][-3000:]
    assert "Total train batch size (w. parallel, distributed & accumulation) = 4" in text[0], text[0][-3000:]

    # One checkpoint, written once (by the main process), standard and loadable, with its head selection.
    assert sorted(p.name for p in out.glob("*.safetensors")) == ["model.safetensors"]
    assert not list(out.glob("checkpoint-*"))
    model = AutoModelForCausalLM.from_pretrained(out)
    HeadSelection.load(out / "alps_heads.json").check_compatible(model)
