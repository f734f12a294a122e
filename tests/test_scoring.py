"""score_heads equals the definition (docs/method.md) computed independently, head by head."""

import numpy as np
import pytest
import torch
from localize_helpers import brute_force_scores, copy_model, perturb_kv_group, perturb_query_heads

from alps_trl.localization import scoring
from alps_trl.localization.scoring import check_same_shape, distribution_distance, head_logits, score_heads
from alps_trl.localization.weights import open_weight_source
from alps_trl.testing import tiny_model


@pytest.fixture(scope="module")
def gqa_pair():
    # Two independent random models: every head differs, so every score is non-zero.
    return tiny_model("llama", seed=0), tiny_model("llama", seed=1)


@pytest.fixture(scope="module")
def mha_pair():
    return tiny_model("llama", seed=0, num_key_value_heads=8), tiny_model("llama", seed=1, num_key_value_heads=8)


@pytest.mark.parametrize("pair", ["gqa_pair", "mha_pair"])
def test_pad_equals_brute_force_scipy(pair, request):
    base, task = request.getfixturevalue(pair)
    ours = score_heads(base, task, device="cpu")
    ref = brute_force_scores(base, task, "pad")
    assert ours.dtype == torch.float64 and ours.shape == ref.shape
    assert (ref > 0).all()
    np.testing.assert_allclose(ours.numpy(), ref, rtol=1e-9, atol=0)


def test_pad_equals_brute_force_on_sharp_distributions():
    # Large weights make the softmax far from uniform: exercises the max-subtraction and the cumsum numerics.
    base = tiny_model("llama", seed=0, initializer_range=0.3)
    task = copy_model(base)
    perturb_query_heads(task, [(0, 1), (1, 6)], scale=0.05)
    perturb_kv_group(task, 1, 0, "v", scale=0.01)
    ours = score_heads(base, task, device="cpu")
    ref = brute_force_scores(base, task, "pad")
    np.testing.assert_allclose(ours.numpy(), ref, rtol=1e-9, atol=0)


def _layer(src, layer, backend):
    return src.layer_arrays(layer) if backend == "numpy" else src.layer_qkv(layer)


def _as_numpy(x):
    return x if isinstance(x, np.ndarray) else x.numpy()


@pytest.mark.parametrize("backend", ["numpy", "torch"])
@pytest.mark.parametrize("metric", ["pad", "kl", "js", "cosine", "euclidean"])
def test_chunked_layer_equals_reference_formulas(metric, backend, gqa_pair, monkeypatch):
    # Chunks of one kv group (several chunks per layer) and the direct row-major reference formulas, with
    # the math run by numpy (the CPU path) and by torch (the CUDA path, here on CPU tensors).
    base, task = gqa_pair
    src_b, src_t = open_weight_source(base), open_weight_source(task)
    monkeypatch.setattr(scoring, "_CHUNK_ELEMENTS", 4 * 8 * 64)
    for layer in range(2):
        qkv_b, qkv_t = _layer(src_b, layer, backend), _layer(src_t, layer, backend)
        chunked = scoring.score_layer(qkv_b, qkv_t, metric, 0.5)
        b64, t64 = ([x.astype(np.float64) for x in qkv] if backend == "numpy" else qkv for qkv in (qkv_b, qkv_t))
        reference = distribution_distance(head_logits(*b64), head_logits(*t64), metric, 0.5)
        assert isinstance(chunked, np.ndarray) == (backend == "numpy") and chunked.dtype == reference.dtype
        np.testing.assert_allclose(_as_numpy(chunked), _as_numpy(reference), rtol=1e-9, atol=1e-15)


@pytest.mark.parametrize("metric", ["pad", "kl", "js", "cosine", "euclidean"])
def test_numpy_and_torch_math_agree(metric, gqa_pair):
    base, task = gqa_pair
    src_b, src_t = open_weight_source(base), open_weight_source(task)
    for layer in range(2):
        with_numpy = scoring.score_layer(src_b.layer_arrays(layer), src_t.layer_arrays(layer), metric)
        with_torch = scoring.score_layer(
            src_b.layer_qkv(layer, dtype=None), src_t.layer_qkv(layer, dtype=None), metric
        )
        np.testing.assert_allclose(with_numpy, with_torch.numpy(), rtol=1e-9, atol=1e-15)


def test_score_array_is_score_heads_in_numpy(gqa_pair):
    base, task = gqa_pair
    as_array = scoring.score_array(base, task, device="cpu")
    assert isinstance(as_array, np.ndarray) and as_array.dtype == np.float64 and as_array.shape == (2, 8)
    as_tensor = score_heads(base, task, device="cpu")
    assert as_tensor.dtype == torch.float64 and np.array_equal(as_tensor.numpy(), as_array)


def test_cpu_device_is_resolved_without_torch_semantics():
    assert scoring.resolve_device("cpu") == scoring.resolve_device(torch.device("cpu")) == "cpu"
    with pytest.raises(ValueError, match="Invalid device"):
        scoring.resolve_device("no-such-device")


@pytest.mark.parametrize("metric", ["kl", "js", "cosine", "euclidean"])
def test_ablation_metrics_equal_brute_force(metric, gqa_pair):
    base, task = gqa_pair
    ours = score_heads(base, task, metric=metric, device="cpu")
    ref = brute_force_scores(base, task, metric)
    # These sums of N ~ 1/N-sized terms are rounding-limited at ~1e-12 absolute: compare at that scale.
    np.testing.assert_allclose(ours.numpy(), ref, rtol=1e-6, atol=1e-14)
    assert (ours > 0).all()


