"""speculative_generate: losslessness (greedy equality, sampling distribution), forward counts, the drafter contract,
errors. Tiny random Llama models; one smoke test on the real default model."""

import math

import pytest
import torch
from transformers import DynamicCache

from hf_fastslow import cache_kwargs
from hf_fastslow.generation import Drafter, DraftModelDrafter, speculative_generate
from tests.conftest import tiny_llama

torch.set_num_threads(1)


class OracleDrafter(Drafter):
    """Drafts the known reference continuation of each row; `corrupt` replaces drafts by wrong tokens."""

    def __init__(self, references, k=4, corrupt=0.0, vocab=128, seed=0, rows=None):
        super().__init__(k)
        self.references = [r.tolist() for r in references]
        self.rows = rows  # rows to draft for (None: all); the others get no drafts and fall behind
        self.corrupt = corrupt
        self.vocab = vocab
        self.gen = torch.Generator().manual_seed(seed)
        self.seen_budgets = []
        self.proposed_lengths = []
        self.feedback = []

    def propose(self, context):
        drafts = []
        for i, (ids, budget) in enumerate(zip(context.input_ids, context.budgets)):
            self.seen_budgets.append(budget)
            ref = self.references[i]
            # Deliberately ignore the budget (the loop must enforce it) and draft past the reference end.
            d = ref[ids.shape[0] : ids.shape[0] + self.max_draft_tokens + 3]
            d = [t if torch.rand((), generator=self.gen) >= self.corrupt else (t + 1) % self.vocab for t in d]
            d = d if self.rows is None or i in self.rows else []
            drafts.append(torch.tensor(d, dtype=torch.long))
        return drafts

    def observe(self, feedback):
        self.feedback.append(feedback)


class EmptyDrafter(Drafter):
    def propose(self, context):
        return [torch.empty(0, dtype=torch.long) for _ in context.input_ids]


class RandomDrafter(Drafter):
    def __init__(self, k=3, vocab=128, seed=0):
        super().__init__(k)
        self.vocab = vocab
        self.gen = torch.Generator().manual_seed(seed)

    def propose(self, context):
        return [torch.randint(0, self.vocab, (b,), generator=self.gen) for b in context.budgets]


def _batch(seed=1, rows=3, width=9, vocab=128, pads=(0, 3, 5)):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (rows, width), generator=g)
    mask = torch.ones_like(ids)
    for r, p in enumerate(pads[:rows]):
        mask[r, :p] = 0
        ids[r, :p] = 0
    return ids, mask


def _unpadded(seqs, mask):
    width = mask.shape[1]
    return [torch.cat([s[:width][m.bool()], s[width:]]) for s, m in zip(seqs, mask)]


def _generated_count(gen, eos):
    total = 0
    for row in gen.tolist():
        total += row.index(eos) + 1 if eos in row else len(row)
    return total


@pytest.fixture(scope="module")
def model():
    return tiny_llama()


@pytest.mark.parametrize("rows", [1, 3])
@pytest.mark.parametrize("kind", ["empty", "wrong", "random", "oracle", "partial"])
def test_greedy_equals_generate(model, rows, kind):
    ids, mask = _batch(rows=rows)
    ref = model.generate(ids, attention_mask=mask, max_new_tokens=40, do_sample=False)
    drafter = {
        "empty": lambda: EmptyDrafter(4),
        "wrong": lambda: OracleDrafter(_unpadded(ref, mask), corrupt=1.0),
        "random": lambda: RandomDrafter(),
        "oracle": lambda: OracleDrafter(_unpadded(ref, mask)),
        "partial": lambda: OracleDrafter(_unpadded(ref, mask), corrupt=0.3),
    }[kind]()
    out = model.generate(
        ids, attention_mask=mask, max_new_tokens=40, do_sample=False, custom_generate=speculative_generate,
        drafter=drafter,
    )
    assert torch.equal(out, ref)
    stats = drafter.last_stats
    assert stats.new_tokens == _generated_count(ref[:, ids.shape[1]:], model.generation_config.eos_token_id)
    if kind == "oracle":
        # Everything up to each row's EOS is accepted (drafts past the EOS are proposed but never verified).
        assert stats.acceptance_rate > 0.9 and stats.target_forwards <= 1 + math.ceil(39 / 5)
    if kind in ("empty", "wrong"):
        assert stats.accepted == 0


def test_budget_is_enforced_and_drafts_past_max_length_are_cut(model):
    ids, mask = _batch(rows=1)
    ref_long = model.generate(ids, max_new_tokens=30, do_sample=False, eos_token_id=None)
    drafter = OracleDrafter(_unpadded(ref_long, mask[:1]), k=4)
    out = model.generate(
        ids, max_new_tokens=13, do_sample=False, eos_token_id=None, custom_generate=speculative_generate,
        drafter=drafter,
    )
    assert torch.equal(out, ref_long[:, : ids.shape[1] + 13])
    assert max(drafter.seen_budgets) == 4
    # The last rounds may not draft past max_new_tokens (budget = remaining - 1).
    assert drafter.last_stats.proposed <= 12
    assert drafter.last_stats.new_tokens == 13


