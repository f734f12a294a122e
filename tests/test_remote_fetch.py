"""`--fetch qkv` / `alps_fetch="qkv"`: q/k/v rows of hub models read with range requests, against a loopback hub.

The hub is `alps_trl.testing.LoopbackHub` on 127.0.0.1 (started and stopped by each test), which serves local
checkpoint directories the way huggingface_hub asks for them. Nothing leaves the machine.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import huggingface_hub.constants as hub_constants
import numpy as np
import pytest
import torch
from localize_helpers import copy_model, perturb_query_heads
from safetensors import safe_open
from safetensors.torch import save_file

from alps_trl.localization.scoring import score_array
from alps_trl.localization.weights import open_weight_source
from alps_trl.testing import LoopbackHub, tiny_model

REPO = Path(__file__).resolve().parents[1]
# Bytes a fetch may read besides the q/k/v rows and the shard headers: config.json, the shard index and the
# revision's file list (the API's JSON), each a few hundred bytes for these models.
SMALL_FILES_BUDGET = 4096


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """A tiny llama base (one safetensors file), its task copy (sharded) and a .bin-only copy."""
    root = tmp_path_factory.mktemp("remote")
    base = tiny_model("llama", seed=0)
    task = copy_model(base)
    perturb_query_heads(task, [(0, 3), (1, 6)])
    base.save_pretrained(root / "base")
    task.save_pretrained(root / "task", max_shard_size="80KB")
    (root / "bin_only").mkdir()
    (root / "bin_only" / "config.json").write_text((root / "base" / "config.json").read_text())
    torch.save(task.state_dict(), root / "bin_only" / "pytorch_model.bin")
    return root


@pytest.fixture
def hub(monkeypatch, tmp_path):
    """A running LoopbackHub that huggingface_hub (this process and subprocesses) talks to; an empty q/k/v cache."""
    with LoopbackHub() as server:
        monkeypatch.setattr(hub_constants, "ENDPOINT", server.url)
        monkeypatch.setattr(
            hub_constants, "HUGGINGFACE_CO_URL_TEMPLATE", server.url + "/{repo_id}/resolve/{revision}/{filename}"
        )
        monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setenv("ALPS_TRL_CACHE", str(tmp_path / "alps_cache"))
        monkeypatch.delenv("HF_TOKEN", raising=False)
        monkeypatch.setenv("HF_HUB_DISABLE_IMPLICIT_TOKEN", "1")
        yield server


def _env(server: LoopbackHub, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "HF_TOKEN"}
    return {**env, "HF_ENDPOINT": server.url, "HF_HUB_OFFLINE": "0", "PYTHONPATH": str(REPO), **extra}


def _qkv_and_header_bytes(folder: Path) -> tuple[int, int]:
    """(bytes of the q/k/v tensors, bytes of the headers of the files holding them) of a local checkpoint."""
    src = open_weight_source(str(folder))
    names = set(src.qkv_tensor_names())
    qkv = headers = 0
    for path in sorted(folder.glob("*.safetensors")):
        with open(path, "rb") as f:
            header_len = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(header_len))
        held = [n for n in names if n in header]
        qkv += sum(header[n]["data_offsets"][1] - header[n]["data_offsets"][0] for n in held)
        headers += (8 + header_len) * bool(held)
    return qkv, headers


def _scores_remote(base: str, task: str) -> np.ndarray:
    return score_array(open_weight_source(base, fetch="qkv"), open_weight_source(task, fetch="qkv"))


def test_remote_scores_are_bit_identical_and_only_qkv_bytes_are_fetched(pair, hub):
    hub.add_repo("acme/base", str(pair / "base"))
    hub.add_repo("acme/task", str(pair / "task"))
    local = score_array(str(pair / "base"), str(pair / "task"))
    remote = _scores_remote("acme/base", "acme/task")
    assert np.array_equal(remote, local)  # bit-identical, not just close
    qkv_b, head_b = _qkv_and_header_bytes(pair / "base")
    qkv_t, head_t = _qkv_and_header_bytes(pair / "task")
    needed = qkv_b + head_b + qkv_t + head_t
    checkpoint_bytes = sum(p.stat().st_size for d in ("base", "task") for p in (pair / d).glob("*.safetensors"))
    assert needed <= hub.bytes_served <= needed + 2 * SMALL_FILES_BUDGET
    assert hub.bytes_served < 0.5 * checkpoint_bytes
    # Only safetensors ranges and small files are asked for; every range names the commit, not "main".
    for method, path, ranged in hub.requests:
        if path == "/api/agent-harnesses":  # huggingface_hub's own once-a-day registry request (user agent)
            continue
        assert method == "GET" and "/resolve/main/" not in path
        assert ranged is not None or path.endswith((".json", "/revision/main"))

    # The second run is offline: the cached rows give the same scores without a single request.
    hub.reset_counts()
    again = _scores_remote("acme/base", "acme/task")
    assert np.array_equal(again, local) and hub.requests == [] and hub.bytes_served == 0
    cache = Path(os.environ["ALPS_TRL_CACHE"]) / "qkv"
    assert not list(cache.rglob("*.part"))  # only completed files, moved into place
    assert (cache / "models--acme--task" / "refs" / "main").is_file()


def test_dropped_connection_mid_range_is_resumed_and_exact(pair, hub):
    hub.add_repo("acme/base", str(pair / "base"))
    hub.add_repo("acme/task", str(pair / "task"))
    hub.drop_after = 1000  # the first range longer than this is cut after 1000 bytes
    remote = _scores_remote("acme/base", "acme/task")
    assert hub.drop_after is None  # the drop happened
    assert np.array_equal(remote, score_array(str(pair / "base"), str(pair / "task")))
    # The retry asked for the rest of the cut range only: from 1000 bytes in to the same last byte.
    ranges = [(p, *map(int, r.removeprefix("bytes=").split("-"))) for _, p, r in hub.requests if r]
    resumed = [(p, a, b) for p, a, b in ranges if (p, a - 1000, b) in ranges]
    assert len(resumed) == 1, ranges


def test_gated_model_needs_the_token(pair, hub, monkeypatch):
    hub.add_repo("acme/base", str(pair / "base"))
    hub.add_repo("acme/gated", str(pair / "task"), gated_token="hf_secret")
    with pytest.raises(PermissionError, match=r"acme/gated is a gated model \(HTTP 401\).*accept.*HF_TOKEN"):
        open_weight_source("acme/gated", fetch="qkv")
    monkeypatch.setenv("HF_TOKEN", "hf_other_account")
    monkeypatch.delenv("HF_HUB_DISABLE_IMPLICIT_TOKEN")
    with pytest.raises(PermissionError, match=r"acme/gated is a gated model \(HTTP 403\).*a token is set but lacks"):
        open_weight_source("acme/gated", fetch="qkv")
    monkeypatch.setenv("HF_TOKEN", "hf_secret")
    remote = _scores_remote("acme/base", "acme/gated")
    assert np.array_equal(remote, score_array(str(pair / "base"), str(pair / "task")))


@pytest.mark.parametrize(
    ("task_id", "expected"),
    [
        ("acme/gated", "acme/gated is a gated model (HTTP 401): accept the model's license on"),
        ("acme/missing", "acme/missing was not found on"),
        ("acme/bin-only", "acme/bin-only has only PyTorch .bin weights (pytorch_model.bin): --fetch qkv reads"),
    ],
)
def test_cli_errors_are_one_line(pair, hub, tmp_path, task_id, expected):
    hub.add_repo("acme/base", str(pair / "base"))
    hub.add_repo("acme/gated", str(pair / "task"), gated_token="hf_secret")
    hub.add_repo("acme/bin-only", str(pair / "bin_only"))
    cmd = [sys.executable, "-m", "alps_trl.cli.localize", "acme/base", task_id, "--fetch", "qkv", "-q"]
    res = subprocess.run(cmd + ["-o", str(tmp_path / "h.json")], env=_env(hub), capture_output=True, text=True)
    assert res.returncode == 1, res.stderr
    assert "Traceback" not in res.stderr and len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert res.stderr.startswith(f"alps-localize: error: {expected}"), res.stderr


def test_checkpoint_cut_short_on_the_server_fails_before_any_qkv_range(pair, hub, tmp_path):
    """A model.safetensors whose tail is missing on the server: its header promises bytes past the file's end (the
    size comes from the Content-Range of the first answer). One line, naming the file and the tensor, and no
    q/k/v range is asked for."""
    cut = tmp_path / "cut"
    cut.mkdir()
    (cut / "config.json").write_text((pair / "base" / "config.json").read_text())
    data = (pair / "base" / "model.safetensors").read_bytes()
    (cut / "model.safetensors").write_bytes(data[: len(data) // 2])
    hub.add_repo("acme/cut", str(cut))
    expected = r"^acme/cut/model\.safetensors: tensor '.*' ends at byte \d+ of the data, past its end"
    with pytest.raises(ValueError, match=expected):
        open_weight_source("acme/cut", fetch="qkv")
    ranges = [r for _, _, r in hub.requests if r]
    assert len(ranges) == 2, ranges  # the header length, then the header: nothing else


def test_an_answer_that_ends_early_is_not_asked_again_forever(pair, hub, monkeypatch):
    """A range the server answers with fewer bytes than asked, without an error, counts as a dropped connection:
    the rest is asked for once more, and the server's 416 for a range past the end is one line."""
    from alps_trl.localization import remote

    monkeypatch.setattr(remote, "_RETRY_WAIT_S", 0.0)
    hub.add_repo("acme/base", str(pair / "base"))
    size = (pair / "base" / "model.safetensors").stat().st_size
    client = remote._Hub("acme/base", None, hub.url)
    client.resolve()
    hub.reset_counts()
    with pytest.raises(OSError, match=r"^acme/base: HTTP 416 from http://127\.0\.0\.1"):
        client.read_bytes("model.safetensors", size - 10, size + 10)
    assert [r for _, _, r in hub.requests] == [f"bytes={size - 10}-{size + 9}", f"bytes={size}-{size + 9}"]
    assert client.sizes["model.safetensors"] == size


