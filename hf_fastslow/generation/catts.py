"""CATTS: confidence-aware test-time scaling for multi-step agents (Lee et al., "Agentic Test-Time Scaling for
WebAgents", arXiv 2602.12276), on the backend layer (`hf_fastslow.backends`).

At every step the policy samples N candidate replies, parses each into a structured action, clusters the actions by a
deterministic canonical form and turns the cluster sizes into a vote distribution p. Its uncertainty U is the vote
entropy (divided by log of the number of votes, so U is in [0, 1]) or 1 - margin (top-1 minus top-2 share). When
U <= tau the majority action is taken; only when U > tau does an arbiter pick among the clusters:

- `arbiter="generate"`: the arbiter model sees the conversation, one lettered representative per cluster with its vote
  count, and replies with a letter (greedy). An invalid or out-of-range reply falls back to the majority (recorded in
  `StepDecision.arbiter_fallback`, logged at INFO level).
- `arbiter="score"`: one `backend.score()` per option label gives log p(label | prompt); the option probabilities are
  the softmax over the labels (the same as the softmax of the label logits, since the log-normaliser cancels), and
  the most probable label wins. Labels must be single tokens for the arbiter's tokenizer (checked up front).

The baselines share the sampling, parsing and accounting code: `GreedyPolicy` (one greedy sample, ReAct-like),
`MajorityVotePolicy` (N samples, never arbitrates, tau = +inf) and `AlwaysArbitratePolicy` (arbitrates every step,
tau = -inf). Each `step` returns a `StepDecision` with the vote statistics and the sampler's and arbiter's usage read
from the backends' ledgers. Episodes over an `Environment` run in `hf_fastslow.generation.catts_env`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from hf_fastslow.backends.base import Backend, Messages, Usage
from hf_fastslow.evaluation.answers import normalize_number

__all__ = [
    "ARBITER_INSTRUCTION",
    "OPTION_LABELS",
    "AlwaysArbitratePolicy",
    "CATTSConfig",
    "CATTSPolicy",
    "GreedyPolicy",
    "MajorityVotePolicy",
    "StepDecision",
    "StepFailed",
    "VoteStats",
    "arbiter_messages",
    "canonical_action",
    "parse_choice",
    "parse_json_action",
    "vote_stats",
]

logger = logging.getLogger(__name__)

OPTION_LABELS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
ARBITER_INSTRUCTION = (
    "Several candidate replies to the request above were proposed{counts}:\n{options}\n"
    "Which candidate is correct? Reply with just its letter."
)
SIGNALS = ("entropy", "margin")
NORMALIZERS = ("log_n", "none")
ARBITERS = ("generate", "score", None)


# ----------------------------------------------------------------------------------------------------------------------
# Canonical actions and vote statistics
# ----------------------------------------------------------------------------------------------------------------------
def _as_number(text: str) -> int | float | None:
    normalized = normalize_number(text)
    try:
        value = float(normalized)
    except ValueError:
        return None
    if not math.isfinite(value):
        return None
    return int(value) if value == int(value) else value


def _normalize(value: Any) -> Any:
    if isinstance(value, str):
        text = value.strip()
        if text[:1] in "{[":
            try:
                return _normalize(json.loads(text))
            except json.JSONDecodeError:
                pass
        number = _as_number(text) if text else None
        return number if number is not None else " ".join(text.split()).casefold()
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, int | float):
        return int(value) if math.isfinite(value) and value == int(value) else value
    if isinstance(value, dict):
        return {" ".join(str(k).split()).casefold(): _normalize(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_normalize(v) for v in value]
    return _normalize(str(value))


def canonical_action(action: Any) -> str:
    """The cluster key of an action: JSON with sorted keys, where strings are stripped, whitespace-collapsed and
    case-folded, numbers written alike ("42", "42.0", 42 -> 42; "1,234" -> 1234) and JSON text is parsed first, so
    `{"x": 1, "y": 2}` and `'{"y": 2, "x": 1.0}'` share a key. Tuples count as lists."""
    return json.dumps(_normalize(action), sort_keys=True, separators=(",", ":"), ensure_ascii=False)


@dataclass(frozen=True)
class VoteStats:
    """The vote distribution of one step's valid actions.

    Clusters are ordered by count, ties by the earliest sample, so cluster 0 is the majority action (the earliest
    among tied ones). `entropy` is in nats; `entropy_norm` divides it by `normalizer` (log of the number of votes
    under "log_n"; 1 under "none") and is clipped to [0, 1] under "log_n"; `margin` is p(top-1) - p(top-2), 1 with a
    single cluster.
    """

    keys: list[str]
    representatives: list[Any]
    counts: list[int]
    members: list[list[int]]
    p: list[float]
    entropy: float
    entropy_norm: float
    margin: float
    normalizer: float

    @property
    def n_votes(self) -> int:
        return sum(self.counts)

    @property
    def majority(self) -> Any:
        return self.representatives[0]

    def uncertainty(self, signal: str) -> float:
        """U of the gate: `entropy_norm` for "entropy", 1 - margin for "margin"."""
        if signal == "entropy":
            return self.entropy_norm
        if signal == "margin":
            return 1.0 - self.margin
        raise ValueError(f"signal must be one of {SIGNALS}, got {signal!r}")


def vote_stats(actions: Sequence[Any], canonicalize: Callable[[Any], str] = canonical_action,
               normalize: str = "log_n") -> VoteStats:
    """Cluster `actions` by `canonicalize` and return their `VoteStats` (see there). Needs at least one action."""
    if normalize not in NORMALIZERS:
        raise ValueError(f"normalize must be one of {NORMALIZERS}, got {normalize!r}")
    if len(actions) == 0:
        raise ValueError("vote_stats needs at least one action")
    members: dict[str, list[int]] = {}
    for i, action in enumerate(actions):
        members.setdefault(canonicalize(action), []).append(i)
    keys = sorted(members, key=lambda k: (-len(members[k]), members[k][0]))
    n = len(actions)
    counts = [len(members[k]) for k in keys]
    p = [c / n for c in counts]
    entropy = max(0.0, -sum(q * math.log(q) for q in p))
    normalizer = math.log(n) if normalize == "log_n" else 1.0
    if normalize == "log_n":
        entropy_norm = min(1.0, entropy / normalizer) if n > 1 else 0.0
    else:
        entropy_norm = entropy
    margin = (counts[0] - (counts[1] if len(counts) > 1 else 0)) / n
    return VoteStats(keys=keys, representatives=[actions[members[k][0]] for k in keys], counts=counts,
                     members=[members[k] for k in keys], p=p, entropy=entropy, entropy_norm=entropy_norm,
                     margin=margin, normalizer=normalizer)


# ----------------------------------------------------------------------------------------------------------------------
# Parsing
# ----------------------------------------------------------------------------------------------------------------------
def parse_json_action(text: str) -> dict | None:
    """The first JSON object in `text` (e.g. `{"action": "click", "id": 3}` inside prose or a code fence), else None."""
    decoder = json.JSONDecoder()
    for match in re.finditer(r"\{", text):
        try:
            value, _ = decoder.raw_decode(text, match.start())
        except json.JSONDecodeError:
            continue
        if isinstance(value, dict):
            return value
    return None


def parse_choice(reply: str, n_options: int) -> int | None:
    """The option index an arbiter reply names ("B", "(B) ...", "The best is B."): the one distinct in-range
    stand-alone label in it; None when there is none, a leading label is out of range, or several different labels
    appear ("A or B")."""
    labels = OPTION_LABELS[:n_options]
    text = reply.strip()
    lead = re.match(r"^\(?([A-Z])(?![A-Za-z0-9])", text)
    if lead and lead.group(1) not in labels:
        return None
    found = {m for m in re.findall(r"(?<![A-Za-z0-9])([A-Z])(?![A-Za-z0-9])", text) if m in labels}
    return labels.index(found.pop()) if len(found) == 1 else None


def arbiter_messages(messages: Messages, options: Sequence[str], counts: Sequence[int] | None = None) -> Messages:
    """The arbiter's conversation: `messages` with the lettered options (and their vote counts) appended to the last
    user message (a new user message when the conversation does not end with one)."""
    if len(options) > len(OPTION_LABELS):
        raise ValueError(f"at most {len(OPTION_LABELS)} options, got {len(options)}")
    total = sum(counts) if counts is not None else 0
    lines = []
    for i, option in enumerate(options):
        votes = f" ({counts[i]} of {total} votes)" if counts is not None else ""
        lines.append(f"{OPTION_LABELS[i]}. {option}{votes}")
    block = ARBITER_INSTRUCTION.format(counts=f" by {total} samples" if counts is not None else "",
                                       options="\n".join(lines))
    out = [dict(m) for m in messages]
    if out and out[-1].get("role") == "user":
        out[-1]["content"] = f"{out[-1]['content']}\n\n{block}"
    else:
        out.append({"role": "user", "content": block})
    return out


def _render_action(action: Any) -> str:
    return action if isinstance(action, str) else json.dumps(action, ensure_ascii=False)


# ----------------------------------------------------------------------------------------------------------------------
# Config and decisions
# ----------------------------------------------------------------------------------------------------------------------
@dataclass
class CATTSConfig:
    """How a step samples and when it arbitrates.

    `tau` compares with U (see the module docstring): U <= tau takes the majority. Under the default "log_n"
    normaliser U <= 1, so tau >= 1 never arbitrates (majority vote) and tau < 0 always does; with `normalize="none"`
    the entropy is in nats and can exceed 1. `arbiter=None` never arbitrates. `max_retries`: resamples of a step
    whose N samples all fail to parse (at `retry_temperature`, default `temperature`, or 0.7 when that is greedy).
    `temperature=0` is greedy (then `n_samples` must be 1).
    """

    n_samples: int = 10
    signal: str = "entropy"
    tau: float = 0.5
    normalize: str = "log_n"
    arbiter: str | None = "generate"
    max_retries: int = 5
    temperature: float = 0.7
    top_p: float | None = None
    max_new_tokens: int | None = 48
    retry_temperature: float | None = None
    arbiter_max_new_tokens: int = 8
    show_counts: bool = True

    def __post_init__(self):
        if isinstance(self.n_samples, bool) or not isinstance(self.n_samples, int) or self.n_samples < 1:
            raise ValueError(f"n_samples must be an int >= 1, got {self.n_samples!r}")
        if self.signal not in SIGNALS:
            raise ValueError(f"signal must be one of {SIGNALS}, got {self.signal!r}")
        if not isinstance(self.tau, int | float) or math.isnan(self.tau):
            raise ValueError(f"tau must be a number (not NaN), got {self.tau!r}")
        if self.normalize not in NORMALIZERS:
            raise ValueError(f"normalize must be one of {NORMALIZERS}, got {self.normalize!r}")
        if self.arbiter not in ARBITERS:
            raise ValueError(f"arbiter must be one of {ARBITERS}, got {self.arbiter!r}")
        if self.max_retries < 0:
            raise ValueError(f"max_retries must be >= 0, got {self.max_retries}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.temperature == 0 and self.n_samples > 1:
            raise ValueError(f"n_samples={self.n_samples} greedy samples would all be the same; set temperature > 0")
        if self.arbiter_max_new_tokens < 1:
            raise ValueError(f"arbiter_max_new_tokens must be >= 1, got {self.arbiter_max_new_tokens}")

    @property
    def resample_temperature(self) -> float:
        if self.retry_temperature is not None:
            return self.retry_temperature
        return self.temperature if self.temperature > 0 else 0.7


class StepFailed(RuntimeError):
    """No sample of a step parsed into an action, after every retry."""

    def __init__(self, message: str, samples: list[str], usage: Usage):
        super().__init__(message)
        self.samples = samples
        self.usage = usage


@dataclass
class StepDecision:
    """What one step chose and why. `choice` indexes `stats` clusters (0 = majority); `arbiter_probs` are the scoring
    arbiter's option probabilities; `overrode_majority`: the arbiter picked a cluster with fewer votes than the top."""

    action: Any
    text: str
    stats: VoteStats
    uncertainty: float
    arbitrated: bool
    choice: int
    samples: list[str]
    invalid_samples: int
    attempts: int
    sampler_usage: Usage
    arbiter_usage: Usage = field(default_factory=Usage)
    arbiter_reply: str | None = None
    arbiter_probs: list[float] | None = None
    arbiter_fallback: bool = False
    seconds: float = 0.0

    @property
    def overrode_majority(self) -> bool:
        return self.arbitrated and self.stats.counts[self.choice] < self.stats.counts[0]

    @property
    def tokens(self) -> int:
        return self.sampler_usage.total_tokens + self.arbiter_usage.total_tokens


