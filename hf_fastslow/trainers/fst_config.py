"""Configuration of Fast-Slow Training (Tiwari et al., "Learning, Fast and Slow", arXiv 2605.12484)."""

from __future__ import annotations

from dataclasses import dataclass, field

from trl import GRPOConfig

from ..integrations import grpo_loss_types
from .config_checks import check_generations_and_precision

PROMPT_SAMPLING = ("round_robin", "best")


@dataclass
class FSTConfig(GRPOConfig):
    r"""`GRPOConfig` plus the fast-weight (optimized system context) schedule of FST.

    Slow weights are the parameters, trained by GRPO-family RL exactly as `GRPOTrainer` does (every GRPOConfig option,
    including `use_vllm`, DeepSpeed/FSDP through `accelerate launch`, and PEFT, passes through). Fast weights are a pool
    of system contexts improved by reflective prompt optimization every `fast_every_steps` optimizer steps.

    Differences from `GRPOConfig` defaults: `loss_type="cispo"` (the paper's slow optimizer) with `epsilon_high=5.0`
    (TRL's recommended ε_max; TRL's fallback would cap every importance weight at `epsilon`=0.2), and `bf16` left unset
    means "bf16 if the accelerator supports it" instead of always True.

    Parameters:
        fast_every_steps (`int`, defaults to `6`): optimizer steps between fast rounds (T); one
            also runs before step 1.
        candidates_per_round (`int`, defaults to `4`): a round stops after this many accepted new contexts (K).
        max_proposals_per_round (`int` or `None`): reflection calls per round at most (default `2 * K`).
        reflection_minibatch_size (`int`, defaults to `3`): training problems per reflection (GEPA's b).
        pareto_set_size (`int`, defaults to `16`): problems scoring every candidate (Pareto set), drawn
            from the training set unless `FSTTrainer(pareto_dataset=...)` is given.
        max_pool_size (`int`, defaults to `8`): candidates kept; beyond it the one best on the fewest items goes.
        prompts_per_problem (`int` or `None`): distinct frontier contexts mixed into each group of `num_generations`
            rollouts (`None` = up to `num_generations`). 1 = every rollout uses the current best context.
        prompt_sampling (`str`, defaults to `"round_robin"`): `"round_robin"` cycles the group's slots over the top
            frontier contexts; `"best"` always uses `fast_context`.
        seed_context (`str` or `None`): initial context. `None` uses the dataset's own system turn if the first row has
            one, else the empty context (no system turn is added: the chat template's default applies).
        max_context_tokens (`int`, defaults to `256`): longer proposals are rejected (they eat the
            prompt budget).
        rescore_frontier_each_round (`bool`, defaults to `True`): re-evaluate the pool on the Pareto set under
            the current slow weights at each round (scores go stale as the weights move).
        fast_eval_batch_size (`int`, defaults to `16`): prompts per `generate` call during fast rounds.
        fast_eval_do_sample (`bool`, defaults to `False`): greedy scoring is less noisy for accept/reject decisions.
        reflection_model (`str`, defaults to `"frozen"`): the reflection LM. `"frozen"`: a frozen copy of the policy
            as it is when the trainer is built (the paper's frozen reflector; costs one model's weights of memory);
            `"policy"`: the policy being trained, with its current weights (no extra memory); a local model path/id
            (loaded frozen); or an OpenAI-compatible base URL (`http(s)://host/v1`). `FSTTrainer(reflector=...)`
            overrides it with a model object, a `Reflector` or a callable.
        reflection_endpoint_model (`str` or `None`): the `model` field sent to an endpoint.
        reflection_api_key_env (`str`, defaults to `"OPENAI_API_KEY"`): environment variable holding the endpoint key.
        reflection_max_new_tokens (`int`, defaults to `256`), reflection_temperature (`float`, defaults to `0.7`).
    """

    loss_type: str = field(default="cispo", metadata={"help": "GRPO loss; FST's slow optimizer is CISPO."})
    bf16: bool | None = field(
        default=None, metadata={"help": "bf16 mixed precision; unset = on when the accelerator supports it."}
    )
    fast_every_steps: int = field(default=6, metadata={"help": "Optimizer steps between fast (context) rounds."})
    candidates_per_round: int = field(default=4, metadata={"help": "Accepted new contexts per fast round at most."})
    max_proposals_per_round: int | None = field(default=None, metadata={"help": "Reflection calls per round (2K)."})
    reflection_minibatch_size: int = field(default=3, metadata={"help": "Problems per reflection minibatch."})
    pareto_set_size: int = field(default=16, metadata={"help": "Problems in the Pareto (selection) set."})
    max_pool_size: int = field(default=8, metadata={"help": "Candidate contexts kept in the pool."})
    prompts_per_problem: int | None = field(default=None, metadata={"help": "Contexts mixed per rollout group."})
    prompt_sampling: str = field(default="round_robin", metadata={"help": "'round_robin' or 'best'."})
    seed_context: str | None = field(default=None, metadata={"help": "Initial system context."})
    max_context_tokens: int = field(default=256, metadata={"help": "Longest accepted context, in tokens."})
    rescore_frontier_each_round: bool = field(default=True, metadata={"help": "Re-score the pool every round."})
    fast_eval_batch_size: int = field(default=16, metadata={"help": "Prompts per generate call in fast rounds."})
    fast_eval_do_sample: bool = field(default=False, metadata={"help": "Sample (True) or greedy (False) scoring."})
    reflection_model: str = field(
        default="frozen", metadata={"help": "'frozen' (copy of the initial policy), 'policy', a model path, or a URL."}
    )
    reflection_endpoint_model: str | None = field(default=None, metadata={"help": "Endpoint `model` field."})
    reflection_api_key_env: str | None = field(default="OPENAI_API_KEY", metadata={"help": "Env var of the key."})
    reflection_max_new_tokens: int = field(default=256, metadata={"help": "Reflection reply length cap."})
    reflection_temperature: float = field(default=0.7, metadata={"help": "Reflection sampling temperature."})

    def __post_init__(self):
        # Validate first: GRPOConfig/TrainingArguments errors for these are generic or come only at the first step.
        check_generations_and_precision(self, "FSTConfig", paper_generations=8)
        known = grpo_loss_types()
        if self.loss_type not in known:
            raise ValueError(f"FSTConfig: loss_type={self.loss_type!r} is not one of this trl's {known}.")
        if self.loss_type == "cispo":
            if self.epsilon_high is None:
                self.epsilon_high = 5.0
            elif self.epsilon_high < 1.0:
                raise ValueError(
                    f"FSTConfig: with loss_type='cispo', epsilon_high is the importance-weight cap ε_max and must be "
                    f">= 1 (got {self.epsilon_high}); below 1 every on-policy token is down-weighted. TRL recommends 5."
                )
        for name in ("fast_every_steps", "candidates_per_round", "reflection_minibatch_size", "pareto_set_size",
                     "max_pool_size", "max_context_tokens", "fast_eval_batch_size", "reflection_max_new_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"FSTConfig: {name} must be >= 1 (got {getattr(self, name)}).")
        if self.max_proposals_per_round is None:
            self.max_proposals_per_round = 2 * self.candidates_per_round
        elif self.max_proposals_per_round < 1:
            raise ValueError(f"FSTConfig: max_proposals_per_round must be >= 1 (got {self.max_proposals_per_round}).")
        if self.prompts_per_problem is not None and self.prompts_per_problem < 1:
            raise ValueError(f"FSTConfig: prompts_per_problem must be >= 1 or None (got {self.prompts_per_problem}).")
        if not isinstance(self.reflection_model, str) or not self.reflection_model.strip():
            raise ValueError(
                f"FSTConfig: reflection_model must be 'frozen', 'policy', a model path/id or an http(s) URL (got "
                f"{self.reflection_model!r}); pass model objects or callables as FSTTrainer(reflector=...)."
            )
        if self.prompt_sampling not in PROMPT_SAMPLING:
            raise ValueError(
                f"FSTConfig: prompt_sampling must be one of {PROMPT_SAMPLING} (got {self.prompt_sampling!r})."
            )
        super().__post_init__()
