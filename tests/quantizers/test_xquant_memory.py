"""XQuant memory: `nbytes()` is what an independent walk of the cache object finds, the layout matches the analytic
size, no cache copies model weights, the SVD factors are shared through the model (only the mode in use, recomputed
when the weights change), and nothing but the streams and the positions outlives a forward pass."""

import copy
import gc
import types
import weakref

import pytest
import torch
from transformers import DynamicCache

from hf_fastslow import XQuantCache, XQuantConfig
from hf_fastslow.integrations import cache_kwargs
from hf_fastslow.quantizers.xquant import release_xquant_factors, xquant_factor_nbytes
from tests.conftest import tiny_llama
from tests.quantizers.conftest import small_cfg

pytestmark = pytest.mark.integration




def forward(model, ids, cache, **kw):
    with torch.no_grad():
        return model(ids, **cache_kwargs(model, cache), **kw).logits


_NOT_ENTERED = (torch.nn.Module, weakref.ReferenceType, type, types.ModuleType, types.FunctionType,
                types.BuiltinFunctionType, types.MethodType, types.CodeType)


def gc_walk(root) -> dict[int, int]:
    """An independent walk (Python's own reference graph, not the package's helper): {storage ptr: storage bytes}."""
    found, seen, stack = {}, set(), [root]
    while stack:
        obj = stack.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        if isinstance(obj, torch.Tensor):
            storage = obj.untyped_storage()
            found[storage.data_ptr()] = storage.nbytes()
        elif not isinstance(obj, _NOT_ENTERED):
            stack.extend(gc.get_referents(obj))
    return found


def walk_bytes(root) -> int:
    return sum(gc_walk(root).values())


def _analytic_bytes(cfg, n_tokens, batch, d, d_kv, n_layers, w_cl):
    """Codes + fp16 (scale, min) per group for quantized blocks, the window in fp32, int32 positions."""
    r = n_tokens % cfg.residual_length
    q = n_tokens - r
    g = cfg.group_size
    total = batch * n_tokens * 4

    def per_token(width, bits):
        return width * bits / 8 + 2 * 2 * width / g if bits != 16 else width * 4

    for i in range(n_layers):
        bits = cfg.bits_for_layer(i)
        if cfg.mode == "x" or (cfg.mode == "cl" and i == cfg.base_layer):
            width = d
        elif cfg.mode == "cl" and i > cfg.base_layer:
            width = w_cl
        else:
            width = 2 * d_kv
        total += batch * (q * per_token(width, bits) + r * width * 4)
    return total


@pytest.mark.parametrize("mode,nbits", [("x", 4), ("latent", 2), ("latent", 3), ("cl", 2), ("cl", 3), ("x", 8),
                                        ("cl", 16)])
def test_nbytes_is_the_walk_and_the_layout_after_every_edit(gqa_model, mode, nbits):
    cfg = small_cfg(nbits=nbits, mode=mode)
    cache = XQuantCache(gqa_model, cfg)
    params = {p.untyped_storage().data_ptr() for p in gqa_model.parameters()}

    def check(n_tokens):
        walked = gc_walk(cache)
        assert cache.nbytes() == sum(walked.values()) == _analytic_bytes(cfg, n_tokens, 2, 64, 16, 4, 32)
        assert not params & set(walked), "the cache holds a model weight (or a view of one)"
        assert cache.get_seq_length() == n_tokens

    ids = torch.randint(3, 128, (2, 45))
    forward(gqa_model, ids, cache)
    check(45)  # prefill: 32 quantized + 13 in the window
    for step in range(4):  # decode: the window fills and flushes a block at 48
        forward(gqa_model, torch.randint(3, 128, (2, 1)), cache)
        check(46 + step)
    cache.crop(-3)  # inside the window
    check(46)
    cache.crop(-20)  # back into the quantized blocks
    check(26)
    cache.reorder_cache(torch.tensor([1, 0]))
    check(26)
    forward(gqa_model, torch.randint(3, 128, (2, 7)), cache)
    check(33)
    clone = copy.deepcopy(cache)
    assert clone.nbytes() == walk_bytes(clone) == cache.nbytes()
    assert not set(gc_walk(clone)) & set(gc_walk(cache)), "a deep copy shares storage with the original"


def test_two_caches_share_factors_that_belong_to_the_model():
    model = tiny_llama(num_layers=4, hidden=64, heads=4, kv_heads=1, seed=3)
    assert xquant_factor_nbytes(model) == 0
    a = XQuantCache(model, small_cfg(nbits=4, mode="latent"))
    b = XQuantCache(model, small_cfg(nbits=2, mode="latent"))
    # per layer: U_k, U_v (64 x 16) and M_k, M_v (16 x 16) in fp32
    assert a.factor_nbytes() == b.factor_nbytes() == xquant_factor_nbytes(model) == 4 * (2 * 64 * 16 + 2 * 16 * 16) * 4
    forward(model, torch.randint(3, 128, (1, 20)), a)
    assert set(gc_walk([a._factors(layer.plan) for layer in a.layers])) == set(
        gc_walk([b._factors(layer.plan) for layer in b.layers]))
    assert a.nbytes() == walk_bytes(a)  # no factor is reachable from the cache itself
    release_xquant_factors(model)
    assert xquant_factor_nbytes(model) == 0


