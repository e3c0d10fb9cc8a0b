"""block_diffusion_generate: degenerates to greedy AR decoding, equals a no-cache reference loop, commit rule, stops,
processors, outputs, errors (nothing mutated), the LOSA call protocol and the 5.17 cache keyword."""

import math

import pytest
import torch
from transformers import LogitsProcessor, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList
from transformers.cache_utils import DynamicCache
from transformers.generation.streamers import BaseStreamer

from hf_fastslow.generation.block_diffusion import BlockDiffusionDecoder, block_diffusion_generate, commit_schedule
from hf_fastslow.generation.padding import left_pad
from hf_fastslow.integrations.caches import cache_kwargs
from hf_fastslow.modeling.block_diffusion import (
    BlockDiffusionConfig,
    attach_block_diffusion,
    block_attention_mask,
    model_attention_mask,
)
from tests.conftest import tiny_llama

MASK = 127
ROWS = [[5, 6, 7, 8, 9, 10, 11], [12, 13, 14], [20, 21, 22, 23, 24]]


def model_with(attention="causal", block_size=4, logit_shift=True, dtype=torch.float64, **kw):
    model = tiny_llama(num_layers=2, **kw).to(dtype)
    return attach_block_diffusion(model, BlockDiffusionConfig(MASK, block_size, logit_shift, attention))


class Collect(BaseStreamer):
    def __init__(self):
        self.chunks, self.ended = [], False

    def put(self, value):
        self.chunks.append(value.reshape(-1).tolist())

    def end(self):
        self.ended = True


def bd_generate(model, ids, mask=None, **kw):
    kw.setdefault("max_new_tokens", 10)
    return model.generate(ids, attention_mask=mask, custom_generate=block_diffusion_generate, do_sample=False, **kw)


# ---- B=1, T=1: plain greedy decoding -------------------------------------------------------------------------------
@pytest.mark.parametrize("attention", ["causal", "block"])
def test_block_one_step_one_is_greedy_generate(attention):
    model = model_with(attention, block_size=1)
    ids = torch.tensor([[5, 6, 7, 8, 9, 10, 11]])
    ref = model.generate(ids, do_sample=False, max_new_tokens=12)
    out = bd_generate(model, ids, max_new_tokens=12, return_dict_in_generate=True)
    assert torch.equal(out.sequences, ref)
    assert out.tokens_per_forward.tolist() == [1.0]  # one forward per token, like greedy generate

    ids, mask = left_pad(ROWS, 0)
    ref = model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=9)
    assert torch.equal(bd_generate(model, ids, mask, max_new_tokens=9), ref)


# ---- equality with a no-cache reference loop -----------------------------------------------------------------------
@torch.no_grad()
def reference_loop(model, ids, padding, max_new, block, steps, pattern, shift):
    """The decoding loop written the slow way: every step recomputes the whole sequence under the block mask."""
    width = ids.shape[1]
    seq, pad = ids, padding
    while seq.shape[1] - width < max_new:
        b = min(block, max_new - (seq.shape[1] - width))
        start = seq.shape[1]
        seq = torch.cat([seq, torch.full((ids.shape[0], b), MASK)], dim=1)
        pad = torch.cat([pad, torch.ones(ids.shape[0], b, dtype=torch.long)], dim=1)
        positions = (pad.cumsum(-1) - 1).clamp(min=0)
        allowed = block_attention_mask(seq.shape[1], seq.shape[1], block, q_offset=0, pattern=pattern,
                                       padding_mask=pad, block_start=width)
        schedule = commit_schedule(b, steps)
        for s, k in enumerate(schedule):
            logits = model(input_ids=seq, attention_mask=model_attention_mask(model, allowed, logits_dtype(model)),
                           position_ids=positions).logits
            logits = logits[:, start - 1:-1] if shift else logits[:, start:]
            logits[..., MASK] = -math.inf
            probs = logits.softmax(-1)
            conf, pick = probs.max(-1)
            masked = seq[:, start:] == MASK
            conf = conf.masked_fill(~masked, -math.inf)
            if s == len(schedule) - 1:
                k = b
            for r in range(seq.shape[0]):
                order = sorted(range(b), key=lambda j: (-float(conf[r, j]), j))
                for j in order[: min(k, int(masked[r].sum()))]:
                    seq[r, start + j] = pick[r, j]
    return seq


def logits_dtype(model):
    return next(model.parameters()).dtype


