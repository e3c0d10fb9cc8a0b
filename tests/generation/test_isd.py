"""I-DLM introspective strided decoding (hf_fastslow/generation/isd.py, isd_round.py) on tiny random Llamas.

Random weights draft badly (acceptance ~0), so the commit/crop paths with accepted drafts are exercised through
`OracleDrafts`: a Llama whose mask-slot logits are, with probability `accept_p`, an exact copy of the anchor's logits
for that slot (read from a precomputed reference continuation), else the same logits with their argmax demoted.
"""

import functools
import inspect
import math

import pytest
import torch
from transformers import DynamicCache, LlamaForCausalLM

from hf_fastslow.generation import isd as isd_module  # noqa: E402
from hf_fastslow.generation.isd import (  # noqa: E402
    IDLMGenerationMixin,
    ISDConfig,
    introspective_acceptance_rate,
    isd_generate,
)
from tests.conftest import tiny_llama

MASK = 127


class OracleDrafts(LlamaForCausalLM):
    """The mask id is never predicted; a mask slot at logical position t copies (probability `accept_p`) the
    reference logits at t, i.e. the anchor the next round will compare its draft with; else it drafts the anchor's
    runner-up (greedy rejects it)."""

    mask_id = MASK
    ref_logits = None  # [B, L, V] by column of the left-padded reference
    left_pad = None
    accept_p = 1.0
    draws = None

    def forward(self, input_ids=None, position_ids=None, **kwargs):
        out = super().forward(input_ids=input_ids, position_ids=position_ids, **kwargs)
        logits = out.logits
        logits[..., self.mask_id] = -1e4
        if self.ref_logits is None:
            return out
        width = logits.shape[1]
        rows, slots = (input_ids[:, -width:] == self.mask_id).nonzero(as_tuple=True)
        cols = position_ids[:, -width:][rows, slots] + self.left_pad.to(rows.device)[rows]
        inside = cols < self.ref_logits.shape[1]
        rows, slots, cols = rows[inside], slots[inside], cols[inside]
        ref = self.ref_logits[rows, cols].to(logits.dtype).clone()
        wrong = torch.rand(len(rows), generator=self.draws) >= self.accept_p
        top = ref.argmax(-1)
        ref[wrong, top[wrong]] = ref.min(-1).values[wrong] - 1.0
        logits[rows, slots] = ref
        return out

    # The cache keyword the library expects is read from forward's signature (`cache` or `past_key_values`).
    forward.__signature__ = inspect.signature(LlamaForCausalLM.forward)


def oracle_model(seed=0, num_layers=2, **kw):
    base = tiny_llama(num_layers=num_layers, seed=seed, **kw)
    model = OracleDrafts(base.config).eval()
    model.load_state_dict(base.state_dict())
    return model.double()


def set_reference(model, ids, mask, max_new_tokens, accept_p, seed=0, **gen):
    """Greedy reference continuation of `model` (plain generate) and its full-forward logits."""
    model.ref_logits = None
    ref = model.generate(ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False, **gen)
    full_mask = torch.cat([mask, torch.ones(ids.shape[0], ref.shape[1] - ids.shape[1], dtype=mask.dtype)], 1)
    positions = (full_mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        model.ref_logits = model(ref, attention_mask=full_mask, position_ids=positions).logits.clone()
    model.left_pad = (mask == 0).sum(1)
    model.accept_p = accept_p
    model.draws = torch.Generator().manual_seed(seed)
    return ref


def left_padded_batch(seed=1, width=9, pads=(3, 1, 0), vocab=120):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (len(pads), width), generator=g)
    mask = torch.ones_like(ids)
    for i, p in enumerate(pads):
        mask[i, :p] = 0
        ids[i, :p] = 0
    return ids, mask


def isd(model, ids, mask=None, n=3, **kw):
    kw.setdefault("do_sample", False)
    return model.generate(ids, attention_mask=mask, custom_generate=isd_generate, gen_block_size=n,
                          mask_token_id=MASK, return_dict_in_generate=True, **kw)