# ----------------------------------------------------------------------------------------------------------------------
# Policies
# ----------------------------------------------------------------------------------------------------------------------
class CATTSPolicy:
    """`CATTSPolicy(sampler, arbiter=None, parse_action=parse_json_action, canonicalize=canonical_action,
    config=CATTSConfig(), render_action=None)`.

    `sampler` and `arbiter` are backends (the same object is fine: the paper uses one model for both). `parse_action
    (text) -> action | None` turns a reply into a structured action (None: invalid); `canonicalize(action) -> str`
    keys the clusters; `render_action(action) -> str` writes an option for the generative arbiter (JSON by default).
    `step(messages, seed=...)` returns a `StepDecision`; `run_episode(env, ...)` runs one episode (see catts_env).
    """

    def __init__(self, sampler: Backend, arbiter: Backend | None = None,
                 parse_action: Callable[[str], Any] = parse_json_action,
                 canonicalize: Callable[[Any], str] = canonical_action, config: CATTSConfig | None = None, *,
                 render_action: Callable[[Any], str] | None = None):
        config = config if config is not None else CATTSConfig()
        if not hasattr(sampler, "chat") or not hasattr(sampler, "ledger"):
            raise TypeError(f"sampler must be a backend (hf_fastslow.backends), got {type(sampler).__name__}")
        if config.arbiter is not None and arbiter is None:
            raise ValueError(f"config.arbiter={config.arbiter!r} needs an arbiter backend (pass arbiter=sampler to use "
                             "the same model), or set config.arbiter=None for plain majority vote")
        if config.arbiter == "score":
            arbiter.require("prompt_scoring", "CATTS's scoring arbiter (log p of each option label)")
            self._check_single_token_labels(arbiter, OPTION_LABELS[:min(config.n_samples, len(OPTION_LABELS))])
        self.sampler = sampler
        self.arbiter = arbiter if config.arbiter is not None else None
        self.parse_action = parse_action
        self.canonicalize = canonicalize
        self.render_action = render_action or _render_action
        self.config = config

    @staticmethod
    def _check_single_token_labels(backend: Backend, labels: str) -> None:
        tokenizer = getattr(backend, "tokenizer", None)
        if tokenizer is None:
            return  # remote scorers are checked on the first score (the number of log-probs per label)
        for label in labels:
            ids = tokenizer(label, add_special_tokens=False)["input_ids"]
            if len(ids) != 1:
                raise ValueError(f"The scoring arbiter needs single-token option labels; {label!r} is {len(ids)} "
                                 f"tokens for {backend.name}'s tokenizer")

    # ----- one step -------------------------------------------------------------------------------------------------
    def _sample(self, messages: Messages, seed: int | None) -> tuple[list[str], list[Any], list[str], int, Usage]:
        cfg = self.config
        mark = self.sampler.ledger.mark()
        samples: list[str] = []
        for attempt in range(cfg.max_retries + 1):
            temperature = cfg.temperature if attempt == 0 else cfg.resample_temperature
            attempt_seed = None if seed is None else seed + attempt * cfg.n_samples
            completions = self.sampler.chat(messages, n=cfg.n_samples, temperature=temperature, top_p=cfg.top_p,
                                            max_new_tokens=cfg.max_new_tokens, seed=attempt_seed)
            texts = [c.text for c in completions]
            samples.extend(texts)
            parsed = [(self.parse_action(t), t) for t in texts]
            valid = [(a, t) for a, t in parsed if a is not None]
            if valid:
                return samples, [a for a, _ in valid], [t for _, t in valid], attempt + 1, self.sampler.ledger.since(
                    mark)
        usage = self.sampler.ledger.since(mark)
        raise StepFailed(f"none of {len(samples)} samples parsed into an action after {cfg.max_retries} retries "
                         f"({self.sampler.name}); last reply: {samples[-1]!r}", samples, usage)

    def _arbitrate(self, messages: Messages, stats: VoteStats) -> tuple[int, str | None, list[float] | None, bool]:
        """(chosen cluster, arbiter reply, option probabilities, fell back to the majority)."""
        k = min(len(stats.keys), len(OPTION_LABELS))
        options = [self.render_action(a) for a in stats.representatives[:k]]
        prompt = arbiter_messages(messages, options, stats.counts[:k] if self.config.show_counts else None)
        if self.config.arbiter == "score":
            logps = []
            for label in OPTION_LABELS[:k]:
                scored = self.arbiter.score(prompt, label)
                if len(scored) != 1:
                    raise ValueError(f"The scoring arbiter needs single-token option labels; {label!r} scored as "
                                     f"{len(scored)} tokens by {self.arbiter.name}")
                logps.append(float(scored[0]))
            top = max(logps)
            weights = [math.exp(lp - top) for lp in logps]
            probs = [w / sum(weights) for w in weights]
            return max(range(k), key=lambda i: (probs[i], -i)), None, probs, False
        reply = self.arbiter.chat(prompt, n=1, temperature=0.0, max_new_tokens=self.config.arbiter_max_new_tokens)
        text = reply[0].text
        choice = parse_choice(text, k)
        if choice is None:  # the arbiter may write the action itself instead of its letter
            action = self.parse_action(text)
            key = self.canonicalize(action) if action is not None else None
            choice = stats.keys.index(key) if key in stats.keys[:k] else None
        if choice is None:
            logger.info("CATTS arbiter reply %r names no option among %d; taking the majority", text, k)
            return 0, text, None, True
        return choice, text, None, False

    def step(self, messages: Messages, *, seed: int | None = None) -> StepDecision:
        """Sample, vote, and arbitrate only when U > tau. Raises `StepFailed` when no sample parses."""
        start = time.perf_counter()
        samples, actions, texts, attempts, sampler_usage = self._sample(messages, seed)
        stats = vote_stats(actions, self.canonicalize, self.config.normalize)
        uncertainty = stats.uncertainty(self.config.signal)
        decision = StepDecision(action=stats.representatives[0], text=texts[stats.members[0][0]], stats=stats,
                                uncertainty=uncertainty, arbitrated=False, choice=0, samples=samples,
                                invalid_samples=len(samples) - len(actions), attempts=attempts,
                                sampler_usage=sampler_usage)
        if self.arbiter is not None and uncertainty > self.config.tau:
            mark = self.arbiter.ledger.mark()
            choice, reply, probs, fallback = self._arbitrate(messages, stats)
            decision.arbiter_usage = self.arbiter.ledger.since(mark)
            decision.arbitrated, decision.choice = True, choice
            decision.arbiter_reply, decision.arbiter_probs, decision.arbiter_fallback = reply, probs, fallback
            decision.action = stats.representatives[choice]
            decision.text = texts[stats.members[choice][0]]
        decision.seconds = time.perf_counter() - start
        return decision

    def run_episode(self, env, *, episode: int = 0, seed: int = 0, max_steps: int | None = None):
        """One episode of `env` (an `Environment`); see `hf_fastslow.generation.catts_env.run_episode`."""
        from hf_fastslow.generation.catts_env import run_episode

        return run_episode(self, env, episode=episode, seed=seed, max_steps=max_steps)

    def __repr__(self) -> str:
        c = self.config
        return (f"{type(self).__name__}(n={c.n_samples}, signal={c.signal}, tau={c.tau}, arbiter={c.arbiter}, "
                f"sampler={self.sampler.name})")


