"""V1-Infer: budgeted, uncertainty-guided pairwise tournament over N candidates (Singh, Li et al., "V1: Unifying
Generation and Self-Verification for Parallel Reasoners", arXiv 2603.04304).

One model samples N candidate solutions, then judges them two at a time. `PairwiseTournament` schedules the
comparisons (random round, min-degree coverage, Swiss refinement), spends at most `budget` judge calls and picks the
candidate with the highest uncertainty-weighted win rate. The baselines it is measured against ship beside it and
take the same candidates: `majority_vote` (self-consistency), `PointwiseSelector` (one 1-10 self-rating per
candidate), `round_robin` (all N(N-1)/2 pairs) and `random_pick`.

Judges are backends with one method, `complete(prompts) -> texts`: `HFJudge` (a local transformers model, one
left-padded batched `generate` per scheduling round) and `EndpointJudge` (any OpenAI-compatible `/chat/completions`
server, e.g. vLLM or TGI, called concurrently with the standard library only).

Where things live (this module samples the candidates, `v1_generate`, and re-exports the rest, so
`hf_fastslow.generation.v1_infer` still names them all): `v1_verdicts.py` (judge prompts, rating parsers, the outcome
of a comparison), `v1_judges.py` (judge backends), `v1_tournament.py` (`PairwiseTournament`, `round_robin`,
`Selection`), `v1_baselines.py` (`PointwiseSelector`, `majority_vote`, `random_pick`, `extract_answer`).
"""

from __future__ import annotations

import torch

from .padding import pad_token_id
from .v1_baselines import PointwiseSelector, extract_answer, majority_vote, random_pick
from .v1_judges import CallableJudge, EndpointJudge, HFJudge, Judge
from .v1_tournament import PairwiseTournament, Selection, round_robin
from .v1_verdicts import (
    MATH_JUDGE_TEMPLATE,
    MATH_POINTWISE_TEMPLATE,
    pair_outcome,
    parse_pair_ratings,
    parse_rating,
)

__all__ = [
    "MATH_JUDGE_TEMPLATE",
    "MATH_POINTWISE_TEMPLATE",
    "CallableJudge",
    "EndpointJudge",
    "HFJudge",
    "Judge",
    "PairwiseTournament",
    "PointwiseSelector",
    "Selection",
    "extract_answer",
    "majority_vote",
    "pair_outcome",
    "parse_pair_ratings",
    "parse_rating",
    "random_pick",
    "round_robin",
    "v1_generate",
]


@torch.no_grad()
def v1_generate(
    model,
    tokenizer,
    problem: str,
    n: int = 8,
    max_new_tokens: int = 256,
    temperature: float = 1.0,
    top_p: float = 0.95,
    system_prompt: str | None = None,
) -> list[str]:
    """Sample `n` candidate solutions for `problem` in one batched `generate` (the candidates V1-Infer ranks)."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}.")
    if getattr(tokenizer, "chat_template", None):
        messages = [{"role": "user", "content": problem}]
        if system_prompt is not None:
            messages.insert(0, {"role": "system", "content": system_prompt})
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        enc = tokenizer(text, return_tensors="pt", add_special_tokens=False)
    else:
        enc = tokenizer(problem, return_tensors="pt")
    device = next(model.parameters()).device
    enc = {k: v.to(device) for k, v in enc.items()}
    out = model.generate(
        **enc,
        do_sample=True,
        temperature=temperature,
        top_p=top_p,
        num_return_sequences=n,
        max_new_tokens=max_new_tokens,
        pad_token_id=pad_token_id(tokenizer),
    )
    return tokenizer.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
