"""How many draft tokens DAS verifies: the length-aware budget classes (paper), and cost-aware drafting (the verify
width that pays on the hardware at hand: round-cost and acceptance models). Used by `hf_fastslow.generation.das`."""

from __future__ import annotations

import bisect
import math
import statistics
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence

__all__ = ["DraftAcceptanceModel", "LengthAwareBudget", "LinearRoundCost", "OnlineRoundCost", "choose_verify_width"]


class LengthAwareBudget:
    """DAS's length-aware speculation policy: long trajectories get longer draft budgets.

    A request's predicted length is max(the problem's response-length estimate, tokens generated so far), so a running
    request is promoted when it outgrows its class. It is Long when that reaches the `thresholds[0]` quantile of the
    known problems' lengths, Medium from the `thresholds[1]` quantile, Short below; with fewer than `min_problems`
    known problems (cold start, or plain generate without history) every request gets `default_class`.

    Args:
        classes (`dict`): draft budget per class (`"long"`, `"medium"`, `"short"`); the paper does not draft short
            requests (budget 0).
        thresholds (`tuple`): (long quantile, medium quantile), 1 >= long >= medium >= 0.
        default_class (`str`): class used without enough history.
        min_problems (`int`): history size needed before classes are assigned.
    """

    CLASSES = ("long", "medium", "short")

    def __init__(
        self,
        classes: dict[str, int] | None = None,
        thresholds: tuple[float, float] = (0.75, 0.25),
        default_class: str = "medium",
        min_problems: int = 4,
    ):
        classes = dict(classes if classes is not None else {"long": 16, "medium": 8, "short": 0})
        if set(classes) != set(self.CLASSES):
            raise ValueError(f"`classes` must give a budget for exactly {self.CLASSES}, got {sorted(classes)}.")
        for name, b in classes.items():
            if isinstance(b, bool) or not isinstance(b, int) or b < 0:
                raise ValueError(f"budget of class {name!r} must be an integer >= 0, got {b!r}.")
        hi, lo = thresholds
        if not (0.0 <= lo <= hi <= 1.0):
            raise ValueError(f"`thresholds` must satisfy 0 <= medium <= long <= 1, got {thresholds}.")
        if default_class not in self.CLASSES:
            raise ValueError(f"`default_class` must be one of {self.CLASSES}, got {default_class!r}.")
        self.classes = classes
        self.thresholds = (hi, lo)
        self.default_class = default_class
        self.min_problems = min_problems

    @staticmethod
    def _quantile(sorted_values: Sequence[float], q: float) -> float:
        pos = q * (len(sorted_values) - 1)
        lo = math.floor(pos)
        hi = min(lo + 1, len(sorted_values) - 1)
        return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)

    def cutoffs(self, sorted_lengths: Sequence[float]) -> tuple[float, float] | None:
        """(long, medium) length cut-offs from the known lengths, sorted ascending; None below `min_problems`."""
        if len(sorted_lengths) < self.min_problems or not sorted_lengths:
            return None
        return self._quantile(sorted_lengths, self.thresholds[0]), self._quantile(sorted_lengths, self.thresholds[1])

    def class_of(self, predicted_length: float | None, generated: int, cutoffs: tuple[float, float] | None) -> str:
        """Class of a request from precomputed `cutoffs` (see `cutoffs`)."""
        if cutoffs is None:
            return self.default_class
        length = max(predicted_length or 0.0, float(generated))
        if length >= cutoffs[0]:
            return "long"
        if length >= cutoffs[1]:
            return "medium"
        return "short"

    def classify(self, predicted_length: float | None, generated: int, known_lengths: Sequence[float]) -> str:
        return self.class_of(predicted_length, generated, self.cutoffs(sorted(known_lengths)))

    def budget(self, predicted_length: float | None, generated: int, known_lengths: Sequence[float]) -> int:
        return self.classes[self.classify(predicted_length, generated, known_lengths)]

    @staticmethod
    def closed_form(length: float, alpha: float, k: float, n_fwd: float, b_max: int) -> int:
        """The paper's Eq. 7 as reported: b* = -(l / alpha) * ln(1 - k (1 - N_fwd / l)), the smallest budget that lets a
        request of remaining length l finish within N_fwd forwards (acceptance saturation A(b) = (l/k)(1 - e^{-alpha
        b / l})). 0 when l <= N_fwd (short requests do not draft), `b_max` when the target is unreachable."""
        if b_max < 0:
            raise ValueError(f"`b_max` must be >= 0, got {b_max}.")
        if alpha <= 0 or k <= 0 or n_fwd <= 0:
            raise ValueError("`alpha`, `k` and `n_fwd` must be > 0.")
        if length <= n_fwd:
            return 0
        arg = 1.0 - k * (1.0 - n_fwd / length)
        if arg <= 0.0:
            return b_max
        return min(b_max, max(0, math.ceil(-(length / alpha) * math.log(arg))))

    @staticmethod
    def split_quota(budgets: Sequence[int], is_long: Sequence[bool], quota: int) -> list[int]:
        """Per-round draft quota across a batch (DAS research code): long rows are served first; if they alone exceed
        the quota they are shrunk by one common ratio (>= 1 token each), otherwise the rest share what is left in
        proportion to their budgets. The result never exceeds `budgets` nor (unless the long rows outnumber it) the
        quota."""
        if quota < 0:
            raise ValueError(f"`quota` must be >= 0, got {quota}.")
        budgets = [max(0, int(b)) for b in budgets]
        if sum(budgets) <= quota:
            return budgets
        out = [0] * len(budgets)
        long_rows = [i for i, b in enumerate(budgets) if is_long[i] and b > 0]
        rest = [i for i, b in enumerate(budgets) if not is_long[i] and b > 0]
        long_total = sum(budgets[i] for i in long_rows)
        if long_total >= quota:
            ratio = quota / long_total if long_total else 0.0
            for i in long_rows:
                out[i] = min(budgets[i], max(1, int(budgets[i] * ratio)))
            return out
        for i in long_rows:
            out[i] = budgets[i]
        left = quota - long_total
        rest_total = sum(budgets[i] for i in rest)
        for i in rest:
            out[i] = min(budgets[i], int(budgets[i] * left / rest_total))
        return out