def test_stops_at_eos_even_if_draft_continues(model):
    ids, mask = _batch(rows=1)
    no_eos = model.generate(ids, max_new_tokens=30, do_sample=False, eos_token_id=None)
    gen = no_eos[0, ids.shape[1]:]
    # Pretend a token first generated at step 4..8 is EOS.
    eos = next(int(gen[j]) for j in range(3, 8) if int(gen[j]) not in gen[:j].tolist())
    ref = model.generate(ids, max_new_tokens=30, do_sample=False, eos_token_id=eos)
    drafter = OracleDrafter(_unpadded(no_eos, mask[:1]), k=8)
    out = model.generate(
        ids, max_new_tokens=30, do_sample=False, eos_token_id=eos, custom_generate=speculative_generate,
        drafter=drafter,
    )
    assert torch.equal(out, ref)
    first = int((gen == eos).nonzero()[0])
    assert out.shape[1] == ids.shape[1] + first + 1
    # The target agreed with all 8 drafts of round 1 (2nd to 9th token), but the row stopped at its EOS: only the
    # drafts up to it count as accepted, and the feedback shows the drafts up to it.
    stats = drafter.last_stats
    assert 1 <= first <= 8 and stats.target_forwards == 2
    assert stats.accepted == first and stats.proposed == 8 and stats.new_tokens == first + 1
    assert drafter.feedback[-1].num_accepted == [first] and len(drafter.feedback[-1].proposed[0]) == first
    assert drafter.feedback[-1].rejected[0].numel() == 0


def test_tokens_per_forward_is_per_row(model):
    """Plain decoding is 1 token per forward at any batch size; exact drafts of k give n / (1 + ceil((n-1)/(k+1)))."""
    ids, mask = _batch(rows=3)
    n, k = 24, 3
    ref = model.generate(ids, attention_mask=mask, max_new_tokens=n, do_sample=False, eos_token_id=None)
    kwargs = {"attention_mask": mask, "max_new_tokens": n, "do_sample": False, "eos_token_id": None,
              "custom_generate": speculative_generate}
    empty = EmptyDrafter(k)
    model.generate(ids, drafter=empty, **kwargs)
    assert empty.last_stats.target_forwards == n and empty.last_stats.tokens_per_forward == 1.0
    oracle = OracleDrafter(_unpadded(ref, mask), k=k)
    model.generate(ids, drafter=oracle, **kwargs)
    forwards = 1 + math.ceil((n - 1) / (k + 1))
    assert oracle.last_stats.target_forwards == forwards
    assert oracle.last_stats.tokens_per_forward == pytest.approx(n / forwards)
    assert oracle.last_stats.new_tokens == 3 * n and oracle.last_stats.row_forwards == 3 * forwards


