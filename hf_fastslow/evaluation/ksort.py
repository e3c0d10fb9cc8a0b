"""K-Sort Eval (arXiv 2602.09411): rate ONE new generative model against a human-voted arena with a corrected judge.

Each run picks the most informative unused arena instance (dynamic matching: mean skill of its K models closest to
the current mu, plus alpha times the overlap of their skill Gaussians), generates the new model's output for its
prompt, shows the judge all K+1 outputs in a random order (the reference's "swapping"), updates the new model's
Gaussian skill with a (K+1)-wise TrueSkill free-for-all against the fixed leaderboard skills, and shrinks that update
toward the prior by how well the judge agreed with the humans on the K known outputs. It stops once sigma < 0.75.

`Arena` holds instances and a leaderboard: `Arena.from_local_dir(path)` reads the public K-Sort-Eval layout
(`Image/<id>/result.json` + `0.jpg..3.jpg`, `Image_meta/Arena-Leaderboard-Image.json`, optional `avg_capacitys.npy` /
`total_overlaps.npy` / `subfolders.npy`; `Video*` alike; `Text*` is this package's text analogue with `0.txt..`);
`Arena.synthetic(...)` draws an arena with known skills. Rating maths: `ksort_rating`; judges: `ksort_judges`.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .ksort_judges import JudgeFormatError, RankJudge, SyntheticOutput
from .ksort_rating import (
    DEFAULT_BETA,
    Skill,
    StoppingRule,
    agreement_weight,
    corrected_skill,
    final_score,
    spearman_rho,
    trueskill_ffa_update,
)

__all__ = ["Arena", "ArenaInstance", "KSortEvaluator", "KSortResult", "KSortStep", "gaussian_overlap",
           "select_instance"]

_MODALITIES = {"image": ("Image", ".jpg", "img_rank"), "video": ("Video", ".mp4", "video_rank"),
               "text": ("Text", ".txt", "text_rank")}
_META_SUFFIX = {"image": "", "video": "_video", "text": "_text"}
# Names the official loaders rewrite (arena vote files vs leaderboard spellings).
_NAME_ALIASES = {
    "LCM": "LCM-v1.5", "Dreamshaper-xl-turbo": "Dreamshaper-xl", "Sora-release": "Sora (release)",
    "Sora": "Sora (official samples)", "Cogvideox-5b": "CogVideoX-5b", "Stable-Video-Diffusion": "StableVideoDiffusion",
    "Animate-Diff": "AnimateDiff", "pika-v1": "Pika-v1.0",
}
_SCORE_KEY, _MODEL_KEY = "⭐ Score (μ/σ)", "🤖 Model"


@dataclass(frozen=True)
class ArenaInstance:
    """One human-ranked arena match: a prompt, K outputs, their models and the humans' rank of each output (lower is
    better; ties allowed)."""

    id: str
    prompt: str
    outputs: tuple
    models: tuple[str, ...]
    human_rank: tuple[float, ...]

    def __post_init__(self):
        if not len(self.outputs) == len(self.models) == len(self.human_rank) >= 2:
            raise ValueError(f"instance {self.id!r}: need >= 2 outputs, one model name and one human rank each; got "
                             f"{len(self.outputs)} outputs, {len(self.models)} models, {len(self.human_rank)} ranks.")


def gaussian_overlap(skills: Sequence[Skill]) -> float:
    """Mean pairwise Bhattacharyya coefficient of the skills' Gaussians (1 = identical, -> 0 = separated): how hard
    the K models of an instance are to tell apart. The public metadata ships its own overlap (`total_overlaps.npy`)
    whose formula is not published; this one is used when that file is absent."""
    pairs = [(a, b) for i, a in enumerate(skills) for b in skills[i + 1:]]
    if not pairs:
        return 0.0
    total = 0.0
    for a, b in pairs:
        va, vb = a.sigma ** 2, b.sigma ** 2
        d = (a.mu - b.mu) ** 2 / (4 * (va + vb)) + 0.5 * math.log((va + vb) / (2 * a.sigma * b.sigma))
        total += math.exp(-d)
    return total / len(pairs)


def select_instance(mean_capacity: Sequence[float], overlap: Sequence[float], mu: float, used: set[int] | Sequence[int],
                    alpha: float = 0.5) -> int:
    """The unused instance minimising |mean capacity - mu| + alpha * overlap (the official code's form of the paper's
    argmax of uncertainty + alpha * diversity); ties go to the lowest index. Raises when the pool is exhausted."""
    used = set(used)
    best, best_cost = -1, math.inf
    for i, (cap, ov) in enumerate(zip(mean_capacity, overlap)):
        if i in used:
            continue
        cost = abs(cap - mu) + alpha * ov
        if cost < best_cost:
            best, best_cost = i, cost
    if best < 0:
        raise LookupError("every arena instance has been used")
    return best


class Arena:
    """Instances + a fixed leaderboard (`{model: Skill}`); `mean_capacity` / `overlap` per instance are computed from
    the leaderboard unless given (the public metadata files)."""

    def __init__(self, instances: Sequence[ArenaInstance], leaderboard: dict[str, Skill], *, modality: str = "text",
                 mean_capacity: Sequence[float] | None = None, overlap: Sequence[float] | None = None,
                 true_skills: dict[str, float] | None = None):
        if not instances:
            raise ValueError("an Arena needs at least one instance.")
        if modality not in _MODALITIES and modality != "synthetic":
            raise ValueError(f"modality must be one of {sorted(_MODALITIES) + ['synthetic']}, got {modality!r}.")
        k = len(instances[0].outputs)
        for inst in instances:
            if len(inst.outputs) != k:
                raise ValueError(f"all instances need the same K; {inst.id!r} has {len(inst.outputs)}, expected {k}.")
            unknown = [m for m in inst.models if m not in leaderboard]
            if unknown:
                raise ValueError(f"instance {inst.id!r} names models missing from the leaderboard: {unknown}.")
        self.instances, self.leaderboard, self.modality, self.k = list(instances), dict(leaderboard), modality, k
        self.true_skills = dict(true_skills or {})
        caps = [sum(leaderboard[m].mu for m in inst.models) / k for inst in instances]
        ovs = [gaussian_overlap([leaderboard[m] for m in inst.models]) for inst in instances]
        self.mean_capacity = list(mean_capacity) if mean_capacity is not None else caps
        self.overlap = list(overlap) if overlap is not None else ovs
        if not len(self.mean_capacity) == len(self.overlap) == len(self.instances):
            raise ValueError("mean_capacity and overlap need one value per instance.")

    def __len__(self) -> int:
        return len(self.instances)

    @property
    def leaderboard_sigmas(self) -> list[float]:
        return [s.sigma for s in self.leaderboard.values()]

    def rank_of(self, score: float, eta: float = 3.0) -> int:
        """1-based place a model with this conservative score takes among the leaderboard's mu - eta * sigma."""
        return 1 + sum(s.mu - eta * s.sigma > score for s in self.leaderboard.values())

    def agreement_filtered(self, min_rho: float = 0.75) -> Arena:
        """Only instances whose human ranking agrees with the leaderboard order (Spearman > min_rho), as the paper
        builds its evaluation set."""
        keep = [i for i, inst in enumerate(self.instances)
                if (rho := spearman_rho(inst.human_rank, [-self.leaderboard[m].mu for m in inst.models])) is not None
                and rho > min_rho]
        if not keep:
            raise ValueError(f"no instance has human-leaderboard agreement > {min_rho}.")
        return Arena([self.instances[i] for i in keep], self.leaderboard, modality=self.modality,
                     mean_capacity=[self.mean_capacity[i] for i in keep], overlap=[self.overlap[i] for i in keep],
                     true_skills=self.true_skills)

    # ----- synthetic -----------------------------------------------------------------------------------------------
    @classmethod
    def synthetic(cls, n_models: int = 20, n_instances: int = 500, k: int = 4, seed: int = 0, *,
                  skill_range: tuple[float, float] = (15.0, 35.0), arena_sigma: float = 0.6,
                  human_scale: float = DEFAULT_BETA * math.sqrt(6) / math.pi, min_rho: float | None = 0.75) -> Arena:
        """`n_models` with true skills uniform in `skill_range` (the leaderboard: true skill, sigma `arena_sigma`);
        each instance shows K random models, ranked by simulated humans (Plackett-Luce, Gumbel scale `human_scale`,
        noise std = TrueSkill's beta by default); with `min_rho` only instances whose human ranking agrees with the
        leaderboard (Spearman > min_rho) are kept, as the paper does. Outputs are `SyntheticOutput`s."""
        if n_models < k or k < 2 or n_instances < 1:
            raise ValueError(f"need n_models >= k >= 2 and n_instances >= 1, got {n_models}, {k}, {n_instances}.")
        rng = random.Random(seed)
        skills = {f"model-{i:02d}": rng.uniform(*skill_range) for i in range(n_models)}
        names = list(skills)
        instances: list[ArenaInstance] = []
        attempts = 0
        while len(instances) < n_instances:
            attempts += 1
            if attempts > 100 * n_instances:
                raise ValueError(f"could not draw {n_instances} instances with human agreement > {min_rho}.")
            models = rng.sample(names, k)
            noisy = [skills[m] - human_scale * math.log(-math.log(1.0 - rng.random())) for m in models]
            order = sorted(range(k), key=lambda i: -noisy[i])
            rank = [0.0] * k
            for r, i in enumerate(order):
                rank[i] = float(r)
            if min_rho is not None:
                rho = spearman_rho(rank, [-skills[m] for m in models])
                if rho is None or rho <= min_rho:
                    continue
            idx = len(instances)
            instances.append(ArenaInstance(f"syn-{idx:04d}", f"prompt {idx}",
                                           tuple(SyntheticOutput(m, skills[m]) for m in models), tuple(models),
                                           tuple(rank)))
        board = {m: Skill(s, arena_sigma) for m, s in skills.items()}
        return cls(instances, board, modality="synthetic", true_skills=skills)

    # ----- public K-Sort-Eval directory layout ---------------------------------------------------------------------
    @classmethod
    def from_local_dir(cls, path: str | Path, modality: str | None = None) -> Arena:
        """Read `<path>/<Image|Video|Text>/<id>/result.json` (+ outputs `0..K-1` with the modality's extension) and
        `<path>/<Modality>_meta/Arena-Leaderboard-<Modality>.json`; the optional `.npy` metadata is used when present
        (loaded without pickle)."""
        root = Path(path)
        if modality is None:
            found = [m for m, (d, _, _) in _MODALITIES.items() if (root / d).is_dir()]
            if len(found) != 1:
                raise ValueError(f"{root}: expected exactly one of Image/, Video/, Text/ (found {found}); "
                                 "pass modality= to choose.")
            modality = found[0]
        if modality not in _MODALITIES:
            raise ValueError(f"modality must be one of {sorted(_MODALITIES)}, got {modality!r}.")
        folder, ext, rank_key = _MODALITIES[modality]
        meta = root / f"{folder}_meta"
        board_file = meta / f"Arena-Leaderboard-{folder}.json"
        if not board_file.is_file():
            raise FileNotFoundError(f"{board_file} is missing (the arena's leaderboard with each model's mu/sigma).")
        leaderboard = _read_leaderboard(board_file)
        suffix = _META_SUFFIX[modality]
        npy = {name: meta / f"{name}{suffix}.npy" for name in ("subfolders", "avg_capacitys", "total_overlaps")}
        if npy["subfolders"].is_file():
            subfolders = [str(s) for s in _load_npy(npy["subfolders"])]
        else:
            subfolders = sorted(p.name for p in (root / folder).iterdir() if (p / "result.json").is_file())
        instances = [_read_instance(root / folder / sub, ext, rank_key, modality) for sub in subfolders]
        caps = ovs = None
        if npy["avg_capacitys"].is_file() and npy["total_overlaps"].is_file():
            raw = _load_npy(npy["avg_capacitys"])
            caps = [float(sum(row) / len(row)) if hasattr(row, "__len__") else float(row) for row in raw]
            ovs = [float(x) for x in _load_npy(npy["total_overlaps"])]
        return cls(instances, leaderboard, modality=modality, mean_capacity=caps, overlap=ovs)

    def save_local_dir(self, path: str | Path) -> Path:
        """Write this arena in the layout `from_local_dir` reads (text and image arenas)."""
        if self.modality not in ("text", "image"):
            raise ValueError(f"save_local_dir writes text or image arenas, not {self.modality!r}.")
        folder, ext, rank_key = _MODALITIES[self.modality]
        root = Path(path)
        meta = root / f"{folder}_meta"
        meta.mkdir(parents=True, exist_ok=True)
        rows = [{_MODEL_KEY: m, _SCORE_KEY: f"{s.mu - 3 * s.sigma:.4f} ({s.mu!r}/{s.sigma!r})"}
                for m, s in sorted(self.leaderboard.items(), key=lambda kv: -kv[1].mu)]
        (meta / f"Arena-Leaderboard-{folder}.json").write_text(json.dumps({"sorted_score_list": rows}, indent=1))
        for inst in self.instances:
            d = root / folder / inst.id
            d.mkdir(parents=True, exist_ok=True)
            names = [f"{i}_{m}" for i, m in enumerate(inst.models)]
            (d / "result.json").write_text(json.dumps({"prompt": [inst.prompt], rank_key: list(inst.human_rank),
                                                       "models_name": names}))
            for i, out in enumerate(inst.outputs):
                if self.modality == "text":
                    (d / f"{i}{ext}").write_text(out)
                else:
                    out.convert("RGB").save(d / f"{i}{ext}")
        return root


