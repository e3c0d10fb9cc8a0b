"""Generation utilities: speculative decoding with pluggable drafters (`speculative_generate`, `Drafter`, DAS)."""

from .drafter import DraftContext, Drafter, DraftFeedback, DraftModelDrafter, SpeculativeStats, problem_id_for
from .das import DASDrafter, DASWindowCallback, LengthAwareBudget, SuffixHistory, SuffixTrie, das_rollout_func
from .speculative import speculative_generate

__all__ = [
    "DASDrafter",
    "DASWindowCallback",
    "LengthAwareBudget",
    "SuffixHistory",
    "SuffixTrie",
    "das_rollout_func",
    "DraftContext",
    "DraftFeedback",
    "DraftModelDrafter",
    "Drafter",
    "SpeculativeStats",
    "problem_id_for",
    "speculative_generate",
]
from .v1_infer import (  # noqa: F401  (V1-Infer)
    EndpointJudge, HFJudge, PairwiseTournament, PointwiseSelector, majority_vote, round_robin, v1_generate,
)
from .aurora import AuroraConfig, AuroraDrafter, AuroraHead, AuroraTrainer, HotSwapHead  # noqa: E402,F401  (Aurora)
