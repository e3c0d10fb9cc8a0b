"""K-Sort Eval's Bayesian pieces: the (K+1)-wise free-for-all TrueSkill update of ONE new player against fixed
opponents, the posterior correction by judge-human agreement, and the stopping rule and final score.

`trueskill_ffa_update` runs the same expectation-propagation schedule as the `trueskill` package (the one the
official K-Sort Eval code calls): players sorted by rank, one truncation factor between neighbours, a forward then
backward sweep repeated until the largest change of a difference variable is <= `min_delta` (at most 10 sweeps), then
messages sent back up to the skills. Only the new player's posterior is returned: the opponents are an arena's
leaderboard and stay fixed (their sigmas enter only through the likelihood). The normal cdf/pdf/ppf are the exact
ones (math.erfc) by default, or `normal="approx"`: the Numerical Recipes erfc that `trueskill` uses by default
(fractional error 1.2e-7, which a difference of two cdfs in a draw, or a far tail, amplifies to ~1e-5 in mu).

Posterior correction (Lemma 1 of the paper): a judge that agrees with the humans on the K known outputs (Spearman
rho) is trusted with weight lambda = sigmoid(kappa * rho); the corrected posterior is the moment-matched mixture
lambda * posterior + (1 - lambda) * prior. Two variance rules exist: the paper's lambda^2 s^2 + (1 - lambda)^2 s0^2,
which shrinks sigma below BOTH inputs at middling lambda (a coin-flip judge would make it stop early), and the
official code's normalised weight w = lambda^2 / (lambda^2 + (1 - lambda)^2), which keeps sigma between them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from statistics import NormalDist

__all__ = [
    "DEFAULT_BETA",
    "DEFAULT_DRAW_PROBABILITY",
    "DEFAULT_MU",
    "DEFAULT_SIGMA",
    "DEFAULT_TAU",
    "NORMAL_KINDS",
    "VARIANCE_RULES",
    "Skill",
    "StoppingRule",
    "agreement_weight",
    "corrected_skill",
    "final_score",
    "posterior_correction",
    "spearman_rho",
    "trueskill_ffa_update",
]

DEFAULT_MU = 25.0
DEFAULT_SIGMA = DEFAULT_MU / 3
DEFAULT_BETA = DEFAULT_SIGMA / 2
DEFAULT_TAU = DEFAULT_SIGMA / 100
DEFAULT_DRAW_PROBABILITY = 0.10
VARIANCE_RULES = ("code", "paper")
NORMAL_KINDS = ("exact", "approx")

_STD_NORMAL = NormalDist()
_MAX_SWEEPS = 10  # the `trueskill` package's cap; parity needs the same schedule, not only the same fixed point


@dataclass(frozen=True)
class Skill:
    """A Gaussian skill belief N(mu, sigma^2)."""

    mu: float = DEFAULT_MU
    sigma: float = DEFAULT_SIGMA

    def __post_init__(self):
        if not (math.isfinite(self.mu) and math.isfinite(self.sigma)) or self.sigma <= 0:
            raise ValueError(f"Skill needs a finite mu and a finite sigma > 0, got mu={self.mu}, sigma={self.sigma}.")


# ----- Gaussian messages in natural parameters (precision pi = 1/var, precision-mean tau = mu/var) ------------------
@dataclass(frozen=True)
class _Nat:
    pi: float = 0.0
    tau: float = 0.0

    @staticmethod
    def of(mu: float, sigma: float) -> _Nat:
        pi = sigma ** -2
        return _Nat(pi, pi * mu)

    @property
    def mu(self) -> float:
        return self.tau / self.pi if self.pi else 0.0

    def __mul__(self, other: _Nat) -> _Nat:
        return _Nat(self.pi + other.pi, self.tau + other.tau)

    def __truediv__(self, other: _Nat) -> _Nat:
        return _Nat(self.pi - other.pi, self.tau - other.tau)


class _Var:
    """A variable node: its current marginal and the last message each neighbouring factor sent it."""

    def __init__(self) -> None:
        self.value = _Nat()
        self.inbox: dict[str, _Nat] = {}

    def cavity(self, factor: str) -> _Nat:
        """The marginal without `factor`'s message: what the factor sees."""
        return self.value / self.inbox.get(factor, _Nat())

    def _set(self, new: _Nat) -> float:
        change_pi = abs(self.value.pi - new.pi)
        change = 0.0 if math.isinf(change_pi) else max(abs(self.value.tau - new.tau), math.sqrt(change_pi))
        self.value = new
        return change

    def receive(self, factor: str, message: _Nat) -> float:
        old = self.inbox.get(factor, _Nat())
        self.inbox[factor] = message
        return self._set(self.value / old * message)

    def replace_marginal(self, factor: str, marginal: _Nat) -> float:
        """Set the marginal directly (prior, truncation) and store the message that explains it."""
        old = self.inbox.get(factor, _Nat())
        self.inbox[factor] = marginal * old / self.value
        return self._set(marginal)


