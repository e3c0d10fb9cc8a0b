"""CREST: step-boundary triggers, per-head probes, norm-preserving rotation, the steerer's identity cases and errors."""

from __future__ import annotations

import pytest
import torch
from transformers import LogitsProcessor, LogitsProcessorList

from hf_fastslow.generation.crest import CRESTCalibrator, CRESTSteerer, CRESTVectors, fit_probes, rotate_away
from hf_fastslow.generation.crest_trigger import BoundaryTokens
from tests.conftest import byte_tokenizer, tiny_llama
from tests.generation.crest_helpers import (
    LINEAR_TRACES,
    TRACES,
    crest_model,
    crest_tokenizer,
    hook_counts,
    step_logits,
)

NL = 259  # the one-token "\n\n" of crest_tokenizer()


@pytest.fixture(scope="module")
def calibrated():
    tok, model = crest_tokenizer(), crest_model()
    cal = CRESTCalibrator(model, tok).collect(TRACES)
    return model, tok, cal, cal.fit(steps=50)


def _batch(tok):
    """Two left-padded prompts; row 0's last token is "\n" (so a following "\n" completes a boundary)."""
    enc = tok(["The sum is 4.\n", "ab"], return_tensors="pt", padding=True, padding_side="left")
    return enc["input_ids"], enc["attention_mask"]


# --- boundaries -----------------------------------------------------------------------------------------------------
def test_boundaries_are_found_in_text_one_token_or_two():
    tok = crest_tokenizer()
    b = BoundaryTokens.from_tokenizer(tok)
    nl = tok.convert_tokens_to_ids("Ċ")
    assert b.whole.nonzero().flatten().tolist() == [NL]
    ids = tok("a\n\nb", add_special_tokens=False).input_ids
    assert ids[1] == NL and b.positions(ids) == [1]
    two = [tok.convert_tokens_to_ids("a"), nl, nl, tok.convert_tokens_to_ids("b")]  # "\n\n" as two tokens
    assert b.positions(two) == [2]
    assert b.positions([nl, 70], prev_id=nl) == [0]  # the first "\n" is the prompt's last token
    assert b.positions([nl, nl, nl]) == [1, 2]  # "\n\n\n" completes the delimiter twice


def test_default_model_tokenizer_boundaries(default_model):
    _, tok = default_model
    b = BoundaryTokens.from_tokenizer(tok)
    assert int(b.whole.sum()) == 18 and bool(b.whole[1116])
    ids = tok("Step 1.\n\nWait", add_special_tokens=False).input_ids
    assert ids[-3:-1] == [198, 198] and b.positions(ids) == [len(ids) - 2]


def test_one_character_delimiter_and_bad_delimiters():
    tok = crest_tokenizer()
    b = BoundaryTokens.from_tokenizer(tok, "\n")
    nl = tok.convert_tokens_to_ids("Ċ")
    assert b.positions([70, nl, 71, NL, nl]) == [1, 3, 4] and not b.ends_first.any()
    for bad in ("", "abc", None):
        with pytest.raises(ValueError, match="one- or two-character"):
            BoundaryTokens.from_tokenizer(byte_tokenizer(), bad)


# --- probes and rotation --------------------------------------------------------------------------------------------
def test_probe_finds_a_planted_head_and_shuffled_labels_do_not():
    gen = torch.Generator().manual_seed(0)
    n, layers, heads, dim = 240, 2, 3, 16
    labels = (torch.rand(n, generator=gen) < 0.3).long()
    planted = torch.randn(dim, generator=gen)
    planted /= planted.norm()
    feats = torch.randn(n, layers, heads, dim, generator=gen)
    feats[:, 1, 2] += 2.5 * labels[:, None] * planted
    fitted = fit_probes(feats, labels, steps=150)
    assert fitted["accuracy"].flatten().argmax().item() == 1 * heads + 2
    assert fitted["accuracy"][1, 2] > 0.85
    assert torch.dot(fitted["direction"][1, 2], planted) > 0.9
    control = fit_probes(feats, labels[torch.randperm(n, generator=gen)], steps=150)
    assert control["accuracy"][1, 2] < 0.7


def test_probe_needs_both_classes():
    with pytest.raises(ValueError, match="2 non-linear"):
        fit_probes(torch.randn(10, 1, 1, 4), torch.tensor([0] * 9 + [1]))


