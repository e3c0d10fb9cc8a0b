"""speculative_generate with logits processors: batched over rows and verified positions as generate applies them
(greedy equality, processed scores, the sampling law, calls per round)."""

import math

import pytest
import torch

from hf_fastslow.generation import Drafter, speculative_generate
from tests.conftest import tiny_llama
from tests.generation.speculative_helpers import (
    EmptyDrafter,
    OracleDrafter,
    RandomDrafter,
    _batch,
    _chi2_p_value,
    _unpadded,
)

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def model():
    return tiny_llama()


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

    from hf_fastslow.integrations.generation import _repetition_penalty_takes_row_boundaries

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