@pytest.fixture(scope="module")
def model64():
    return tiny_llama(num_layers=2).double()


# ---- greedy exactness ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n", [2, 3, 4, 6])
def test_greedy_equals_generate_batch1(model64, n):
    ids = torch.randint(3, 120, (1, 7), generator=torch.Generator().manual_seed(n))
    want = model64.generate(ids, max_new_tokens=20, do_sample=False)
    out = isd(model64, ids, n=n, max_new_tokens=20)
    assert torch.equal(out.sequences, want)
    assert out.tokens_per_forward.shape == (1,) and out.num_forwards[0] >= 1


@pytest.mark.parametrize("n", [2, 3, 4, 6])
def test_greedy_equals_generate_left_padded_batch(model64, n):
    ids, mask = left_padded_batch()
    want = model64.generate(ids, attention_mask=mask, max_new_tokens=16, do_sample=False)
    out = isd(model64, ids, mask, n=n, max_new_tokens=16)
    assert torch.equal(out.sequences, want)


@pytest.mark.parametrize("n,accept_p", [(2, 1.0), (3, 0.7), (4, 1.0), (6, 0.5)])
def test_greedy_equals_generate_with_accepted_drafts(monkeypatch, n, accept_p):
    """Ragged multi-token commits, masked holes, crops and compaction: still generate's tokens."""
    compactions = []
    compact = isd_module.speculative_compact_cache
    monkeypatch.setattr(isd_module, "speculative_compact_cache", lambda c, o: (compactions.append(1), compact(c, o)))
    model = oracle_model()
    ids, mask = left_padded_batch(width=8, pads=(3, 0, 5))
    ref = set_reference(model, ids, mask, 40, accept_p)
    out = isd(model, ids, mask, n=n, max_new_tokens=40)
    assert torch.equal(out.sequences, ref)
    assert float(out.tokens_per_forward.max()) > 1.2  # drafts really were accepted
    assert bool(compactions) == (accept_p < 1)  # ragged acceptance left holes that were compacted


@pytest.mark.parametrize("arch", ["qwen3", "mistral_sliding"])
def test_greedy_equals_generate_other_architectures(arch):
    """Qwen3 is the I-DLM checkpoints' shape; Mistral with a 6-token sliding window crops windowed cache layers."""
    from transformers import MistralConfig, MistralForCausalLM, Qwen3Config, Qwen3ForCausalLM

    common = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, pad_token_id=0, eos_token_id=1)
    torch.manual_seed(0)
    if arch == "qwen3":
        model = Qwen3ForCausalLM(Qwen3Config(head_dim=16, **common))
    else:
        model = MistralForCausalLM(MistralConfig(sliding_window=6, **common))
    model = model.eval().double()
    ids = torch.randint(3, 120, (1, 9), generator=torch.Generator().manual_seed(2))
    want = model.generate(ids, max_new_tokens=16, do_sample=False)
    assert torch.equal(isd(model, ids, n=3, max_new_tokens=16).sequences, want)


def test_eos_inside_accepted_drafts_and_max_new_tokens():
    model = oracle_model()
    ids, mask = left_padded_batch(width=6, pads=(0, 2))
    ref = set_reference(model, ids, mask, 23, 1.0)
    eos = int(ref[0, 6 + 9])  # a token of row 0's continuation becomes EOS: rows stop there, inside a round
    want = model.generate(ids, attention_mask=mask, max_new_tokens=23, do_sample=False, eos_token_id=eos)
    out = isd(model, ids, mask, n=4, max_new_tokens=23, eos_token_id=eos)
    assert torch.equal(out.sequences, want)
    assert want.shape[1] > ids.shape[1] + 9 and (want[0, ids.shape[1]:] == eos).any()
    for new in (1, 2, 5, 7):  # max_new_tokens not a multiple of N
        out = isd(model, ids, mask, n=4, max_new_tokens=new)
        assert torch.equal(out.sequences, ref[:, : ids.shape[1] + new])