@pytest.mark.parametrize("pattern", ["causal", "block", "bidirectional"])
@pytest.mark.parametrize("shift", [True, False])
def test_cached_loop_equals_full_recompute_loop(pattern, shift):
    model = model_with(pattern, block_size=4, logit_shift=shift)
    ids, mask = left_pad(ROWS, 0)
    for block, steps, max_new in [(4, 4, 10), (4, 2, 7), (2, 1, 5)]:
        want = reference_loop(model, ids, mask, max_new, block, steps, pattern, shift)
        for fuse_commit in (True, False):
            got = bd_generate(model, ids, mask, block_size=block, steps=steps, max_new_tokens=max_new,
                              eos_token_id=None, pad_token_id=0, fuse_commit=fuse_commit)
            assert torch.equal(got, want), (pattern, shift, block, steps, fuse_commit)


# ---- the commit rule -----------------------------------------------------------------------------------------------
class RecordingDecoder(BlockDiffusionDecoder):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.log = []
        RecordingDecoder.last = self

    def select(self, confidence, masked, step):
        chosen = super().select(confidence, masked, step)
        self.log.append((step, list(self.schedule), chosen.sum(-1).tolist(), masked.sum(-1).tolist()))
        return chosen


def test_threshold_one_commits_exactly_k_per_step():
    model = model_with("block", block_size=8, dtype=torch.float32)
    ids, mask = left_pad(ROWS, 0)
    bd_generate(model, ids, mask, block_size=8, steps=3, threshold=1.0, max_new_tokens=16, decoder_cls=RecordingDecoder,
                eos_token_id=None, pad_token_id=0)
    log = RecordingDecoder.last.log
    assert [entry[0] for entry in log] == [0, 1, 2, 0, 1, 2]
    for step, schedule, chosen, _ in log:
        assert schedule == [3, 3, 2] and chosen == [schedule[step]] * 3


@pytest.mark.parametrize("fuse_commit, forwards", [(False, 4), (True, 3)])
def test_threshold_zero_commits_a_block_in_one_forward(fuse_commit, forwards):
    model = model_with("block", block_size=4, dtype=torch.float32)
    out = bd_generate(model, torch.tensor([ROWS[0]]), block_size=4, threshold=0.0, max_new_tokens=8,
                      return_dict_in_generate=True, eos_token_id=None, fuse_commit=fuse_commit)
    # unfused: prefill + (1 denoising forward + 1 commit) for block 1 + 1 denoising forward for block 2 (no commit
    # after the last block); fused: the commit pass of block 1 is block 2's only denoising forward
    assert out.num_forwards.tolist() == [forwards] and out.tokens_per_forward.tolist() == [pytest.approx(8 / forwards)]


class PassThroughForward(BlockDiffusionDecoder):
    def forward(self, inputs, position_ids, attention_mask, cache, logits_to_keep, extra):
        assert isinstance(logits_to_keep, int)  # an overriding subclass keeps the int convention
        return super().forward(inputs, position_ids, attention_mask, cache, logits_to_keep, extra)


def test_sliced_block_logits_change_nothing():
    """Denoising passes compute logits only where a masked slot reads them; all positions (a subclass overriding
    `forward`) give the same tokens and scores."""
    model = model_with("block", block_size=4)
    ids, mask = left_pad(ROWS, 0)
    for shift in (True, False):
        attach_block_diffusion(model, BlockDiffusionConfig(MASK, 4, shift, "block"))
        kw = dict(max_new_tokens=9, eos_token_id=None, pad_token_id=0, output_scores=True, return_dict_in_generate=True)
        sliced = bd_generate(model, ids, mask, **kw)
        full = bd_generate(model, ids, mask, decoder_cls=PassThroughForward, **kw)
        assert torch.equal(sliced.sequences, full.sequences)
        torch.testing.assert_close(torch.stack(sliced.scores), torch.stack(full.scores), atol=1e-9, rtol=1e-9)


def test_commit_schedule():
    assert commit_schedule(4, 4) == [1, 1, 1, 1]
    assert commit_schedule(7, 3) == [3, 2, 2]
    assert commit_schedule(2, 4) == [1, 1]  # a short last block never takes more steps than slots