def test_custom_stopping_criteria_per_row(model):
    """A stopping criterion is checked after every accepted token, per row, as in plain generate (with an EOS
    configured: without one, plain generate keeps decoding rows a custom criterion stopped, we pad them)."""
    from transformers import StoppingCriteria, StoppingCriteriaList

    ids, mask = _batch(rows=3)
    free = model.generate(ids, attention_mask=mask, max_new_tokens=30, do_sample=False, eos_token_id=None)
    stop_token = int(free[0, ids.shape[1] + 7])

    class StopOn(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            return input_ids[:, -1] == stop_token

    kwargs = {"attention_mask": mask, "max_new_tokens": 30, "do_sample": False,
              "stopping_criteria": StoppingCriteriaList([StopOn()])}
    ref = model.generate(ids, **kwargs)
    drafter = OracleDrafter(_unpadded(free, mask), k=6)
    out = model.generate(ids, custom_generate=speculative_generate, drafter=drafter, **kwargs)
    assert torch.equal(out, ref)
    assert out.shape[1] < free.shape[1]


def _count_forwards(model):
    calls = []
    handle = model.model.register_forward_pre_hook(lambda *a: calls.append(1))
    return calls, handle


@pytest.mark.parametrize("k", [1, 3, 5])
def test_forward_counts(model, k):
    ids, mask = _batch(rows=1)
    n = 24
    ref = model.generate(ids, max_new_tokens=n, do_sample=False, eos_token_id=None)
    calls, handle = _count_forwards(model)
    try:
        oracle = OracleDrafter(_unpadded(ref, mask[:1]), k=k)
        model.generate(ids, max_new_tokens=n, do_sample=False, eos_token_id=None,
                       custom_generate=speculative_generate, drafter=oracle)
        oracle_calls = len(calls)
        calls.clear()
        empty = EmptyDrafter(k)
        model.generate(ids, max_new_tokens=n, do_sample=False, eos_token_id=None,
                       custom_generate=speculative_generate, drafter=empty)
        empty_calls = len(calls)
    finally:
        handle.remove()
    # Prefill gives the first token, then each round emits k accepted drafts + 1 bonus token.
    assert oracle_calls == oracle.last_stats.target_forwards == 1 + math.ceil((n - 1) / (k + 1))
    assert empty_calls == empty.last_stats.target_forwards == n
    assert oracle.last_stats.tokens_per_forward > empty.last_stats.tokens_per_forward == 1.0
    assert oracle.last_stats.mean_acceptance_length > 1.0


def test_cache_state_after_generation(model):
    ids, _ = _batch(rows=1)
    ref = model.generate(ids, max_new_tokens=20, do_sample=False, eos_token_id=None, return_dict_in_generate=True,
                         output_scores=True)
    drafter = OracleDrafter(_unpadded(ref.sequences, torch.ones_like(ids)), k=3, corrupt=0.4)
    out = model.generate(ids, max_new_tokens=20, do_sample=False, eos_token_id=None, return_dict_in_generate=True,
                         output_scores=True, custom_generate=speculative_generate, drafter=drafter)
    assert torch.equal(out.sequences, ref.sequences)
    cache = getattr(out, "cache", None) or getattr(out, "past_key_values", None)
    assert cache.get_seq_length() == out.sequences.shape[1] - 1
    assert len(out.scores) == len(ref.scores) == 20
    for a, b in zip(out.scores, ref.scores):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


class HiddenRecorder(Drafter):
    needs_hidden_states = True
    needs_target_logits = True

    def __init__(self, references, k=3):
        super().__init__(k)
        self.oracle = OracleDrafter(references, k=k, corrupt=0.3)
        self.hidden, self.logits, self.last_ids = {}, [], None

    def propose(self, context):
        for i, (h, off) in enumerate(zip(context.hidden_states, context.hidden_offsets)):
            if h is not None:
                self.hidden.setdefault(i, []).append((off, h))
        self.last_ids = context.input_ids
        return self.oracle.propose(context)

    def observe(self, feedback):
        for n, lg in zip(feedback.num_accepted, feedback.target_logits):
            assert lg.shape[0] == n + 1
            self.logits.append(lg)


def test_hidden_states_contract(model):
    """Successive hidden-state chunks tile every token but the last and equal a teacher-forced forward."""
    ids, mask = _batch(rows=3)
    ref = model.generate(ids, attention_mask=mask, max_new_tokens=16, do_sample=False, eos_token_id=None)
    rec = HiddenRecorder(_unpadded(ref, mask))
    out = model.generate(ids, attention_mask=mask, max_new_tokens=16, do_sample=False, eos_token_id=None,
                         custom_generate=speculative_generate, drafter=rec)
    assert torch.equal(out, ref)
    for i, seq in enumerate(_unpadded(out, mask)):
        chunks = rec.hidden[i]
        expected_offset = 0
        for off, h in chunks:
            assert off == expected_offset
            expected_offset += h.shape[0]
        got = torch.cat([h for _, h in chunks])[:, 0]
        with torch.no_grad():
            full = model(seq[None], output_hidden_states=True).hidden_states[-1][0]
        torch.testing.assert_close(got, full[: got.shape[0]], atol=1e-4, rtol=1e-4)
        assert got.shape[0] <= seq.shape[0] - 1
    assert rec.logits


def test_sampling_preserves_distribution():
    """Chi-square: tokens 2-4 (drafted and verified) follow the target's distribution, exact enumeration."""
    vocab, temperature = 6, 0.8
    model = tiny_llama(num_layers=2, hidden=32, vocab=vocab, seed=3)
    with torch.no_grad():
        model.lm_head.weight.mul_(6.0)  # peaked distributions: drafts get accepted often enough
    model.generation_config.eos_token_id = None
    prompt = torch.tensor([[3, 4, 5, 3]])

    # Exact joint law of (x1..x4) under plain sampling with the same processors (temperature).
    seqs = torch.cartesian_prod(*[torch.arange(vocab)] * 3)  # all (x1, x2, x3)
    with torch.no_grad():
        logits = model(torch.cat([prompt.expand(len(seqs), -1), seqs], 1)).logits[:, -4:] / temperature
    logp = torch.log_softmax(logits.double(), -1)  # positions predict x1..x4
    joint = sum(logp[:, j].gather(1, seqs[:, j : j + 1]) for j in range(3)).squeeze(1)
    # P(x2, x3, x4) = sum over x1 of P(x1, x2, x3) P(x4 | ...)
    p4 = (joint[:, None] + logp[:, 3]).exp()  # (x1x2x3, x4)
    expected = p4.reshape(vocab, vocab, vocab, vocab).sum(0).reshape(-1)

    # Greedy continuation of every prefix, read off the enumeration (no model calls inside the drafter).
    greedy = {}
    for row, (x1, x2, x3) in enumerate(seqs.tolist()):
        for j, prefix in enumerate([(), (x1,), (x1, x2), (x1, x2, x3)]):
            greedy[prefix] = int(logits[row, j].argmax())

    class MixedDrafter(Drafter):
        """Half the time the target's greedy continuation, otherwise random tokens (own RNG)."""

        def __init__(self):
            super().__init__(3)
            self.gen = torch.Generator().manual_seed(7)

        def propose(self, context):
            out = []
            for ids, b in zip(context.input_ids, context.budgets):
                if torch.rand((), generator=self.gen) < 0.5:
                    d, gen = [], tuple(ids[prompt.shape[1]:].tolist())
                    for _ in range(b):
                        d.append(greedy[gen])
                        gen = gen + (d[-1],)
                    out.append(torch.tensor(d, dtype=torch.long))
                else:
                    out.append(torch.randint(0, vocab, (b,), generator=self.gen))
            return out

    n = 3000
    torch.manual_seed(0)
    drafter = MixedDrafter()
    out = model.generate(prompt.expand(n, -1), max_new_tokens=4, do_sample=True, temperature=temperature, top_k=None,
                         top_p=None, custom_generate=speculative_generate, drafter=drafter)
    assert drafter.last_stats.accepted > 500  # the multi-token acceptance path was exercised
    tail = out[:, -3:]
    codes = tail[:, 0] * vocab * vocab + tail[:, 1] * vocab + tail[:, 2]
    observed = torch.bincount(codes, minlength=vocab**3).double()
    exp_counts = expected * n
    # Pool cells with small expectation into one bin (chi-square validity).
    small = exp_counts < 5
    obs = torch.cat([observed[~small], observed[small].sum()[None]])
    exp = torch.cat([exp_counts[~small], exp_counts[small].sum()[None]])
    chi2 = float(((obs - exp) ** 2 / exp.clamp_min(1e-12)).sum())
    dof = len(obs) - 1
    p_value = float(torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64), torch.tensor(chi2 / 2)))
    assert p_value > 0.001, (chi2, dof, p_value)