def test_rotation_keeps_the_norm_and_scales_the_component():
    torch.manual_seed(1)
    o, v = torch.randn(5, 32), torch.randn(1, 32)
    v /= v.norm()
    w, b = torch.zeros(1, 32), torch.zeros(1)
    out = rotate_away(o, w, b, v, strength=4.0, gate="off")
    torch.testing.assert_close(out.norm(dim=-1), o.norm(dim=-1), rtol=1e-6, atol=0)
    p = o @ v[0]
    raw = o - 4.0 * p[:, None] * v[0]  # component (1 - 4) p before the rescale
    torch.testing.assert_close(out, raw * (o.norm(dim=-1) / raw.norm(dim=-1))[:, None])
    assert torch.equal(rotate_away(o, w, b, v, 0.0, gate="off"), o)
    assert torch.equal(rotate_away(o, w, b - 1.0, v, 4.0, gate="hard"), o)  # gate closed everywhere
    multi = torch.nn.functional.normalize(torch.randn(3, 32), dim=-1)
    out3 = rotate_away(o, torch.randn(3, 32), torch.zeros(3), multi, 4.0, gate="soft")
    torch.testing.assert_close(out3.norm(dim=-1), o.norm(dim=-1), rtol=1e-6, atol=0)


# --- the steerer ----------------------------------------------------------------------------------------------------
def test_steerer_is_plain_outside_boundaries_at_zero_strength_and_after_exit(calibrated):
    model, tok, _, vectors = calibrated
    prefix, mask = _batch(tok)
    nl, x = tok.convert_tokens_to_ids("Ċ"), tok.convert_tokens_to_ids("x")
    boundary_next = torch.tensor([nl, NL])  # row 0: "\n" after "\n"; row 1: the one-token "\n\n"
    plain_pre, plain = step_logits(model, prefix, mask, boundary_next)
    _, plain_x = step_logits(model, prefix, mask, torch.tensor([x, x]))
    with CRESTSteerer(model, vectors, strength=4.0, top_ratio=1.0, probe_gate="off") as steerer:
        pre, steered = step_logits(model, prefix, mask, boundary_next)
        _, steered_x = step_logits(model, prefix, mask, torch.tensor([x, x]))
    assert steerer.boundary_steps == 2
    assert torch.equal(pre, plain_pre)  # prefill is never steered
    assert torch.equal(steered_x, plain_x)  # no boundary, no change
    assert (steered - plain).abs().amax(-1).min() > 1e-4  # both rows steered
    with CRESTSteerer(model, vectors, strength=0.0, top_ratio=1.0, probe_gate="off"):
        assert torch.equal(step_logits(model, prefix, mask, boundary_next)[1], plain)
    assert torch.equal(step_logits(model, prefix, mask, boundary_next)[1], plain)  # after exit


def test_steering_is_per_row_with_left_padding(calibrated):
    model, tok, _, vectors = calibrated
    prefix, mask = _batch(tok)
    nl = tok.convert_tokens_to_ids("Ċ")
    nxt = torch.tensor([nl, nl])  # a boundary for row 0 only (row 1's prompt ends with "b")
    _, plain = step_logits(model, prefix, mask, nxt)
    with CRESTSteerer(model, vectors, top_ratio=1.0, probe_gate="off") as steerer:
        _, steered = step_logits(model, prefix, mask, nxt)
    assert steerer.boundary_steps == 1
    assert torch.equal(steered[1], plain[1])
    assert (steered[0] - plain[0]).abs().max() > 1e-4


def test_steered_outputs_keep_their_norm(calibrated):
    model, tok, _, vectors = calibrated
    prefix, mask = _batch(tok)
    proj = model.model.layers[1].self_attn.o_proj
    seen = {}
    before = proj.register_forward_hook(lambda m, a, out: seen.__setitem__("raw", out.detach().clone()))
    with CRESTSteerer(model, vectors, top_ratio=1.0, probe_gate="off"):
        after = proj.register_forward_hook(lambda m, a, out: seen.__setitem__("steered", out.detach().clone()))
        step_logits(model, prefix, mask, torch.tensor([NL, NL]))
        after.remove()
    before.remove()
    raw, steered = seen["raw"], seen["steered"]
    assert (steered - raw).abs().max() > 1e-4
    torch.testing.assert_close(steered.norm(dim=-1), raw.norm(dim=-1), rtol=1e-6, atol=0)


