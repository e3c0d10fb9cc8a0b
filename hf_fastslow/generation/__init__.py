"""Generation strategies: lossless speculative decoding with pluggable drafters (DAS, Aurora, draft models),
V1-Infer pairwise tournaments, CREST test-time head steering (with the SEAL-style and token-ban peers), diffusion-LM
decoding (block diffusion, I-DLM's introspective strided decoding and its stationary batch, RCD), qTTT, and the
test-time-scaling methods that orchestrate backends (Squeeze Evolve, CATTS, staircase Mixture-of-Agents,
speculative interaction agents)."""

import importlib

from .agent_grammar import ClockFormat, TurnParser, format_action, grammar_prompt
from .agent_tasks import make_fact_tasks, teacher_policy
from .agent_tools import InlineStream, Tool, ToolRuntime, VirtualClockLoop, run_virtual
from .aurora import AuroraConfig, AuroraDrafter, AuroraHead, HotSwapHead
from .block_diffusion import BlockDiffusionDecoder, block_diffusion_generate
from .catts import (
    AlwaysArbitratePolicy,
    CATTSConfig,
    CATTSPolicy,
    GreedyPolicy,
    MajorityVotePolicy,
    StepDecision,
    StepFailed,
    VoteStats,
    canonical_action,
    parse_json_action,
    vote_stats,
)
from .catts_env import Environment, EpisodeResult, RunningTotalEnv, Transition, run_episode, summarize
from .crest import CRESTCalibrator, CRESTSteerer, CRESTVectors
from .crest_baselines import SEALSteerer, TokenBanLogitsProcessor, fit_seal_vector
from .das import DASDrafter, LengthAwareBudget, StagedRollouts, SuffixHistory, SuffixTrie
from .drafter import DraftContext, Drafter, DraftFeedback, DraftModelDrafter, SpeculativeStats, problem_id_for
from .evolution_baselines import RSA, MajorityVote
from .isd import IDLMGenerationMixin, ISDGenerateOutput, introspective_acceptance_rate, isd_generate
from .isd_batch import StationaryBatchISD, StationaryBatchOutput
from .isd_config import ISDConfig
from .isd_round import ISDRoundResult, ISDRows, isd_round
from .qttt import QTTTConfig, QueryOnlyTTT, qttt_generate
from .rcd import RCDConfig, RCDDecoder, entropy_weighted_residual, inject_residual, rcd_generate
from .speculative import speculative_generate
from .speculative_agent import (
    AgentEvent,
    AgentMetrics,
    AgentResult,
    InterruptOnEvent,
    SequentialReActAgent,
    SpeculativeAgent,
    feed_words,
    unsafe_violations,
)
from .squeeze_evolve import SqueezeEvolve, recombination_messages
from .squeeze_evolve_config import Candidate, EvolveResult, LoopRecord, SqueezeEvolveConfig, Tier
from .staircase import AggregationMetrics, MixtureOfAgents, Stair, StaircaseMoA, aggregate_prompt, interleaved_prompt
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
    "CRESTCalibrator",
    "CRESTSteerer",
    "CRESTVectors",
    "DASDrafter",
    "StagedRollouts",
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
    "SEALSteerer",
    "SpeculativeStats",
    "SuffixHistory",
    "SuffixTrie",
    "TokenBanLogitsProcessor",
    "das_rollout_func",
    "fit_seal_vector",
    "majority_vote",
    "problem_id_for",
    "round_robin",
    "speculative_generate",
    "v1_generate",
    "BlockDiffusionDecoder",
    "block_diffusion_generate",
    "IDLMGenerationMixin",
    "ISDGenerateOutput",
    "introspective_acceptance_rate",
    "isd_generate",
    "StationaryBatchISD",
    "StationaryBatchOutput",
    "ISDConfig",
    "ISDRoundResult",
    "ISDRows",
    "isd_round",
    "QTTTConfig",
    "QueryOnlyTTT",
    "qttt_generate",
    "RCDConfig",
    "RCDDecoder",
    "entropy_weighted_residual",
    "inject_residual",
    "rcd_generate",
    "AlwaysArbitratePolicy",
    "CATTSConfig",
    "CATTSPolicy",
    "GreedyPolicy",
    "MajorityVotePolicy",
    "StepDecision",
    "StepFailed",
    "VoteStats",
    "canonical_action",
    "parse_json_action",
    "vote_stats",
    "Environment",
    "EpisodeResult",
    "RunningTotalEnv",
    "Transition",
    "run_episode",
    "summarize",
    "RSA",
    "MajorityVote",
    "SqueezeEvolve",
    "recombination_messages",
    "Candidate",
    "EvolveResult",
    "LoopRecord",
    "SqueezeEvolveConfig",
    "Tier",
    "AggregationMetrics",
    "MixtureOfAgents",
    "Stair",
    "StaircaseMoA",
    "aggregate_prompt",
    "interleaved_prompt",
    "ClockFormat",
    "TurnParser",
    "format_action",
    "grammar_prompt",
    "make_fact_tasks",
    "teacher_policy",
    "InlineStream",
    "Tool",
    "ToolRuntime",
    "VirtualClockLoop",
    "run_virtual",
    "AgentEvent",
    "AgentMetrics",
    "AgentResult",
    "InterruptOnEvent",
    "SequentialReActAgent",
    "SpeculativeAgent",
    "feed_words",
    "unsafe_violations",
]

# Public names that live a floor up, in hf_fastslow.trainers (name -> module): they resolve on first use, so importing
# generation/ never imports trainers/. Add a line here for each name that moves there.
_FROM_TRAINERS = {
    "AuroraTrainer": "hf_fastslow.trainers.aurora_online_trainer",
    "DASWindowCallback": "hf_fastslow.trainers.das_rollout",
    "das_rollout_func": "hf_fastslow.trainers.das_rollout",
}


def __getattr__(name: str):
    if name in _FROM_TRAINERS:
        return getattr(importlib.import_module(_FROM_TRAINERS[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