def test_draft_model_drafter_lossless_and_vocab_check(model):
    ids, mask = _batch(rows=3)
    ref = model.generate(ids, attention_mask=mask, max_new_tokens=24, do_sample=False)
    draft = tiny_llama(num_layers=1, hidden=32, seed=5)
    drafter = DraftModelDrafter(draft, max_draft_tokens=3)
    out = model.generate(ids, attention_mask=mask, max_new_tokens=24, do_sample=False,
                         custom_generate=speculative_generate, drafter=drafter)
    assert torch.equal(out, ref)
    assert drafter.last_stats.proposed > 0
    # The target drafting for itself is a perfect draft model.
    self_drafter = DraftModelDrafter(model, max_draft_tokens=3)
    out = model.generate(ids, attention_mask=mask, max_new_tokens=24, do_sample=False,
                         custom_generate=speculative_generate, drafter=self_drafter)
    assert torch.equal(out, ref)
    assert self_drafter.last_stats.acceptance_rate == 1.0

    other_vocab = tiny_llama(num_layers=1, hidden=32, vocab=100)
    with pytest.raises(ValueError, match="tokenizer"):
        model.generate(ids, attention_mask=mask, max_new_tokens=4, custom_generate=speculative_generate,
                       drafter=DraftModelDrafter(other_vocab))


class _Tok:
    def __init__(self, vocab):
        self._vocab = vocab

    def get_vocab(self):
        return self._vocab


def test_errors(model):
    ids, _ = _batch(rows=1)
    for bad in (0, -2, 1.5):
        with pytest.raises(ValueError, match="max_draft_tokens"):
            EmptyDrafter(bad)
    with pytest.raises(ValueError, match="drafter"):
        model.generate(ids, max_new_tokens=4, custom_generate=speculative_generate)
    with pytest.raises(TypeError, match="Drafter"):
        model.generate(ids, max_new_tokens=4, custom_generate=speculative_generate, drafter=object())
    with pytest.raises(ValueError, match="tokenizer"):
        DraftModelDrafter(model, tokenizer=_Tok({"a": 0}), draft_tokenizer=_Tok({"b": 0}))

    class NoCropCache(DynamicCache):
        @property
        def is_croppable(self):
            return False

    with pytest.raises(ValueError, match="crop"):
        model.generate(ids, max_new_tokens=4, custom_generate=speculative_generate, drafter=EmptyDrafter(2),
                       **cache_kwargs(model, NoCropCache(config=model.config)))
    with pytest.raises(ValueError, match="use_cache"):
        model.generate(ids, max_new_tokens=4, custom_generate=speculative_generate, drafter=EmptyDrafter(2),
                       use_cache=False)
    class OutOfVocab(Drafter):
        def propose(self, context):
            return [torch.tensor([10_000]) for _ in context.input_ids]

    with pytest.raises(ValueError, match="vocabulary"):
        model.generate(ids, max_new_tokens=4, custom_generate=speculative_generate, drafter=OutOfVocab(2))
    with pytest.raises(ValueError, match="problem_ids"):
        model.generate(ids, max_new_tokens=4, custom_generate=speculative_generate, drafter=EmptyDrafter(2),
                       problem_ids=["a", "b"])


def test_real_model_greedy_smoke(default_model):
    """SmolLM2-135M: greedy with DAS equals plain greedy on a chat prompt batch (second call drafts from the first)."""
    from hf_fastslow.generation import DASDrafter

    model, tok = default_model
    tok.padding_side = "left"
    texts = [
        tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
        for q in ("List three prime numbers.", "Write a Python function that adds two numbers.")
    ]
    enc = tok(texts, return_tensors="pt", padding=True)
    ref = model.generate(**enc, max_new_tokens=24, do_sample=False)
    drafter = DASDrafter()
    for _ in range(2):
        out = model.generate(**enc, max_new_tokens=24, do_sample=False,
                                     custom_generate=speculative_generate, drafter=drafter)
        assert torch.equal(out, ref)
    assert drafter.last_stats.tokens_per_forward > 2.0  # two rows, and the second call drafts from the first


# --- a cache that already holds part of the prompt -------------------------------------------------------------------
def _cache_of(out):
    return getattr(out, "cache", None) or getattr(out, "past_key_values", None)