# ---- cache bookkeeping ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("batch", [1, 3])
def test_cache_invariant_every_round(monkeypatch, batch):
    model = oracle_model()
    ids, mask = left_padded_batch(width=8, pads=(0, 3, 5)[:batch])
    set_reference(model, ids, mask, 30, 0.7)
    checks = []
    step = isd_module._ISDRun.step

    def checked_step(run):
        step(run)
        checks.append(run.cache_invariant_holds())
        if run.batch_size == 1 and bool(run.rows.active[0]):  # no holes: the physical length is the invariant
            committed = int(run.rows.lengths[0]) - run.prompt_width
            checks.append(run.cache.get_seq_length() == ids.shape[1] + committed - 1)

    monkeypatch.setattr(isd_module._ISDRun, "step", checked_step)
    out = isd(model, ids, mask, n=4, max_new_tokens=30)
    assert len(checks) >= 5 and all(checks)
    if batch == 1:  # the returned cache is laid out as generate leaves it
        assert out.past_key_values.get_seq_length() == out.sequences.shape[1] - 1 if hasattr(
            out, "past_key_values") and out.past_key_values is not None else out.cache.get_seq_length() == (
            out.sequences.shape[1] - 1)


def test_cache_holding_part_of_the_prompt(model64):
    ids = torch.randint(3, 120, (1, 10), generator=torch.Generator().manual_seed(3))
    want = model64.generate(ids, max_new_tokens=12, do_sample=False)
    cache = DynamicCache(config=model64.config)
    with torch.no_grad():
        model64(ids[:, :6], past_key_values=cache, use_cache=True)
    out = isd(model64, ids, n=3, max_new_tokens=12, past_key_values=cache)
    assert torch.equal(out.sequences, want)


# ---- tokens per forward --------------------------------------------------------------------------------------------
def closed_form_tpf(n, p):
    return (2 + sum(p**k for k in range(1, n - 1))) / (2 - p ** (n - 1))


@pytest.mark.parametrize("n,p,new", [(4, 0.0, 30), (4, 0.5, 160), (4, 0.9, 160), (4, 1.0, 41),
                                     pytest.param(3, 0.8, 240, marks=pytest.mark.slow)])
def test_tokens_per_forward_matches_closed_form(n, p, new):
    """TPF_N = (2 + p + ... + p^(N-2)) / (2 - p^(N-1)) for per-draft acceptance p, over 8 rows' decode rounds."""
    model = oracle_model(seed=2, num_layers=1)
    ids = torch.randint(3, 120, (8, 4), generator=torch.Generator().manual_seed(4))
    set_reference(model, ids, torch.ones_like(ids), new, p, seed=5, eos_token_id=None)
    out = isd(model, ids, n=n, max_new_tokens=new, eos_token_id=None)
    assert out.sequences.shape[1] == ids.shape[1] + new
    forwards = out.num_forwards.double()
    torch.testing.assert_close(out.tokens_per_forward.double(), new / forwards)
    decode_tpf = float((new - 1) * len(ids) / (forwards - 1).sum())  # rounds after the prefill, all rows
    want = closed_form_tpf(n, p)
    if p in (0.0, 1.0):  # deterministic: every round commits 1 (p = 0), or N after the cold start (p = 1)
        want = 1.0 if p == 0.0 else (new - 1) / (1 + math.ceil((new - 2) / n))
        assert decode_tpf == pytest.approx(want, rel=1e-12)
    else:
        assert abs(decode_tpf - want) < 0.07 * want, (decode_tpf, want)