# ---- stops, lengths, outputs ---------------------------------------------------------------------------------------
def test_eos_stops_each_row_and_pads_after_it():
    model = model_with("block", block_size=4)
    ids, mask = left_pad(ROWS, 0)
    free = bd_generate(model, ids, mask, max_new_tokens=12, eos_token_id=None, pad_token_id=0)
    width = ids.shape[1]
    eos = int(free[0, width + 5])  # row 0 writes it at its 6th new token (in the second block)
    out = bd_generate(model, ids, mask, max_new_tokens=12, eos_token_id=eos, pad_token_id=0,
                      return_dict_in_generate=True)
    for r in range(len(ROWS)):
        new = out.sequences[r, width:].tolist()
        if eos in free[r, width:].tolist():
            cut = free[r, width:].tolist().index(eos)
            assert new[: cut + 1] == free[r, width: width + cut + 1].tolist()
            assert all(t == 0 for t in new[cut + 1:])
    assert out.sequences.shape[1] <= free.shape[1]


def test_rows_count_their_own_forwards_in_a_batch():
    """A row that stops early counts only the forwards made while it was generating: in a left-padded batch each row
    gets the tokens and the forward count it gets decoded alone (no shift here: with it, a forward skipped for a row
    alone may be needed by another row of the batch)."""
    model = model_with("block", block_size=4, logit_shift=False)
    ids, mask = left_pad(ROWS, 0)
    free = bd_generate(model, ids, mask, max_new_tokens=12, eos_token_id=None, pad_token_id=0)
    eos = int(free[0, ids.shape[1] + 2])  # row 0 stops in the first block
    out = bd_generate(model, ids, mask, max_new_tokens=12, eos_token_id=eos, pad_token_id=0,
                      return_dict_in_generate=True)
    counts = out.num_forwards.tolist()
    assert len(set(counts)) > 1  # the rows stop at different blocks
    for r, row in enumerate(ROWS):
        alone = bd_generate(model, torch.tensor([row]), max_new_tokens=12, eos_token_id=eos, pad_token_id=0,
                            return_dict_in_generate=True)
        new = alone.sequences[0, len(row):].tolist()
        assert out.sequences[r, ids.shape[1]: ids.shape[1] + len(new)].tolist() == new
        assert counts[r] == int(alone.num_forwards[0]), r
        assert float(out.tokens_per_forward[r]) == pytest.approx(float(alone.tokens_per_forward[0]))


def test_max_new_tokens_not_a_multiple_of_block():
    model = model_with("block", block_size=4)
    out = bd_generate(model, torch.tensor([ROWS[0]]), max_new_tokens=7, eos_token_id=None)
    assert out.shape[1] == len(ROWS[0]) + 7 and MASK not in out[0].tolist()


