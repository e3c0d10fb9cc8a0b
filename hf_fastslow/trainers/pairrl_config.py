"""Configuration of V1-PairRL (Singh, Li et al., "V1: Unifying Generation and Self-Verification for Parallel
Reasoners", arXiv 2603.04304)."""

from __future__ import annotations

from dataclasses import dataclass, field

from trl import GRPOConfig

from ..generation.v1_infer import MATH_JUDGE_TEMPLATE
from .config_checks import check_generations_and_precision


@dataclass
class PairRLConfig(GRPOConfig):
    r"""`GRPOConfig` plus the pairwise self-verification role of V1-PairRL.

    Every GRPOConfig option passes through unchanged (loss type, KL `beta`, `use_vllm` and its modes, `accelerate
    launch` with DeepSpeed/FSDP, PEFT). Each training generation batch has two phases: `num_generations` solver
    rollouts per problem (rewarded by the task), then judge rollouts on pairs built from those same rollouts
    (rewarded for ratings that match the solutions' correctness). The paper's recipe is `loss_type="dapo"`,
    `epsilon_high=0.28`, `scale_rewards="none"`, `beta=0.0`, `num_generations=4`.

    Differences from `GRPOConfig` defaults: `bf16` left unset means "bf16 if a bf16-capable GPU is present" instead of
    always True, so the config also builds on CPU.

    Parameters:
        verifier_weight (`float`, defaults to `1.0`): λ in J = J_gen + λ J_pairverif; scales the judge rows'
            advantages. `0` switches the judge phase off (the trainer is then plain GRPO).
        pairs_per_problem (`int`, defaults to `1`): judge groups (each `num_generations` rollouts of one pair) per
            problem in the batch. The judge phase always has `pairs_per_problem` times as many rows as the solver
            phase: problems with no correct solution give their slots to problems that have one (no incorrect-
            incorrect pairs are built); with no correct solution anywhere in the batch the judge phase is skipped.
        require_correct_in_pair (`bool`, defaults to `True`): only pairs with at least one correct solution. The
            paper's guard against the solver emitting empty wrong answers that the judge then scores trivially.
        reward_tolerance (`float`, defaults to `0.2`): a rating r earns credit when |(r - 1)/9 - y| <= tolerance,
            y in {0, 1} the solution's correctness (the sparsity threshold against rating everything 5).
        require_both (`bool`, defaults to `False`): reward 1 only when both ratings are within tolerance; otherwise
            the reward is the mean of the two indicators.
        swap_positions (`bool`, defaults to `True`): randomise which solution is shown as A (position bias).
        correctness_reward_index (`int`, defaults to `0`): which reward function decides correctness.
        correct_threshold (`float` or `None`): a solution is correct when that function's score is >= this. `None`
            uses the task's `perfect_score` for a `VerifiableTask`, else 1.0.
        max_solution_tokens (`int` or `None`, defaults to `512`): solutions are cut to this many tokens inside judge
            prompts (counted in the `verifier/truncated_solutions` metric); judge prompts carry two solutions.
        judge_template (`str`): the judge prompt, with `{problem}`, `{solution_a}`, `{solution_b}`; the same
            template as `hf_fastslow.generation.v1_infer.PairwiseTournament` so the trained judge is used as trained.
    """

    bf16: bool | None = field(
        default=None, metadata={"help": "bf16 mixed precision; unset = on when a bf16-capable GPU is present."}
    )
    verifier_weight: float = field(default=1.0, metadata={"help": "λ: weight of the pairwise-verification objective."})
    pairs_per_problem: int = field(default=1, metadata={"help": "Judge groups per problem in the batch."})
    require_correct_in_pair: bool = field(default=True, metadata={"help": "Never build incorrect-incorrect pairs."})
    reward_tolerance: float = field(default=0.2, metadata={"help": "Credit when |(r-1)/9 - y| <= tolerance."})
    require_both: bool = field(default=False, metadata={"help": "Both ratings within tolerance (else their mean)."})
    swap_positions: bool = field(default=True, metadata={"help": "Randomise the A/B order of each pair."})
    correctness_reward_index: int = field(default=0, metadata={"help": "Reward function deciding correctness."})
    correct_threshold: float | None = field(default=None, metadata={"help": "Score >= threshold counts as correct."})
    max_solution_tokens: int | None = field(default=512, metadata={"help": "Solution length cap in judge prompts."})
    judge_template: str = field(default=MATH_JUDGE_TEMPLATE, metadata={"help": "Pairwise judge prompt template."})

    def __post_init__(self):
        # Checked before GRPOConfig's own validation, whose messages for these cases are generic or come late.
        check_generations_and_precision(self, "PairRLConfig", paper_generations=4)
        if self.verifier_weight < 0:
            raise ValueError(f"PairRLConfig: verifier_weight must be >= 0 (got {self.verifier_weight}).")
        if self.pairs_per_problem < 1:
            raise ValueError(f"PairRLConfig: pairs_per_problem must be >= 1 (got {self.pairs_per_problem}).")
        if not 0.0 <= self.reward_tolerance <= 1.0:
            raise ValueError(f"PairRLConfig: reward_tolerance must be in [0, 1] (got {self.reward_tolerance}).")
        if self.correctness_reward_index < 0:
            raise ValueError(
                f"PairRLConfig: correctness_reward_index must be >= 0 (got {self.correctness_reward_index})."
            )
        if self.max_solution_tokens is not None and self.max_solution_tokens < 1:
            raise ValueError(
                f"PairRLConfig: max_solution_tokens must be >= 1 or None (got {self.max_solution_tokens})."
            )
        for key in ("{problem}", "{solution_a}", "{solution_b}"):
            if key not in self.judge_template:
                raise ValueError(f"PairRLConfig: judge_template must contain {key}.")
        if self.multi_objective_aggregation != "sum_then_normalize":
            raise ValueError(
                "PairRLConfig: multi_objective_aggregation must be 'sum_then_normalize': solver and judge rows use "
                "disjoint reward functions (each 'not applicable' to the other role), which per-function "
                "normalisation across the group cannot handle."
            )
        super().__post_init__()