def test_without_fetch_nothing_is_requested(pair, hub):
    hub.add_repo("acme/task", str(pair / "task"))
    with pytest.raises(FileNotFoundError, match="pass --fetch qkv"):
        open_weight_source("acme/task")
    assert hub.requests == []


def test_cli_fetches_then_runs_offline(pair, hub, tmp_path):
    hub.add_repo("acme/base", str(pair / "base"))
    commit = hub.add_repo("acme/task", str(pair / "task"))
    local_out, out = tmp_path / "local.json", tmp_path / "remote.json"
    cli = [sys.executable, "-m", "alps_trl.cli.localize"]
    subprocess.run(
        cli + [str(pair / "base"), str(pair / "task"), "-q", "-o", str(local_out)], env=_env(hub), check=True
    )
    fetch = ["acme/base", "acme/task", "--fetch", "qkv", "--revision", commit, "-o", str(out)]
    res = subprocess.run(cli + fetch, env=_env(hub), capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert "Fetching q/k/v of acme/task" in res.stderr and "base: acme/base" in res.stdout
    assert json.loads(out.read_text())["heads"] == json.loads(local_out.read_text())["heads"]
    hub.reset_counts()
    res = subprocess.run(cli + fetch, env=_env(hub, HF_HUB_OFFLINE="1"), capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert hub.requests == []


def test_trainer_option_reads_the_remote_task_model(pair, hub):
    from alps_trl.trainers.config import AlpsArguments
    from alps_trl.trainers.head_sources import open_task_model

    commit = hub.add_repo("acme/task", str(pair / "task"))
    alps = AlpsArguments(alps_task_model="acme/task", alps_fetch="qkv", alps_task_revision=commit)
    task = open_task_model(alps)
    ref = open_weight_source(str(pair / "task"))
    assert all(np.array_equal(a, b) for a, b in zip(task.layer_arrays(1), ref.layer_arrays(1)))
    assert AlpsArguments().alps_fetch is None  # off by default
    with pytest.raises(ValueError, match="alps_fetch='all' is not known; choose one of qkv."):
        AlpsArguments(alps_fetch="all")


def test_smollm2_over_loopback_is_bit_identical(smollm2_dir, hub, tmp_path):
    """The real SmolLM2-135M-Instruct (float32) against a copy with three q heads moved, both served by the hub."""
    src = open_weight_source(smollm2_dir)
    hd = src.layout.head_dim
    task_dir = tmp_path / "smollm2_task"
    task_dir.mkdir()
    (task_dir / "config.json").write_text(Path(smollm2_dir, "config.json").read_text())
    tensors = {}
    gen = torch.Generator().manual_seed(0)
    with safe_open(os.path.join(smollm2_dir, "model.safetensors"), "pt") as f:
        for name in src.qkv_tensor_names():
            tensors[name] = f.get_tensor(name).clone()
    for layer, head in [(2, 1), (11, 7), (25, 4)]:
        w = tensors[src.layout.layers[layer].q_weight.name]
        w[head * hd : (head + 1) * hd] += 0.02 * torch.randn(hd, w.shape[1], generator=gen)
    save_file(tensors, str(task_dir / "model.safetensors"))
    hub.add_repo("HuggingFaceTB/SmolLM2-135M-Instruct", smollm2_dir)
    hub.add_repo("acme/smollm2-task", str(task_dir))
    local = score_array(smollm2_dir, str(task_dir))
    remote = _scores_remote("HuggingFaceTB/SmolLM2-135M-Instruct", "acme/smollm2-task")
    assert np.array_equal(remote, local)
    qkv_b, head_b = _qkv_and_header_bytes(Path(smollm2_dir))
    qkv_t, head_t = _qkv_and_header_bytes(task_dir)
    assert hub.bytes_served <= qkv_b + head_b + qkv_t + head_t + 2 * SMALL_FILES_BUDGET
    top3 = sorted(np.argsort(-local.ravel())[:3])
    assert [divmod(int(i), src.layout.num_heads) for i in top3] == [(2, 1), (11, 7), (25, 4)]


def test_trainer_localizes_against_a_hub_task_model(pair, hub, tmp_path):
    """AlpsSFTTrainer(alps_task_model=<hub id>, alps_fetch="qkv"): the task model is read from the hub (q/k/v only)
    and gives the same heads as the same checkpoint read from its local directory."""
    from trainer_helpers import sft_config, sft_dataset, tiny_tokenizer

    from alps_trl.trainers.sft import AlpsSFTTrainer

    hub.add_repo("acme/task", str(pair / "task"))

    def trainer(name: str, task: str, **options):
        args = sft_config(str(tmp_path / name), alps_task_model=task, **options)
        return AlpsSFTTrainer(model=tiny_model("llama", seed=0), args=args, train_dataset=sft_dataset(),
                              processing_class=tiny_tokenizer())  # fmt: skip

    remote = trainer("remote", "acme/task", alps_fetch="qkv")
    assert remote.head_source == "alps_task_model"
    qkv, headers = _qkv_and_header_bytes(pair / "task")
    assert qkv + headers <= hub.bytes_served <= qkv + headers + SMALL_FILES_BUDGET
    local = trainer("local", str(pair / "task"))
    assert local.head_source == "alps_task_model"
    assert remote.head_selection == local.head_selection
    assert {(0, 3), (1, 6)} <= set(map(tuple, remote.head_selection.heads))  # the heads the task copy moved