class LinearRoundCost:
    """A fixed verify-round cost model: a target pass over n tokens (rows x width) costs `base + per_token * n` (the DAS
    paper's latency model, in any unit). Inject one (e.g. from a calibration) to make drafting decisions
    deterministic; `observe` ignores measurements."""

    def __init__(self, base: float = 1.0, per_token: float = 0.0):
        if base <= 0 or per_token < 0:
            raise ValueError(f"need base > 0 and per_token >= 0, got base={base}, per_token={per_token}.")
        self.base = float(base)
        self.per_token = float(per_token)

    def cost(self, tokens: int) -> float:
        return self.base + self.per_token * tokens

    def observe(self, tokens: int, seconds: float) -> None:
        pass


class OnlineRoundCost:
    """Verify-round cost learned from wall-clock time on the hardware at hand.

    `DASDrafter` times every round from one `propose` to the next (the target pass, the loop's bookkeeping and the
    drafter itself) and reports `(tokens fed, seconds)`. Per pass size the median of the last `memory` rounds is kept
    (a median, because on a shared machine another process's burst makes single rounds several times slower), and
    `cost(n) = base + per_token * n` is fitted to the medians by least squares weighted by their counts, with a prior
    `per_token / base = prior_token_ratio` (weight `prior_weight`, in observations of the residual
    `mean size * (per_token - ratio * base)`): until rounds of clearly different sizes are measured the curve keeps the
    prior's shape through the measured point; afterwards the measurements decide. The slope is kept within
    [0, base] (a wider pass never costs less, and one more token never costs more than the fixed part of a pass).
    Decisions only widen the pass when the current curve says it pays, and each such round corrects the curve.

    Args:
        prior_token_ratio (`float`): assumed extra cost of one more token in the pass, relative to the fixed cost.
        prior_weight (`float`): weight of that prior, in observations.
        memory (`int`): rounds remembered per pass size.
        max_sizes (`int`): pass sizes remembered (least recently seen forgotten first).
    """

    def __init__(self, prior_token_ratio: float = 0.03, prior_weight: float = 0.2, memory: int = 16,
                 max_sizes: int = 64):
        if prior_token_ratio < 0 or prior_weight <= 0 or memory < 1 or max_sizes < 2:
            raise ValueError("need prior_token_ratio >= 0, prior_weight > 0, memory >= 1 and max_sizes >= 2.")
        self.prior_token_ratio = prior_token_ratio
        self.prior_weight = prior_weight
        self.memory = memory
        self.max_sizes = max_sizes
        self._points: OrderedDict[int, deque[float]] = OrderedDict()  # tokens -> recent round times (s)
        self._coefficients: tuple[float, float] | None = None

    def observe(self, tokens: int, seconds: float) -> None:
        if tokens < 1 or not seconds > 0:
            return
        times = self._points.get(tokens)
        if times is None:
            times = self._points[tokens] = deque(maxlen=self.memory)
            if len(self._points) > self.max_sizes:
                self._points.popitem(last=False)
        else:
            self._points.move_to_end(tokens)
        times.append(seconds)
        self._coefficients = None

    def coefficients(self) -> tuple[float, float]:
        """(base, per_token) of the current fit (unit: seconds; the prior alone gives (1, prior_token_ratio))."""
        if self._coefficients is not None:
            return self._coefficients
        r = self.prior_token_ratio
        if not self._points:
            return 1.0, r
        s = sn = snn = sy = sny = 0.0
        for n, times in self._points.items():
            w, y = float(len(times)), statistics.median(times)
            s += w
            sn += w * n
            snn += w * n * n
            sy += w * y
            sny += w * n * y
        prior = self.prior_weight * (sn / s) ** 2  # the prior residual n_mean * (b - r a) is in seconds, like the data
        # Normal equations of  sum w (a + b n - y)^2 + prior (b - r a)^2.
        m11, m12, m22 = s + r * r * prior, sn - r * prior, snn + prior
        det = m11 * m22 - m12 * m12
        a = (sy * m22 - sny * m12) / det
        b = (m11 * sny - m12 * sy) / det
        if b < 0:  # a wider pass never costs less
            a, b = sy / s, 0.0
        if a <= 0 or b > a:  # keep 0 <= per_token <= base: refit the common scale with per_token = base
            a = sy / (s + sn)
            b = a
        self._coefficients = (a, b)
        return a, b

    def cost(self, tokens: int) -> float:
        a, b = self.coefficients()
        return a + b * tokens


