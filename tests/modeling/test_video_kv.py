"""The video KV cache (modeling/video_kv.py) and the autoregressive Wan driver (modeling/wan_autoregressive.py) on a
tiny random Wan transformer built from a config, as diffusers' own tests do."""

import pytest
import torch

pytest.importorskip("diffusers")

from hf_fastslow.evaluation.memory import storage_bytes  # noqa: E402
from hf_fastslow.integrations.diffusers import (  # noqa: E402
    restore_wan_self_attention_processors,
    set_wan_self_attention_mask,
)
from hf_fastslow.modeling.video_kv import (  # noqa: E402
    KIVICodec,
    VideoKVCache,
    VideoKVConfig,
    apply_qvg,
    remove_qvg,
    video_kv_cache_of,
)
from hf_fastslow.modeling.wan_autoregressive import flow_sigmas, wan_autoregressive_rollout  # noqa: E402

torch.set_num_threads(1)

TOKENS_PER_FRAME = 16  # 8 x 8 latents, 2 x 2 patches
CHUNK = 2  # latent frames per chunk -> 32 tokens (a multiple of 8, which KIVI's per-channel keys need)


def tiny_wan(seed=0, head_dim=16, fused=False):
    from diffusers import WanTransformer3DModel

    torch.manual_seed(seed)
    model = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=head_dim, in_channels=4, out_channels=4,
        text_dim=16, freq_dim=16, ffn_dim=32, num_layers=2, cross_attn_norm=True, rope_max_seq_len=32,
    ).eval()
    if fused:
        model.fuse_qkv_projections()
    return model


def video_inputs(chunks=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, 4, chunks * CHUNK, 8, 8, generator=g), torch.randn(1, 5, 16, generator=g)


@pytest.fixture(scope="module")
def model():
    return tiny_wan()


def rollout(model, config, chunks=4, steps=2, **kw):
    noise, text = video_inputs(chunks)
    cache = VideoKVCache(config)
    out = wan_autoregressive_rollout(model, cache, noise, text, chunk_frames=CHUNK, num_steps=steps, **kw)
    return out, cache


