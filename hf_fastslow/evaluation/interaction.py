"""Test-time interaction with a concept bottleneck model: which concept group to ask a human about next.

CooP (Chauhan et al., "Interactive Concept Bottleneck Models", AAAI 2023, arXiv 2212.07430) scores every group G
not yet asked, per example, as `U(G) + beta * I(G) - gamma * cost(G)`:
- `U(G)`: summed binary entropy of the predicted probabilities of G's hidden concepts;
- `I(G)` ("confidence change v1"): with yhat the current prediction and pi0 its probability, q = mean of G's
  predicted probabilities, `I = q |pi(yhat | G set to r(1)) - pi0| + (1 - q) |pi(yhat | G set to r(0)) - pi0|`;
- beta is tuned on a validation split (`tune_beta`), never on test.
Baselines beside it: `RandomPolicy` (a random order per example), `StaticGreedyPolicy` (one input-independent
order fitted greedily on validation), `UncertaintyPolicy` (CooP with beta = 0, what pytorch-concepts offers) and
`OracleGreedyPolicy` (per example, the group that most raises the true label's probability given the true answers:
uses the label, an upper bound, not deployable).

A revealed concept's bottleneck value is `InterventionStats`'s r(1) / r(0): the 95th / 5th percentile of the
bottleneck over a held-out split, pooled over all concepts (format "probs" or "logits"), or exactly 1 / 0 ("binary").
All policies are vectorised over the batch; `run_interaction` records the accuracy after 0, 1, ..., T queries.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from hf_fastslow.modeling.concept_bottleneck import INTERVENTION_FORMATS, intervene, validate_concept_groups

LabelHead = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class InterventionStats:
    """r(0) = `low`, r(1) = `high`: the bottleneck values of a concept revealed absent / present."""

    fmt: str
    low: float
    high: float

    def __post_init__(self):
        if self.fmt not in INTERVENTION_FORMATS:
            raise ValueError(f"intervention format must be one of {INTERVENTION_FORMATS}, got {self.fmt!r}.")

    @classmethod
    def fit(cls, concept_logits: torch.Tensor, fmt: str = "probs",
            percentiles: tuple[float, float] = (5.0, 95.0)) -> InterventionStats:
        """Percentiles of the bottleneck over a held-out (policy / validation) split, all concepts pooled."""
        if fmt not in INTERVENTION_FORMATS:
            raise ValueError(f"intervention format must be one of {INTERVENTION_FORMATS}, got {fmt!r}.")
        if fmt == "binary":
            return cls(fmt, 0.0, 1.0)
        values = concept_logits.detach().float().flatten()
        values = torch.sigmoid(values) if fmt == "probs" else values
        low, high = torch.quantile(values, torch.tensor([percentiles[0] / 100, percentiles[1] / 100]))
        return cls(fmt, float(low), float(high))

    def bottleneck(self, concept_logits: torch.Tensor) -> torch.Tensor:
        """u(l): what the label head reads for a concept not revealed."""
        return concept_logits if self.fmt == "logits" else torch.sigmoid(concept_logits)

    def values(self, answers: torch.Tensor) -> torch.Tensor:
        """r(c) for 0/1 answers."""
        answers = answers.float()
        return answers * self.high + (1 - answers) * self.low


@dataclass
class GroundTruthOracle:
    """The "human": answers with the true concepts, each flipped once with probability `noise` (seeded), and
    optionally `visible` [B, k] (a requested but invisible concept is not revealed, yet the query is spent)."""

    noise: float = 0.0
    seed: int = 0
    visible: torch.Tensor | None = None

    def answer(self, concept_labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        answers = concept_labels.float().clone()
        if self.noise > 0:
            gen = torch.Generator().manual_seed(self.seed)
            flip = torch.rand(answers.shape, generator=gen) < self.noise
            answers = torch.where(flip, 1 - answers, answers)
        visible = torch.ones_like(answers, dtype=torch.bool) if self.visible is None else self.visible.bool()
        if visible.shape != answers.shape:
            raise ValueError(f"visible {tuple(visible.shape)} != concepts {tuple(answers.shape)}.")
        return answers, visible


@dataclass
class InteractionState:
    """What a policy sees at one step. `labels` / `answer_values` are filled only for policies that declare
    `uses_labels = True` (the oracle bound)."""

    probs: torch.Tensor          # [B, k] predicted concept probabilities
    current: torch.Tensor        # [B, k] the bottleneck now (revealed entries overwritten)
    revealed: torch.Tensor       # [B, k] bool
    asked: torch.Tensor          # [B, K] bool: groups already queried
    membership: torch.Tensor     # [K, k] bool
    label_head: LabelHead
    stats: InterventionStats
    labels: torch.Tensor | None = None
    answer_values: torch.Tensor | None = None

    def with_group(self, values: torch.Tensor) -> torch.Tensor:
        """[B, K, k]: the bottleneck with each group's still-hidden concepts set to `values` ([B, k] or scalar)."""
        hidden = self.membership[None] & ~self.revealed[:, None, :]
        values = torch.as_tensor(values, dtype=self.current.dtype)
        values = values[:, None, :] if values.dim() == 2 else values
        return torch.where(hidden, values, self.current[:, None, :])


