"""Weight sources: every way of pointing at a model reads the same q/k/v rows and gives the same scores."""

import json
import os

import numpy as np
import pytest
import torch
from localize_helpers import copy_model, perturb_query_heads
from safetensors.torch import load_file, save_file

from alps_trl.localization.anatomy import UnsupportedArchitectureError
from alps_trl.localization.scoring import score_heads
from alps_trl.localization.weights import WeightSource, bf16_to_float32, open_weight_source
from alps_trl.testing import tiny_model


@pytest.fixture(scope="module")
def pair_dirs(tmp_path_factory):
    """base/task tiny GQA llama saved in several formats; returns (models, dirs)."""
    root = tmp_path_factory.mktemp("ckpts")
    base = tiny_model("llama", seed=0)
    task = copy_model(base)
    perturb_query_heads(task, [(0, 1), (1, 6)])
    dirs = {}
    for label, model in (("base", base), ("task", task)):
        dirs[f"{label}_single"] = root / f"{label}_single"
        model.save_pretrained(dirs[f"{label}_single"])
        dirs[f"{label}_sharded"] = root / f"{label}_sharded"
        model.save_pretrained(dirs[f"{label}_sharded"], max_shard_size="60KB")
        # A .bin checkpoint (transformers 5 saves safetensors only): torch.save a state dict + config.json.
        d = root / f"{label}_bin"
        d.mkdir()
        torch.save(model.state_dict(), d / "pytorch_model.bin")
        model.config.to_json_file(d / "config.json")
        dirs[f"{label}_bin"] = d
    return (base, task), dirs


def test_sharded_checkpoint_is_really_sharded(pair_dirs):
    _, dirs = pair_dirs
    files = os.listdir(dirs["base_sharded"])
    assert "model.safetensors.index.json" in files
    assert sum(f.endswith(".safetensors") for f in files) > 3


def test_all_sources_give_identical_scores(pair_dirs):
    (base, task), dirs = pair_dirs
    reference = score_heads(str(dirs["base_single"]), str(dirs["task_single"]), device="cpu")
    assert torch.count_nonzero(reference) == 2
    state_b = {k: v.clone() for k, v in base.state_dict().items()}
    state_t = {k: v.clone() for k, v in task.state_dict().items()}
    variants = {
        "sharded": (str(dirs["base_sharded"]), str(dirs["task_sharded"])),
        "in-memory": (base, task),
        "state-dict": (
            open_weight_source(state_b, config=base.config),
            open_weight_source(state_t, config=task.config),
        ),
        "bin": (str(dirs["base_bin"]), str(dirs["task_bin"])),
        "mixed": (base, str(dirs["task_sharded"])),
        "pathlike": (dirs["base_single"], dirs["task_bin"]),
    }
    for label, (b, t) in variants.items():
        assert torch.equal(score_heads(b, t, device="cpu"), reference), label


def test_layer_qkv_shapes_dtype_and_values(pair_dirs):
    (base, _), dirs = pair_dirs
    src = open_weight_source(str(dirs["base_sharded"]))
    assert isinstance(src, WeightSource) and src.name == str(dirs["base_sharded"])
    wq, wk, wv = src.layer_qkv(1)
    assert wq.shape == (8, 8, 64) and wk.shape == (2, 8, 64) and wv.shape == (2, 8, 64)
    assert wq.dtype == wk.dtype == torch.float64
    attn = base.model.layers[1].self_attn
    assert torch.equal(wq.reshape(64, 64), attn.q_proj.weight.double())
    assert torch.equal(wk[1], attn.k_proj.weight[8:16].double())
    assert torch.equal(wv.reshape(16, 64), attn.v_proj.weight.double())
    raw = src.layer_qkv(1, dtype=None)[0]
    assert raw.dtype == torch.float32


def test_bf16_checkpoint_rows_are_exact(tmp_path):
    model = tiny_model("llama", seed=0).to(torch.bfloat16)
    model.save_pretrained(tmp_path)
    wq, _, _ = open_weight_source(str(tmp_path)).layer_qkv(0)
    assert torch.equal(wq.reshape(64, 64), model.model.layers[0].self_attn.q_proj.weight.double())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
