"""QVGCache on tiny random Llamas and on synthetic K/V: quantization off == DynamicCache, chunk bookkeeping, chunks
compressed once, reconstruction quality per PRQ stage, crop / beam / batch edits, memory, bad input."""

import copy

import pytest
import torch
from transformers import DynamicCache

from hf_fastslow import QVGCache, QVGConfig
from hf_fastslow.evaluation.memory import storage_bytes
from hf_fastslow.integrations import cache_kwargs
from tests.conftest import tiny_llama


@pytest.fixture(scope="module")
def model():
    # head_dim 16, 2 KV heads, 3 layers
    return tiny_llama(num_layers=3, hidden=64, heads=4, kv_heads=2, seed=0)


def cfg(**kw):
    base = dict(nbits=2, block_size=16, chunk_tokens=8, sink_tokens=2, num_centroids=4, kmeans_iters=3)
    base.update(kw)
    return QVGConfig(**base)


def run(model, cache, pieces):
    outs = []
    with torch.no_grad():
        for piece in pieces:
            outs.append(model(piece, **cache_kwargs(model, cache)).logits)
    return torch.cat(outs, dim=1)


def split(ids, cuts):
    bounds = [0, *cuts, ids.shape[1]]
    return [ids[:, a:b] for a, b in zip(bounds, bounds[1:]) if b > a]


IDS = torch.randint(3, 128, (2, 45), generator=torch.Generator().manual_seed(0))
PIECES = split(IDS, [11, 12, 13, 27, 28])  # a prefill, single steps, a chunk-crossing block, single steps


# ---------------------------------------------------------------------------------------------------------------------
# quantization off == DynamicCache
# ---------------------------------------------------------------------------------------------------------------------
def test_quantization_off_without_rope_round_trip_is_bit_identical_to_dynamic_cache(model):
    ref = run(model, DynamicCache(config=model.config), PIECES)
    cache = QVGCache(model, cfg(nbits=16, pre_rope_keys=False))
    assert torch.equal(run(model, cache, PIECES), ref)
    assert all(len(layer.spans) == (45 - 2) // 8 for layer in cache.layers)  # the chunk machinery did run


@pytest.mark.parametrize("keep_recent_chunks", [0, 1])
def test_quantization_off_with_pre_rope_keys_matches_dynamic_cache(model, keep_recent_chunks):
    ref = run(model, DynamicCache(config=model.config), PIECES)
    cache = QVGCache(model, cfg(nbits=16, keep_recent_chunks=keep_recent_chunks))
    torch.testing.assert_close(run(model, cache, PIECES), ref, atol=1e-5, rtol=1e-5)


def test_generate_by_name_and_by_instance(model):
    prompt = IDS[:1, :20]
    with torch.no_grad():
        ref = model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False, max_new_tokens=8)
        by_name = model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False, max_new_tokens=8,
                                 cache_implementation="qvg", cache_config={"nbits": 16, "chunk_tokens": 4},
                                 return_dict_in_generate=True)
        cache = QVGCache(model, cfg(nbits=16))
        by_instance = model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                                     max_new_tokens=8, **cache_kwargs(model, cache))
    returned = getattr(by_name, "cache", None) or getattr(by_name, "past_key_values", None)
    assert isinstance(returned, QVGCache) and len(returned.layers[0].spans) > 0
    assert torch.equal(by_name.sequences, ref) and torch.equal(by_instance, ref)
    assert cache.get_seq_length() == 27


