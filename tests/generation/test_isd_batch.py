"""Stationary-batch ISD (hf_fastslow/generation/isd_batch.py) on tiny random Llamas in float64.

Random weights draft badly (acceptance ~0), so the paths with accepted drafts run on `SlotOracle`: a Llama whose
mask-slot logits are, with probability `accept_p`, the exact AR logits of the request that owns the slot at that
position (from its precomputed greedy continuation), else the same logits with their argmax demoted.
"""

import inspect

import pytest
import torch
from transformers import LlamaForCausalLM

from hf_fastslow.generation import isd_batch  # noqa: E402
from hf_fastslow.generation.isd import isd_generate  # noqa: E402
from hf_fastslow.generation.isd_batch import StationaryBatchISD  # noqa: E402
from tests.conftest import tiny_llama

MASK = 127
LENGTHS = (5, 1, 9, 3, 12, 7)


def ragged_prompts(lengths=LENGTHS, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 120, (n,), generator=g) for n in lengths]


@pytest.fixture(scope="module")
def model64():
    return tiny_llama(num_layers=2).double()


def per_request_isd(model, prompt, n, max_new, eos=None, **gen):
    ids = prompt[None]
    return model.generate(ids, attention_mask=torch.ones_like(ids), custom_generate=isd_generate, gen_block_size=n,
                          mask_token_id=MASK, max_new_tokens=max_new, eos_token_id=eos, pad_token_id=0,
                          do_sample=False, **gen)[0]


def batch_isd(model, prompts, n, max_new, **kw):
    kw.setdefault("eos_token_id", [])
    return StationaryBatchISD(model, gen_block_size=n, mask_token_id=MASK, max_new_tokens=max_new, **kw).generate(
        prompts)


@pytest.mark.parametrize("n, batch_size, cache", [(2, 3, "dynamic"), (3, 2, "static"), (4, 4, "dynamic"),
                                                  (6, 6, "static")])
def test_greedy_equals_per_request_isd_generate(model64, n, batch_size, cache):
    prompts = ragged_prompts()
    out = batch_isd(model64, prompts, n, 10, batch_size=batch_size, cache_implementation=cache)
    for prompt, seq in zip(prompts, out.sequences):
        assert torch.equal(seq, per_request_isd(model64, prompt, n, 10))
    assert out.new_tokens.tolist() == [10] * len(prompts)


class SlotOracle(LlamaForCausalLM):
    """The mask id is never predicted; a mask slot at position t of slot b drafts (probability `accept_p`) the AR
    logits at t of the request slot b serves (so the next round's anchor agrees), else their runner-up."""

    run = None  # the stationary batch's run (gives slot -> request)
    ref_logits = None  # per request [L, V]
    accept_p = 1.0
    draws = None

    def forward(self, input_ids=None, position_ids=None, **kwargs):
        out = super().forward(input_ids=input_ids, position_ids=position_ids, **kwargs)
        logits = out.logits
        logits[..., MASK] = -1e4
        if self.run is None:
            return out
        for row, slot in zip(*(input_ids == MASK).nonzero(as_tuple=True).__iter__()):
            req = self.run.owner_of[int(row)]
            t = int(position_ids[row, slot])
            ref = self.ref_logits[req]
            if req < 0 or t >= ref.shape[0]:
                continue
            draft = ref[t].to(logits.dtype).clone()
            if float(torch.rand(1, generator=self.draws)) >= self.accept_p:
                draft[draft.argmax()] = draft.min() - 1.0
            logits[row, slot] = draft
        return out

    forward.__signature__ = inspect.signature(LlamaForCausalLM.forward)


def oracle_setup(monkeypatch, prompts, max_new, accept_p, seed=0):
    base = tiny_llama(num_layers=2, seed=seed)
    model = SlotOracle(base.config).eval()
    model.load_state_dict(base.state_dict())
    model = model.double()
    refs, model.ref_logits = [], []
    for prompt in prompts:
        ref = model.generate(prompt[None], attention_mask=torch.ones(1, prompt.numel(), dtype=torch.long),
                             max_new_tokens=max_new, do_sample=False, eos_token_id=None, pad_token_id=0)[0]
        refs.append(ref)
        with torch.no_grad():
            model.ref_logits.append(model(ref[None]).logits[0].clone())
    model.accept_p, model.draws = accept_p, torch.Generator().manual_seed(seed)
    start = isd_batch._Run.start

    def start_and_expose(run):
        model.run = run
        start(run)

    monkeypatch.setattr(isd_batch._Run, "start", start_and_expose)
    return model, refs