@pytest.mark.parametrize("mode,expected", [
    ("x", 0),
    # layer 0 before the base: latent factors; layer 1 = base: none; layers 2, 3: U_kv (64 x 32)
    ("cl", (2 * 64 * 16 + 2 * 16 * 16) * 4 + 2 * 64 * 32 * 4),
])
def test_only_the_factors_of_the_mode_in_use_are_computed(mode, expected):
    model = tiny_llama(num_layers=4, hidden=64, heads=4, kv_heads=1, seed=4)
    cache = XQuantCache(model, small_cfg(nbits=2, mode=mode))
    forward(model, torch.randint(3, 128, (1, 40)), cache)
    assert xquant_factor_nbytes(model) == cache.factor_nbytes() == expected


@pytest.mark.parametrize("mode", ["latent", "cl"])
def test_factors_follow_in_place_weight_updates(mode):
    model = tiny_llama(num_layers=4, hidden=64, heads=4, kv_heads=1, seed=5)
    ids = torch.randint(3, 128, (1, 30))
    XQuantCache(model, small_cfg(nbits=16, mode=mode))  # factors of the original weights
    with torch.no_grad():  # an optimizer step: same storages, new values
        for layer in model.model.layers:
            layer.self_attn.k_proj.weight.mul_(1.7).add_(0.01)
            layer.self_attn.v_proj.weight.mul_(-0.8)
    cache = XQuantCache(model, small_cfg(nbits=16, mode=mode))
    forward(model, ids[:, :20], cache)
    ref = DynamicCache(config=model.config)
    forward(model, ids[:, :20], ref)
    torch.testing.assert_close(forward(model, ids[:, 20:], cache), forward(model, ids[:, 20:], ref), atol=1e-4,
                               rtol=1e-4)


def test_nothing_but_streams_and_positions_outlives_a_forward(gqa_model):
    cache = XQuantCache(gqa_model, small_cfg(nbits=2, mode="cl"))
    forward(gqa_model, torch.randint(3, 128, (1, 40)), cache)
    forward(gqa_model, torch.randint(3, 128, (1, 1)), cache)
    assert cache._stash == {} and cache._rope_memo == {}
    assert cache._cl_read is None and cache._cl_flush is None
    for layer in cache.layers:
        for s in layer.streams.values():  # the window owns a storage of its own size
            if s.res is not None:
                assert s.res.untyped_storage().nbytes() == s.res.numel() * s.res.element_size()


def test_outlier_channel_costs_fp16_per_token(gqa_model):
    ids = torch.randint(3, 128, (1, 32))
    a = XQuantCache(gqa_model, small_cfg(nbits=2, mode="latent"))
    b = XQuantCache(gqa_model, small_cfg(nbits=2, mode="latent", fp16_outlier_channel=True, group_size=8))
    forward(gqa_model, ids, a)
    out_b = forward(gqa_model, ids, b)
    assert torch.isfinite(out_b).all()

    # channel 0 of the key latent leaves the quantizer: +32 tokens x 2 B of fp16, -32 codes, -4 groups x (scale, min)
    def delta(bits):
        return 32 * 2 - 32 * bits // 8 - (32 // 8) * 2 * 2

    assert b.nbytes() - a.nbytes() == delta(4) + 3 * delta(2)
    assert b.nbytes() == walk_bytes(b)


def test_compression_ratio_against_fp16_kv(gqa_model):
    cache = XQuantCache(gqa_model, XQuantConfig(nbits=2, mode="latent", group_size=16, residual_length=16,
                                                high_precision_layers=0))
    forward(gqa_model, torch.randint(3, 128, (1, 256)), cache)
    ratio = cache.fp16_kv_nbytes() / cache.nbytes()
    # 2-bit codes + fp16 scale/min per 16 values = 4 bits per value; int32 positions on top
    assert 3.5 < ratio < 4.0


@pytest.mark.slow
@pytest.mark.parametrize("mode,nbits,min_ratio", [("cl", 2, 5.5), ("latent", 4, 3.5)])
def test_default_model_memory_targets(default_model, mode, nbits, min_ratio):
    """On SmolLM2-135M (fp32): bytes per token against fp16 K/V, the fixed cost of a full window, and one cache plus
    the factors it needs below a DynamicCache in the model's dtype at 1,024 tokens."""
    from hf_fastslow.evaluation.kv_ppl import bundled_text
    from hf_fastslow.evaluation.memory import storage_bytes

    model, tok = default_model
    ids = tok(bundled_text(), return_tensors="pt").input_ids[:, : 1024 + 63]
    cache = XQuantCache(model, XQuantConfig(nbits=nbits, mode=mode, group_size=64, residual_length=64))
    points = []
    for start in range(0, 1024, 64):
        forward(model, ids[:, start : start + 64], cache)
        points.append((start + 64, cache.nbytes()))
    slope = (points[-1][1] - points[1][1]) / (points[-1][0] - points[1][0])
    at_1k = points[-1][1]
    assert 2 * 30 * 192 * 2 / slope >= min_ratio
    forward(model, ids[:, 1024:], cache)  # 63 more tokens: the unquantized window at its largest
    assert cache.nbytes() - slope * ids.shape[1] < 5e6
    dynamic = DynamicCache(config=model.config)
    forward(model, ids[:, :1024], dynamic)
    assert at_1k + cache.factor_nbytes() < storage_bytes(dynamic)
