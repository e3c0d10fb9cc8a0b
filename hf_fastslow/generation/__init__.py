"""Generation utilities: speculative decoding with pluggable drafters (`speculative_generate`, `Drafter`, DAS)."""

from .drafter import DraftContext, Drafter, DraftFeedback, DraftModelDrafter, SpeculativeStats, problem_id_for

__all__ = [
    "DraftContext",
    "DraftFeedback",
    "DraftModelDrafter",
    "Drafter",
    "SpeculativeStats",
    "problem_id_for",
]