# ---------------------------------------------------------------------------------------------------------------------
# chunk bookkeeping and "compressed once"
# ---------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("keep_recent_chunks", [0, 1])
def test_chunk_boundaries_token_by_token(model, keep_recent_chunks):
    cache = QVGCache(model, cfg(keep_recent_chunks=keep_recent_chunks))
    chunk, sinks = 8, 2
    for t in range(1, 30):
        run(model, cache, [IDS[:1, t - 1 : t]])
        after_sinks = max(0, t - sinks)
        spans = max(0, after_sinks // chunk - keep_recent_chunks)
        for layer in cache.layers:
            assert (layer.n_sink, len(layer.spans), layer.n_window) == (
                min(t, sinks), spans, after_sinks - spans * chunk), f"after {t} tokens"
            assert all(s.length == chunk for s in layer.spans)


def test_old_chunks_are_never_recompressed(model):
    cache = QVGCache(model, cfg(num_stages=2))
    run(model, cache, [IDS[:, :20]])
    first = [[(span, [t.clone() for t in span.k.tensors() + span.v.tensors()]) for span in layer.spans]
             for layer in cache.layers]
    assert all(len(spans) == 2 for spans in first)
    run(model, cache, split(IDS[:, 20:], [1, 2, 10]))
    for layer, spans in zip(cache.layers, first):
        assert len(layer.spans) == 5
        for i, (span, saved) in enumerate(spans):
            assert layer.spans[i] is span
            for now, before in zip(span.k.tensors() + span.v.tensors(), saved):
                assert torch.equal(now, before)


def test_nbytes_is_the_storage_walk_and_below_an_fp16_cache(model):
    cache = QVGCache(model, cfg(nbits=2, chunk_tokens=16, num_centroids=2, sink_tokens=1))
    run(model, cache, [IDS[:, :40], IDS[:, 40:41]])
    assert cache.nbytes() == storage_bytes(cache)
    assert cache.packed_nbytes() == sum(s.k.nbytes() + s.v.nbytes() for layer in cache.layers for s in layer.spans)
    dyn = DynamicCache(config=model.config)
    run(model, dyn, [IDS[:, :40], IDS[:, 40:41]])
    assert cache.fp16_kv_nbytes() == storage_bytes(dyn) // 2  # the fp32 DynamicCache holds twice the fp16 bytes
    assert cache.nbytes() < storage_bytes(dyn)


# ---------------------------------------------------------------------------------------------------------------------
# reconstruction quality on clustered synthetic K/V (update() called directly, positions 0..T-1)
# ---------------------------------------------------------------------------------------------------------------------
def _clustered_kv(n=64, d=16, heads=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(1, heads, 6, d, generator=g) * 3
    ids = torch.randint(0, 6, (1, heads, n), generator=g)
    base = torch.gather(centers, -2, ids.unsqueeze(-1).expand(1, heads, n, d))
    return base + 0.2 * torch.randn(1, heads, n, d, generator=g), base + 0.2 * torch.randn(1, heads, n, d, generator=g)


def _history_error(model, config, noise=None):
    """Relative error of the K/V history the cache returns (one read after 64 tokens were written)."""
    cache = QVGCache(model, config)
    k, v = _clustered_kv()
    for layer_idx in range(len(cache.layers)):
        cache.update(k, v, layer_idx)
    probe = torch.zeros(1, 2, 1, 16)
    errors = []
    for layer_idx in range(len(cache.layers)):
        keys, values = cache.update(probe, probe, layer_idx)
        if noise is not None:
            keys = keys + noise * torch.randn_like(keys)
        # keys come back re-rotated at positions 0..63: compare with what the model would cache, rotated the same
        errors.append(((values[:, :, :64] - v).norm() / v.norm()).item())
        errors.append(((keys[:, :, :64] - k).norm() / k.norm()).item())
    return max(errors)


QUALITY = dict(chunk_tokens=16, num_centroids=6, kmeans_iters=10)
GOOD_ENOUGH = 0.1  # relative error of the rebuilt history that 3 stages reach on these clustered K/V


def test_history_error_decreases_with_each_prq_stage(model):
    errors = [_history_error(model, cfg(num_stages=s, **QUALITY)) for s in range(4)]
    assert all(a > b for a, b in zip(errors, errors[1:])), errors
    assert errors[1] < 0.5 * errors[0], errors  # smoothing pays off on clustered vectors
    assert errors[-1] < GOOD_ENOUGH, errors


def test_history_error_check_fails_on_noise(model):
    assert _history_error(model, cfg(num_stages=3, **QUALITY), noise=0.3) > GOOD_ENOUGH


# ---------------------------------------------------------------------------------------------------------------------
# crop, beams, batch edits, copies
# ---------------------------------------------------------------------------------------------------------------------
def _history(cache):
    """The K/V every layer holds, as the next read returns them (without writing anything)."""
    out = [layer._rebuild(layer.get_seq_length()) for layer in cache.layers]
    cache._shared.rope_memo.clear()  # the RoPE tables a forward shares between layers; a forward clears them itself
    return out


def test_crop_every_n_off_matches_dynamic_cache(model):
    ids = IDS[:1, :30]
    nxt = IDS[:1, 30:32]
    ours = QVGCache(model, cfg(nbits=16))
    ref = DynamicCache(config=model.config)
    run(model, ours, [ids[:, :20], ids[:, 20:]])
    run(model, ref, [ids])
    for n in range(0, 31):
        a, b = copy.deepcopy(ours), copy.deepcopy(ref)
        a.crop(-n)
        if n:
            b.crop(-n)
        assert a.get_seq_length() == b.get_seq_length() == 30 - n
        torch.testing.assert_close(run(model, a, [nxt]), run(model, b, [nxt]), atol=1e-5, rtol=1e-5,
                                   msg=lambda m, n=n: f"crop(-{n}): {m}")


def test_crop_keeps_codes_and_zero_removes_nothing(model):
    cache = QVGCache(model, cfg(num_stages=1))
    run(model, cache, [IDS[:, :30]])
    before, nbytes = _history(cache), cache.nbytes()
    cache.crop(0)
    assert cache.get_seq_length() == 30 and cache.nbytes() == nbytes
    for (k0, v0), (k1, v1) in zip(before, _history(cache)):
        assert torch.equal(k0, k1) and torch.equal(v0, v1)
    for n in (3, 9, 12, 25, 29):  # into the window, mid-span, span boundary, into the sinks
        a = copy.deepcopy(cache)
        a.crop(-n)
        assert a.get_seq_length() == 30 - n and a.positions.shape[1] == 30 - n
        assert a.nbytes() == storage_bytes(a)
        for (k0, v0), (k1, v1) in zip(before, _history(a)):
            torch.testing.assert_close(k1, k0[:, :, : 30 - n], atol=1e-6, rtol=0)
            assert torch.equal(v1, v0[:, :, : 30 - n])
    cache.crop(-100)
    assert cache.get_seq_length() == 0 and cache.positions is None
    run(model, cache, [IDS[:, :12]])  # usable again, chunks cut afresh
    assert cache.get_seq_length() == 12 and len(cache.layers[0].spans) == 1


def test_beam_reorder_and_batch_edits_move_rows(model):
    cache = QVGCache(model, cfg(num_stages=2))
    ids = torch.randint(3, 128, (3, 26), generator=torch.Generator().manual_seed(4))
    mask = torch.ones_like(ids)
    mask[1, :3] = mask[2, :6] = 0  # rows padded differently: their RoPE positions differ
    pos = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
    with torch.no_grad():
        model(ids, attention_mask=mask, position_ids=pos, **cache_kwargs(model, cache))
    assert torch.equal(cache.positions, pos.int())
    before = _history(cache)
    order = torch.tensor([2, 0, 0])
    beams = copy.deepcopy(cache)
    beams.reorder_cache(order)
    for (k0, v0), (k1, v1) in zip(before, _history(beams)):
        torch.testing.assert_close(k1, k0[order], atol=1e-6, rtol=0)
        assert torch.equal(v1, v0[order])
    assert torch.equal(beams.positions, cache.positions[order])
    rep = copy.deepcopy(cache)
    rep.batch_repeat_interleave(2)
    for (k0, v0), (k1, v1) in zip(before, _history(rep)):
        torch.testing.assert_close(k1, k0.repeat_interleave(2, dim=0), atol=1e-6, rtol=0)
        assert torch.equal(v1, v0.repeat_interleave(2, dim=0))
    sel = copy.deepcopy(cache)
    sel.batch_select_indices(torch.tensor([1]))
    for (k0, v0), (k1, v1) in zip(before, _history(sel)):
        torch.testing.assert_close(k1, k0[1:2], atol=1e-6, rtol=0)
        assert torch.equal(v1, v0[1:2])
    # and the reordered cache keeps decoding like the original's rows would
    nxt = torch.randint(3, 128, (3, 1))
    full = torch.cat([mask, torch.ones(3, 1, dtype=mask.dtype)], 1)
    step = dict(attention_mask=full, position_ids=pos[:, -1:] + 1)
    with torch.no_grad():
        reordered = model(nxt[order], **{k: v[order] for k, v in step.items()}, **cache_kwargs(model, beams)).logits
        original = model(nxt, **step, **cache_kwargs(model, copy.deepcopy(cache))).logits
    torch.testing.assert_close(reordered, original[order], atol=1e-5, rtol=1e-5)


def test_left_padded_batch_off_matches_dynamic_cache_and_sinks_cover_the_padding(model):
    ids = IDS[:, :24].clone()
    mask = torch.ones_like(ids)
    mask[1, :5] = 0  # row 1 is left-padded by 5
    ids[1, :5] = 0
    pos = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
    kw = dict(attention_mask=mask, position_ids=pos)
    with torch.no_grad():
        ref = model(ids, **kw, **cache_kwargs(model, DynamicCache(config=model.config))).logits
        cache = QVGCache(model, cfg(nbits=16))
        first = model(ids[:, :20], attention_mask=mask[:, :20], position_ids=pos[:, :20],
                      **cache_kwargs(model, cache)).logits
        rest = model(ids[:, 20:], attention_mask=mask, position_ids=pos[:, 20:], **cache_kwargs(model, cache)).logits
    out = torch.cat([first, rest], 1)
    torch.testing.assert_close(out[mask.bool()], ref[mask.bool()], atol=1e-5, rtol=1e-5)
    assert cache.layers[0].n_sink == 5 + 2  # row 1's first real tokens are exact too


def test_deepcopy_grows_apart(model):
    cache = QVGCache(model, cfg())
    run(model, cache, [IDS[:, :20]])
    clone = copy.deepcopy(cache)
    assert clone.model is model
    run(model, clone, [IDS[:, 20:23]])
    assert cache.get_seq_length() == 20 and clone.get_seq_length() == 23
    assert clone.layers[0]._shared is clone._shared is not cache._shared


def test_bf16_model_runs_and_off_stays_close():
    model = tiny_llama(num_layers=2, hidden=64, heads=4, kv_heads=2, seed=1).to(torch.bfloat16)
    ref = run(model, DynamicCache(config=model.config), PIECES)
    off = run(model, QVGCache(model, cfg(nbits=16)), PIECES)
    torch.testing.assert_close(off.float(), ref.float(), atol=2e-2, rtol=2e-2)
    q = QVGCache(model, cfg(nbits=4))
    assert torch.isfinite(run(model, q, PIECES).float()).all()
    assert q.layers[0].spans[0].k.centroids.dtype == torch.bfloat16


# ---------------------------------------------------------------------------------------------------------------------
# bad input: clear errors, nothing corrupted
# ---------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, match", [
    (dict(nbits=5), "nbits"), (dict(nbits=1), "nbits"), (dict(block_size=12), "block_size"),
    (dict(num_centroids=300), "256"), (dict(chunk_tokens=0), "chunk_tokens"), (dict(num_stages=-1), "num_stages"),
    (dict(sink_tokens=-1), "sink_tokens"),
])
def test_config_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        QVGConfig(**kwargs)