def test_layer_arrays_hold_the_same_values_as_layer_qkv(tmp_path, dtype):
    # The numpy rows that CPU scoring reads (bf16 widened to float32 by a bit shift) equal the torch rows.
    model = tiny_model("llama", seed=0).to(dtype)
    model.save_pretrained(tmp_path)
    src = open_weight_source(str(tmp_path))
    numpy_dtypes = {torch.bfloat16: np.float32, torch.float16: np.float16, torch.float32: np.float32}
    expected = numpy_dtypes.get(dtype, np.float64)
    scratch: dict = {}
    for layer in (0, 1):
        arrays = src.layer_arrays(layer, scratch)
        tensors = src.layer_qkv(layer)
        for arr, ten in zip(arrays, tensors):
            assert isinstance(arr, np.ndarray) and arr.shape == tuple(ten.shape)
            assert arr.dtype == expected
            assert np.array_equal(arr.astype(np.float64), ten.numpy())
        in_memory = open_weight_source(model).layer_arrays(layer)
        assert all(np.array_equal(a, b) for a, b in zip(arrays, in_memory))


def test_bf16_widening_is_exact_for_every_bit_pattern():
    bits = np.arange(1 << 16, dtype=np.uint16)
    widened = bf16_to_float32(bits)
    reference = torch.from_numpy(bits.astype(np.int16)).view(torch.bfloat16).to(torch.float32).numpy()
    same = (widened == reference) | (np.isnan(widened) & np.isnan(reference))
    assert same.all() and np.array_equal(np.signbit(widened), np.signbit(reference))


def test_fused_qkv_rows_are_sliced_by_offset(tmp_path):
    model = tiny_model("phi3", seed=0)
    model.save_pretrained(tmp_path)
    wq, wk, wv = open_weight_source(str(tmp_path)).layer_qkv(0)
    fused = model.model.layers[0].self_attn.qkv_proj.weight.double()
    assert torch.equal(wq.reshape(64, 64), fused[:64])
    assert torch.equal(wk.reshape(16, 64), fused[64:80])
    assert torch.equal(wv.reshape(16, 64), fused[80:96])


def test_checkpoint_without_prefix_and_with_biases(tmp_path):
    # Some checkpoints are saved from the inner model: names start with "layers." not "model.layers.".
    model = tiny_model("qwen2", seed=0)
    state = {k.removeprefix("model."): v for k, v in model.state_dict().items()}
    save_file(state, tmp_path / "model.safetensors")
    model.config.to_json_file(tmp_path / "config.json")
    src = open_weight_source(str(tmp_path))
    assert src.layout.layers[0].q_weight.name == "layers.0.self_attn.q_proj.weight"
    assert src.layout.layers[0].q_bias is not None
    assert torch.equal(src.layer_qkv(1)[0].reshape(64, 64), model.model.layers[1].self_attn.q_proj.weight.double())


def test_hub_id_is_resolved_from_the_local_cache_only(tmp_path, monkeypatch, pair_dirs):
    import huggingface_hub.constants

    _, dirs = pair_dirs
    cache = tmp_path / "hub"
    repo = cache / "models--acme--tiny-llama"
    commit = "0123456789abcdef0123456789abcdef01234567"
    snap = repo / "snapshots" / commit
    snap.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    for name in ("config.json", "model.safetensors"):
        (snap / name).write_bytes((dirs["base_single"] / name).read_bytes())
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    src = open_weight_source("acme/tiny-llama")
    assert src.name == "acme/tiny-llama" and src.layout.num_layers == 2
    ref = open_weight_source(str(dirs["base_single"]))
    assert torch.equal(src.layer_qkv(1)[0], ref.layer_qkv(1)[0])
    with pytest.raises(FileNotFoundError, match="not in the local Hugging Face cache.*downloads nothing unless told"):
        open_weight_source("acme/not-cached")


def test_path_without_config(tmp_path, pair_dirs):
    _, dirs = pair_dirs
    (tmp_path / "model.safetensors").write_bytes((dirs["base_single"] / "model.safetensors").read_bytes())
    with pytest.raises(FileNotFoundError, match="No config.json"):
        open_weight_source(str(tmp_path))


def test_path_without_weights(tmp_path, pair_dirs):
    _, dirs = pair_dirs
    (tmp_path / "config.json").write_text((dirs["base_single"] / "config.json").read_text())
    with pytest.raises(FileNotFoundError, match=r"No model weights.*model\.safetensors.*pytorch_model\.bin"):
        open_weight_source(str(tmp_path))


