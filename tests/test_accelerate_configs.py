"""The Accelerate configs in recipes/accelerate_configs/ load with accelerate's own classes and launch logic.

Each file goes through what `accelerate launch --config_file F` does (config class, argument validation, the
environment the launcher hands to the ranks) and, for FSDP, through the plugin the ranks build from that
environment, so a typo or an inconsistent value fails here rather than on a GPU cluster.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import torch
from distributed_helpers import free_port

CONFIGS = Path(__file__).resolve().parents[1] / "recipes" / "accelerate_configs"
EXPECTED = {
    "single_gpu.yaml",
    "multi_gpu.yaml",
    "multi_node.yaml",
    "fsdp2.yaml",
    "fsdp2_qlora.yaml",
    "deepspeed_zero2.yaml",
    "deepspeed_zero3.yaml",
}


def launch_args(name: str, *extra: str):
    """Parse and validate like `accelerate launch --config_file <name> <extra> train.py`."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser

    parser = launch_command_parser()
    args = parser.parse_args(["--config_file", str(CONFIGS / name), *extra, "train.py"])
    args, defaults, _ = _validate_launch_command(args)
    return args, defaults


def launcher_env(name: str, *extra: str) -> dict[str, str]:
    from accelerate.utils.launch import prepare_multi_gpu_env

    args, _ = launch_args(name, "--main_process_port", str(free_port()), *extra)
    return prepare_multi_gpu_env(args)


def fsdp_plugin(name: str, monkeypatch):
    from accelerate.utils import FullyShardedDataParallelPlugin

    for key, value in launcher_env(name).items():
        if key.startswith(("FSDP_", "ACCELERATE_")):
            monkeypatch.setenv(key, value)
    return FullyShardedDataParallelPlugin()


def test_the_shipped_set_of_configs():
    assert {p.name for p in CONFIGS.glob("*.yaml")} == EXPECTED


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_config_loads_and_is_documented(name):
    from accelerate.commands.config.config_args import ClusterConfig, load_config_from_file

    config = load_config_from_file(str(CONFIGS / name))  # raises on unknown keys
    assert isinstance(config, ClusterConfig)
    text = (CONFIGS / name).read_text()
    header = text.split("\ncompute_environment")[0]
    assert header.startswith("#") and len(header.splitlines()) >= 3, "each config starts with a comment block"
    assert "Edit" in header, "the comment says which values to edit"
    assert f"--config_file recipes/accelerate_configs/{name}" in header or name == "multi_node.yaml"
    assert config.num_processes >= 1 and config.mixed_precision in ("no", "bf16", "fp16")


def test_single_gpu_and_multi_gpu():
    single, _ = launch_args("single_gpu.yaml")
    assert single.num_processes == 1 and not single.multi_gpu and not single.use_fsdp
    multi, defaults = launch_args("multi_gpu.yaml")
    assert multi.multi_gpu and not multi.use_fsdp and defaults.num_processes > 1
    env = launcher_env("multi_gpu.yaml")
    assert "ACCELERATE_USE_FSDP" not in env and env["ACCELERATE_MIXED_PRECISION"] == "bf16"


def test_fsdp2_is_fsdp2_with_layer_wrapping_and_sharded_checkpoints(monkeypatch, tiny_llama):
    from torch.distributed.fsdp import StateDictType
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    args, _ = launch_args("fsdp2.yaml")
    assert args.use_fsdp and not args.multi_gpu
    plugin = fsdp_plugin("fsdp2.yaml", monkeypatch)
    assert plugin.fsdp_version == 2
    assert plugin.reshard_after_forward is True
    assert plugin.state_dict_type == StateDictType.SHARDED_STATE_DICT
    assert not plugin.cpu_ram_efficient_loading, "ALPS reads real weights on every rank before wrapping"
    assert not plugin.activation_checkpointing, "transformers refuses it together with gradient checkpointing"
    plugin.set_auto_wrap_policy(tiny_llama)
    assert plugin.auto_wrap_policy.keywords["transformer_layer_cls"] == {LlamaDecoderLayer}
    # The final save path is documented: sharded checkpoints, a full standard checkpoint from save_model.
    header = (CONFIGS / "fsdp2.yaml").read_text()
    assert "SHARDED_STATE_DICT" in header and "save_model()" in header and "FULL state dict" in header


def test_fsdp2_qlora_quant_storage_dtype_and_mixed_precision_agree(monkeypatch):
    from transformers import HfArgumentParser
    from trl import ModelConfig, get_quantization_config

    text = (CONFIGS / "fsdp2_qlora.yaml").read_text()
    plugin = fsdp_plugin("fsdp2_qlora.yaml", monkeypatch)
    assert plugin.fsdp_version == 2 and not plugin.cpu_ram_efficient_loading
    # The recipe flags the comment documents, parsed by TRL's ModelConfig like the recipes do.
    flags = re.search(r"recipe flags `([^`]+)`", text)
    assert flags, "fsdp2_qlora.yaml documents the recipe flags for the 4-bit base"
    (model_args,) = HfArgumentParser(ModelConfig).parse_args_into_dataclasses(shlex.split(flags.group(1)))
    quant = get_quantization_config(model_args)
    assert quant.load_in_4bit and quant.bnb_4bit_quant_type == "nf4"
    assert quant.bnb_4bit_quant_storage == torch.bfloat16
    assert quant.bnb_4bit_compute_dtype == torch.bfloat16
    assert model_args.dtype == "bfloat16"
    args, _ = launch_args("fsdp2_qlora.yaml")
    assert args.mixed_precision == "bf16", "quant storage, model dtype and mixed precision must all be bf16"
    assert "bnb_4bit_quant_storage" in text and "alps-merge" in text and "delta" in text


def test_multi_node_has_placeholders_that_the_launchers_override():
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(CONFIGS / "multi_node.yaml"))
    assert config.num_machines > 1
    assert config.num_processes % config.num_machines == 0 and config.num_processes > config.num_machines
    assert config.main_process_ip and config.main_process_port
    env = launcher_env("multi_node.yaml", "--machine_rank", "1", "--main_process_ip", "127.0.0.1")
    assert env["ACCELERATE_MIXED_PRECISION"] == "bf16"
    args, _ = launch_args("multi_node.yaml", "--num_machines", "4", "--num_processes", "32", "--machine_rank", "3")
    assert (args.num_machines, args.num_processes, int(args.machine_rank)) == (4, 32, 3)


@pytest.mark.parametrize("name, stage", [("deepspeed_zero2.yaml", 2), ("deepspeed_zero3.yaml", 3)])
def test_deepspeed_configs_are_for_delta_mode(name, stage):
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(CONFIGS / name))
    args, _ = launch_args(name)
    assert args.use_deepspeed and config.deepspeed_config["zero_stage"] == stage
    # Every rank holds real weights when ALPS sets up its deltas.
    assert config.deepspeed_config["zero3_init_flag"] is False
    if stage == 3:
        assert config.deepspeed_config["zero3_save_16bit_model"] is True
    assert "alps_mode delta" in (CONFIGS / name).read_text()