@pytest.mark.parametrize("kind", ["empty", "partial"])
def test_multi_turn_cache_reuse_batch1(kind):
    """Turn 2 of a conversation with the cache left by turn 1: only the new tokens are fed, same text as generate."""
    import copy

    model = _position_sensitive_llama()
    ids, _ = _batch(rows=1)
    kwargs = {"max_new_tokens": 12, "do_sample": False, "eos_token_id": None}
    ref1 = model.generate(ids, return_dict_in_generate=True, **kwargs, **cache_kwargs(model, DynamicCache()))
    ref_cache = _cache_of(ref1)
    turn2 = torch.cat([ref1.sequences, torch.tensor([[5, 17, 33, 9]])], dim=1)
    ref2 = model.generate(turn2, **kwargs, **cache_kwargs(model, copy.deepcopy(ref_cache)))

    def drafter(reference):
        return EmptyDrafter(3) if kind == "empty" else OracleDrafter(_unpadded(reference, torch.ones_like(ids)),
                                                                     k=3, corrupt=0.3)

    cache = DynamicCache()
    out1 = model.generate(ids, custom_generate=speculative_generate, drafter=drafter(ref1.sequences), **kwargs,
                          **cache_kwargs(model, cache))
    assert torch.equal(out1, ref1.sequences)
    assert cache.get_seq_length() == ref_cache.get_seq_length() == out1.shape[1] - 1
    calls, handle = _count_tokens_fed(model)
    try:
        out2 = model.generate(turn2, custom_generate=speculative_generate, drafter=drafter(ref2), **kwargs,
                              **cache_kwargs(model, cache))
    finally:
        handle.remove()
    assert torch.equal(out2, ref2)
    assert calls[0] == turn2.shape[1] - out1.shape[1] + 1  # the prefill fed the uncached tail only


def _count_tokens_fed(model):
    fed = []
    handle = model.model.register_forward_pre_hook(
        lambda mod, args, kwargs: fed.append((kwargs.get("input_ids") if kwargs.get("input_ids") is not None
                                              else args[0]).shape[1]),
        with_kwargs=True,
    )
    return fed, handle


@pytest.mark.parametrize("rows", [1, 3])
def test_prefilled_prompt_cache_left_padded(rows):
    """A prompt cache (shared prefix computed once, deep-copied per call) + a suffix: same tokens as generate (on a
    model that notices positions off by the padding)."""
    import copy

    model = _position_sensitive_llama()
    prefix, prefix_mask = _batch(rows=rows, width=9)
    suffix = torch.randint(3, 128, (rows, 5), generator=torch.Generator().manual_seed(4))
    ids = torch.cat([prefix, suffix], dim=1)
    mask = torch.cat([prefix_mask, torch.ones_like(suffix)], dim=1)
    prompt_cache = DynamicCache()
    with torch.no_grad():
        model(prefix, attention_mask=prefix_mask, position_ids=(prefix_mask.cumsum(-1) - 1).clamp(min=0),
              use_cache=True, **cache_kwargs(model, prompt_cache))
    kwargs = {"attention_mask": mask, "max_new_tokens": 20, "do_sample": False}
    ref = model.generate(ids, **kwargs, **cache_kwargs(model, copy.deepcopy(prompt_cache)))
    for drafter in (EmptyDrafter(3), OracleDrafter(_unpadded(ref, mask), k=3, corrupt=0.3)):
        fed, handle = _count_tokens_fed(model)
        try:
            out = model.generate(ids, custom_generate=speculative_generate, drafter=drafter, **kwargs,
                                 **cache_kwargs(model, copy.deepcopy(prompt_cache)))
        finally:
            handle.remove()
        assert torch.equal(out, ref)
        assert fed[0] == suffix.shape[1]
    with pytest.raises(ValueError, match="already holds"):
        model.generate(prefix, attention_mask=prefix_mask, custom_generate=speculative_generate,
                       drafter=EmptyDrafter(3), max_new_tokens=4, **cache_kwargs(model, copy.deepcopy(prompt_cache)))


# --- logits processors: batched over rows and draft positions, as generate applies them ------------------------------
_PROCESSOR_CASES = {
    "repetition_penalty": {"repetition_penalty": 1.3},
    "no_repeat_ngram": {"no_repeat_ngram_size": 2},
    # EOS 27 is an early greedy token of every row; row 0 then stops right at the boundary (an off-by-one shows).
    "min_new_tokens": {"min_new_tokens": 8, "eos_token_id": 27},
    "suppress_tokens": {"suppress_tokens": [27, 74]},
    "all": {"repetition_penalty": 1.2, "no_repeat_ngram_size": 3, "min_new_tokens": 8, "eos_token_id": 27,
            "suppress_tokens": [53]},
}