def _weighted_sum_message(terms: Sequence[tuple[float, _Nat]]) -> _Nat:
    """Message to x = sum c_i y_i from the cavities of the y_i (Gaussian sum factor)."""
    mean, variance = 0.0, 0.0
    for coeff, cavity in terms:
        mean += coeff * cavity.mu
        variance = math.inf if (math.isinf(variance) or cavity.pi == 0) else variance + coeff ** 2 / cavity.pi
    pi = 1.0 / variance
    return _Nat(pi, pi * mean)


# Chebyshev fit of erfc from Numerical Recipes (2nd ed., sec. 6.2; fractional error < 1.2e-7 everywhere): the
# normal functions the `trueskill` package uses unless told to use scipy or mpmath. normal="approx" selects it, so
# the update reproduces the official K-Sort Eval code's numbers (its TrueSkill() runs on the default backend).
_NR_ERFC = (-1.26551223, 1.00002368, 0.37409196, 0.09678418, -0.18628806, 0.27886807, -1.13520398, 1.48851587,
            -0.82215223, 0.17087277)


def _erfc_approx(x: float) -> float:
    z = abs(x)
    t = 1.0 / (1.0 + 0.5 * z)
    poly = 0.0
    for c in reversed(_NR_ERFC[1:]):
        poly = t * (c + poly)
    r = t * math.exp(-z * z + _NR_ERFC[0] + poly)
    return 2.0 - r if x < 0 else r


class _Normal:
    """Standard normal cdf / pdf / ppf, exact (math.erfc; erfc, not 1 + erf, which cancels deep in the lower tail
    where draws between far-apart players live) or with the Numerical Recipes erfc."""

    def __init__(self, kind: str):
        if kind not in NORMAL_KINDS:
            raise ValueError(f"normal must be one of {NORMAL_KINDS}, got {kind!r}.")
        self.erfc = math.erfc if kind == "exact" else _erfc_approx
        self.kind = kind

    def cdf(self, x: float) -> float:
        return 0.5 * self.erfc(-x / math.sqrt(2.0))

    @staticmethod
    def pdf(x: float) -> float:
        return math.exp(-0.5 * x * x) / math.sqrt(2.0 * math.pi)

    def ppf(self, p: float) -> float:
        x = _STD_NORMAL.inv_cdf(p)
        if self.kind == "approx":  # invert the approximate cdf itself (Newton from the exact quantile)
            for _ in range(3):
                x -= (self.cdf(x) - p) / self.pdf(x)
        return x

    def v_win(self, t: float, eps: float) -> float:
        x = t - eps
        denom = self.cdf(x)
        return self.pdf(x) / denom if denom else -x

    def w_win(self, t: float, eps: float) -> float:
        v = self.v_win(t, eps)
        w = v * (v + t - eps)
        if not 0 < w < 1:
            raise FloatingPointError(f"TrueSkill win update out of range (w={w}): the winner is far below the loser.")
        return w

    def v_draw(self, t: float, eps: float) -> float:
        a, b = eps - abs(t), -eps - abs(t)
        denom = self.cdf(a) - self.cdf(b)
        v = (self.pdf(b) - self.pdf(a)) / denom if denom else a
        return -v if t < 0 else v

    def w_draw(self, t: float, eps: float) -> float:
        a, b = eps - abs(t), -eps - abs(t)
        denom = self.cdf(a) - self.cdf(b)
        if not denom:
            raise FloatingPointError("TrueSkill draw update underflowed (the two players are too far apart).")
        v = self.v_draw(abs(t), eps)
        return v * v + (a * self.pdf(a) - b * self.pdf(b)) / denom


_NORMALS: dict[str, _Normal] = {}