# ---- logits processors ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("gen", [
    {"repetition_penalty": 1.7},
    {"no_repeat_ngram_size": 2, "repetition_penalty": 1.3},
    {"min_new_tokens": 12, "suppress_tokens": [5, 6]},
])
def test_processors_with_per_batch_state_match_generate(gen):
    model = oracle_model()
    ids, mask = left_padded_batch(width=8, pads=(4, 0, 2))
    ids[1, 3:6] = ids[1, 6]  # repeated tokens in the prompt: the penalty bites
    ref = set_reference(model, ids, mask, 30, 0.8, eos_token_id=1, **gen)
    out = isd(model, ids, mask, n=3, max_new_tokens=30, eos_token_id=1, **gen)
    assert torch.equal(out.sequences, ref)


def test_drafts_are_processed_at_their_anchors_context():
    """Each draft goes through the processors with the context its anchor will have (committed + earlier drafts):
    with drafts that copy the anchor's raw logits, every draft is accepted even under context-dependent processors."""
    model = oracle_model()
    ids, mask = left_padded_batch(width=8, pads=(4, 0, 2))
    gen = {"repetition_penalty": 1.7, "no_repeat_ngram_size": 2, "min_new_tokens": 10}
    ref = set_reference(model, ids, mask, 24, 1.0, eos_token_id=1, **gen)
    out = isd(model, ids, mask, n=4, max_new_tokens=24, eos_token_id=1, **gen)
    assert torch.equal(out.sequences, ref)
    assert out.acceptance_rate.tolist() == [1.0, 1.0, 1.0]


# ---- sampling follows the AR distribution --------------------------------------------------------------------------
def _chi_square(counts, probs, min_expected=5.0):
    keep = probs > 0
    counts, probs = counts[keep], probs[keep]
    total = counts.sum()
    expected = probs * total
    big = expected >= min_expected
    obs = torch.cat([counts[big], counts[~big].sum()[None]])
    exp = torch.cat([expected[big], expected[~big].sum()[None]])
    stat = float(((obs - exp) ** 2 / exp.clamp(min=1e-12)).sum())
    dof = int(big.sum())  # cells - 1
    p_value = float(torch.special.gammaincc(torch.tensor(dof / 2.0, dtype=torch.float64),
                                            torch.tensor(stat / 2.0, dtype=torch.float64)))
    return stat, p_value