class DraftAcceptanceModel:
    """Online estimate of the chance that a trie draft token is accepted given that the ones before it were.

    One Beta count per cell: sampling or greedy, the draft's source (the problem's history or the live request), how
    many times the trie saw the node the token continues (1, 2, 3-4, 5-8, 9+) and the trie's frequency of the token
    after it ([0, .25), [.25, .5), [.5, .75), [.75, 1), 1). The prior mean is the frequency shrunk by the count,
    `f * c / (c + 1)`, worth `prior_weight` observations; counts are halved past `max_trials` so the estimate follows
    a drifting policy.
    """

    _COUNT_EDGES = (1, 2, 4, 8)
    _COUNT_REPS = (1.0, 2.0, 3.5, 6.5, 12.0)
    _FREQ_EDGES = (0.25, 0.5, 0.75, 1.0)
    _FREQ_REPS = (0.125, 0.375, 0.625, 0.875, 1.0)

    def __init__(self, prior_weight: float = 2.0, max_trials: float = 256.0):
        if prior_weight <= 0 or max_trials <= 0:
            raise ValueError("need prior_weight > 0 and max_trials > 0.")
        self.prior_weight = prior_weight
        self.max_trials = max_trials
        self._counts: dict[tuple, list[float]] = {}  # cell -> [accepted, trials]

    @classmethod
    def cell(cls, do_sample: bool, source: str, count: int, freq: float) -> tuple:
        c = bisect.bisect_left(cls._COUNT_EDGES, count)
        f = len(cls._FREQ_EDGES) if freq >= 1.0 else bisect.bisect_right(cls._FREQ_EDGES, freq)
        return bool(do_sample), source, c, f

    def prob(self, cell: tuple) -> float:
        _, _, c, f = cell
        count = self._COUNT_REPS[c]
        prior = self._FREQ_REPS[f] * count / (count + 1.0)
        hits, trials = self._counts.get(cell, (0.0, 0.0))
        return (hits + self.prior_weight * prior) / (trials + self.prior_weight)

    def expected_accepted(self, cells: Sequence[tuple]) -> list[float]:
        """E[accepted tokens | the first k tokens are drafted], for k = 0 .. len(cells)."""
        out, run, total = [0.0], 1.0, 0.0
        for cell in cells:
            run *= self.prob(cell)
            total += run
            out.append(total)
        return out

    def update(self, cells: Sequence[tuple], num_accepted: int) -> None:
        """Drafted `cells` (in order), of which the first `num_accepted` were accepted; later ones were never judged."""
        for j, cell in enumerate(cells[: num_accepted + 1]):
            entry = self._counts.setdefault(cell, [0.0, 0.0])
            entry[0] += 1.0 if j < num_accepted else 0.0
            entry[1] += 1.0
            if entry[1] > self.max_trials:
                entry[0] *= 0.5
                entry[1] *= 0.5


def choose_verify_width(expected: Sequence[Sequence[float]], rows: int, cost: Callable[[int], float]) -> int:
    """The verify width (1 + draft tokens) that maximizes the expected tokens per unit of round cost.

    `expected[i][k]`: expected accepted tokens if active row i drafts its first k tokens (`expected[i][0] == 0`);
    every active row also emits one token of its own. `rows`: rows in the target pass (padding included, so the pass
    feeds `rows * width` tokens) and `cost(n)` the cost of a pass over n tokens. Rows are padded to a common width, so
    once a width is paid every row drafts up to it. Width 1 means no drafting. For one row this drafts k tokens only
    if E[accepted | k] > cost(k + 1) / cost(1) - 1."""
    active = len(expected)
    if active == 0:
        return 1
    best_width, best = 1, active / cost(rows)
    for width in range(2, max(len(e) for e in expected) + 1):
        gain = sum(e[min(len(e), width) - 1] for e in expected)
        value = (active + gain) / cost(rows * width)
        if value > best:
            best_width, best = width, value
    return best_width