def trueskill_ffa_update(
    new: Skill,
    opponents: list[Skill],
    ranks: Sequence[int],
    *,
    beta: float = DEFAULT_BETA,
    tau: float = DEFAULT_TAU,
    draw_probability: float = DEFAULT_DRAW_PROBABILITY,
    min_delta: float = 1e-4,
    normal: str = "approx",
) -> Skill:
    """The new player's posterior after one free-for-all match of `[*opponents, new]` finishing in `ranks` (lower is
    better; equal ranks are draws). Opponents are held fixed. Equals `trueskill.TrueSkill().rate(...)`'s new-player
    rating with the same settings (beta, tau, draw probability, min_delta): the default `normal="approx"` uses that
    package's default erfc approximation (so the official K-Sort Eval code's numbers come out); `normal="exact"`
    matches `TrueSkill(backend="scipy")`. The two differ by up to ~1e-5 in mu in far tails and draws."""
    players = [*opponents, new]
    if not opponents:
        raise ValueError("trueskill_ffa_update needs at least one opponent.")
    if len(ranks) != len(players):
        raise ValueError(f"ranks must give one rank per player of [*opponents, new]: {len(players)} players, "
                         f"got {len(ranks)} ranks.")
    if not all(isinstance(p, Skill) for p in players):
        raise TypeError("new and opponents must be Skill objects.")
    if not 0 <= draw_probability < 1 or beta <= 0 or tau < 0 or min_delta <= 0:
        raise ValueError("need 0 <= draw_probability < 1, beta > 0, tau >= 0 and min_delta > 0.")
    rank_values = [float(r) for r in ranks]
    if not all(math.isfinite(r) for r in rank_values):
        raise ValueError(f"ranks must be finite numbers, got {list(ranks)}.")

    nd = _NORMALS.get(normal) or _NORMALS.setdefault(normal, _Normal(normal))
    order = sorted(range(len(players)), key=lambda i: rank_values[i])  # stable, like the reference
    n = len(order)
    skill = [_Var() for _ in range(n)]
    perf = [_Var() for _ in range(n)]
    team = [_Var() for _ in range(n)]  # one-player teams: team performance == player performance
    diff = [_Var() for _ in range(n - 1)]
    # Two players in each compared pair -> the draw margin of a 1-vs-1 comparison.
    margin = nd.ppf((draw_probability + 1) / 2) * math.sqrt(2) * beta
    drawn = [rank_values[order[j]] == rank_values[order[j + 1]] for j in range(n - 1)]

    # Downward pass: priors (with the dynamics tau), performance noise beta, team sums.
    for j, i in enumerate(order):
        s = players[i]
        skill[j].replace_marginal("prior", _Nat.of(s.mu, math.sqrt(s.sigma ** 2 + tau ** 2)))
    for j in range(n):
        cav = skill[j].cavity("lik")
        a = 1.0 / (1.0 + beta ** 2 * cav.pi)
        perf[j].receive("lik", _Nat(a * cav.pi, a * cav.tau))
    for j in range(n):
        team[j].receive("team", _weighted_sum_message([(1.0, perf[j].cavity("team"))]))

    def diff_down(j: int) -> None:
        diff[j].receive("sum", _weighted_sum_message([(1.0, team[j].cavity(f"d{j}")),
                                                      (-1.0, team[j + 1].cavity(f"d{j}"))]))

    def truncate(j: int) -> float:
        cav = diff[j].cavity("trunc")
        sqrt_pi = math.sqrt(cav.pi)
        t, eps = cav.tau / sqrt_pi, margin * sqrt_pi
        v, w = (nd.v_draw(t, eps), nd.w_draw(t, eps)) if drawn[j] else (nd.v_win(t, eps), nd.w_win(t, eps))
        return diff[j].replace_marginal("trunc", _Nat(cav.pi / (1 - w), (cav.tau + sqrt_pi * v) / (1 - w)))

    def diff_up(j: int, to_left: bool) -> None:
        # d = t_j - t_{j+1}  =>  t_j = d + t_{j+1},  t_{j+1} = t_j - d
        d_cav = diff[j].cavity("sum")
        if to_left:
            team[j].receive(f"d{j}", _weighted_sum_message([(1.0, d_cav), (1.0, team[j + 1].cavity(f"d{j}"))]))
        else:
            team[j + 1].receive(f"d{j}", _weighted_sum_message([(1.0, team[j].cavity(f"d{j}")), (-1.0, d_cav)]))

    for _ in range(_MAX_SWEEPS):
        if n == 2:
            diff_down(0)
            delta = truncate(0)
        else:
            delta = 0.0
            for j in range(n - 2):
                diff_down(j)
                delta = max(delta, truncate(j))
                diff_up(j, to_left=False)
            for j in range(n - 2, 0, -1):
                diff_down(j)
                delta = max(delta, truncate(j))
                diff_up(j, to_left=True)
        if delta <= min_delta:
            break
    diff_up(0, to_left=True)
    diff_up(n - 2, to_left=False)

    # Back up to the new player's skill only (the opponents are fixed).
    j = order.index(len(players) - 1)
    perf[j].receive("team", _weighted_sum_message([(1.0, team[j].cavity("team"))]))
    cav = perf[j].cavity("lik")
    a = 1.0 / (1.0 + beta ** 2 * cav.pi)
    skill[j].receive("lik", _Nat(a * cav.pi, a * cav.tau))
    post = skill[j].value
    return Skill(post.mu, math.sqrt(1.0 / post.pi))