@functools.lru_cache(maxsize=2)
def _vocab6(top_k=0):
    model = tiny_llama(num_layers=2, vocab=6, hidden=32, heads=2, kv_heads=1, seed=3).double()
    with torch.no_grad():
        model.lm_head.weight.mul_(6.0)  # peaked distributions: drafts and anchors differ clearly
    model.generation_config.eos_token_id = None
    prompt = torch.tensor([[2, 3, 4, 3]])
    temperature = 0.8
    # Exact AR probabilities of every 3-token continuation by the chain rule (after the same warpers).
    seqs = torch.cartesian_prod(*[torch.arange(6)] * 3)
    full = torch.cat([prompt.expand(len(seqs), -1), seqs], 1)
    with torch.no_grad():
        scores = model(full).logits[:, 3:6] / temperature
    if top_k:
        kth = scores.topk(top_k, dim=-1).values[..., -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    logp = torch.log_softmax(scores, -1)
    probs = logp.gather(2, seqs[..., None]).squeeze(-1).sum(1).exp()
    assert abs(float(probs.sum()) - 1) < 1e-9
    return model, prompt, temperature, seqs, probs


def _isd_counts(proposal, alpha, samples, seed, batch=5000, top_k=0):
    model, prompt, temperature, seqs, probs = _vocab6(top_k)
    torch.manual_seed(seed)
    counts = torch.zeros(len(seqs), dtype=torch.float64)
    for _ in range(samples // batch):
        out = model.generate(prompt.expand(batch, -1), custom_generate=isd_generate, gen_block_size=3,
                             mask_token_id=5, do_sample=True, temperature=temperature, top_k=top_k, max_new_tokens=3,
                             proposal=proposal, verify_alpha=alpha, pad_token_id=0)
        new = out[:, prompt.shape[1]:]
        index = new[:, 0] * 36 + new[:, 1] * 6 + new[:, 2]
        counts += torch.bincount(index, minlength=len(seqs)).double()
    return counts, probs


@pytest.mark.parametrize("proposal,top_k", [("sample", 0), ("argmax", 0), ("sample", 3)])
def test_sampling_follows_ar_distribution_fast(proposal, top_k):
    counts, probs = _isd_counts(proposal, 1.0, 3000, seed=11, batch=3000, top_k=top_k)
    if top_k:
        assert counts[probs == 0].sum() == 0  # nothing outside the top-k is ever committed
    _, p_value = _chi_square(counts, probs)
    assert p_value > 1e-3, p_value


def test_sampling_negative_control_fails_fast():
    counts, probs = _isd_counts("sample", 0.5, 3000, seed=11, batch=3000)
    _, p_value = _chi_square(counts, probs)
    assert p_value < 1e-3, p_value


@pytest.mark.slow
@pytest.mark.parametrize("proposal,alpha,exact", [("sample", 1.0, True), ("argmax", 1.0, True),
                                                  ("sample", 0.5, False), ("argmax", 0.5, False)])
def test_sampling_chi_square_20k(proposal, alpha, exact):
    counts, probs = _isd_counts(proposal, alpha, 20000, seed=21)
    _, p_value = _chi_square(counts, probs)
    assert (p_value > 1e-3) if exact else (p_value < 1e-3), p_value


# ---- R-ISD (peft activated LoRA on the mask slots) -----------------------------------------------------------------
@pytest.fixture(scope="module")
def alora_model():
    peft = pytest.importorskip("peft")
    base = tiny_llama(num_layers=2).double()
    config = peft.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                             alora_invocation_tokens=[MASK], init_lora_weights=False)
    torch.manual_seed(7)
    return peft.get_peft_model(base, config).double().eval()


def test_r_isd_verifier_is_the_base_model_bit_for_bit(alora_model):
    from hf_fastslow.integrations.isd_seam import alora_offsets, uses_alora

    inner = alora_model.get_base_model()
    assert uses_alora(inner)
    ids = torch.cat([torch.randint(3, 120, (2, 6)), torch.full((2, 2), MASK)], 1)
    with torch.no_grad():
        with alora_model.disable_adapter():
            base = inner(ids).logits
        with alora_offsets(inner, [2, 2]):
            risd = inner(ids).logits
        with alora_offsets(inner, [ids.shape[1]] * 2):
            everywhere = inner(ids).logits
    assert torch.equal(risd[:, :-2], base[:, :-2])  # verified positions: base weights, bit for bit
    assert not torch.allclose(risd[:, -2:], base[:, -2:])  # mask slots: the adapter acts
    assert not torch.allclose(everywhere[:, :-2], base[:, :-2])  # (it would act everywhere without offsets)


@pytest.mark.parametrize("n", [2, 4])
def test_r_isd_greedy_equals_base_greedy(alora_model, n):
    ids, mask = left_padded_batch(width=7, pads=(2, 0, 4))
    with alora_model.disable_adapter():
        want = alora_model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=14, do_sample=False)
    out = alora_model.generate(input_ids=ids, attention_mask=mask, custom_generate=isd_generate, gen_block_size=n,
                               mask_token_id=MASK, max_new_tokens=14, do_sample=False, return_dict_in_generate=True)
    assert torch.equal(out.sequences, want)
    direct = isd_generate(alora_model, ids, generation_config=alora_model.generation_config,
                          gen_block_size=n, mask_token_id=MASK, attention_mask=mask,
                          past_key_values=DynamicCache(config=alora_model.config), max_new_tokens=14)
    assert torch.equal(direct[:, : want.shape[1]], want[:, : direct.shape[1]])
    # Without the offsets the adapter would change the verifier: plain generate with the adapter on differs.
    plain_adapter = alora_model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=14, do_sample=False,
                                         alora_offsets=[ids.shape[1] + 14] * 3)
    assert not torch.equal(plain_adapter, want)