def test_missing_shard_is_named(tmp_path, pair_dirs):
    _, dirs = pair_dirs
    src_dir = dirs["base_sharded"]
    for name in os.listdir(src_dir):
        (tmp_path / name).write_bytes((src_dir / name).read_bytes())
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    victim = sorted(set(index["weight_map"].values()))[-1]
    os.remove(tmp_path / victim)
    with pytest.raises(FileNotFoundError, match=victim):
        open_weight_source(str(tmp_path))


@pytest.mark.parametrize(
    "victim", ["model.layers.1.self_attn.v_proj.weight", "model.layers.0.self_attn.q_proj.weight"]
)
def test_missing_qkv_tensor_is_named(tmp_path, pair_dirs, victim):
    _, dirs = pair_dirs
    state = load_file(dirs["base_single"] / "model.safetensors")
    del state[victim]
    save_file(state, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text((dirs["base_single"] / "config.json").read_text())
    with pytest.raises(ValueError, match="missing|No tensor named") as err:
        open_weight_source(str(tmp_path))
    assert victim in str(err.value)


def test_tensor_shape_that_contradicts_config_is_named(tmp_path, pair_dirs):
    _, dirs = pair_dirs
    state = load_file(dirs["base_single"] / "model.safetensors")
    state["model.layers.1.self_attn.k_proj.weight"] = torch.zeros(8, 64)
    save_file(state, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text((dirs["base_single"] / "config.json").read_text())
    with pytest.raises(ValueError, match=r"'model\.layers\.1\.self_attn\.k_proj\.weight' has shape \[8, 64\]"):
        open_weight_source(str(tmp_path))


def test_unsupported_architecture_lists_supported(tmp_path, pair_dirs):
    _, dirs = pair_dirs
    cfg = json.loads((dirs["base_single"] / "config.json").read_text())
    cfg["model_type"] = "gpt_neox"
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    (tmp_path / "model.safetensors").write_bytes((dirs["base_single"] / "model.safetensors").read_bytes())
    with pytest.raises(UnsupportedArchitectureError, match="'gpt_neox' is not supported.*llama.*phi3.*qwen2"):
        open_weight_source(str(tmp_path))


def test_other_bad_inputs():
    with pytest.raises(ValueError, match="needs config="):
        open_weight_source({"a": torch.zeros(1)})
    with pytest.raises(TypeError, match="Cannot read attention weights"):
        open_weight_source(42)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        open_weight_source("/no/such/dir/anywhere")


def test_file_instead_of_directory(pair_dirs):
    _, dirs = pair_dirs
    with pytest.raises(FileNotFoundError, match="is a file"):
        open_weight_source(str(dirs["base_single"] / "model.safetensors"))


def test_truncated_safetensors_is_reported(tmp_path, pair_dirs):
    _, dirs = pair_dirs
    raw = (dirs["base_single"] / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(raw[: len(raw) // 2])
    (tmp_path / "config.json").write_text((dirs["base_single"] / "config.json").read_text())
    with pytest.raises(ValueError, match="truncated"):  # refused when opened: a tensor ends past the file
        src = open_weight_source(str(tmp_path))
        for layer in range(src.layout.num_layers):
            src.layer_qkv(layer)


def test_wrapped_model_is_unwrapped(tiny_llama):
    class Wrapper(torch.nn.Module):
        def __init__(self, module):
            super().__init__()
            self.module = module

    src = open_weight_source(Wrapper(tiny_llama))
    assert torch.equal(
        src.layer_qkv(0)[0].reshape(64, 64), tiny_llama.model.layers[0].self_attn.q_proj.weight.double()
    )


@pytest.mark.parametrize("bits", [4, 8])
def test_quantized_model_in_memory_is_dequantized(tmp_path, bits):
    pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    model = tiny_model("llama", seed=0, hidden_size=128, head_dim=32, num_attention_heads=4, num_key_value_heads=2)
    model.save_pretrained(tmp_path)
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4") if bits == 4 else None
    quant = quant or BitsAndBytesConfig(load_in_8bit=True)
    qmodel = AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=quant, device_map="cpu")
    src = open_weight_source(qmodel)
    assert src.tensor_shape("model.layers.0.self_attn.q_proj.weight") == (128, 128)
    wq, wk, wv = src.layer_qkv(1)
    assert wq.shape == (4, 32, 128) and wk.shape == (2, 32, 128) and wq.dtype == torch.float64
    exact = model.model.layers[1].self_attn.q_proj.weight.detach().double()
    tolerance = 0.02 if bits == 4 else 1e-3  # quantization error of NF4 / LLM.int8 on weights ~0.02
    assert (wq.reshape(128, 128) - exact).abs().max() < tolerance