def test_scores_streamer_and_stopping_criteria():
    model = model_with("block", block_size=4)
    ids = torch.tensor([ROWS[0]])

    streamer = Collect()
    out = bd_generate(model, ids, max_new_tokens=9, eos_token_id=None, streamer=streamer, output_scores=True,
                      output_logits=True, return_dict_in_generate=True)
    new = out.sequences[0, ids.shape[1]:].tolist()
    assert streamer.chunks[0] == ids[0].tolist()  # generate streams the prompt itself
    assert sum(streamer.chunks[1:], []) == new and streamer.ended
    assert len(out.scores) == len(out.logits) == 9
    assert [int(s.argmax()) for s in out.scores] == new  # greedy: each token is its slot's argmax when committed

    stop_token = new[5]

    class StopOn(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            return input_ids[:, -1] == stop_token

    cut = bd_generate(model, ids, max_new_tokens=9, eos_token_id=None,
                      stopping_criteria=StoppingCriteriaList([StopOn()]))
    assert cut[0, ids.shape[1]:].tolist() == new[: new.index(stop_token) + 1]


def test_logits_processor_sees_each_slot_at_its_position():
    model = model_with("block", block_size=4)
    seen = []

    class Ban(LogitsProcessor):
        def __call__(self, input_ids, scores):
            seen.append(input_ids.shape[1])
            scores[:, 40:] = -math.inf
            return scores

    ids = torch.tensor([ROWS[0]])
    out = bd_generate(model, ids, max_new_tokens=8, eos_token_id=None, logits_processor=LogitsProcessorList([Ban()]))
    assert max(out[0, ids.shape[1]:].tolist()) < 40
    assert set(seen) == set(range(ids.shape[1], ids.shape[1] + 8))


def test_per_row_processor_state_left_padded_batch():
    """`prefix_allowed_tokens_fn` keeps per-row state (the batch id): row 0 may write even ids only, row 1 odd ids."""
    model = model_with("block", block_size=4)
    ids, mask = left_pad(ROWS[:2], 0)

    def allowed(batch_id, _ids):
        return list(range(4 + batch_id, 120, 2))

    out = bd_generate(model, ids, mask, max_new_tokens=7, eos_token_id=None, pad_token_id=0,
                      prefix_allowed_tokens_fn=allowed)
    new = out[:, ids.shape[1]:]
    assert bool((new[0] % 2 == 0).all()) and bool((new[1] % 2 == 1).all())


def test_a_masked_hole_is_skipped_like_missing_tokens():
    """Any 2D mask works, not only left padding: a hidden token in the middle (a chat prompt whose <|im_end|> equals a
    pad id) is as if it were not there (per-row positions count real tokens, its key is hidden)."""
    model = model_with("block", block_size=4)
    row = ROWS[0]
    holed = torch.tensor([row[:3] + [99] + row[3:]])
    mask = torch.ones_like(holed)
    mask[0, 3] = 0
    want = bd_generate(model, torch.tensor([row]), max_new_tokens=6, eos_token_id=None)
    got = bd_generate(model, holed, mask, max_new_tokens=6, eos_token_id=None)
    assert got[0, holed.shape[1]:].tolist() == want[0, len(row):].tolist()


def test_bfloat16_model():
    model = model_with("block", block_size=4, dtype=torch.bfloat16)
    out = bd_generate(model, torch.tensor([ROWS[0]]), max_new_tokens=6, eos_token_id=None, threshold=0.5,
                      output_scores=True, return_dict_in_generate=True)
    assert out.sequences.shape[1] == len(ROWS[0]) + 6 and out.scores[0].dtype == torch.float32


def test_sampling_is_seeded_and_valid():
    model = model_with("block", block_size=4, dtype=torch.float32)
    ids = torch.tensor([ROWS[0]])
    torch.manual_seed(1)
    a = model.generate(ids, custom_generate=block_diffusion_generate, do_sample=True, temperature=0.7,
                       max_new_tokens=8, threshold=0.9)
    torch.manual_seed(1)
    b = model.generate(ids, custom_generate=block_diffusion_generate, do_sample=True, temperature=0.7,
                       max_new_tokens=8, threshold=0.9)
    assert torch.equal(a, b) and MASK not in a[0].tolist()


@pytest.mark.parametrize("remasking", ["random", "entropy", "margin"])
def test_other_remasking_modes_fill_every_slot(remasking):
    model = model_with("block", block_size=4, dtype=torch.float32)
    out = bd_generate(model, torch.tensor([ROWS[0]]), max_new_tokens=6, eos_token_id=None, remasking=remasking)
    assert out.shape[1] == len(ROWS[0]) + 6 and MASK not in out[0].tolist()


# ---- errors: clear, and nothing changes ----------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, match", [
    (dict(mask_token_id=128), "vocabulary"),
    (dict(mask_token_id=1), "EOS"),
    (dict(block_size=0), "block_size"),
    (dict(block_size=4, steps=5), "steps=5 > block_size=4"),
    (dict(steps=0), "steps"),
    (dict(num_beams=2), "beam"),
    (dict(remasking="loud"), "remasking"),
    (dict(remasking="random", threshold=0.9), "random"),
    (dict(block_size=3), "does not divide"),
    (dict(output_hidden_states=True), "hidden states"),
])
def test_bad_input_is_refused_and_changes_nothing(kwargs, match):
    model = model_with("block", block_size=4)
    before = model.config.to_dict()
    cache = DynamicCache()
    ids = torch.tensor([ROWS[0]])
    with pytest.raises(ValueError, match=match):
        bd_generate(model, ids, **cache_kwargs(model, cache), **kwargs)
    assert cache.get_seq_length() == 0 and model.config.to_dict() == before


def test_missing_mask_token_and_assistant_model_are_refused():
    model = tiny_llama(num_layers=1)
    ids = torch.tensor([ROWS[0]])
    with pytest.raises(ValueError, match="mask token"):
        bd_generate(model, ids)
    with pytest.raises(ValueError, match="assistant_model"):
        bd_generate(model, ids, mask_token_id=MASK, block_size=2, assistant_model=tiny_llama(num_layers=1))
    batch, mask = left_pad(ROWS[:2], 0)
    with pytest.raises(ValueError, match="batch size 1"):
        bd_generate(model, batch, mask, mask_token_id=MASK, block_size=2, streamer=Collect())