@pytest.mark.parametrize("n, accept_p", [(3, 1.0), (4, 0.7), (6, 0.5)])
def test_greedy_with_accepted_drafts_equals_generate(monkeypatch, n, accept_p):
    prompts = ragged_prompts(seed=1)
    model, refs = oracle_setup(monkeypatch, prompts, 14, accept_p)
    out = batch_isd(model, prompts, n, 14, batch_size=3, max_cache_len=80)
    for ref, seq in zip(refs, out.sequences):
        assert torch.equal(seq, ref)
    assert float(out.tokens_per_forward.mean()) > 1.3  # drafts were accepted, not only corrected
    rate = out.acceptance_rate[~out.acceptance_rate.isnan()]
    assert (rate > 0).all()
    if accept_p == 1.0:
        assert (rate == 1).all()
    else:
        assert (rate < 1).any()
    assert out.compactions > 0


def test_cache_and_mask_invariants_every_round(monkeypatch):
    prompts = ragged_prompts(seed=2)
    n = 4
    model, refs = oracle_setup(monkeypatch, prompts, 12, 0.6, seed=2)
    shapes, checks = [], []
    model.register_forward_pre_hook(lambda m, args, kwargs: shapes.append(tuple(kwargs["input_ids"].shape)),
                                    with_kwargs=True)
    round_ = isd_batch._Run.round

    def checked_round(run):
        round_(run)
        rows, decode = run.rows, [p == isd_batch._DECODE for p in run.phase]
        for slot in range(run.slots):
            valid = int(run.kv_valid[slot].sum())
            assert valid == int(run.n_cached[slot])
            assert not run.kv_valid[slot, run.width:].any()  # nothing valid past the columns in use
            if decode[slot] and run.owner_of[slot] >= 0:
                # pending (the last committed token) is not cached: valid = prompt + committed - 1
                assert valid == int(rows.lengths[slot]) - 1
        assert run.cache.get_seq_length() == run.width  # every row has the same physical length
        checks.append(run.width)

    monkeypatch.setattr(isd_batch._Run, "round", checked_round)
    out = batch_isd(model, prompts, n, 12, batch_size=4, cache_implementation="static", max_cache_len=64)
    for ref, seq in zip(refs, out.sequences):
        assert torch.equal(seq, ref)
    assert shapes[0] == (4, max(LENGTHS[:4]) - 1)  # one prefill forward for the first 4 requests
    assert set(shapes[1:]) == {(4, 2 * n - 1)}  # then every forward has the same shape
    assert len(checks) == out.forwards - 1 and out.compactions > 0


def test_continuous_batching_refills_slots(model64):
    prompts = ragged_prompts((4, 2, 6, 3, 5))
    limits = [3, 9, 2, 6, 5]
    sb = StationaryBatchISD(model64, 2, gen_block_size=3, mask_token_id=MASK, eos_token_id=[])
    out = sb.generate(prompts, max_new_tokens=limits)
    # 2 slots, 5 requests of different lengths: a slot takes the next request as soon as its own ends, its prompt
    # prefilled inside the rounds; the run takes fewer forwards than the requests do together.
    assert out.forwards < sum(int(f) for f in out.num_forwards)
    assert out.new_tokens.tolist() == limits
    for prompt, seq, limit in zip(prompts, out.sequences, limits):
        assert torch.equal(seq, per_request_isd(model64, prompt, 3, limit))
    with pytest.raises(ValueError, match="one per request"):
        sb.generate(prompts, max_new_tokens=limits[:2])