def binary_entropy(p: torch.Tensor) -> torch.Tensor:
    p = p.clamp(1e-12, 1 - 1e-12)
    return -(p * p.log() + (1 - p) * (1 - p).log())


def check_costs(costs: Sequence[float] | None, n_groups: int | None = None) -> torch.Tensor | None:
    if costs is None:
        return None
    costs = torch.as_tensor(costs, dtype=torch.float32)
    if (costs < 0).any():
        raise ValueError(f"acquisition costs must be >= 0, got {costs.tolist()}.")
    if n_groups is not None and costs.numel() != n_groups:
        raise ValueError(f"{costs.numel()} costs for {n_groups} concept groups.")
    return costs


class Policy:
    """Picks one group per example: `select(state) -> LongTensor [B]` among groups not yet asked."""

    uses_labels = False
    name = "policy"

    def scores(self, state: InteractionState) -> torch.Tensor:
        raise NotImplementedError

    def select(self, state: InteractionState) -> torch.Tensor:
        scores = self.scores(state).masked_fill(state.asked, float("-inf"))
        return scores.argmax(dim=1)  # ties: the lowest group index (torch returns the first maximum)


INFLUENCES = ("confidence_change_v1", "confidence_change_v2", "expected_confidence_change", "expected_kld", "signed")
MAX_EXPECTED_GROUP = 12  # 2**12 answer patterns per group for "expected_confidence_change"


