"""CREST's peers: SEAL-style additive residual steering and the "Wait"-token ban logits processor."""

from __future__ import annotations

import pytest
import torch
from transformers import LogitsProcessorList

from hf_fastslow.generation.crest import CRESTCalibrator
from hf_fastslow.generation.crest_baselines import SEALSteerer, TokenBanLogitsProcessor, fit_seal_vector
from tests.conftest import byte_tokenizer, tiny_llama
from tests.generation.crest_helpers import TRACES, crest_model, crest_tokenizer, hook_counts, step_logits

NL = 259


@pytest.fixture(scope="module")
def seal():
    tok, model = crest_tokenizer(), crest_model()
    cal = CRESTCalibrator(model, tok).collect(TRACES)
    return model, tok, cal, fit_seal_vector(cal, layer=1)


def test_seal_vector_is_the_class_mean_difference(seal):
    _, _, cal, vec = seal
    at, labels = cal.residuals[:, 1], cal.labels
    torch.testing.assert_close(vec.vector, at[labels == 0].mean(0) - at[labels == 1].mean(0))
    assert fit_seal_vector(cal).layer == 2  # 70 % of 3 layers
    with pytest.raises(ValueError, match="layer must be in"):
        fit_seal_vector(cal, layer=3)


def test_seal_adds_only_on_boundary_rows_and_leaves_no_hooks(seal):
    model, tok, _, vec = seal
    enc = tok(["The sum is 4.\n", "ab"], return_tensors="pt", padding=True, padding_side="left")
    prefix, mask = enc["input_ids"], enc["attention_mask"]
    nl = tok.convert_tokens_to_ids("Ċ")
    nxt = torch.tensor([nl, nl])  # boundary on row 0 only
    plain_pre, plain = step_logits(model, prefix, mask, nxt)
    count = hook_counts(model)
    seen = {}
    layer = model.model.layers[1]
    with SEALSteerer(model, vec, strength=1.0) as steerer:
        probe = layer.register_forward_hook(lambda m, a, out: seen.__setitem__("h", out.detach().clone()))
        pre, steered = step_logits(model, prefix, mask, nxt)
        probe.remove()
    assert torch.equal(pre, plain_pre)
    assert torch.equal(steered[1], plain[1]) and (steered[0] - plain[0]).abs().max() > 1e-4
    assert hook_counts(model) == count and not steerer.active and steerer.boundary_steps == 1
    with SEALSteerer(model, vec, strength=0.0):
        assert torch.equal(step_logits(model, prefix, mask, nxt)[1], plain)
    with pytest.raises(KeyError), SEALSteerer(model, vec):
        raise KeyError("boom")
    assert hook_counts(model) == count
    assert torch.equal(step_logits(model, prefix, mask, nxt)[1], plain)


def test_seal_refuses_another_shape_and_one_class(seal):
    _, tok, _, vec = seal
    with pytest.raises(ValueError, match="3 layers, hidden size 64.*2 layers"):
        SEALSteerer(crest_model(num_layers=2), vec)
    cal = CRESTCalibrator(crest_model(num_layers=1), tok)
    with pytest.raises(ValueError, match="collect"):
        fit_seal_vector(cal)
    cal.collect(["Go.\n\nWait, check.\n\nwait again."])
    with pytest.raises(ValueError, match="both linear and non-linear"):
        fit_seal_vector(cal)


def test_token_ban_forbids_every_spelling_and_nothing_else():
    tok = byte_tokenizer()
    tok.add_tokens(["Wait", " wait", "WAIT", "\nWait", "Waiting", "hmm"])
    proc = TokenBanLogitsProcessor(tok, words=["Wait", "hmm", "Alternatively"])
    banned = sorted(tok.convert_tokens_to_ids(t) for t in ["Wait", " wait", "WAIT", "\nWait", "hmm"])
    assert sorted(proc.banned_ids.tolist()) == banned
    assert proc.unmatched_words == ["alternatively"]
    scores = torch.randn(2, len(tok))
    out = proc(torch.zeros(2, 3, dtype=torch.long), scores.clone())
    assert torch.isneginf(out[:, banned]).all()
    keep = torch.ones(len(tok), dtype=torch.bool)
    keep[banned] = False
    assert torch.equal(out[:, keep], scores[:, keep])
    with pytest.raises(ValueError, match="no token"):
        TokenBanLogitsProcessor(tok, words=["Alternatively"])


def test_token_ban_in_batched_generate_with_left_padding():
    tok = byte_tokenizer()
    model = tiny_llama(vocab=259)
    enc = tok(["hello there", "ab"], return_tensors="pt", padding=True, padding_side="left")
    kw = dict(max_new_tokens=12, do_sample=False, pad_token_id=0)
    plain = model.generate(**enc, **kw)[:, enc["input_ids"].shape[1]:]
    common = torch.mode(plain.flatten()).values.item()  # the token the random model writes most
    word = tok.decode([common])
    proc = TokenBanLogitsProcessor(tok, words=[word.strip() or word])
    banned = model.generate(**enc, logits_processor=LogitsProcessorList([proc]), **kw)[:, enc["input_ids"].shape[1]:]
    assert common in plain.tolist()[0] + plain.tolist()[1]
    assert not torch.isin(banned, proc.banned_ids).any()