def test_cache_errors_leave_the_cache_untouched(model):
    with pytest.raises(ValueError, match="does not divide the head dim"):
        QVGCache(model, QVGConfig(block_size=32))  # head dim 16
    with pytest.raises(ValueError, match="Unknown QVGConfig keys"):
        QVGCache(model, {"bits": 2})
    cache = QVGCache(model, cfg())
    run(model, cache, [IDS[:, :20]])
    state = (cache.get_seq_length(), cache.nbytes(), cache.positions.clone(), _history(cache))
    with pytest.raises(ValueError, match="batch of 2"):
        run(model, cache, [IDS[:1, 20:22]])
    with pytest.raises(ValueError, match="heads of dim"):
        cache.update(torch.zeros(2, 1, 1, 16), torch.zeros(2, 1, 1, 16), 0)
    with pytest.raises(ValueError, match="block_size"):
        cache.update(torch.zeros(2, 2, 1, 8), torch.zeros(2, 2, 1, 8), 0)
    with pytest.raises(ValueError, match="shape"):
        cache.update(torch.zeros(2, 2, 1, 16), torch.zeros(2, 2, 3, 16), 0)
    assert cache.get_seq_length() == state[0] and cache.nbytes() == state[1]
    assert torch.equal(cache.positions, state[2])
    for (k0, v0), (k1, v1) in zip(state[3], _history(cache)):
        assert torch.equal(k0, k1) and torch.equal(v0, v1)
    run(model, cache, [IDS[:, 20:22]])  # still usable
    assert cache.get_seq_length() == 22


def test_a_cache_that_already_holds_part_of_the_prompt(model):
    prompt = IDS[:1, :22]
    held = prompt[:, :13]
    cache = QVGCache(model, cfg(nbits=16))
    run(model, cache, [held])
    with torch.no_grad():
        ref = model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False, max_new_tokens=6)
        out = model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False, max_new_tokens=6,
                             **cache_kwargs(model, cache))
    assert torch.equal(out, ref)
    assert cache.get_seq_length() == 22 + 5
