"""One test per class of malformed input the fuzzer (tests/test_fuzz.py) found: each is refused in one line that
names the file, before any read or allocation it would misdirect."""

from __future__ import annotations

import json
import os
import shutil
import struct
import tracemalloc

import pytest
import torch
from fuzz_harness import join_safetensors, split_safetensors, write_gguf

from alps_trl.localization.selection import HeadSelection, HeadSelectionError
from alps_trl.localization.weights import open_weight_source
from alps_trl.testing import tiny_model

Q0 = "model.layers.0.self_attn.q_proj.weight"
K0 = "model.layers.0.self_attn.k_proj.weight"


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    from restriction_helpers import selection_for

    from alps_trl.restriction import build_restriction

    root = tmp_path_factory.mktemp("hostile")
    model = tiny_model("llama", seed=0)
    model.save_pretrained(root / "ckpt")
    write_gguf(model, str(root / "model.gguf"))
    sel = selection_for(model)
    sel.save(root / "alps_heads.json")
    delta_model = tiny_model("llama", seed=0)
    restriction = build_restriction(delta_model, sel, "delta", train_non_attention=False)
    restriction.install(delta_model)
    restriction.save_delta(delta_model, root / "alps_delta.safetensors")
    return root


def _checkpoint(files, tmp_path, edit) -> str:
    """A copy of the tiny checkpoint whose model.safetensors is edit(bytes)."""
    ckpt = tmp_path / "ckpt"
    shutil.copytree(files / "ckpt", ckpt)
    path = ckpt / "model.safetensors"
    path.write_bytes(edit(path.read_bytes()))
    return str(ckpt)


def _edit_entry(name, **changes):
    def edit(data):
        header, body = split_safetensors(data)
        for key, value in changes.items():
            if value is None:
                del header[name][key]
            else:
                header[name][key] = value
        return join_safetensors(header, body)

    return edit


def _refused(call, path, match):
    with pytest.raises(ValueError, match=match) as info:
        call()
    message = str(info.value)
    assert os.fspath(path) in message and "\n" not in message, message
    return message


# ---- safetensors ------------------------------------------------------------------------------------------
def test_header_claiming_a_terabyte_is_refused_before_reading(files, tmp_path):
    ckpt = _checkpoint(files, tmp_path, _edit_entry(Q0, shape=[2**20, 2**18], data_offsets=[0, 2**40]))
    tracemalloc.start()
    try:
        _refused(lambda: open_weight_source(ckpt), ckpt, "past its end")
        assert tracemalloc.get_traced_memory()[1] < 16 << 20
    finally:
        tracemalloc.stop()


def test_header_length_past_end_of_file_is_refused(files, tmp_path):
    ckpt = _checkpoint(files, tmp_path, lambda d: struct.pack("<Q", 10**7) + d[8:])
    _refused(lambda: open_weight_source(ckpt), ckpt, "runs past the end of the file")
    ckpt2 = _checkpoint(files, tmp_path / "b", lambda d: struct.pack("<Q", 2**63) + d[8:])
    _refused(lambda: open_weight_source(ckpt2), ckpt2, "implausible header length")


def test_header_length_one_short_is_refused(files, tmp_path):
    """The JSON still parses (its padding is cut), but every tensor would be read one byte off."""
    ckpt = _checkpoint(files, tmp_path, lambda d: struct.pack("<Q", struct.unpack("<Q", d[:8])[0] - 1) + d[8:])
    _refused(lambda: open_weight_source(ckpt), ckpt, "data ends at byte")


def test_truncated_data_is_refused_when_opened(files, tmp_path):
    ckpt = _checkpoint(files, tmp_path, lambda d: d[: len(d) - 100])
    _refused(lambda: open_weight_source(ckpt), ckpt, "truncated")


@pytest.mark.parametrize("dtype", ["XYZ", 5, None])
def test_unknown_or_missing_dtype_is_refused(files, tmp_path, dtype):
    ckpt = _checkpoint(files, tmp_path, _edit_entry(Q0, dtype=dtype))
    _refused(lambda: open_weight_source(ckpt), ckpt, "has dtype")


@pytest.mark.parametrize("shape", ["[64, 64]", [-64, 64], [64.0, 64], [True, 64], None])
def test_shape_that_is_not_a_list_of_non_negative_ints_is_refused(files, tmp_path, shape):
    ckpt = _checkpoint(files, tmp_path, _edit_entry(Q0, shape=shape))
    _refused(lambda: open_weight_source(ckpt), ckpt, "not a list of non-negative integers")


