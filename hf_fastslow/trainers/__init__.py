"""TRL trainers (FST, PairRL, ...). Names resolve lazily: `import hf_fastslow.trainers` does not import trl."""

from __future__ import annotations

import importlib

# public name -> submodule; each trainer adds its own lines
_LAZY = {
    "VerifiableTask": "tasks",
    "FSTConfig": "fst_config",
    "FSTTrainer": "fst_trainer",
    "load_fast_context": "fst_trainer",
    "Reflector": "reflection",
    "PolicyReflector": "reflection",
    "FrozenReflector": "reflection",
    "HFReflector": "reflection",
    "OpenAIReflector": "reflection",
    "FunctionReflector": "reflection",
    "PairRLConfig": "pairrl_config",
    "PairRLTrainer": "pairrl_trainer",
    "AuroraTrainer": "aurora_online_trainer",
    "ReplayBuffer": "replay_buffer",
    "das_rollout_func": "das_rollout",
    "DASWindowCallback": "das_rollout",
    "KVHealingConfig": "kv_healing_config",
    "KVHealingTrainer": "kv_healing_trainer",
    "EarlyReadoutDistillationConfig": "early_readout_config",
    "EarlyReadoutDistillationTrainer": "early_readout_trainer",
    "EarlyReadoutGKDConfig": "early_readout_gkd_config",
    "EarlyReadoutGKDTrainer": "early_readout_gkd_trainer",
    "FeatureSieveConfig": "feature_sieve_config",
    "FeatureSieveTrainer": "feature_sieve_trainer",
    "ClockTraceBuilder": "clock_sft",
    "TimedEpisode": "clock_sft",
    "clock_sft_trainer": "clock_sft",
    "make_clock_sft_dataset": "clock_sft",
    "synthesize_episodes": "clock_sft",
    "DTSConfig": "dts",
    "build_dts_pairs": "dts",
    "build_sampling_pairs": "dts",
    "BlockDiffusionTrainingConfig": "block_diffusion_config",
    "BlockDiffusionTrainer": "block_diffusion_trainer",
    "IDLMConfig": "idlm_config",
    "IDLMTrainer": "idlm_trainer",
    "RCDTrainingConfig": "rcd_config",
    "RCDTrainer": "rcd_trainer",
    "IMAMLConfig": "imaml_config",
    "IMAMLTrainer": "imaml_trainer",
    "MisconfiguredLaunchError": "distributed",
    "check_distributed_launch": "distributed",
    "SlimSearchConfig": "slim_config",
    "SlimSearchTrainer": "slim_trainer",
}

__all__ = list(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
