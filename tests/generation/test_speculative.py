"""speculative_generate: losslessness (greedy equality, sampling distribution), forward counts, stats, the drafter
contract, errors. Tiny random Llama models; one smoke test on the real default model. Logits processors are tested in
test_speculative_processors.py, caches and position ids in test_speculative_cache.py."""

import math

import pytest
import torch
from transformers import DynamicCache

from hf_fastslow import cache_kwargs
from hf_fastslow.generation import Drafter, DraftModelDrafter, speculative_generate
from tests.conftest import tiny_llama
from tests.generation.speculative_helpers import EmptyDrafter, OracleDrafter, RandomDrafter, _batch, _unpadded

torch.set_num_threads(1)


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