# ----- agreement and correction ------------------------------------------------------------------------------------
def _average_ranks(values: Sequence[float]) -> list[float]:
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    start = 0
    while start < len(order):
        end = start
        while end + 1 < len(order) and values[order[end + 1]] == values[order[start]]:
            end += 1
        for k in range(start, end + 1):
            ranks[order[k]] = (start + end) / 2
        start = end + 1
    return ranks


def spearman_rho(a: Sequence[float], b: Sequence[float]) -> float | None:
    """Spearman's rank correlation (ties get average ranks, as scipy.stats.spearmanr); None when undefined (fewer
    than two items, or one side all tied)."""
    if len(a) != len(b):
        raise ValueError(f"spearman_rho needs two rankings of the same length, got {len(a)} and {len(b)}.")
    if len(a) < 2:
        return None
    ra, rb = _average_ranks(a), _average_ranks(b)
    ma, mb = sum(ra) / len(ra), sum(rb) / len(rb)
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb))
    va, vb = sum((x - ma) ** 2 for x in ra), sum((y - mb) ** 2 for y in rb)
    if va == 0 or vb == 0:
        return None
    return max(-1.0, min(1.0, cov / math.sqrt(va * vb)))


def agreement_weight(rho: float, kappa: float = 5.0) -> float:
    """lambda = sigmoid(kappa * rho): how far one judged match is trusted (0.5 at rho = 0)."""
    if not math.isfinite(rho) or not -1.0 <= rho <= 1.0:
        raise ValueError(f"rho must be a correlation in [-1, 1], got {rho}.")
    return 1.0 / (1.0 + math.exp(-kappa * rho))


def corrected_skill(prior: Skill, post: Skill, lam: float, variance_rule: str = "code") -> Skill:
    """Moment-matched mixture lam * post + (1 - lam) * prior; lam = 1 -> post, lam = 0 -> prior exactly.
    variance_rule "code": sigma^2 = w post^2 + (1 - w) prior^2, w = lam^2 / (lam^2 + (1 - lam)^2);
    "paper": sigma^2 = lam^2 post^2 + (1 - lam)^2 prior^2."""
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"lambda must lie in [0, 1], got {lam}.")
    if variance_rule == "code":
        w = lam ** 2 / (lam ** 2 + (1 - lam) ** 2)
        var = w * post.sigma ** 2 + (1 - w) * prior.sigma ** 2
    elif variance_rule == "paper":
        var = lam ** 2 * post.sigma ** 2 + (1 - lam) ** 2 * prior.sigma ** 2
    else:
        raise ValueError(f"variance_rule must be one of {VARIANCE_RULES}, got {variance_rule!r}.")
    return Skill(lam * post.mu + (1 - lam) * prior.mu, math.sqrt(var))


def posterior_correction(prior: Skill, post: Skill, rho: float, kappa: float = 5.0,
                         variance_rule: str = "code") -> Skill:
    """`corrected_skill(prior, post, agreement_weight(rho, kappa), variance_rule)`."""
    return corrected_skill(prior, post, agreement_weight(rho, kappa), variance_rule)


# ----- stopping and score --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class StoppingRule:
    """Stop at the first run whose sigma < `sigma_stop`, or after `max_runs` runs (then unconverged). The variance
    rule decides how sigma moves: "code" (official implementation, the default) or "paper" (Eq. as printed)."""

    sigma_stop: float = 0.75
    max_runs: int = 150
    variance_rule: str = "code"

    def __post_init__(self):
        if self.sigma_stop <= 0 or self.max_runs < 1:
            raise ValueError(f"need sigma_stop > 0 and max_runs >= 1, got {self.sigma_stop}, {self.max_runs}.")
        if self.variance_rule not in VARIANCE_RULES:
            raise ValueError(f"variance_rule must be one of {VARIANCE_RULES}, got {self.variance_rule!r}.")

    def converged(self, skill: Skill) -> bool:
        return skill.sigma < self.sigma_stop

    def exhausted(self, runs: int) -> bool:
        return runs >= self.max_runs


def final_score(skill: Skill, leaderboard_sigmas: Sequence[float], eta: float = 3.0, sigma_ref: str = "code") -> float:
    """The conservative score mu - eta * sigma_ref: "code" uses the mean sigma of the arena's models (so the new
    model is scored like the leaderboard's entries), "paper" the new model's own sigma."""
    if sigma_ref == "code":
        if not leaderboard_sigmas:
            raise ValueError("sigma_ref='code' needs the leaderboard's sigmas.")
        ref = sum(leaderboard_sigmas) / len(leaderboard_sigmas)
    elif sigma_ref == "paper":
        ref = skill.sigma
    else:
        raise ValueError(f"sigma_ref must be 'code' or 'paper', got {sigma_ref!r}.")
    return skill.mu - eta * ref