def test_hooks_are_removed_on_exit_and_on_exceptions(calibrated):
    model, _, _, vectors = calibrated
    count = hook_counts(model)
    steerer = CRESTSteerer(model, vectors, top_k=3)
    with steerer:
        assert hook_counts(model) == count + 1 + len({layer for layer, _ in steerer.heads})
        with pytest.raises(RuntimeError, match="already active"):
            steerer.__enter__()
    assert hook_counts(model) == count
    with pytest.raises(KeyError), CRESTSteerer(model, vectors):
        raise KeyError("boom")
    assert hook_counts(model) == count


class _Force(LogitsProcessor):
    """Forces the given token ids, one per generation step (same for every row)."""

    def __init__(self, ids):
        self.ids, self.step = ids, 0

    def __call__(self, input_ids, scores):
        out = torch.full_like(scores, float("-inf"))
        out[:, self.ids[min(self.step, len(self.ids) - 1)]] = 0.0
        self.step += 1
        return out


def test_generate_steers_every_boundary_it_feeds_back(calibrated):
    model, tok, _, vectors = calibrated
    prefix, mask = _batch(tok)
    text = "ok\n\nWait.\n\nDone\nx"
    forced = tok(text.replace("\n\n", "\n\x00"), add_special_tokens=False).input_ids  # "\n\n" as two tokens
    forced = [tok.convert_tokens_to_ids("Ċ") if t == tok.convert_tokens_to_ids("Ā") else t for t in forced]
    kw = dict(attention_mask=mask, max_new_tokens=len(forced), do_sample=False, pad_token_id=0)
    plain = model.generate(prefix, logits_processor=LogitsProcessorList([_Force(forced)]), **kw)
    with CRESTSteerer(model, vectors, strength=0.0) as steerer:
        same = model.generate(prefix, logits_processor=LogitsProcessorList([_Force(forced)]), **kw)
    assert torch.equal(same, plain)
    assert steerer.boundary_steps == 2 * 2  # two boundaries per row, both fed back (the last token is not)


# --- vectors: save/load and shape checks ----------------------------------------------------------------------------
def test_vectors_round_trip_through_safetensors(calibrated, tmp_path):
    model, tok, _, vectors = calibrated
    path = vectors.save(tmp_path / "crest.safetensors")
    assert path.stat().st_size < 200_000
    loaded = CRESTVectors.load(path)
    for name in ("probe_weight", "probe_bias", "directions", "accuracy"):
        assert torch.equal(getattr(loaded, name), getattr(vectors, name))
    for name in ("whole", "ends_first", "starts_second"):
        assert torch.equal(getattr(loaded.boundary, name), getattr(vectors.boundary, name))
    assert (loaded.keywords, loaded.num_linear, loaded.num_nonlinear, loaded.model_type) == (
        vectors.keywords, vectors.num_linear, vectors.num_nonlinear, "llama")
    prefix, mask = _batch(tok)
    with CRESTSteerer(model, vectors):
        a = step_logits(model, prefix, mask, torch.tensor([NL, NL]))[1]
    with CRESTSteerer(model, loaded):
        b = step_logits(model, prefix, mask, torch.tensor([NL, NL]))[1]
    assert torch.equal(a, b)


def test_vectors_from_another_shape_are_refused(calibrated, tmp_path):
    _, _, _, vectors = calibrated
    other = crest_model(num_layers=2)
    count = hook_counts(other)
    with pytest.raises(ValueError, match="3 layers x 4 heads.*2 layers x 4 heads.*CRESTCalibrator"):
        CRESTSteerer(other, vectors)
    with pytest.raises(ValueError, match="hidden size 64.*hidden size 32"):
        CRESTSteerer(crest_model(hidden=32), vectors)
    with pytest.raises(ValueError, match="embeds only 128"):
        CRESTSteerer(tiny_llama(), vectors)
    assert hook_counts(other) == count
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(1)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="not a CREST vector file"):
        CRESTVectors.load(tmp_path / "other.safetensors")