def _derived(config: CATTSConfig | None, n_samples: int | None, **overrides: Any) -> CATTSConfig:
    config = config if config is not None else CATTSConfig()
    if n_samples is not None:
        overrides["n_samples"] = n_samples
    return dataclasses.replace(config, **overrides)


class MajorityVotePolicy(CATTSPolicy):
    """Self-consistency over N sampled actions: the majority cluster every step (ties: the earliest sample)."""

    def __init__(self, sampler: Backend, parse_action: Callable[[str], Any] = parse_json_action,
                 canonicalize: Callable[[Any], str] = canonical_action, config: CATTSConfig | None = None, *,
                 n_samples: int | None = None, **kwargs: Any):
        super().__init__(sampler, None, parse_action, canonicalize,
                         _derived(config, n_samples, arbiter=None, tau=math.inf), **kwargs)


class AlwaysArbitratePolicy(CATTSPolicy):
    """N sampled actions, then the arbiter on every step (even a unanimous one, as the paper's baseline does)."""

    def __init__(self, sampler: Backend, arbiter: Backend, parse_action: Callable[[str], Any] = parse_json_action,
                 canonicalize: Callable[[Any], str] = canonical_action, config: CATTSConfig | None = None, *,
                 n_samples: int | None = None, **kwargs: Any):
        overrides = {} if config is None or config.arbiter is not None else {"arbiter": "generate"}
        super().__init__(sampler, arbiter, parse_action, canonicalize,
                         _derived(config, n_samples, tau=-math.inf, **overrides), **kwargs)


class GreedyPolicy(CATTSPolicy):
    """One greedy sample per step (the paper's ReAct, N=1); an unparseable reply is resampled at the retry
    temperature up to `max_retries` times."""

    def __init__(self, sampler: Backend, parse_action: Callable[[str], Any] = parse_json_action,
                 canonicalize: Callable[[Any], str] = canonical_action, config: CATTSConfig | None = None,
                 **kwargs: Any):
        base = config if config is not None else CATTSConfig()
        super().__init__(sampler, None, parse_action, canonicalize,
                         _derived(base, 1, temperature=0.0, arbiter=None, tau=math.inf,
                                  retry_temperature=base.resample_temperature), **kwargs)