def block_causal_reference(model, noise, text, *, steps, sink_chunks=1, window_chunks=None, context_timestep=0.0,
                           prefix=None):
    """The rollout recomputed without any cache: every step of chunk c runs the transformer on the clean chunks
    0..c-1 (at the context timestep) followed by the noisy chunk c (at the step's timestep), with diffusers' default
    self-attention under a block-causal mask (chunk i sees the sink chunks, the last `window_chunks` chunks before
    it, and itself). Each chunk's prefix is thus recomputed from scratch from the clean latents. `prefix`: given
    clean chunks that come first (returned too)."""
    sigmas = flow_sigmas(steps)
    clean = [] if prefix is None else list(prefix.split(CHUNK, dim=2))
    given = len(clean)
    for c in range(given, given + noise.shape[2] // CHUNK):
        x = noise[:, :, (c - given) * CHUNK : (c - given + 1) * CHUNK]
        chunk_of = torch.arange((c + 1) * CHUNK * TOKENS_PER_FRAME) // (CHUNK * TOKENS_PER_FRAME)
        i, j = chunk_of[:, None], chunk_of[None, :]
        seen = (j == i) | ((j < i) & ((j < sink_chunks) | (window_chunks is None) | (j >= i - (window_chunks or 0))))
        for k in range(steps):
            full = torch.cat(clean + [x], dim=2)
            per_token = torch.full((1, chunk_of.numel()), float(context_timestep))
            per_token[:, c * CHUNK * TOKENS_PER_FRAME :] = 1000 * float(sigmas[k])
            previous = set_wan_self_attention_mask(model, seen)
            try:
                with torch.no_grad():
                    velocity = model(full, per_token, text, return_dict=False)[0][:, :, c * CHUNK :]
            finally:
                restore_wan_self_attention_processors(model, previous)
            x = x + (float(sigmas[k + 1]) - float(sigmas[k])) * velocity
        clean.append(x)
    return torch.cat(clean, dim=2)


# ----------------------------------------------------------------------------------------------- exactness


@pytest.mark.parametrize("compression", ["none", "kivi", "qvg"])
def test_single_chunk_equals_diffusers_default_processor(model, compression):
    noise, text = video_inputs(1)
    t = torch.tensor([700.0])
    with torch.no_grad():
        expected = model(noise, t, text, return_dict=False)[0]
        cache = VideoKVCache(VideoKVConfig(compression=compression))
        apply_qvg(model, cache)
        try:
            ours = model(noise, t, text, return_dict=False)[0]
        finally:
            remove_qvg(model)
        again = model(noise, t, text, return_dict=False)[0]
    assert torch.allclose(ours, expected, atol=1e-6, rtol=0), (ours - expected).abs().max()
    assert torch.equal(again, expected)  # remove_qvg put diffusers' processors back
    assert cache.num_chunks == 0 and cache.nbytes() == 0  # denoising writes nothing


@pytest.mark.parametrize(
    "policy",
    [dict(), dict(window_chunks=2, span_chunks=2, keep_recent_chunks=0), dict(sink_chunks=0, keep_recent_chunks=0)],
    ids=["all-chunks", "window2-span2", "no-sink-no-recent"],
)
def test_uncompressed_rollout_equals_block_causal_recompute(model, policy):
    noise, text = video_inputs(chunks=5)
    config = VideoKVConfig(compression="none", **policy)
    cache = VideoKVCache(config)
    ours = wan_autoregressive_rollout(model, cache, noise, text, chunk_frames=CHUNK, num_steps=2)
    expected = block_causal_reference(model, noise, text, steps=2, sink_chunks=config.sink_chunks,
                                      window_chunks=config.window_chunks)
    assert torch.allclose(ours, expected, atol=2e-5, rtol=0), (ours - expected).abs().max()
    # the same rollout with full attention over the history would differ: the window really is applied
    if config.window_chunks is not None:
        unwindowed = block_causal_reference(model, noise, text, steps=2)
        assert not torch.allclose(ours[:, :, -CHUNK:], unwindowed[:, :, -CHUNK:], atol=1e-4)


def test_given_prefix_chunks_are_committed_as_the_history(model):
    noise, text = video_inputs(chunks=2)
    prefix, _ = video_inputs(chunks=3, seed=5)
    ours = wan_autoregressive_rollout(model, VideoKVCache(compression="none"), noise, text, chunk_frames=CHUNK,
                                      num_steps=2, prefix_latents=prefix)
    expected = block_causal_reference(model, noise, text, steps=2, prefix=prefix)
    assert torch.equal(ours[:, :, : 3 * CHUNK], prefix)
    assert torch.allclose(ours, expected, atol=2e-5, rtol=0), (ours - expected).abs().max()


def test_chunk_by_chunk_calls_continue_the_same_rollout(model):
    noise, text = video_inputs(chunks=4)
    whole, _ = rollout(model, VideoKVConfig(compression="kivi", nbits=4), chunks=4)
    cache = VideoKVCache(VideoKVConfig(compression="kivi", nbits=4))
    parts = [wan_autoregressive_rollout(model, cache, noise[:, :, c * CHUNK : (c + 1) * CHUNK], text,
                                        chunk_frames=CHUNK, num_steps=2) for c in range(4)]
    assert torch.equal(torch.cat(parts, dim=2), whole)
    assert cache.next_frame == 4 * CHUNK and video_kv_cache_of(model) is None


@pytest.mark.parametrize("compression", ["none", "kivi"])
def test_batch_of_two_equals_each_video_alone(model, compression):
    noise, text = video_inputs(chunks=4)
    noise2, text2 = video_inputs(chunks=4, seed=7)
    config = VideoKVConfig(compression=compression, nbits=2)
    both = wan_autoregressive_rollout(model, VideoKVCache(config), torch.cat([noise, noise2]),
                                      torch.cat([text, text2]), chunk_frames=CHUNK, num_steps=2)
    for row, (x, t) in enumerate([(noise, text), (noise2, text2)]):
        alone = wan_autoregressive_rollout(model, VideoKVCache(config), x, t, chunk_frames=CHUNK, num_steps=2)
        assert torch.allclose(both[row : row + 1], alone, atol=1e-5, rtol=0), (both[row : row + 1] - alone).abs().max()


@pytest.mark.parametrize("compression", ["kivi", "qvg"])
def test_compressed_rollout_is_close_and_better_with_more_bits(model, compression):
    exact, _ = rollout(model, VideoKVConfig(compression="none"), chunks=5)
    errors = {}
    for bits in (2, 8):
        out, _ = rollout(model, VideoKVConfig(compression=compression, nbits=bits, num_centroids=4), chunks=5)
        errors[bits] = float((out - exact).norm() / exact.norm())
    assert 0 < errors[8] < errors[2] < 0.2, errors


# ----------------------------------------------------------------------------------------------- storage policy


def snapshot(span):
    return [(t.data_ptr(), t.clone()) for t in storage_tensors(span)]


def storage_tensors(obj):
    out = []
    for value in (vars(obj) if hasattr(obj, "__dict__") else {}).values():
        if isinstance(value, torch.Tensor):
            out.append(value)
        elif hasattr(value, "__dict__"):
            out.extend(storage_tensors(value))
    return out


@pytest.mark.parametrize("compression", ["kivi", "qvg"])
def test_spans_are_never_recompressed(model, compression):
    noise, text = video_inputs(chunks=6)
    cache = VideoKVCache(VideoKVConfig(compression=compression, num_centroids=4))
    seen = {}
    for c in range(6):
        wan_autoregressive_rollout(model, cache, noise[:, :, c * CHUNK : (c + 1) * CHUNK], text, chunk_frames=CHUNK,
                                   num_steps=1)
        for layer_index, layer in cache.layers.items():
            for span in layer.spans:
                key = (layer_index, span.chunks[0].index)
                if key in seen:
                    for (ptr, old), (new_ptr, new) in zip(seen[key], snapshot(span)):
                        assert ptr == new_ptr and torch.equal(old, new), f"span {key} changed after commit {c}"
                else:
                    seen[key] = snapshot(span)
    assert len(seen) == 2 * 4 and all(len(s) >= 4 for s in seen.values())  # chunks 1-4 packed, in both layers


@pytest.mark.parametrize("compression", ["kivi", "qvg"])
def test_sink_chunk_is_stored_exactly(model, compression):
    policy = dict(window_chunks=2, span_chunks=1, keep_recent_chunks=1)
    _, exact = rollout(model, VideoKVConfig(compression="none", **policy), chunks=5)
    _, packed = rollout(model, VideoKVConfig(compression=compression, nbits=2, **policy), chunks=5)
    for index, layer in packed.layers.items():
        (sink,) = layer.sink
        assert sink.info.index == 0
        assert torch.equal(sink.key, exact.layers[index].sink[0].key)  # chunk 0 saw only itself: same K/V
        assert torch.equal(sink.value, exact.layers[index].sink[0].value)
        recent = layer.recent[-1]  # the newest chunk is also exact, but its history was compressed: differs
        assert not torch.equal(recent.key, exact.layers[index].recent[-1].key)
    assert packed.attended_chunks()[0] == 0  # the sink survives the window


def test_window_evicts_a_span_only_when_all_of_it_left():
    model = tiny_wan()
    noise, text = video_inputs(chunks=7)
    cache = VideoKVCache(VideoKVConfig(compression="kivi", window_chunks=3, span_chunks=2, keep_recent_chunks=1))
    expected = {  # after committing chunk c: held (sink, spans, recent), and what chunk c + 1 attends to
        0: ([0], [], [], [0]),
        1: ([0], [], [1], [0, 1]),
        2: ([0], [], [1, 2], [0, 1, 2]),
        3: ([0], [[1, 2]], [3], [0, 1, 2, 3]),
        4: ([0], [[1, 2]], [3, 4], [0, 2, 3, 4]),  # chunk 1 left the window; its span stays for chunk 2
        5: ([0], [[3, 4]], [5], [0, 3, 4, 5]),  # span (1, 2) gone once chunk 2 left too
        6: ([0], [[3, 4]], [5, 6], [0, 4, 5, 6]),
    }
    for c in range(7):
        wan_autoregressive_rollout(model, cache, noise[:, :, c * CHUNK : (c + 1) * CHUNK], text, chunk_frames=CHUNK,
                                   num_steps=1)
        sink, spans, recent, attended = expected[c]
        assert cache.held_chunks() == {"sink": sink, "spans": spans, "recent": recent}, c
        assert cache.attended_chunks() == attended, c
        read = cache.read(0)
        assert [x.info.index for x in read] == attended
        assert all(x.key.shape[-2] == CHUNK * TOKENS_PER_FRAME for x in read)


@pytest.mark.parametrize("compression", ["none", "kivi", "qvg"])
def test_nbytes_is_the_storage_walk_and_each_part_owns_its_storage(compression):
    model = tiny_wan(fused=True)  # fused q/k/v: k and v are views of one projection output
    _, cache = rollout(model, VideoKVConfig(compression=compression, span_chunks=2, num_centroids=4), chunks=5)
    parts = cache.nbytes_by_part()
    assert cache.nbytes() == storage_bytes(cache) == sum(parts.values()) > 0
    own = 0
    for layer in cache.layers.values():
        for chunk in layer.sink + layer.recent:
            own += sum(t.numel() * t.element_size() for t in (chunk.key, chunk.value))
        for span in layer.spans:
            own += sum(t.numel() * t.element_size() for t in storage_tensors(span))
    assert cache.nbytes() == own  # nothing holds a bigger buffer than its own data (no views of projections)
    exact_chunk = 2 * 1 * 2 * CHUNK * TOKENS_PER_FRAME * 16 * 4  # K and V, batch 1, 2 heads, head dim 16, fp32
    assert parts["sink"] == 2 * exact_chunk  # two layers
    assert cache.num_tokens_held() == {"sink": 64, "spans": 128, "recent": 128}
    if compression == "none":
        assert parts["spans"] == 2 * 2 * exact_chunk
    else:
        assert parts["spans"] < 2 * 2 * exact_chunk / 4


def test_kivi_quantizes_keys_per_channel_and_values_per_token():
    codec = KIVICodec(nbits=4, value_group=16, key_group_tokens=64)
    x = torch.randn(1, 2, 96, 16)
    x[..., 3] += 20.0  # an outlier channel: per-channel keys absorb it, per-token values do not
    key, value = codec.encode(x, "key", 0), codec.encode(x, "value", 0)
    assert key.per_channel and key.tensor.scale.shape == (1, 2, 16, 96 // 48)  # groups of 48 tokens (largest <= 64)
    assert not value.per_channel and value.tensor.scale.shape == (1, 2, 96, 1)
    key_err = (codec.decode(key, torch.float32) - x).abs()
    value_err = (codec.decode(value, torch.float32) - x).abs()
    assert key_err.max() <= key.tensor.scale.float().max() / 2 + 1e-3
    assert key_err.mean() < value_err.mean() / 3


# ----------------------------------------------------------------------------------------------- bad input


def state(cache):
    return (cache.num_chunks, cache.next_frame, cache.held_chunks(), cache.nbytes(),
            [t.clone() for x in cache.layers.values() for c in x.sink + x.recent for t in (c.key, c.value)])


def same_state(a, b):
    return a[:4] == b[:4] and len(a[4]) == len(b[4]) and all(torch.equal(x, y) for x, y in zip(a[4], b[4]))


def test_bad_input_raises_and_changes_nothing(model):
    noise, text = video_inputs(chunks=2)
    cache = VideoKVCache(VideoKVConfig(compression="kivi", keep_recent_chunks=1))
    wan_autoregressive_rollout(model, cache, noise, text, chunk_frames=CHUNK, num_steps=1)
    before = state(cache)
    apply_qvg(model, cache)
    t0 = torch.zeros(1)
    try:
        with pytest.raises(ValueError, match="commit without a chunk"), cache.committing():
            pass
        with pytest.raises(ValueError, match="empty chunk"), torch.no_grad(), cache.committing():
            model(noise[:, :, :0], t0, text)
        with pytest.raises(ValueError, match="empty chunk"), torch.no_grad():
            model(noise[:, :, :0], t0, text)
        with pytest.raises(RuntimeError, match="already installed"):
            apply_qvg(model, cache)
        with pytest.raises(RuntimeError, match="one transformer forward per commit"), torch.no_grad():
            with cache.committing():
                model(noise[:, :, :CHUNK], t0, text)
                model(noise[:, :, :CHUNK], t0, text)
        assert same_state(state(cache), before)
        # KIVI packs keys along tokens: a 1 x 2 x 2 chunk (4 tokens) cannot form a span; the commit that would pack
        # it fails before anything changes
        with torch.no_grad(), cache.committing():
            model(noise[:, :, :1, :4, :4], t0, text)
        middle = state(cache)
        with pytest.raises(ValueError, match="multiple of 8"), torch.no_grad(), cache.committing():
            model(noise[:, :, :1, :4, :4], t0, text)
        assert same_state(state(cache), middle)
    finally:
        remove_qvg(model)
    other = tiny_wan(head_dim=24)  # head dims that do not match the cached ones
    apply_qvg(other, cache)
    try:
        with pytest.raises(ValueError, match="head_dim"), torch.no_grad(), cache.committing():
            other(noise[:, :, :CHUNK], t0, text)
    finally:
        remove_qvg(other)
    assert same_state(state(cache), middle) and not same_state(middle, before)
    with pytest.raises(RuntimeError, match="no video KV cache"):
        remove_qvg(model)


@pytest.mark.parametrize("kwargs", [dict(compression="kivi", nbits=5), dict(compression="qvg", nbits=1),
                                    dict(compression="qvg", nbits=16), dict(compression="int2"),
                                    dict(span_chunks=0), dict(window_chunks=0), dict(num_centroids=300)])
def test_bad_config_is_refused(kwargs):
    with pytest.raises(ValueError):
        VideoKVConfig(**kwargs)


def test_bad_driver_arguments(model):
    noise, text = video_inputs(chunks=1)
    cache = VideoKVCache(compression="none")
    with pytest.raises(ValueError, match="chunk_frames"):
        wan_autoregressive_rollout(model, cache, noise, text, chunk_frames=0)
    with pytest.raises(ValueError, match="T > 0"):
        wan_autoregressive_rollout(model, cache, noise[:, :, :0], text, chunk_frames=CHUNK)
    apply_qvg(model, VideoKVCache(compression="none"))
    try:
        with pytest.raises(RuntimeError, match="another video KV cache"):
            wan_autoregressive_rollout(model, cache, noise, text, chunk_frames=CHUNK)
    finally:
        remove_qvg(model)
    assert cache.num_chunks == 0