def test_bad_steerer_settings_are_refused(calibrated):
    model, _, _, vectors = calibrated
    with pytest.raises(ValueError, match=r"top_k must be an int in \[1, 12\]"):
        CRESTSteerer(model, vectors, top_k=13)
    with pytest.raises(ValueError, match="top_ratio"):
        CRESTSteerer(model, vectors, top_ratio=0.0)
    with pytest.raises(ValueError, match="probe_gate"):
        CRESTSteerer(model, vectors, probe_gate="maybe")
    assert len(vectors.top_heads(top_ratio=0.38)) == 5  # ceil(0.38 * 12)


# --- calibration ----------------------------------------------------------------------------------------------------
def test_calibration_labels_the_step_after_each_boundary(calibrated):
    _, _, cal, vectors = calibrated
    _, positions, labels = cal.label_trace(TRACES[0])
    assert labels == [1, 0, 0]  # "Wait, let me check" follows the first boundary
    assert cal.features.shape == (cal.num_steps, 3, 4, 64) and cal.residuals.shape == (cal.num_steps, 3, 64)
    assert vectors.num_nonlinear == 5 and vectors.num_linear == cal.num_steps - 5
    assert torch.allclose(vectors.directions.norm(dim=-1), torch.ones(3, 4))


def test_traces_without_the_targeted_behaviour_are_refused():
    tok, model = crest_tokenizer(), crest_model(num_layers=1)
    cal = CRESTCalibrator(model, tok)
    with pytest.raises(ValueError, match="at least one step of the targeted behaviour"):
        cal.collect(LINEAR_TRACES)
    with pytest.raises(ValueError, match="contains a step boundary"):
        cal.collect(["no steps at all", "still none"])
    assert cal.num_steps == 0 and cal.features.numel() == 0
    with pytest.raises(ValueError, match="collect"):
        cal.fit()


@pytest.mark.parametrize("arch", ["qwen2", "qwen3", "gemma3_text"])
def test_other_architectures_calibrate_and_steer(arch):
    from transformers import (
        Gemma3ForCausalLM,
        Gemma3TextConfig,
        Qwen2Config,
        Qwen2ForCausalLM,
        Qwen3Config,
        Qwen3ForCausalLM,
    )

    cls, cfg_cls = {"qwen2": (Qwen2ForCausalLM, Qwen2Config), "qwen3": (Qwen3ForCausalLM, Qwen3Config),
                    "gemma3_text": (Gemma3ForCausalLM, Gemma3TextConfig)}[arch]
    torch.manual_seed(0)
    cfg = cfg_cls(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, vocab_size=260, max_position_embeddings=256, pad_token_id=0)
    model = cls(cfg).eval()
    tok = crest_tokenizer()
    vectors = CRESTCalibrator(model, tok).collect(TRACES).fit(steps=20)
    assert vectors.shape == (2, 4, 32) and vectors.model_type == arch
    prefix, mask = _batch(tok)
    _, plain = step_logits(model, prefix, mask, torch.tensor([NL, NL]))
    with CRESTSteerer(model, vectors, strength=0.0):
        assert torch.equal(step_logits(model, prefix, mask, torch.tensor([NL, NL]))[1], plain)
    with CRESTSteerer(model, vectors, top_ratio=1.0, probe_gate="off"):
        assert not torch.equal(step_logits(model, prefix, mask, torch.tensor([NL, NL]))[1], plain)


def test_unsupported_architecture_is_refused():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=260)).eval()
    with pytest.raises(NotImplementedError, match="o_proj|decoder layers"):
        CRESTCalibrator(model, crest_tokenizer())


def test_bf16_model_steers_in_its_dtype(calibrated):
    import copy

    model, tok, _, vectors = calibrated
    half = copy.deepcopy(model).to(torch.bfloat16)
    prefix, mask = _batch(tok)
    nxt = torch.tensor([NL, NL])
    _, plain = step_logits(half, prefix, mask, nxt)
    with CRESTSteerer(half, vectors, strength=0.0, top_ratio=1.0, probe_gate="off"):
        assert torch.equal(step_logits(half, prefix, mask, nxt)[1], plain)
    with CRESTSteerer(half, vectors, top_ratio=1.0, probe_gate="off"):
        steered = step_logits(half, prefix, mask, nxt)[1]
    assert steered.dtype == torch.bfloat16 and not torch.equal(steered, plain)