def test_eos_stops_a_request_and_frees_its_slot(model64):
    prompts = ragged_prompts((6, 4, 8))
    plain = [per_request_isd(model64, p, 3, 10) for p in prompts]
    eos = int(plain[0][6 + 3])  # the 4th generated token of request 0
    out = batch_isd(model64, prompts, 3, 10, batch_size=2, eos_token_id=eos)
    for prompt, seq in zip(prompts, out.sequences):
        expected = per_request_isd(model64, prompt, 3, 10, eos=eos)
        assert torch.equal(seq, expected[: seq.numel()]) and seq.numel() == expected.numel()
    assert int(out.sequences[0][-1]) == eos and out.new_tokens[0] <= 4


def test_sampling_path_with_top_k_1_is_greedy(model64):
    # top_k=1 makes p and q one-hot: the sampled path (isd_verify, residual sampling) must reproduce greedy.
    prompts = ragged_prompts((5, 3, 7))
    for proposal in ("sample", "argmax"):
        out = batch_isd(model64, prompts, 3, 8, batch_size=2, do_sample=True, top_k=1, proposal=proposal)
        for prompt, seq in zip(prompts, out.sequences):
            assert torch.equal(seq, per_request_isd(model64, prompt, 3, 8))


def test_sampling_with_warpers_runs_and_stays_in_top_k(model64):
    torch.manual_seed(3)
    prompts = ragged_prompts((5, 3))
    out = batch_isd(model64, prompts, 3, 8, batch_size=2, do_sample=True, temperature=0.7, top_k=5, top_p=0.9)
    for prompt, seq in zip(prompts, out.sequences):
        assert seq.numel() == prompt.numel() + 8 and torch.equal(seq[: prompt.numel()], prompt)
        with torch.no_grad():
            logits = model64(seq[None]).logits[0, prompt.numel() - 1: -1]
        top5 = logits.topk(5, dim=-1).indices
        assert (top5 == seq[prompt.numel():, None]).any(-1).all()


@pytest.mark.parametrize("kwargs, match", [
    ({"gen_block_size": 1}, "gen_block_size"),
    ({"mask_token_id": None}, "mask token"),
    ({"eos_token_id": MASK}, "EOS"),
    ({"batch_size": 0}, "batch_size"),
    ({"max_new_tokens": 0}, "max_new_tokens"),
    ({"cache_implementation": "offloaded"}, "cache_implementation"),
    ({"max_cache_len": 0}, "max_cache_len"),
])
def test_bad_settings_raise(model64, kwargs, match):
    base = {"gen_block_size": 3, "mask_token_id": MASK, "eos_token_id": []}
    with pytest.raises((ValueError, TypeError), match=match):
        StationaryBatchISD(model64, **{**base, **kwargs})


def test_bad_requests_and_processors_raise(model64):
    from transformers.generation.logits_process import MinNewTokensLengthLogitsProcessor

    sb = StationaryBatchISD(model64, gen_block_size=3, mask_token_id=MASK, eos_token_id=[], max_new_tokens=4)
    with pytest.raises(ValueError, match="at least one"):
        sb.generate([])
    with pytest.raises(ValueError, match="empty prompt"):
        sb.generate([torch.tensor([5]), torch.tensor([], dtype=torch.long)])
    with pytest.raises(ValueError, match="vocabulary"):
        sb.generate([torch.tensor([5, 128])])
    with pytest.raises(ValueError, match="max_cache_len"):
        StationaryBatchISD(model64, gen_block_size=3, mask_token_id=MASK, max_new_tokens=4,
                           max_cache_len=10).generate([torch.arange(3, 12)])
    with pytest.raises(ValueError, match="MinNewTokensLengthLogitsProcessor"):
        StationaryBatchISD(model64, gen_block_size=3, mask_token_id=MASK,
                           logits_processor=[MinNewTokensLengthLogitsProcessor(3, 5, eos_token_id=1)])


def test_refuses_non_causal_block_diffusion_models_and_other_attention():
    model = tiny_llama(num_layers=1)
    model.config.block_diffusion = {"mask_token_id": MASK, "block_size": 4, "logit_shift": False,
                                    "attention": "block"}
    with pytest.raises(ValueError, match="block_diffusion_generate"):
        StationaryBatchISD(model, gen_block_size=3, mask_token_id=MASK)
    other = tiny_llama(num_layers=1)
    other.config._attn_implementation = "flash_attention_2"
    with pytest.raises(ValueError, match="4D attention mask"):
        StationaryBatchISD(other, gen_block_size=3, mask_token_id=MASK)