@pytest.mark.parametrize("rows", [1, 3])
@pytest.mark.parametrize("case", sorted(_PROCESSOR_CASES))
def test_logits_processors_greedy_equal_generate(model, rows, case):
    """Processors with per-batch state (repetition penalty's padding lengths), length-dependent ones (min_new_tokens)
    and content ones, on left-padded rows that advance by different amounts: same tokens as generate."""
    ids, mask = _batch(rows=rows)
    ids = ids.masked_fill(mask == 0, 27)  # pad with a token the model likes: counting pads (or filler) would show
    kwargs = {"attention_mask": mask, "max_new_tokens": 30, "do_sample": False, "eos_token_id": None,
              "pad_token_id": 27, **_PROCESSOR_CASES[case]}
    ref = model.generate(ids, **kwargs)
    plain = model.generate(ids, attention_mask=mask, max_new_tokens=30, do_sample=False,
                           eos_token_id=kwargs["eos_token_id"], pad_token_id=27)
    assert ref.shape != plain.shape or not torch.equal(ref, plain)  # the processors matter here
    references = _unpadded(ref, mask)
    # Rows that race ahead on exact drafts while the others step one token a round: row 0 (the one min_new_tokens
    # holds back) lags; with k=2 row 2 reaches its EOS (step 11) at the first position of a round, beside rows that
    # are still below min_new_tokens.
    for drafter in (OracleDrafter(references, k=4, corrupt=0.3), OracleDrafter(references, k=6, rows={1, 2}),
                    OracleDrafter(references, k=2, rows={2}), RandomDrafter(k=3), EmptyDrafter(2)):
        out = model.generate(ids, custom_generate=speculative_generate, drafter=drafter, **kwargs)
        assert torch.equal(out, ref), type(drafter).__name__
    assert drafter.last_stats.new_tokens > 0


def test_logits_processor_scores_equal_generate(model):
    """output_scores with processors: the processed scores of every kept token equal generate's (rows that finished
    excepted: generate keeps scoring their padding)."""
    ids, mask = _batch(rows=3)
    kwargs = {"attention_mask": mask, "max_new_tokens": 16, "do_sample": False, "eos_token_id": None,
              "repetition_penalty": 1.3, "no_repeat_ngram_size": 2, "return_dict_in_generate": True,
              "output_scores": True}
    ref = model.generate(ids, **kwargs)
    out = model.generate(ids, custom_generate=speculative_generate,
                         drafter=OracleDrafter(_unpadded(ref.sequences, mask), k=4, corrupt=0.3), **kwargs)
    assert torch.equal(out.sequences, ref.sequences)
    for a, b in zip(out.scores, ref.scores):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def _chi2_p_value(samples: torch.Tensor, expected: torch.Tensor) -> float:
    """Chi-square goodness of fit of sample cell codes to a probability vector (cells with expectation < 5 pooled)."""
    n = samples.numel()
    observed = torch.bincount(samples, minlength=expected.numel()).double()
    exp_counts = expected.double() * n
    small = exp_counts < 5
    obs = torch.cat([observed[~small], observed[small].sum()[None]])
    exp = torch.cat([exp_counts[~small], exp_counts[small].sum()[None]])
    chi2 = float(((obs - exp) ** 2 / exp.clamp_min(1e-12)).sum())
    dof = len(obs) - 1
    return float(torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64), torch.tensor(chi2 / 2)))


def test_sampling_with_processors_matches_generate_distribution():
    """Sampling with repetition penalty + temperature + top-p, three left-padded prompts (rows advancing by different
    amounts): tokens 2-4 follow the exact law of plain sampling with the same processors (enumerated), as plain
    generate's own samples do; the law without the repetition penalty is rejected (the check has the power to see a
    processor applied wrongly)."""
    from transformers.generation.logits_process import (
        RepetitionPenaltyLogitsProcessor,
        TemperatureLogitsWarper,
        TopPLogitsWarper,
    )

    from hf_fastslow.integrations import _repetition_penalty_takes_row_boundaries

    vocab, penalty, temperature, top_p = 6, 2.0, 0.7, 0.9
    model = tiny_llama(num_layers=2, hidden=32, vocab=vocab, seed=3)
    with torch.no_grad():
        model.lm_head.weight.mul_(6.0)  # peaked distributions: drafts get accepted often enough
    model.generation_config.eos_token_id = None
    prompts = [[3, 4, 5, 3, 2], [5, 5, 4], [4, 3]]
    width = max(map(len, prompts))

    greedy = {}  # (prompt, generated so far) -> the most likely next token under the processed law

    # generate counts the left pads in the penalty on transformers 5.17, not on 5.24 (per-row prompt boundaries).
    pads_counted = not _repetition_penalty_takes_row_boundaries()

    def law(prompt, with_penalty=True):
        """Exact joint law of (x2, x3, x4) under plain sampling with these processors."""
        seqs = torch.cartesian_prod(*[torch.arange(vocab)] * 4)  # all (x1..x4)
        ids = torch.cat([torch.tensor(prompt).expand(len(seqs), -1), seqs], 1)
        seen = torch.cat([torch.full((len(seqs), width - len(prompt)), 3), ids], 1) if pads_counted else ids
        with torch.no_grad():
            logits = model(ids[:, :-1]).logits[:, -4:].double()
        logp = torch.zeros(len(seqs), dtype=torch.float64)
        for t in range(4):
            scores = logits[:, t]
            if with_penalty:
                scores = RepetitionPenaltyLogitsProcessor(penalty)(seen[:, : seen.shape[1] - 4 + t], scores)
            scores = TopPLogitsWarper(top_p)(None, TemperatureLogitsWarper(temperature)(None, scores))
            logp += torch.log_softmax(scores, -1).gather(1, seqs[:, t : t + 1]).squeeze(1)
            if with_penalty:
                for prefix, best in zip(seqs[:, :t].tolist(), scores.argmax(-1).tolist()):
                    greedy[(tuple(prompt), tuple(prefix))] = best
        return logp.exp().reshape(vocab, vocab**3).sum(0)

    class GreedyChainDrafter(Drafter):
        """Drafts the most likely continuation under the processed law: most drafted positions get verified."""

        def propose(self, context):
            drafts = []
            for ids, n_prompt, budget in zip(context.input_ids, context.prompt_lengths, context.budgets):
                prompt, gen, draft = tuple(ids[:n_prompt].tolist()), tuple(ids[n_prompt:].tolist()), []
                for _ in range(budget):
                    draft.append(greedy[(prompt, gen)])
                    gen += (draft[-1],)
                drafts.append(torch.tensor(draft, dtype=torch.long))
            return drafts

    laws = [law(p) for p in prompts]

    n = 2000
    ids = torch.full((3 * n, width), 3)  # pads are token 3, which the penalty must not count
    mask = torch.zeros_like(ids)
    for r, p in enumerate(prompts):
        ids[r::3, width - len(p) :] = torch.tensor(p)
        mask[r::3, width - len(p) :] = 1
    kwargs = {"attention_mask": mask, "max_new_tokens": 4, "do_sample": True, "repetition_penalty": penalty,
              "temperature": temperature, "top_p": top_p, "top_k": None}
    torch.manual_seed(0)
    plain = model.generate(ids, **kwargs)[:, -3:]
    drafter = GreedyChainDrafter(3)
    spec = model.generate(ids, custom_generate=speculative_generate, drafter=drafter, **kwargs)[:, -3:]
    assert drafter.last_stats.accepted > 3000  # many drafted positions were verified and kept
    for r, (p, expected) in enumerate(zip(prompts, laws)):
        for out in (plain, spec):
            tail = out[r::3]
            codes = tail[:, 0] * vocab * vocab + tail[:, 1] * vocab + tail[:, 2]
            assert _chi2_p_value(codes, expected) > 1e-3, (r, out is spec)
        spec_codes = spec[r::3, 0] * vocab * vocab + spec[r::3, 1] * vocab + spec[r::3, 2]
        assert _chi2_p_value(spec_codes, law(p, with_penalty=False)) < 1e-6