def _load_npy(file: Path):
    import numpy as np

    try:
        return np.load(file, allow_pickle=False)
    except ValueError as err:
        raise ValueError(f"{file} holds Python objects; refusing to unpickle it (save it as a plain array).") from err


def _read_leaderboard(file: Path) -> dict[str, Skill]:
    data = json.loads(file.read_text())
    rows = data.get("sorted_score_list") if isinstance(data, dict) else None
    if not rows:
        raise ValueError(f"{file}: expected {{'sorted_score_list': [...]}} as in the public K-Sort-Eval metadata.")
    board = {}
    for row in rows:
        try:
            inner = row[_SCORE_KEY].split(" ")[1].strip("()")
            mu, sigma = (float(x) for x in inner.split("/"))
            board[row[_MODEL_KEY]] = Skill(mu, sigma)
        except (KeyError, IndexError, ValueError) as err:
            raise ValueError(f"{file}: cannot read a leaderboard row {row!r} (want '{_SCORE_KEY}': 'S (mu/sigma)')"
                             ) from err
    return board


def _read_instance(d: Path, ext: str, rank_key: str, modality: str) -> ArenaInstance:
    result = d / "result.json"
    if not result.is_file():
        raise FileNotFoundError(f"{result} is missing.")
    data = json.loads(result.read_text())
    try:
        prompt = data["prompt"][0] if isinstance(data["prompt"], list) else data["prompt"]
        rank = tuple(float(r) for r in data[rank_key])
        models = tuple(_NAME_ALIASES.get(m.split("_", 1)[1], m.split("_", 1)[1]) for m in data["models_name"])
    except (KeyError, IndexError) as err:
        raise ValueError(f"{result}: needs 'prompt', '{rank_key}' and 'models_name' ('<n>_<model>').") from err
    files = [d / f"{i}{ext}" for i in range(len(models))]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise FileNotFoundError(f"{d}: output file(s) {missing} missing.")
    outputs = tuple(f.read_text() for f in files) if modality == "text" else tuple(str(f) for f in files)
    return ArenaInstance(d.name, prompt, outputs, models, rank)