def test_sampled_path_through_the_triton_verify(model64):
    # The same top_k=1 run with isd_verify forced onto the Triton kernel (the interpreter on a CPU).
    from hf_fastslow.kernels.dispatch import force_backend
    from hf_fastslow.kernels.testing import triton_runnable

    if not triton_runnable("cpu"):
        pytest.skip("needs triton and TRITON_INTERPRET=1")
    prompts = ragged_prompts((5, 3))
    with force_backend("triton"):
        out = batch_isd(model64, prompts, 3, 6, batch_size=2, do_sample=True, top_k=1)
    for prompt, seq in zip(prompts, out.sequences):
        assert torch.equal(seq, per_request_isd(model64, prompt, 3, 6))


def test_r_isd_stationary_batch_equals_base_greedy():
    # Decoding slots run the aLoRA on their N-1 mask slots only, prefilling slots (newcomers) nowhere.
    peft = pytest.importorskip("peft")
    base = tiny_llama(num_layers=2).double()
    config = peft.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                             alora_invocation_tokens=[MASK], init_lora_weights=False)
    torch.manual_seed(7)
    model = peft.get_peft_model(base, config).double().eval()
    prompts = ragged_prompts((6, 9, 2, 11))
    out = StationaryBatchISD(model, 2, gen_block_size=3, mask_token_id=MASK, eos_token_id=[],
                             max_new_tokens=8).generate(prompts)
    with model.disable_adapter():
        for prompt, seq in zip(prompts, out.sequences):
            want = model.generate(input_ids=prompt[None], attention_mask=torch.ones(1, prompt.numel(),
                                                                                    dtype=torch.long),
                                  max_new_tokens=8, do_sample=False, eos_token_id=None, pad_token_id=0)[0]
            assert torch.equal(seq, want)


# ---- sampling follows the AR distribution, through slot refills -----------------------------------------------------
def _vocab6_exact():
    """A peaked vocab-6 Llama (mask id 5), a prompt, and the exact probabilities of all 216 3-token continuations."""
    model = tiny_llama(num_layers=2, vocab=6, hidden=32, heads=2, kv_heads=1, seed=3).double()
    with torch.no_grad():
        model.lm_head.weight.mul_(6.0)
    prompt = torch.tensor([2, 3, 4, 3])
    seqs = torch.cartesian_prod(*[torch.arange(6)] * 3)
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.cat([prompt.expand(len(seqs), -1), seqs], 1)).logits[:, 3:6], -1)
    return model, prompt, seqs, logp.gather(2, seqs[..., None]).squeeze(-1).sum(1).exp()


def _chi_square_p(counts, probs, min_expected=5.0):
    expected = probs * counts.sum()
    big = expected >= min_expected
    obs = torch.cat([counts[big], counts[~big].sum()[None]])
    exp = torch.cat([expected[big], expected[~big].sum()[None]])
    stat = float(((obs - exp) ** 2 / exp.clamp(min=1e-12)).sum())
    return float(torch.special.gammaincc(torch.tensor(int(big.sum()) / 2.0, dtype=torch.float64),
                                         torch.tensor(stat / 2.0, dtype=torch.float64)))


@pytest.mark.parametrize("proposal, alpha, exact", [("sample", 1.0, True), ("argmax", 1.0, True),
                                                    ("sample", 0.5, False)])
def test_sampling_follows_the_ar_distribution(proposal, alpha, exact):
    # 3000 requests of one prompt through 256 slots: every slot is refilled ~11 times while others decode.
    model, prompt, seqs, probs = _vocab6_exact()
    torch.manual_seed(5)
    sb = StationaryBatchISD(model, 256, gen_block_size=3, mask_token_id=5, eos_token_id=[], max_new_tokens=3,
                            do_sample=True, proposal=proposal, verify_alpha=alpha)
    out = sb.generate([prompt] * 3000)
    new = torch.stack([s[4:] for s in out.sequences])
    counts = torch.bincount(new[:, 0] * 36 + new[:, 1] * 6 + new[:, 2], minlength=216).double()
    p_value = _chi_square_p(counts, probs)
    assert (p_value > 1e-3) if exact else (p_value < 1e-3), p_value
