"""The diffusers seam (integrations/diffusers.py) on a tiny random Wan transformer, as diffusers' own tests build it."""

import pytest
import torch

pytest.importorskip("diffusers")

from hf_fastslow.integrations.diffusers import (  # noqa: E402
    WanSelfAttentionProcessor,
    check_wan_transformer,
    restore_wan_self_attention_processors,
    set_wan_self_attention_processors,
    wan_frame_offset,
    wan_rotary,
)

pytestmark = pytest.mark.integration


def tiny_wan(seed=0):
    from diffusers import WanTransformer3DModel

    torch.manual_seed(seed)
    return WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=4,
        text_dim=16, freq_dim=16, ffn_dim=32, num_layers=2, cross_attn_norm=True, rope_max_seq_len=32,
    ).eval()


def wan_inputs(frames=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    return dict(
        hidden_states=torch.randn(1, 4, frames, 8, 8, generator=g),
        timestep=torch.tensor([500]),
        encoder_hidden_states=torch.randn(1, 5, 16, generator=g),
        return_dict=False,
    )


def test_base_processor_reproduces_diffusers_default_output():
    model = tiny_wan()
    inputs = wan_inputs()
    with torch.no_grad():
        expected = model(**inputs)[0]
        previous = set_wan_self_attention_processors(model, WanSelfAttentionProcessor)
        ours = model(**inputs)[0]
        restore_wan_self_attention_processors(model, previous)
        again = model(**inputs)[0]
    assert torch.allclose(ours, expected, atol=1e-5), (ours - expected).abs().max()
    assert torch.equal(again, expected)
    assert all(isinstance(p, WanSelfAttentionProcessor) is False for p in previous)


def test_rotary_at_offset_zero_is_wans_own_and_offsets_shift_frames():
    model = tiny_wan()
    x = wan_inputs(frames=3)["hidden_states"]
    cos, sin = model.rope(x)
    ours = wan_rotary(model, 3, 4, 4)
    assert torch.equal(ours[0], cos) and torch.equal(ours[1], sin)
    # frames [2, 5) of a 5-frame table are the last three frames of that table
    full = wan_rotary(model, 5, 4, 4)
    shifted = wan_rotary(model, 3, 4, 4, frame_offset=2)
    assert torch.equal(shifted[0], full[0][:, 2 * 16 :])
    with wan_frame_offset(model, 2):
        assert torch.equal(model.rope(x)[0], shifted[0])
    assert torch.equal(model.rope(x)[0], cos)  # the patch is gone after the block
    with pytest.raises(ValueError, match="rotary table"):
        wan_rotary(model, 3, 4, 4, frame_offset=31)


def test_clear_errors():
    with pytest.raises(TypeError, match="Wan"):
        check_wan_transformer(torch.nn.Linear(2, 2))
    model = tiny_wan()
    with pytest.raises(ValueError, match="one per block"):
        restore_wan_self_attention_processors(model, [])
    proc = WanSelfAttentionProcessor()
    with pytest.raises(ValueError, match="cross-attention"):
        proc(model.blocks[0].attn2, torch.randn(1, 4, 24), torch.randn(1, 5, 24))


def test_watch_wan_input_grid_reports_patch_grid_and_can_refuse():
    from hf_fastslow.integrations.diffusers import watch_wan_input_grid

    model = tiny_wan()
    seen = []
    handle = watch_wan_input_grid(model, seen.append)
    inputs = wan_inputs(frames=3)
    with torch.no_grad():
        model(**inputs)
        model(inputs.pop("hidden_states")[:, :, :2], **inputs)  # positional hidden_states too

    def refuse(grid):
        raise ValueError("refused")

    handle.remove()
    assert seen == [(3, 4, 4), (2, 4, 4)]
    handle = watch_wan_input_grid(model, refuse)
    with pytest.raises(ValueError, match="refused"), torch.no_grad():
        model(**wan_inputs())
    handle.remove()


def test_masked_default_processor_is_diffusers_attention_under_a_mask():
    from hf_fastslow.integrations.diffusers import set_wan_self_attention_mask

    model = tiny_wan()
    inputs = wan_inputs(frames=3)
    tokens = 3 * 16
    with torch.no_grad():
        expected = model(**inputs)[0]
        previous = set_wan_self_attention_mask(model, torch.ones(tokens, tokens, dtype=torch.bool))
        assert torch.equal(model(**inputs)[0], expected)  # an all-True mask is no mask
        frame = torch.arange(tokens) // 16
        restore_wan_self_attention_processors(model, previous)
        previous = set_wan_self_attention_mask(model, frame[None, :] <= frame[:, None])  # frame-causal
        causal = model(**inputs)[0]
        changed = dict(inputs, hidden_states=inputs["hidden_states"].clone())
        changed["hidden_states"][:, :, 2] += 1.0
        causal_changed = model(**changed)[0]
        restore_wan_self_attention_processors(model, previous)
    assert not torch.allclose(causal, expected, atol=1e-4)  # the mask is applied
    assert torch.equal(causal_changed[:, :, :2], causal[:, :, :2])  # frame 2 cannot reach frames 0, 1
    assert not torch.allclose(causal_changed[:, :, 2], causal[:, :, 2])


def test_wan_to_dtype_keeps_fp32_modules_and_rope_tables():
    from hf_fastslow.integrations.diffusers import wan_to_dtype

    model = tiny_wan()
    rope_dtype = model.rope.freqs_cos.dtype
    wan_to_dtype(model, torch.bfloat16)
    dtypes = {name: p.dtype for name, p in model.named_parameters()}
    assert dtypes["blocks.0.attn1.to_k.weight"] == torch.bfloat16 and dtypes["proj_out.weight"] == torch.bfloat16
    assert dtypes["blocks.0.scale_shift_table"] == torch.float32
    assert dtypes["condition_embedder.time_embedder.linear_1.weight"] == torch.float32
    assert model.rope.freqs_cos.dtype == rope_dtype != torch.bfloat16  # not rounded
    inputs = wan_inputs()
    inputs["hidden_states"] = inputs["hidden_states"].bfloat16()
    inputs["encoder_hidden_states"] = inputs["encoder_hidden_states"].bfloat16()
    with torch.no_grad():
        out = model(**inputs)[0]
        reference = tiny_wan()(**wan_inputs())[0]
    assert out.dtype == torch.bfloat16 and float((out.float() - reference).norm() / reference.norm()) < 0.05