# --- the batched cache: holes are compacted ---------------------------------------------------------------------------
class AlternatingDrafter(OracleDrafter):
    """Exact drafts for even rows on even rounds and odd rows on odd rounds, wrong ones otherwise: the leader changes
    every round, so without compaction the cache grows by k + 1 columns a round while rows grow by (k + 2) / 2."""

    def propose(self, context):
        drafts = super().propose(context)
        return [d if (context.round + i) % 2 == 0 else (d + 1) % self.vocab for i, d in enumerate(drafts)]


@pytest.mark.parametrize("pads", [(0, 0, 0), (0, 3, 5)])
def test_batched_cache_is_compacted(model, pads):
    ids, mask = _batch(rows=3, pads=pads)
    n, k = 60, 6
    ref = model.generate(ids, attention_mask=mask, max_new_tokens=n, do_sample=False, eos_token_id=None)
    cache = DynamicCache()
    drafter = AlternatingDrafter(_unpadded(ref, mask), k=k)
    out = model.generate(ids, attention_mask=mask, max_new_tokens=n, do_sample=False, eos_token_id=None,
                         custom_generate=speculative_generate, drafter=drafter, **cache_kwargs(model, cache))
    assert torch.equal(out, ref)
    stats = drafter.last_stats
    # Without compaction every round adds the leader's k + 1 columns: far more than any row holds.
    uncompacted = ids.shape[1] + (stats.target_forwards - 1) * (k + 1)
    longest_row = ids.shape[1] - min(pads) + n - 1  # tokens in the cache: the last one is never fed
    assert uncompacted > longest_row + 40
    assert cache.get_seq_length() <= longest_row + 16 + (k + 1)


def test_processors_called_once_per_round_with_the_batch(model):
    """A round without drafts calls each processor once with generate's batch view (the same calls as generate);
    with drafts, once per verified position while some row is still accepting (and once per distinct row length for
    a processor outside the content-only set)."""
    from transformers import LogitsProcessor, LogitsProcessorList

    class Recorder(LogitsProcessor):
        def __init__(self):
            self.calls = []

        def __call__(self, input_ids, scores):
            self.calls.append((tuple(input_ids.shape), tuple(scores.shape)))
            return scores

    ids, mask = _batch(rows=3)
    kwargs = {"attention_mask": mask, "max_new_tokens": 12, "do_sample": False, "eos_token_id": None}
    plain_rec, spec_rec = Recorder(), Recorder()
    ref = model.generate(ids, logits_processor=LogitsProcessorList([plain_rec]), **kwargs)
    out = model.generate(ids, logits_processor=LogitsProcessorList([spec_rec]), custom_generate=speculative_generate,
                         drafter=EmptyDrafter(3), **kwargs)
    assert torch.equal(out, ref) and spec_rec.calls == plain_rec.calls and len(plain_rec.calls) == 12

    drafted = Recorder()
    drafter = OracleDrafter(_unpadded(ref, mask), k=3)  # every row accepts everything: rows stay level
    model.generate(ids, logits_processor=LogitsProcessorList([drafted]), custom_generate=speculative_generate,
                   drafter=drafter, **kwargs)
    # One call per position, each with the whole batch: 12 calls (prefill + 11 verified positions) in 4 forwards.
    assert drafter.last_stats.target_forwards == 1 + math.ceil(11 / 4)
    assert [shapes[0] for shapes in drafted.calls] == [shapes[0] for shapes in plain_rec.calls]