@dataclass
class CooPPolicy(Policy):
    """CooP: `U(G) + beta * I(G) - gamma * cost(G)` (module docstring).

    `influence` (how much G's answer moves the confidence pi(yhat) of the current prediction):
    - `"confidence_change_v1"` (the paper's): all of G set to r(1) with weight q = mean p, or all to r(0).
    - `"signed"`: v1 without the |.|.
    - `"confidence_change_v2"` (the official code's variant for one-hot groups): one concept j at a time, set to
      r(1) / r(0) with weights p_j / 1 - p_j, summed over j.
    - `"expected_confidence_change"`: the exact expectation over G's 2^|G| joint answers under the predicted,
      independent p (equal to v1 for one-concept groups). v1 treats a group as all-on or all-off, which scores a
      confidently predicted mixed group such as {upper-right stroke on, upper-left off} (q = 0.5) as a coin flip.
    - `"expected_kld"`: the same expectation of the symmetric KL between the label distributions after and before
      (the official code's `label_kld` metric, there with the v1 weighting): the whole distribution's change, not
      only the current top class's.
    """

    beta: float = 1.0
    gamma: float = 0.0
    costs: Sequence[float] | None = None
    influence: str = "confidence_change_v1"
    name: str = "coop"

    def __post_init__(self):
        if self.influence not in INFLUENCES:
            raise ValueError(f"influence must be one of {INFLUENCES}, got {self.influence!r}.")
        self._costs = check_costs(self.costs)

    def uncertainty(self, state: InteractionState) -> torch.Tensor:
        hidden_entropy = binary_entropy(state.probs) * (~state.revealed)
        return hidden_entropy @ state.membership.T.to(hidden_entropy.dtype)

    def influence_scores(self, state: InteractionState) -> torch.Tensor:
        base = torch.softmax(state.label_head(state.current), dim=-1)
        yhat = base.argmax(dim=-1)
        pi0 = base.gather(1, yhat[:, None])                                       # [B, 1]
        if self.influence == "confidence_change_v2":
            return self._per_concept_influence(state, yhat, pi0)
        if self.influence in ("expected_confidence_change", "expected_kld"):
            return self._expected_influence(state, base, yhat, pi0)
        member = state.membership.to(state.probs.dtype)
        q = (state.probs @ member.T) / member.sum(1)                              # [B, K]
        probs = []
        for value in (state.stats.high, state.stats.low):
            cand = torch.softmax(state.label_head(state.with_group(value)), dim=-1)  # [B, K, m]
            probs.append(cand.gather(2, yhat[:, None, None].expand(-1, cand.shape[1], 1)).squeeze(2))
        d1, d0 = probs[0] - pi0, probs[1] - pi0
        if self.influence == "confidence_change_v1":
            d1, d0 = d1.abs(), d0.abs()
        return q * d1 + (1 - q) * d0

    def _confidence(self, state: InteractionState, candidates: torch.Tensor, yhat: torch.Tensor) -> torch.Tensor:
        """pi(yhat) for candidate bottlenecks [B, N, k] -> [B, N]."""
        probs = torch.softmax(state.label_head(candidates), dim=-1)
        return probs.gather(2, yhat[:, None, None].expand(-1, probs.shape[1], 1)).squeeze(2)

    def _per_concept_influence(self, state, yhat, pi0) -> torch.Tensor:
        k = state.probs.shape[1]
        eye = torch.eye(k, dtype=torch.bool)
        hidden = eye[None] & ~state.revealed[:, None, :]                          # [B, k, k]: concept j alone
        changes = []
        for value in (state.stats.high, state.stats.low):
            cand = torch.where(hidden, torch.tensor(value, dtype=state.current.dtype), state.current[:, None, :])
            changes.append((self._confidence(state, cand, yhat) - pi0).abs())   # [B, k]
        per_concept = state.probs * changes[0] + (1 - state.probs) * changes[1]
        return per_concept @ state.membership.T.to(per_concept.dtype)

    def _expected_influence(self, state, base, yhat, pi0) -> torch.Tensor:
        out = torch.zeros(state.asked.shape, dtype=state.probs.dtype)
        for g, members in enumerate(state.membership):
            index = members.nonzero().flatten()
            n = len(index)
            if n > MAX_EXPECTED_GROUP:
                raise ValueError(f"group {g} has {n} concepts; expected_confidence_change enumerates 2**n answers "
                                 f"and allows n <= {MAX_EXPECTED_GROUP}.")
            patterns = ((torch.arange(2**n)[:, None] >> torch.arange(n)) & 1).to(state.probs.dtype)  # [P, n]
            p = state.probs[:, index]                                             # [B, n]
            weight = (patterns[None] * p[:, None] + (1 - patterns[None]) * (1 - p[:, None])).prod(-1)  # [B, P]
            cand = state.current[:, None, :].repeat(1, 2**n, 1)                   # [B, P, k]
            values = state.stats.values(patterns)[None].expand(len(p), -1, -1)
            hidden = ~state.revealed[:, None, index]
            cand[:, :, index] = torch.where(hidden, values, cand[:, :, index])
            if self.influence == "expected_kld":
                new = torch.softmax(state.label_head(cand), dim=-1).clamp_min(1e-12)    # [B, P, m]
                old = base.clamp_min(1e-12)[:, None, :]
                change = ((new - old) * (new.log() - old.log())).sum(-1)            # KL(new||old) + KL(old||new)
            else:
                change = (self._confidence(state, cand, yhat) - pi0).abs()
            out[:, g] = (weight * change).sum(-1)
        return out

    def scores(self, state: InteractionState) -> torch.Tensor:
        score = self.uncertainty(state)
        if self.beta != 0:
            score = score + self.beta * self.influence_scores(state)
        if self._costs is not None and self.gamma != 0:
            score = score - self.gamma * check_costs(self._costs, state.membership.shape[0])
        return score


class UncertaintyPolicy(CooPPolicy):
    """Summed binary entropy of the group's hidden concepts only (CooP with beta = 0)."""

    def __init__(self, gamma: float = 0.0, costs: Sequence[float] | None = None):
        super().__init__(beta=0.0, gamma=gamma, costs=costs, name="uncertainty")


@dataclass
class RandomPolicy(Policy):
    """A random order per example, reproducible from `seed` (re-seeded by `reset`)."""

    seed: int = 0
    name: str = "random"
    _gen: torch.Generator | None = field(default=None, repr=False)

    def reset(self) -> None:
        self._gen = torch.Generator().manual_seed(self.seed)

    def scores(self, state: InteractionState) -> torch.Tensor:
        if self._gen is None:
            self.reset()
        return torch.rand(state.asked.shape, generator=self._gen)