def test_shape_offset_mismatch_is_refused(files, tmp_path):
    ckpt = _checkpoint(files, tmp_path, _edit_entry(Q0, shape=[32, 64]))
    _refused(lambda: open_weight_source(ckpt), ckpt, "needs 8192 bytes")


@pytest.mark.parametrize("offsets", [[-4, 16380], "x", [0], [0.0, 16384.0], ["0", "16384"]])
def test_malformed_or_negative_offsets_are_refused(files, tmp_path, offsets):
    ckpt = _checkpoint(files, tmp_path, _edit_entry(Q0, data_offsets=offsets))
    _refused(lambda: open_weight_source(ckpt), ckpt, "data_offsets")


def test_reversed_offsets_are_refused(files, tmp_path):
    data = (files / "ckpt" / "model.safetensors").read_bytes()
    begin, end = split_safetensors(data)[0][Q0]["data_offsets"]
    ckpt = _checkpoint(files, tmp_path, _edit_entry(Q0, data_offsets=[end, begin]))
    _refused(lambda: open_weight_source(ckpt), ckpt, "not 0 <= begin <= end")


def test_overlapping_offsets_are_refused(files, tmp_path):
    """q_proj pointed at k_proj's bytes (same size): without the check its rows would be k's."""
    data = (files / "ckpt" / "model.safetensors").read_bytes()
    header, _ = split_safetensors(data)
    kb, _ = header[K0]["data_offsets"]
    ckpt = _checkpoint(files, tmp_path, _edit_entry(Q0, data_offsets=[kb, kb + 16384]))
    _refused(lambda: open_weight_source(ckpt), ckpt, "overlap")


def test_deeply_nested_header_is_refused(files, tmp_path):
    ckpt = _checkpoint(files, tmp_path, lambda d: join_safetensors(b"[" * 100_000 + b"]" * 100_000, b""))
    _refused(lambda: open_weight_source(ckpt), ckpt, "nests too deeply")