# ----- the evaluation loop -------------------------------------------------------------------------------------------
@dataclass
class KSortStep:
    """One run: the instance, the judge's ranks of [*instance outputs, new] (None when the judge failed), the
    agreement rho and weight lambda, and the skill after the run."""

    run: int
    instance: str
    ranks: list[int] | None
    rho: float | None
    lam: float | None
    mu: float
    sigma: float
    judge_replies: list[str] = field(default_factory=list)
    skipped: str | None = None


@dataclass
class KSortResult:
    score: float
    mu: float
    sigma: float
    runs: int
    rank: int
    converged: bool
    updates: int
    judge_failures: int
    skipped_runs: int
    steps: list[KSortStep]
    settings: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class KSortEvaluator:
    """`KSortEvaluator(arena, judge, alpha=0.5, kappa=5.0, sigma_stop=0.75, eta=3.0, max_runs=150, correction=True,
    matching="dynamic"|"static", variance_rule="code"|"paper", sigma_ref="code"|"paper", judge_retries=1, seed=0)`.

    `evaluate(generate_fn)` calls `generate_fn(prompt)` once per run. A judge reply that is not a permutation is
    re-asked (fresh shuffle) up to `judge_retries` times, then the run is skipped; every failure is counted in the
    result and its raw reply kept in the step. Static matching walks the arena in its stored order."""

    def __init__(self, arena: Arena, judge: RankJudge, *, alpha: float = 0.5, kappa: float = 5.0,
                 sigma_stop: float = 0.75, eta: float = 3.0, max_runs: int = 150, correction: bool = True,
                 matching: str = "dynamic", variance_rule: str = "code", sigma_ref: str = "code",
                 judge_retries: int = 1, prior: Skill | None = None, seed: int = 0, normal: str = "approx"):
        if matching not in ("dynamic", "static"):
            raise ValueError(f"matching must be 'dynamic' or 'static', got {matching!r}.")
        if judge_retries < 0:
            raise ValueError(f"judge_retries must be >= 0, got {judge_retries}.")
        self.arena, self.judge = arena, judge
        self.alpha, self.kappa, self.eta = alpha, kappa, eta
        self.stopping = StoppingRule(sigma_stop, max_runs, variance_rule)
        self.correction, self.matching, self.sigma_ref = correction, matching, sigma_ref
        self.judge_retries, self.prior, self.seed, self.normal = judge_retries, prior or Skill(), seed, normal
        final_score(self.prior, arena.leaderboard_sigmas, eta, sigma_ref)  # validates sigma_ref early

    def settings(self) -> dict[str, Any]:
        return {"alpha": self.alpha, "kappa": self.kappa, "eta": self.eta, "sigma_stop": self.stopping.sigma_stop,
                "max_runs": self.stopping.max_runs, "variance_rule": self.stopping.variance_rule,
                "correction": self.correction, "matching": self.matching, "sigma_ref": self.sigma_ref,
                "judge_retries": self.judge_retries, "seed": self.seed, "k": self.arena.k,
                "instances": len(self.arena)}

    def _judge(self, inst: ArenaInstance, new_output: Any, rng: random.Random, step: KSortStep) -> list[int] | None:
        items = [*inst.outputs, new_output]
        for _ in range(1 + self.judge_retries):
            shown = list(range(len(items)))
            rng.shuffle(shown)
            try:
                order = self.judge.rank(inst.prompt, [items[i] for i in shown])
            except JudgeFormatError as err:
                step.judge_replies.append(err.reply)
                continue
            ranks = [0] * len(items)
            for r, shown_index in enumerate(order):
                ranks[shown[shown_index]] = r
            return ranks
        return None

    def evaluate(self, generate_fn: Callable[[str], Any]) -> KSortResult:
        rng = random.Random(self.seed)
        skill, used, steps = self.prior, set(), []
        failures = skipped = updates = 0
        board = self.arena.leaderboard
        while not self.stopping.exhausted(len(steps)) and len(used) < len(self.arena):
            if self.matching == "dynamic":
                idx = select_instance(self.arena.mean_capacity, self.arena.overlap, skill.mu, used, self.alpha)
            else:
                idx = len(steps)
            used.add(idx)
            inst = self.arena.instances[idx]
            step = KSortStep(len(steps) + 1, inst.id, None, None, None, skill.mu, skill.sigma)
            steps.append(step)
            ranks = self._judge(inst, generate_fn(inst.prompt), rng, step)
            failures += len(step.judge_replies)
            if ranks is None:
                step.skipped, skipped = "judge gave no valid ranking", skipped + 1
                continue
            step.ranks = ranks
            post = trueskill_ffa_update(skill, [board[m] for m in inst.models], ranks, normal=self.normal)
            step.rho = spearman_rho(inst.human_rank, ranks[:-1])
            if self.correction:
                if step.rho is None:  # humans tied everything: agreement is undefined, so no update
                    step.skipped, skipped = "agreement undefined (tied human ranks)", skipped + 1
                    continue
                step.lam = agreement_weight(step.rho, self.kappa)
                post = corrected_skill(skill, post, step.lam, self.stopping.variance_rule)
            skill, updates = post, updates + 1
            step.mu, step.sigma = skill.mu, skill.sigma
            if self.stopping.converged(skill):
                break
        score = final_score(skill, self.arena.leaderboard_sigmas, self.eta, self.sigma_ref)
        return KSortResult(score=score, mu=skill.mu, sigma=skill.sigma, runs=len(steps),
                           rank=self.arena.rank_of(score, self.eta), converged=self.stopping.converged(skill),
                           updates=updates, judge_failures=failures, skipped_runs=skipped, steps=steps,
                           settings=self.settings())
