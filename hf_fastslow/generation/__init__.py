"""Generation strategies: lossless speculative decoding with pluggable drafters (DAS, Aurora, draft models) and
V1-Infer pairwise tournaments."""

from .aurora import AuroraConfig, AuroraDrafter, AuroraHead, AuroraTrainer, HotSwapHead
from .das import DASDrafter, DASWindowCallback, LengthAwareBudget, SuffixHistory, SuffixTrie, das_rollout_func
from .drafter import DraftContext, Drafter, DraftFeedback, DraftModelDrafter, SpeculativeStats, problem_id_for
from .speculative import speculative_generate
from .v1_infer import (
    EndpointJudge,
    HFJudge,
    PairwiseTournament,
    PointwiseSelector,
    majority_vote,
    round_robin,
    v1_generate,
)

__all__ = [
    "AuroraConfig",
    "AuroraDrafter",
    "AuroraHead",
    "AuroraTrainer",
    "DASDrafter",
    "DASWindowCallback",
    "DraftContext",
    "DraftFeedback",
    "DraftModelDrafter",
    "Drafter",
    "EndpointJudge",
    "HFJudge",
    "HotSwapHead",
    "LengthAwareBudget",
    "PairwiseTournament",
    "PointwiseSelector",
    "SpeculativeStats",
    "SuffixHistory",
    "SuffixTrie",
    "das_rollout_func",
    "majority_vote",
    "problem_id_for",
    "round_robin",
    "speculative_generate",
    "v1_generate",
]