@dataclass
class StaticGreedyPolicy(Policy):
    """One order for every input; `fit` builds it greedily on a validation split (the group that most raises the
    split's accuracy next, ties broken by the mean true-label probability, then the lowest index)."""

    order: list[int] | None = None
    name: str = "static"

    def fit(self, label_head: LabelHead, concept_logits: torch.Tensor, concept_labels: torch.Tensor,
            labels: torch.Tensor, groups: Sequence[Sequence[int]], stats: InterventionStats,
            oracle: GroundTruthOracle | None = None) -> StaticGreedyPolicy:
        membership = group_membership(groups, concept_logits.shape[1])
        answers, visible = (oracle or GroundTruthOracle()).answer(concept_labels)
        values, base = stats.values(answers), stats.bottleneck(concept_logits)
        revealed = torch.zeros_like(base, dtype=torch.bool)
        order: list[int] = []
        with torch.no_grad():
            for _ in range(membership.shape[0]):
                best = None
                for g in range(membership.shape[0]):
                    if g in order:
                        continue
                    mask = revealed | (membership[g][None] & visible)
                    probs = torch.softmax(label_head(intervene(base, mask, values)), dim=-1)
                    key = ((probs.argmax(-1) == labels).float().mean().item(),
                           probs.gather(1, labels[:, None]).mean().item())
                    if best is None or key > best[0]:
                        best = (key, g, mask)
                order.append(best[1])
                revealed = best[2]
        self.order = order
        return self

    def scores(self, state: InteractionState) -> torch.Tensor:
        if self.order is None:
            raise ValueError("StaticGreedyPolicy has no order: call fit(...) on a validation split or pass order=.")
        if sorted(self.order) != list(range(state.membership.shape[0])):
            raise ValueError(f"static order {self.order} is not a permutation of the "
                             f"{state.membership.shape[0]} groups.")
        rank = torch.empty(len(self.order))
        rank[torch.tensor(self.order)] = torch.arange(len(self.order), 0, -1, dtype=torch.float32)
        return rank.expand(state.asked.shape[0], -1)


class OracleGreedyPolicy(Policy):
    """Upper bound: per example the group whose true answers most raise the true label's probability."""

    uses_labels = True
    name = "oracle"

    def scores(self, state: InteractionState) -> torch.Tensor:
        cand = torch.softmax(state.label_head(state.with_group(state.answer_values)), dim=-1)  # [B, K, m]
        index = state.labels[:, None, None].expand(-1, cand.shape[1], 1)
        return cand.gather(2, index).squeeze(2)


def group_membership(groups: Sequence[Sequence[int]], n_concepts: int) -> torch.Tensor:
    """[K, k] bool membership of validated groups."""
    groups = validate_concept_groups(groups, n_concepts)
    membership = torch.zeros(len(groups), n_concepts, dtype=torch.bool)
    for g, group in enumerate(groups):
        membership[g, group] = True
    return membership


@dataclass
class InteractionTrace:
    """`accuracy_per_step[t]`: accuracy after t queries (t = 0..T); `chosen` [T, B] groups asked; `revealed` [B, k]
    final mask; `predictions` [T + 1, B]."""

    accuracy_per_step: list[float]
    chosen: torch.Tensor
    revealed: torch.Tensor
    predictions: torch.Tensor

    def area_under_curve(self, queries: int | None = None) -> float:
        return area_under_curve(self.accuracy_per_step, queries)


def area_under_curve(accuracy: Sequence[float], queries: int | None = None) -> float:
    """Trapezoid area under accuracy vs queries over 0..`queries`, divided by `queries` (a mean accuracy)."""
    acc = list(accuracy)[: (len(accuracy) if queries is None else queries + 1)]
    if len(acc) < 2:
        return float(acc[0])
    return float(sum((a + b) / 2 for a, b in zip(acc[:-1], acc[1:])) / (len(acc) - 1))