def test_alps_localize_reports_a_broken_checkpoint_in_one_line(files, tmp_path, capsys):
    from alps_trl.cli.localize import main

    ckpt = _checkpoint(files, tmp_path, _edit_entry(Q0, dtype=None))
    assert main([str(files / "ckpt"), ckpt, "-q", "-o", str(tmp_path / "h.json")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("alps-localize: error: ") and ckpt in err and "\n" not in err


# ---- config.json ------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "change, match",
    [
        ({"num_attention_heads": 7}, "not a multiple of num_key_value_heads"),
        ({"num_attention_heads": 6, "head_dim": None}, "hidden_size=64 is not a multiple"),
        ({"num_key_value_heads": 0}, "num_key_value_heads=0 is not a positive integer"),
        ({"num_attention_heads": -8}, "num_attention_heads=-8"),
        ({"num_hidden_layers": 10**9}, "num_hidden_layers"),
        ({"num_hidden_layers": 1}, "attention tensors of layer 1"),
        ({"head_dim": 16}, "has shape"),
        ({"model_type": {"a": 1}}, "not a string"),
    ],
)
def test_config_with_wrong_head_counts_is_refused_naming_config_json(files, tmp_path, change, match):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(files / "ckpt", ckpt)
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg.update(change)
    (ckpt / "config.json").write_text(json.dumps(cfg))
    _refused(lambda: open_weight_source(str(ckpt)), ckpt / "config.json", match)


# ---- GGUF -------------------------------------------------------------------------------------------------
def _gguf(files, tmp_path, edit) -> str:
    path = tmp_path / "edited.gguf"
    path.write_bytes(edit((files / "model.gguf").read_bytes()))
    return str(path)


def _kv_array(key: str, item_type: int, count: int) -> bytes:
    raw = key.encode()
    return struct.pack("<Q", len(raw)) + raw + struct.pack("<IIQ", 9, item_type, count)


def test_gguf_array_claiming_2_to_the_60_items_is_refused_without_looping(files, tmp_path):
    """gguf's reader loops over the claimed items one by one, past the end of the file: for ever."""

    def edit(data):
        tensors, kvs = struct.unpack_from("<QQ", data, 8)
        return data[:8] + struct.pack("<QQ", tensors, kvs + 1) + _kv_array("x.y", 0, 2**60) + data[24:]

    path = _gguf(files, tmp_path, edit)
    _refused(lambda: open_weight_source(path), path, "claims 1152921504606846976 bytes")


def test_truncated_gguf_is_refused_naming_the_file(files, tmp_path):
    for cut in (10, 200, 2000, 30000):
        path = _gguf(files, tmp_path, lambda d, cut=cut: d[:cut])
        _refused(lambda path=path: open_weight_source(path), path, "GGUF")


def test_gguf_with_non_utf8_key_is_refused(files, tmp_path):
    path = _gguf(files, tmp_path, lambda d: d.replace(b"general.name", b"gener\xffl.name", 1))
    _refused(lambda: open_weight_source(path), path, "not UTF-8")


def test_gguf_with_zero_head_count_is_refused(files, tmp_path):
    import gguf

    from alps_trl.localization.gguf import GGUFStore

    path = str(tmp_path / "zero.gguf")
    w = gguf.GGUFWriter(path, "llama")
    w.add_block_count(2)
    w.add_head_count(0)
    w.add_embedding_length(64)
    w.add_tensor("blk.0.attn_q.weight", torch.zeros(64, 64).numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    _refused(lambda: GGUFStore(path), path, "head_count is 0")


def test_convert_gguf_refuses_a_truncated_file_before_transformers(files, tmp_path):
    from alps_trl.localization.gguf import convert_gguf

    path = _gguf(files, tmp_path, lambda d: d[:3000])
    _refused(lambda: convert_gguf(path, cache_dir=str(tmp_path / "cache")), path, "GGUF")


# ---- heads files ------------------------------------------------------------------------------------------
def _heads(files, tmp_path, edit) -> str:
    data = json.loads((files / "alps_heads.json").read_text())
    data.pop("fingerprint")
    raw = edit(data)
    path = tmp_path / "heads.json"
    path.write_bytes(raw if isinstance(raw, bytes) else json.dumps(raw).encode())
    return str(path)


@pytest.mark.parametrize(
    "change, match",
    [
        ({"num_kv_heads": 0}, "num_kv_heads is 0"),
        ({"num_layers": 10**12}, "num_layers"),
        ({"num_layers": 5000, "num_heads": 5000, "num_kv_heads": 1}, "more than"),
        ({"num_heads": 8.5}, "num_heads is 8.5"),
        ({"heads": [[0.5, 1]]}, "not a \\[layer, head\\] pair"),
        ({"heads": [["0", "1"]]}, "not a \\[layer, head\\] pair"),
        ({"heads": [[0, 99]]}, "outside a model"),
        ({"provenance": [1, 2]}, "provenance"),
    ],
)
def test_malformed_heads_file_is_refused_naming_it(files, tmp_path, change, match):
    path = _heads(files, tmp_path, lambda d: {**d, **change})
    with pytest.raises(HeadSelectionError, match=match) as info:
        HeadSelection.load(path)
    assert path in str(info.value) and "\n" not in str(info.value)


def test_heads_file_that_is_not_utf8_is_refused(files, tmp_path):
    path = _heads(files, tmp_path, lambda d: json.dumps(d).encode().replace(b'"heads"', b'"he\xffds"'))
    with pytest.raises(HeadSelectionError, match="not valid JSON") as info:
        HeadSelection.load(path)
    assert path in str(info.value)


def test_heads_file_for_another_shape_names_the_file(files, tmp_path):
    path = _heads(files, tmp_path, lambda d: {**d, "hidden_size": 128})
    sel = HeadSelection.load(path)
    with pytest.raises(HeadSelectionError, match="hidden_size=128") as info:
        sel.check_compatible(open_weight_source(str(files / "ckpt")).layout)
    assert path in str(info.value)


# ---- delta files ------------------------------------------------------------------------------------------
def _delta(files, tmp_path, edit_tensors) -> str:
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(files / "alps_delta.safetensors"), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        metadata = f.metadata()
    edit_tensors(tensors)
    path = tmp_path / "alps_delta.safetensors"
    save_file(tensors, str(path), metadata=metadata)
    return str(path)


@pytest.mark.parametrize("to_peft", [False, True])
@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda t: t[Q0 + ".alps_rows"].add_(1000), "leaves \\[0, 64\\)"),
        (lambda t: t[Q0 + ".alps_rows"].mul_(-1).sub_(1), "leaves \\[0, 64\\)"),
        (lambda t: t[Q0 + ".alps_rows"].fill_(3), "repeats a row"),
        (lambda t: t.update({Q0 + ".alps_delta": t[Q0 + ".alps_delta"][:, :32].contiguous()}), "has shape"),
    ],
)
def test_delta_whose_index_does_not_fit_the_base_is_refused_by_alps_merge(
    files, tmp_path, capsys, edit, match, to_peft
):
    import re

    from alps_trl.cli.merge import main

    path = _delta(files, tmp_path, edit)
    argv = [str(files / "ckpt"), path, str(tmp_path / "out")] + (["--to-peft"] if to_peft else [])
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("alps-merge: error: ") and path in err and "\n" not in err, err
    assert re.search(match, err), err