def test_temperature_is_applied(gqa_pair):
    base, task = gqa_pair
    ours = score_heads(base, task, temperature=0.25, device="cpu")
    ref = brute_force_scores(base, task, "pad", temperature=0.25)
    np.testing.assert_allclose(ours.numpy(), ref, rtol=1e-9, atol=0)
    assert not torch.allclose(ours, score_heads(base, task, device="cpu"))


@pytest.mark.parametrize("which", ["k", "v"])
def test_gqa_maps_query_head_to_kv_group(which, tiny_llama):
    # H=8, KV=2: group 1 = query heads 4..7. Changing only that group's k (or v) rows must move exactly
    # those heads; slicing k/v by the query head index (a known bug) would move heads 1 (and 0..1 rows).
    task = copy_model(tiny_llama)
    perturb_kv_group(task, layer=1, group=1, which=which)
    scores = score_heads(tiny_llama, task, device="cpu")
    nonzero = {(int(a), int(b)) for a, b in torch.nonzero(scores)}
    assert nonzero == {(1, 4), (1, 5), (1, 6), (1, 7)}


def test_identical_models_score_zero(tiny_llama):
    scores = score_heads(tiny_llama, copy_model(tiny_llama), device="cpu")
    assert torch.count_nonzero(scores) == 0


def test_head_logits_matches_per_head_formula():
    gen = torch.Generator().manual_seed(0)
    wq, wk, wv = (torch.randn(n, 4, 6, generator=gen, dtype=torch.float64) for n in (6, 2, 2))
    logits = head_logits(wq, wk, wv)
    for h in range(6):
        g = h // 3
        np.testing.assert_allclose(logits[h].numpy(), (wq[h].T @ (wk[g] @ wv[g].T)).flatten().numpy(), rtol=1e-12)
    out = torch.empty(6, 24, dtype=torch.float64)
    assert head_logits(wq, wk, wv, out=out) is out and torch.equal(out, logits)


def test_distance_of_equal_distributions_is_zero():
    x = torch.randn(3, 50, dtype=torch.float64)
    for metric in ("pad", "kl", "js", "cosine", "euclidean"):
        assert torch.all(distribution_distance(x.clone(), x.clone(), metric) == 0), metric
        assert np.all(distribution_distance(x.numpy().copy(), x.numpy().copy(), metric) == 0), metric


def test_head_logits_numpy_equals_torch():
    gen = torch.Generator().manual_seed(0)
    wq, wk, wv = (torch.randn(n, 4, 6, generator=gen, dtype=torch.float64) for n in (6, 2, 2))
    np.testing.assert_allclose(head_logits(wq.numpy(), wk.numpy(), wv.numpy()), head_logits(wq, wk, wv), rtol=1e-12)


def test_architecture_mismatch_is_named(tiny_llama):
    other = tiny_model("qwen2", seed=0)
    with pytest.raises(ValueError, match="different architectures.*'llama'.*'qwen2'"):
        score_heads(tiny_llama, other)


def test_shape_mismatch_names_first_tensor(tiny_llama):
    wider = tiny_model("llama", seed=0, hidden_size=32, head_dim=8)
    with pytest.raises(ValueError, match=r"model\.layers\.0\.self_attn\.q_proj\.weight.*\[64, 64\].*\[64, 32\]"):
        score_heads(tiny_llama, wider)
    fewer_kv = tiny_model("llama", seed=0, num_key_value_heads=4)
    with pytest.raises(ValueError, match=r"model\.layers\.0\.self_attn\.k_proj\.weight"):
        score_heads(tiny_llama, fewer_kv)
    deeper = tiny_model("llama", seed=0, num_hidden_layers=3)
    with pytest.raises(ValueError, match=r"model\.layers\.2\.self_attn\.q_proj\.weight.*3 layers"):
        check_same_shape(open_weight_source(tiny_llama), open_weight_source(deeper))


def test_same_tensor_shapes_different_heads_is_refused(tiny_llama):
    # 8 heads of 8 vs 4 heads of 16: identical tensor shapes, different head geometry.
    other = tiny_model("llama", seed=0, num_attention_heads=4, num_key_value_heads=1, head_dim=16)
    with pytest.raises(ValueError, match="k_proj|num_heads|head_dim"):
        score_heads(tiny_llama, other)


def test_bad_metric_and_temperature(tiny_llama):
    with pytest.raises(ValueError, match="Unknown ALPS metric 'w2'.*pad, kl, js, cosine, euclidean"):
        score_heads(tiny_llama, tiny_llama, metric="w2")
    with pytest.raises(ValueError, match="temperature"):
        score_heads(tiny_llama, tiny_llama, temperature=0)


def test_cuda_request_without_cuda_is_a_clear_error(tiny_llama):
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    with pytest.raises(ValueError, match="CUDA is not available"):
        score_heads(tiny_llama, tiny_llama, device="cuda")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_scores_equal_cpu_scores(gqa_pair):
    base, task = gqa_pair
    cpu = score_heads(base, task, device="cpu")
    gpu = score_heads(base, task, device="cuda")
    assert gpu.device.type == "cpu"
    np.testing.assert_allclose(gpu.numpy(), cpu.numpy(), rtol=1e-9, atol=0)