def run_interaction(
    model_or_head, policy: Policy, *, concept_labels: torch.Tensor, labels: torch.Tensor,
    stats: InterventionStats, pixel_values: torch.Tensor | None = None, concept_logits: torch.Tensor | None = None,
    groups: Sequence[Sequence[int]] | None = None, steps: int | None = None, oracle: GroundTruthOracle | None = None,
) -> InteractionTrace:
    """Ask `policy` for one group per example per step; accuracy after 0, 1, ..., min(steps, K) queries.

    `model_or_head`: a `ConceptBottleneckModel` (its label head and groups are used; concept logits come from
    `pixel_values` unless given) or a bare label head (then pass `concept_logits` and `groups`).
    """
    config = getattr(model_or_head, "config", None)
    label_head = getattr(model_or_head, "label_head", model_or_head)
    if concept_logits is None:
        if pixel_values is None or config is None:
            raise ValueError("pass concept_logits, or a ConceptBottleneckModel with pixel_values.")
        with torch.no_grad():
            concept_logits = model_or_head(pixel_values=pixel_values).concept_logits
    if groups is None:
        if config is None:
            raise ValueError("a bare label head needs groups=.")
        groups = config.concept_groups
    if config is not None and stats.fmt != "binary" and stats.fmt != config.intervention_format:
        raise ValueError(f"stats are in the {stats.fmt!r} format but this model's label head reads "
                         f"{config.intervention_format!r}.")
    first = label_head[0] if isinstance(label_head, torch.nn.Sequential) else label_head
    width = getattr(first, "in_features", None)
    if width is not None and width != concept_logits.shape[1]:
        raise ValueError(f"the label head reads {width} concepts but concept_logits hold {concept_logits.shape[1]}.")
    if concept_labels.shape != concept_logits.shape:
        raise ValueError(f"concept_labels {tuple(concept_labels.shape)} != concept_logits "
                         f"{tuple(concept_logits.shape)}.")
    membership = group_membership(groups, concept_logits.shape[1])
    n_groups, batch = membership.shape[0], concept_logits.shape[0]
    steps = n_groups if steps is None else min(int(steps), n_groups)
    answers, visible = (oracle or GroundTruthOracle()).answer(concept_labels)
    answer_values = stats.values(answers)
    if isinstance(policy, RandomPolicy):
        policy.reset()

    with torch.no_grad():
        base = stats.bottleneck(concept_logits.float())
        state = InteractionState(
            probs=torch.sigmoid(concept_logits.float()), current=base,
            revealed=torch.zeros_like(base, dtype=torch.bool),
            asked=torch.zeros(batch, n_groups, dtype=torch.bool), membership=membership, label_head=label_head,
            stats=stats, labels=labels if policy.uses_labels else None,
            answer_values=answer_values if policy.uses_labels else None,
        )
        predictions = [label_head(base).argmax(-1)]
        chosen = []
        rows = torch.arange(batch)
        for _ in range(steps):
            group = policy.select(state)
            if state.asked[rows, group].any():
                raise RuntimeError(f"{type(policy).__name__} chose a group already asked.")
            chosen.append(group)
            state.asked[rows, group] = True
            state.revealed = state.revealed | (membership[group] & visible)
            state.current = intervene(base, state.revealed, answer_values)
            predictions.append(label_head(state.current).argmax(-1))
    predictions = torch.stack(predictions)
    accuracy = (predictions == labels[None]).float().mean(dim=1).tolist()
    chosen = torch.stack(chosen) if chosen else torch.zeros(0, batch, dtype=torch.long)
    return InteractionTrace(accuracy, chosen, state.revealed, predictions)


def tune_coop(
    label_head: LabelHead, *, concept_logits: torch.Tensor, concept_labels: torch.Tensor, labels: torch.Tensor,
    groups: Sequence[Sequence[int]], stats: InterventionStats, queries: int = 3,
    betas: Sequence[float] = (0.0, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 64.0, 256.0),
    influences: Sequence[str] = ("confidence_change_v1",), gamma: float = 0.0, costs: Sequence[float] | None = None,
) -> tuple[CooPPolicy, dict[tuple[str, float], float]]:
    """The CooP policy (beta, and the influence among `influences`) with the largest area under the accuracy curve
    over the first `queries` queries on the (validation) split given; ties go to the smaller beta, then to the
    influence listed first. Returns (policy, {(influence, beta): area})."""
    areas = {}
    for influence in influences:
        for beta in betas:
            policy = CooPPolicy(beta=beta, gamma=gamma, costs=costs, influence=influence)
            trace = run_interaction(label_head, policy, concept_logits=concept_logits, concept_labels=concept_labels,
                                    labels=labels, groups=groups, stats=stats, steps=queries)
            areas[(influence, float(beta))] = trace.area_under_curve(queries)
    rank = {name: i for i, name in enumerate(influences)}
    influence, beta = max(areas, key=lambda key: (areas[key], -key[1], -rank[key[0]]))
    return CooPPolicy(beta=beta, gamma=gamma, costs=costs, influence=influence), areas