# ---- LOSA protocol and the 5.17 cache keyword ----------------------------------------------------------------------
class FakeLosaState:
    events: list = []

    def __init__(self, config, model):
        FakeLosaState.events = ["init"]

    def start_block(self):
        self.events.append("start")

    def end_block(self):
        self.events.append("end")


def test_losa_protocol(monkeypatch):
    import hf_fastslow.modeling.losa as losa_module

    monkeypatch.setattr(losa_module, "LosaState", FakeLosaState)
    model = model_with("block", block_size=4, dtype=torch.float32)
    seen = []

    def record(module, args, kwargs):
        state = kwargs.get("losa_state")
        seen.append(state is not None)
        FakeLosaState.events.append("forward")

    model.register_forward_pre_hook(record, with_kwargs=True)
    bd_generate(model, torch.tensor([ROWS[0]]), max_new_tokens=8, steps=2, losa=object(), eos_token_id=None)
    assert all(seen) and len(seen) == 1 + 2 + 1 + 2
    assert FakeLosaState.events == ["init", "forward", "start", "forward", "forward", "end", "forward",
                                    "start", "forward", "forward", "end"]


def test_real_losa_at_full_budget_matches_dense():
    """With H7's LosaState and attention: a budget covering the whole prefix and every block token active is dense
    attention, so the loop writes the SDPA tokens (float64)."""
    from hf_fastslow.modeling.losa import LosaConfig, register_losa

    model = model_with("block", block_size=4)
    ids = torch.randint(3, 120, (1, 21))
    want = bd_generate(model, ids, max_new_tokens=8, steps=4, eos_token_id=None)
    model.set_attn_implementation(register_losa())
    losa = LosaConfig(budget=64, page_size=4, active_k=4, min_prefix=0)
    got = bd_generate(model, ids, max_new_tokens=8, steps=4, eos_token_id=None, losa=losa)
    assert torch.equal(got, want)


def test_past_key_values_keyword_path(monkeypatch):
    """transformers 5.17 only knows `past_key_values=`: the loop must work when that is the cache keyword."""
    import hf_fastslow.integrations.caches as caches

    model = model_with("block", block_size=1)
    ids = torch.tensor([ROWS[0]])
    want = bd_generate(model, ids, max_new_tokens=6)
    monkeypatch.setattr(caches, "cache_kwarg_name", lambda model=None: "past_key_values")
    assert torch.equal(bd_generate(model, ids, max_new_tokens=6), want)


def test_direct_call_and_a_prefilled_cache():
    model = model_with("block", block_size=2)
    ids = torch.tensor([ROWS[0]])
    want = bd_generate(model, ids, max_new_tokens=6, eos_token_id=None, output_logits=True,
                       return_dict_in_generate=True)
    direct = block_diffusion_generate(model, ids, max_new_tokens=6, eos_token_id=None)
    assert torch.equal(direct, want.sequences)
    cache = DynamicCache()
    model(input_ids=ids[:, :4], use_cache=True, **cache_kwargs(model, cache))
    got = bd_generate(model, ids, max_new_tokens=6, eos_token_id=None, output_logits=True,
                      return_dict_in_generate=True, **cache_kwargs(model, cache))
    assert torch.equal(got.sequences, want.sequences)
    # the uncached prompt tail is read at its own positions: the logits match, not only the argmax
    torch.testing.assert_close(torch.stack(got.logits), torch.stack(want.logits), atol=1e-9, rtol=1e-9)
    assert cache.get_seq_length() == len(ROWS[0]) + 4  # the caller's cache grew: prompt + all blocks but the last


@pytest.mark.slow
def test_default_model_block_one_is_greedy_generate_float64():
    """SmolLM2-135M-Instruct in float64, a left-padded chat batch: block_size=1 (causal, shift) == greedy generate."""
    from hf_fastslow import load_default_model
    from hf_fastslow.evaluation.prompts import encode_chat
    from hf_fastslow.modeling.block_diffusion import ensure_mask_token

    model, tok = load_default_model(dtype=torch.float64)
    mask_id = ensure_mask_token(model, tok)
    attach_block_diffusion(model, BlockDiffusionConfig(mask_id, 1, True, "causal"))
    batch = encode_chat(tok, ["What is 12 + 30?", "Name a colour of the sky on a clear day, in one word."])
    want = model.generate(**batch, do_sample=False, max_new_tokens=16)
    got = model.generate(**batch, custom_generate=block_diffusion_generate, do_sample=False, max_new_tokens=16)
    assert torch.equal(got, want)