# ---- mixin, streamer, acceptance rate ------------------------------------------------------------------------------
class _Streamer:
    def __init__(self):
        self.puts, self.ended = [], False

    def put(self, value):
        self.puts.append(value.reshape(-1).tolist())

    def end(self):
        self.ended = True


def test_mixin_and_streamer_once_per_round():
    class IDLMLlama(IDLMGenerationMixin, OracleDrafts):
        pass

    model = IDLMLlama(oracle_model().config).eval()
    model.load_state_dict(oracle_model().state_dict())
    model = model.double()
    model.isd_config = ISDConfig(gen_block_size=3, mask_token_id=MASK)
    ids = torch.randint(3, 120, (1, 6), generator=torch.Generator().manual_seed(8))
    ref = set_reference(model, ids, torch.ones_like(ids), 17, 0.8, isd=False)
    streamer = _Streamer()
    out = model.generate(ids, max_new_tokens=17, do_sample=False, return_dict_in_generate=True, streamer=streamer)
    assert torch.equal(out.sequences, ref)
    assert streamer.ended and len(streamer.puts) == int(out.num_forwards[0])
    assert sum(streamer.puts, []) == ref[0, ids.shape[1]:].tolist()
    with pytest.raises(ValueError, match="assistant_model"):
        model.generate(ids, max_new_tokens=3, assistant_model=model)


def _brute_force_alpha(model, seq, prompt_length, n, temperature=1.0):
    """The card's alpha by full forwards without a cache: ISD's full-acceptance tiling, one row."""
    total = seq.shape[1]
    ratios = []
    last_real = prompt_length  # the cold round's exact token
    with torch.no_grad():
        p_all = torch.softmax(model(seq).logits[0] / temperature, -1)
        while True:
            ids = torch.cat([seq[:, : last_real + 1], torch.full((1, n - 1), MASK)], 1)
            q = torch.softmax(model(ids).logits[0, last_real + 1:] / temperature, -1)
            pending = last_real + 1
            for m in range(1, n):
                col = pending + m
                if col < total:
                    x = int(seq[0, col])
                    ratios.append(min(1.0, float(p_all[col - 1, x] / q[m - 1, x])))
            if pending + n - 1 >= total - 1:
                break
            last_real = pending + n - 1
    return sum(ratios) / len(ratios)


def test_introspective_acceptance_rate(model64):
    ids = torch.randint(3, 120, (1, 5), generator=torch.Generator().manual_seed(9))
    seq = torch.randint(3, 120, (1, 19), generator=torch.Generator().manual_seed(10))  # p(x) / q(x) varies
    for n in (2, 3, 4):
        got = introspective_acceptance_rate(model64, seq, n, prompt_length=5, mask_token_id=MASK)
        assert math.isclose(got, _brute_force_alpha(model64, seq, 5, n), rel_tol=1e-6), n
        assert 0.5 < got < 0.99
    oracle = oracle_model()
    ref = set_reference(oracle, ids, torch.ones_like(ids), 14, 1.0)
    assert introspective_acceptance_rate(oracle, ref, 3, prompt_length=5, mask_token_id=MASK) > 0.999


def test_bfloat16_runs_and_starts_like_generate():
    model = tiny_llama(num_layers=2).to(torch.bfloat16)
    ids, mask = left_padded_batch()
    want = model.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False)
    out = isd(model, ids, mask, n=3, max_new_tokens=10)
    assert out.sequences.shape == want.shape
    assert torch.equal(out.sequences[:, : ids.shape[1] + 1], want[:, : ids.shape[1] + 1])  # same prefill