# --- position ids of left-padded rows: tested on models that react to a shift ----------------------------------------
def _position_sensitive_llama():
    """A tiny Llama whose greedy output changes when generated tokens sit 3-5 positions off: RoPE with a small base
    (fast rotation), query/key weights scaled so attention follows positions, a sharpened head (no near ties).
    Random tiny models at default scale attend almost uniformly and did not notice such a shift."""
    model = tiny_llama(num_layers=2, hidden=64, seed=11, rope_parameters={"rope_type": "default", "rope_theta": 10.0})
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(4.0)
            layer.self_attn.k_proj.weight.mul_(4.0)
        model.lm_head.weight.mul_(4.0)
    return model


def _greedy_with_generated_positions_shifted(model, ids, mask, shift, steps):
    """Plain greedy decoding by hand where row i's generated tokens get positions `shift[i]` too high."""
    cache, positions = DynamicCache(), (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        logits = model(ids, attention_mask=mask, position_ids=positions, **cache_kwargs(model, cache)).logits
        token, pos, out = logits[:, -1].argmax(-1, keepdim=True), positions[:, -1:] + 1 + shift[:, None], [ids]
        for _ in range(steps - 1):
            out.append(token)
            mask = torch.cat([mask, torch.ones_like(token)], 1)
            logits = model(token, attention_mask=mask, position_ids=pos, **cache_kwargs(model, cache)).logits
            token, pos = logits[:, -1].argmax(-1, keepdim=True), pos + 1
        return torch.cat(out + [token], 1)


def test_left_padded_positions_on_a_position_sensitive_model():
    model = _position_sensitive_llama()
    ids, mask = _batch(rows=3, pads=(0, 3, 5))
    ref = model.generate(ids, attention_mask=mask, max_new_tokens=30, do_sample=False, eos_token_id=None)
    # The model has the power to see the bug: shifting the padded rows' generated positions changes their text.
    shifted = _greedy_with_generated_positions_shifted(model, ids, mask, torch.tensor([0, 3, 5]), 30)
    assert not torch.equal(shifted[1], ref[1]) and not torch.equal(shifted[2], ref[2])
    for drafter in (OracleDrafter(_unpadded(ref, mask), k=4, corrupt=0.3), OracleDrafter(_unpadded(ref, mask), k=3),
                    EmptyDrafter(2)):
        out = model.generate(ids, attention_mask=mask, max_new_tokens=30, do_sample=False, eos_token_id=None,
                             custom_generate=speculative_generate, drafter=drafter)
        assert torch.equal(out, ref), type(drafter).__name__


def test_left_padded_positions_on_the_default_model(default_model):
    """SmolLM2-135M, three chat prompts left-padded by different amounts, drafts partly wrong: same tokens as
    generate."""
    model, tok = default_model
    tok.padding_side = "left"
    texts = [
        tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
        for q in ("Name a color.", "List three prime numbers, please.", "Write one sentence about the sea and ships.")
    ]
    enc = tok(texts, return_tensors="pt", padding=True)
    pads = (enc["attention_mask"] == 0).sum(1).tolist()
    assert len(set(pads)) == 3 and max(pads) >= 3
    kwargs = {**enc, "max_new_tokens": 16, "do_sample": False}
    ref = model.generate(**kwargs)
    drafter = OracleDrafter(_unpadded(ref, enc["attention_mask"]), k=4, corrupt=0.3, vocab=model.config.vocab_size)
    out = model.generate(**kwargs, custom_generate=speculative_generate, drafter=drafter)
    assert torch.equal(out, ref)
    assert drafter.last_stats.accepted > 0 and drafter.last_stats.target_forwards < 16


def test_long_generation_grows_the_token_buffer(model):
    """More new tokens than the loop's initial token buffer (prompt + 256): the buffer grows, the text is generate's,
    and every row view handed to the drafter keeps its tokens to the end (views are never written again)."""

    class ViewKeeper(OracleDrafter):
        def propose(self, context):
            self.views = getattr(self, "views", []) + list(context.input_ids)
            return super().propose(context)

    ids, mask = _batch(rows=2, pads=(0, 4))
    ref = model.generate(ids, attention_mask=mask, max_new_tokens=300, do_sample=False, eos_token_id=None)
    references = _unpadded(ref, mask)
    drafter = ViewKeeper(references, k=6, corrupt=0.2)
    out = model.generate(ids, attention_mask=mask, max_new_tokens=300, do_sample=False, eos_token_id=None,
                         custom_generate=speculative_generate, drafter=drafter)
    assert torch.equal(out, ref)
    assert len(drafter.views) > 2 * 40
    for n, view in enumerate(drafter.views):
        assert torch.equal(view, references[n % 2][: view.numel()])
