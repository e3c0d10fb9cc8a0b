"""Drafters, batches and models shared by the speculative_generate tests."""

import torch

from hf_fastslow.generation import Drafter
from tests.conftest import tiny_llama


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


class AlternatingDrafter(OracleDrafter):
    """Exact drafts for even rows on even rounds and odd rows on odd rounds, wrong ones otherwise: the leader changes
    every round, so without compaction the cache grows by k + 1 columns a round while rows grow by (k + 2) / 2."""

    def propose(self, context):
        drafts = super().propose(context)
        return [d if (context.round + i) % 2 == 0 else (d + 1) % self.vocab for i, d in enumerate(drafts)]


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