def test_isd_config_roundtrip_and_validation():
    config = ISDConfig(gen_block_size=5, mask_token_id=9, verify_alpha=0.8, proposal="argmax")
    assert ISDConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="Unknown"):
        ISDConfig.from_dict({"gen_block_size": 3, "block": 2})
    with pytest.raises(TypeError):
        ISDConfig(gen_block_size=2.0)
    with pytest.raises(ValueError, match="mask_token_id"):
        ISDConfig(mask_token_id=-1)


# ---- errors: clear, and nothing changed ----------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs,match", [
    ({"gen_block_size": 1}, "gen_block_size"),
    ({"mask_token_id": None}, "mask token"),
    ({"mask_token_id": 1}, "EOS"),
    ({"mask_token_id": 500}, "vocabulary"),
    ({"num_beams": 2}, "num_beams"),
    ({"prompt_lookup_num_tokens": 3}, "assistant_model"),
    ({"proposal": "topk"}, "proposal"),
    ({"verify_alpha": 1.5}, "verify_alpha"),
    ({"output_scores": True}, "output_scores"),
    ({"use_cache": False}, "cache"),
])
def test_bad_calls_raise_and_change_nothing(model64, kwargs, match):
    ids = torch.randint(3, 120, (1, 5))
    before = {k: v.clone() for k, v in model64.state_dict().items()}
    config_before = model64.generation_config.to_dict()
    cache = DynamicCache(config=model64.config)
    call = {"gen_block_size": 3, "mask_token_id": MASK, "max_new_tokens": 4}
    call.update(kwargs)
    if call.get("use_cache", True):
        call["past_key_values"] = cache
    with pytest.raises((ValueError, TypeError), match=match):
        model64.generate(ids, custom_generate=isd_generate, **call)
    assert cache.get_seq_length() == 0
    assert model64.generation_config.to_dict() == config_before
    assert all(torch.equal(v, before[k]) for k, v in model64.state_dict().items())


def test_direct_call_refuses_assistant_and_block_diffusion_models(model64):
    ids = torch.randint(3, 120, (1, 5))
    with pytest.raises(ValueError, match="assistant_model"):
        isd_generate(model64, ids, gen_block_size=3, mask_token_id=MASK, assistant_model=model64,
                     past_key_values=DynamicCache(config=model64.config))
    with pytest.raises(ValueError, match="input_ids"):
        model64.generate(inputs_embeds=model64.get_input_embeddings()(ids), custom_generate=isd_generate,
                         gen_block_size=3, mask_token_id=MASK, max_new_tokens=3)
    model = tiny_llama(num_layers=1)
    model.config.block_diffusion = {"mask_token_id": MASK, "block_size": 4, "logit_shift": False,
                                    "attention": "block"}
    with pytest.raises(ValueError, match="causal"):
        model.generate(ids, custom_generate=isd_generate, gen_block_size=3, max_new_tokens=3)
    # The attached config's mask id is the default, and a causal I-DLM config is accepted.
    model.config.block_diffusion.update(attention="causal", logit_shift=True)
    want = model.generate(ids, max_new_tokens=5, do_sample=False)
    assert torch.equal(model.generate(ids, custom_generate=isd_generate, gen_block_size=3, max_new_tokens=5,
                                      do_sample=False), want)


@pytest.mark.slow
def test_default_model_greedy_equals_generate_float64(default_model):
    """SmolLM2-135M (not I-DLM trained: acceptance ~0) in float64: ISD greedy == generate on a chat prompt."""
    import copy

    model, tok = default_model
    model = copy.deepcopy(model).double()
    ids = tok.apply_chat_template([{"role": "user", "content": "Name three rivers in Europe."}],
                                  add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
    want = model.generate(ids, max_new_tokens=24, do_sample=False)
    out = model.generate(ids, custom_generate=isd_generate, gen_block_size=3, mask_token_id=3, max_new_tokens=24,
                         do_sample=False, return_dict_in_generate=True)
    assert torch.equal(out.sequences, want)
