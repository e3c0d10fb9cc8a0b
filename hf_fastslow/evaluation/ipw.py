"""Intelligence per Watt (arXiv 2511.07885): accuracy per unit of power of a model on a machine, from per-query
energy windows.

`IPWProfiler(backend, dataset, scorer, meter)` sends the dataset's questions one at a time (batch 1, so each
query's energy is its own) through any `hf_fastslow.backends.Backend` (an in-process `HFLocalBackend`, or an
`EndpointBackend` on `transformers serve` / vLLM / a hosted API), reads the meter before and after each query,
samples power in the background, and records accuracy, energy, power, latency, TTFT, tokens and CPU seconds.
`IPWReport` aggregates: accuracy (Wilson interval), mean power = total energy / total time, IPW = accuracy / mean
power, accuracy per joule (APJ), joules per token, accuracy per CPU-second. Every energy figure carries the meter's
label: a report with any estimated reading is labelled estimated; one without a meter (a cloud endpoint whose
energy is not yours to read) has no energy figures (None, not 0).

Where energy is only estimated from CPU time, "power" is nearly constant (watts per busy core x cores in use), so
IPW mostly reflects that assumption; accuracy per CPU-second is the hardware-honest figure there and is reported
beside IPW. `simulate_routing(local, cloud)` is the paper's local/cloud routing: the share of queries servable
locally and the energy an (imperfect) router saves against sending everything to the cloud model.
"""

from __future__ import annotations

import json
import random
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from .answers import answers_match, normalize_number
from .energy import EnergyMeter, EnergyReading, PowerSampler, auto_meter, cpu_seconds, energy_between
from .intervals import wilson_interval
from .timing import machine_state

__all__ = [
    "IPWProfiler",
    "IPWReport",
    "QueryRecord",
    "RoutingResult",
    "exact_match",
    "ipw_score",
    "numeric_match",
    "reports_table",
    "simulate_routing",
]

Scorer = Callable[[str, Mapping[str, Any]], "bool | float"]


def numeric_match(reply: str, item: Mapping[str, Any]) -> bool:
    """The reply's final number (`hf_fastslow.evaluation.answers.extract_answer`) equals `item["answer"]`."""
    return answers_match(reply, item["answer"])


def exact_match(reply: str, item: Mapping[str, Any]) -> bool:
    """Whitespace- and case-insensitive equality with `item["answer"]` (numbers normalised: "1,000." == "1000")."""
    def norm(s: Any) -> str:
        return normalize_number(" ".join(str(s).split()).lower())

    return norm(reply) == norm(item["answer"])


def ipw_score(accuracy: float, mean_power_w: float) -> float:
    """Accuracy / mean power (1/W). Zero or negative power is an error (a meter that counted nothing)."""
    if not 0.0 <= accuracy <= 1.0:
        raise ValueError(f"accuracy must be in [0, 1], got {accuracy}")
    if mean_power_w is None or mean_power_w <= 0:
        raise ValueError(f"mean power must be > 0 W to compute IPW, got {mean_power_w!r}: the meter counted no "
                         "energy over the queries (a counter that did not advance, or windows shorter than its update "
                         "period)")
    return accuracy / mean_power_w


@dataclass
class QueryRecord:
    """One metered query. `energy_j` is None when the window's energy is unknown (no meter, a counter reset);
    `mean_power_w` etc. come from the background sampler (None without samples inside the window)."""

    index: int
    correct: float
    reply: str
    answer: Any
    seconds: float
    cpu_seconds: float
    ttft_s: float | None
    prompt_tokens: int
    completion_tokens: int
    energy_j: float | None
    measured: bool | None
    source: str | None
    mean_power_w: float | None = None
    median_power_w: float | None = None
    min_power_w: float | None = None
    max_power_w: float | None = None
    power_samples: int = 0
    sampled_energy_j: float | None = None

    @property
    def j_per_token(self) -> float | None:
        if self.energy_j is None or self.completion_tokens <= 0:
            return None
        return self.energy_j / self.completion_tokens


def _median(values: Sequence[float]) -> float | None:
    return statistics.median(values) if values else None


@dataclass
class IPWReport:
    """Aggregates of `records` (see the module docstring). `kind`: "measured" only if every energy reading was,
    "estimated" if any was estimated, "unmetered" without energy."""

    name: str
    records: list[QueryRecord]
    meter_source: str | None = None
    meter_scope: str | None = None
    fallback_reason: str | None = None
    idle_power_w: float | None = None
    machine: dict = field(default_factory=dict)
    sampler_errors: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.records:
            raise ValueError("an IPW report needs at least one query record")

    # ----- accuracy and time -----------------------------------------------------------------------------------
    @property
    def n(self) -> int:
        return len(self.records)

    @property
    def accuracy(self) -> float:
        return statistics.fmean(float(r.correct) for r in self.records)

    @property
    def accuracy_interval(self) -> tuple[float, float]:
        """95 % Wilson interval (scores rounded to right/wrong)."""
        return wilson_interval(sum(r.correct >= 0.5 for r in self.records), self.n)

    @property
    def total_seconds(self) -> float:
        return sum(r.seconds for r in self.records)

    @property
    def cpu_seconds_per_query(self) -> float:
        return statistics.fmean(r.cpu_seconds for r in self.records)

    @property
    def accuracy_per_cpu_second(self) -> float | None:
        cpu = self.cpu_seconds_per_query
        return self.accuracy / cpu if cpu > 0 else None

    @property
    def tokens_per_s(self) -> float | None:
        secs = self.total_seconds
        return sum(r.completion_tokens for r in self.records) / secs if secs > 0 else None

    @property
    def ttft_p50_s(self) -> float | None:
        return _median([r.ttft_s for r in self.records if r.ttft_s is not None])

    @property
    def latency_p50_s(self) -> float:
        return statistics.median(r.seconds for r in self.records)

    # ----- energy ------------------------------------------------------------------------------------------------
    @property
    def metered(self) -> list[QueryRecord]:
        """Records with a known energy (a counter reset drops a query's energy, not its accuracy)."""
        return [r for r in self.records if r.energy_j is not None]

    @property
    def dropped_energy(self) -> int:
        return self.n - len(self.metered) if self.kind != "unmetered" else 0

    @property
    def kind(self) -> str:
        labels = [r.measured for r in self.records if r.measured is not None]
        if not labels:
            return "unmetered"
        return "measured" if all(labels) else "estimated"

    @property
    def total_energy_j(self) -> float | None:
        metered = self.metered
        return sum(r.energy_j for r in metered) if metered else None

    @property
    def energy_per_query_j(self) -> float | None:
        metered = self.metered
        return statistics.fmean(r.energy_j for r in metered) if metered else None

    @property
    def mean_power_w(self) -> float | None:
        """Total energy / total time of the metered queries (time-weighted, so long queries count by their length)."""
        metered = self.metered
        secs = sum(r.seconds for r in metered)
        return sum(r.energy_j for r in metered) / secs if metered and secs > 0 else None

    @property
    def idle_subtracted_energy_per_query_j(self) -> float | None:
        if self.idle_power_w is None or not self.metered:
            return None
        return statistics.fmean(r.energy_j - self.idle_power_w * r.seconds for r in self.metered)

    def _metered_accuracy(self) -> float:
        return statistics.fmean(float(r.correct) for r in self.metered)

    @property
    def ipw(self) -> float | None:
        """Accuracy / mean power over the metered queries; ValueError when the meter counted nothing."""
        if not self.metered:
            return None
        return ipw_score(self._metered_accuracy(), self.mean_power_w)

    @property
    def apj(self) -> float | None:
        """Accuracy per joule: accuracy / mean energy per query."""
        energy = self.energy_per_query_j
        if energy is None:
            return None
        if energy <= 0:
            raise ValueError(f"mean energy per query is {energy} J: the meter counted no energy")
        return self._metered_accuracy() / energy

    @property
    def j_per_token(self) -> float | None:
        metered = self.metered
        tokens = sum(r.completion_tokens for r in metered)
        return sum(r.energy_j for r in metered) / tokens if metered and tokens else None

    # ----- output ------------------------------------------------------------------------------------------------
    def figures(self) -> dict[str, dict[str, Any]]:
        """Every headline figure as {"value", "label"}: accuracy, time and CPU figures are "measured" (counted on
        this machine's clocks); energy figures carry the report's kind."""
        energy_label = self.kind
        lo, hi = self.accuracy_interval

        def entry(value, label):
            return {"value": value, "label": label}

        return {
            "accuracy": entry(self.accuracy, "measured"),
            "accuracy_ci95": entry([lo, hi], "measured"),
            "latency_p50_s": entry(self.latency_p50_s, "measured"),
            "ttft_p50_s": entry(self.ttft_p50_s, "measured"),
            "tokens_per_s": entry(self.tokens_per_s, "measured"),
            "cpu_seconds_per_query": entry(self.cpu_seconds_per_query, "measured"),
            "accuracy_per_cpu_second": entry(self.accuracy_per_cpu_second, "measured"),
            "energy_per_query_j": entry(self.energy_per_query_j, energy_label),
            "idle_subtracted_energy_per_query_j": entry(self.idle_subtracted_energy_per_query_j, energy_label),
            "mean_power_w": entry(self.mean_power_w, energy_label),
            "ipw_per_w": entry(self.ipw, energy_label),
            "apj_per_j": entry(self.apj, energy_label),
            "j_per_token": entry(self.j_per_token, energy_label),
        }

    def to_dict(self, with_records: bool = True) -> dict[str, Any]:
        out = {
            "name": self.name, "kind": self.kind, "n": self.n, "meter_source": self.meter_source,
            "meter_scope": self.meter_scope, "fallback_reason": self.fallback_reason,
            "dropped_energy_queries": self.dropped_energy, "idle_power_w": self.idle_power_w,
            "machine": self.machine, "sampler_errors": self.sampler_errors, "figures": self.figures(),
        }
        if with_records:
            out["records"] = [{**asdict(r), "j_per_token": r.j_per_token} for r in self.records]
        return out

    def to_json(self, path: str | None = None, **kwargs: Any) -> str:
        text = json.dumps(self.to_dict(**kwargs), indent=2, default=str)
        if path is not None:
            with open(path, "w") as f:
                f.write(text)
        return text

    def summary(self) -> str:
        def fmt(x, spec):
            return "n/a" if x is None else format(x, spec)

        return (f"{self.name}: accuracy {self.accuracy:.3f} ({self.n} queries), {self.kind} energy "
                f"{fmt(self.energy_per_query_j, '.2f')} J/query, mean power {fmt(self.mean_power_w, '.2f')} W, "
                f"IPW {fmt(self.ipw, '.4f')} /W, APJ {fmt(self.apj, '.4f')} /J, accuracy per CPU-second "
                f"{fmt(self.accuracy_per_cpu_second, '.3f')}")


def reports_table(reports: Mapping[str, IPWReport], peer: str | None = None) -> list[str]:
    """Markdown rows, one per report, with the energy label in every energy column and, with `peer`, each arm's
    accuracy per CPU-second and energy per query relative to the peer's (measured in the same run)."""
    head = ("| arm | accuracy (95 % CI) | energy J/query | mean power W | IPW 1/W | APJ 1/J | J/token | "
            "CPU s/query | accuracy per CPU-s | TTFT p50 s | latency p50 s |")
    lines = [head + (f" energy / {peer} | acc per CPU-s / {peer} |" if peer else ""),
             "|" + "---|" * (11 + (2 if peer else 0))]

    def fmt(x, spec, label=None):
        if x is None:
            return "n/a"
        return f"{x:{spec}}" + (f" ({label})" if label else "")

    for name, rep in reports.items():
        lo, hi = rep.accuracy_interval
        k = rep.kind if rep.kind != "unmetered" else None
        row = (f"| {name} | {rep.accuracy:.2f} ({lo:.2f}-{hi:.2f}) | {fmt(rep.energy_per_query_j, '.2f', k)} | "
               f"{fmt(rep.mean_power_w, '.2f', k)} | {fmt(rep.ipw, '.4f', k)} | {fmt(rep.apj, '.4f', k)} | "
               f"{fmt(rep.j_per_token, '.3f', k)} | {rep.cpu_seconds_per_query:.3f} | "
               f"{fmt(rep.accuracy_per_cpu_second, '.3f')} | {fmt(rep.ttft_p50_s, '.3f')} | "
               f"{rep.latency_p50_s:.3f} |")
        if peer:
            ref = reports[peer]
            e, e0 = rep.energy_per_query_j, ref.energy_per_query_j
            a, a0 = rep.accuracy_per_cpu_second, ref.accuracy_per_cpu_second
            row += (f" {fmt(e / e0 if e is not None and e0 else None, '.2f')} |"
                    f" {fmt(a / a0 if a is not None and a0 else None, '.2f')} |")
        lines.append(row)
    return lines


class IPWProfiler:
    """`IPWProfiler(backend, dataset, scorer=numeric_match, meter="auto", *, warmup=2, name=None,
    max_new_tokens=64, sampler_interval_s=0.05, cpu_pids=None, idle_seconds=0.0, **generation_kwargs)`.

    `dataset`: items with "question" (sent as one user message) or "messages", and "answer" for the scorer.
    `scorer(reply, item) -> bool | float`. `meter`: an `EnergyMeter`, "auto" (`auto_meter()`), or None (no local
    energy: a cloud endpoint). `warmup` queries (the first items) run unrecorded before the first `run()` / `query()`.
    `cpu_pids`: whose CPU time a query costs (default this process; an endpoint arm passes the server's pid and
    `os.getpid()`). `idle_seconds > 0` measures idle power first (reported, and subtracted in one figure).
    Queries are greedy (`temperature=0`) and streamed when the backend streams (TTFT). `run()` profiles the whole
    dataset; `query(item)` profiles one, so that several profilers can be interleaved per query.
    """

    def __init__(self, backend, dataset: Sequence[Mapping[str, Any]], scorer: Scorer = numeric_match,
                 meter: EnergyMeter | str | None = "auto", *, warmup: int = 2, name: str | None = None,
                 max_new_tokens: int = 64, sampler_interval_s: float | None = 0.05,
                 cpu_pids: Sequence[int] | None = None, idle_seconds: float = 0.0, **generation_kwargs: Any):
        self.dataset = list(dataset)
        if not self.dataset:
            raise ValueError("IPWProfiler needs a non-empty dataset (items with 'question' or 'messages', and "
                             "'answer')")
        for i, item in enumerate(self.dataset):
            if not isinstance(item, Mapping) or not ("question" in item or "messages" in item):
                raise ValueError(f"dataset item {i} has neither 'question' nor 'messages': {item!r:.120}")
        if warmup < 0 or idle_seconds < 0:
            raise ValueError(f"need warmup >= 0 and idle_seconds >= 0 (got {warmup}, {idle_seconds})")
        if meter == "auto":
            meter = auto_meter()
        elif isinstance(meter, str):
            raise ValueError(f"meter must be an EnergyMeter, 'auto' or None, got {meter!r}")
        if meter is not None and not meter.available():
            raise ValueError(f"the energy meter cannot be read: {meter.source}: {meter.reason}")
        self.backend = backend
        self.scorer = scorer
        self.meter = meter
        self.warmup = warmup
        self.name = name or getattr(backend, "name", type(backend).__name__)
        self.generation_kwargs = {"max_new_tokens": max_new_tokens, "temperature": 0.0, **generation_kwargs}
        self.cpu_pids = None if cpu_pids is None else list(cpu_pids)
        self.idle_seconds = idle_seconds
        self.idle_power_w: float | None = None
        self.records: list[QueryRecord] = []
        self.sampler = PowerSampler(meter, sampler_interval_s) if meter is not None and sampler_interval_s else None
        self._started = False

    # ----- lifecycle ---------------------------------------------------------------------------------------------
    def start(self) -> IPWProfiler:
        """Idle baseline (if asked), warm-up queries (unrecorded), then the power sampler. Idempotent."""
        if self._started:
            return self
        self._started = True
        if self.meter is not None and self.idle_seconds > 0:
            r0 = self.meter.read()
            time.sleep(self.idle_seconds)
            r1 = self.meter.read()
            energy = energy_between(r0, r1)
            self.idle_power_w = None if energy is None else energy / (r1.t - r0.t)
        for item in self.dataset[: self.warmup]:
            self._ask(item)
        if self.sampler is not None:
            self.sampler.start()
        return self

    def close(self) -> None:
        if self.sampler is not None:
            self.sampler.stop()

    def __enter__(self) -> IPWProfiler:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ----- one query ---------------------------------------------------------------------------------------------
    @staticmethod
    def messages_of(item: Mapping[str, Any]) -> list[dict[str, str]]:
        if "messages" in item:
            return [dict(m) for m in item["messages"]]
        return [{"role": "user", "content": str(item["question"])}]

    def _ask(self, item: Mapping[str, Any]) -> str:
        messages = self.messages_of(item)
        if self.backend.capabilities.streaming:
            return "".join(self.backend.stream(messages, **self.generation_kwargs))
        return self.backend.chat(messages, **self.generation_kwargs)[0].text

    def _cpu(self) -> float:
        return cpu_seconds(self.cpu_pids)

    def _read(self) -> EnergyReading | None:
        if self.meter is None:
            return None
        _synchronize_accelerator()
        return self.meter.read()

    def query(self, item: Mapping[str, Any], index: int | None = None) -> QueryRecord:
        """Profile one query and append its record."""
        self.start()
        mark = self.backend.ledger.mark()
        cpu0 = self._cpu()
        r0 = self._read()
        t0 = time.perf_counter() if r0 is None else r0.t
        reply = self._ask(item)
        r1 = self._read()
        t1 = time.perf_counter() if r1 is None else r1.t
        cpu = self._cpu() - cpu0
        calls = self.backend.ledger.records[mark:]
        usage = self.backend.ledger.since(mark)
        ttft = calls[0].ttft_s if len(calls) == 1 else None
        energy = None if r0 is None else energy_between(r0, r1)
        window = self.sampler.window(t0, t1) if self.sampler is not None else None
        record = QueryRecord(
            index=len(self.records) if index is None else index, correct=float(self.scorer(reply, item)),
            reply=reply, answer=item.get("answer"), seconds=t1 - t0, cpu_seconds=cpu, ttft_s=ttft,
            prompt_tokens=usage.prompt_tokens, completion_tokens=usage.completion_tokens, energy_j=energy,
            measured=None if r1 is None else r1.measured, source=None if r1 is None else r1.source,
        )
        if window is not None:
            record.mean_power_w, record.median_power_w = window.mean_w, window.median_w
            record.min_power_w, record.max_power_w = window.min_w, window.max_w
            record.power_samples, record.sampled_energy_j = window.samples, window.energy_j
        self.records.append(record)
        return record

    # ----- whole runs ----------------------------------------------------------------------------------------------
    def run(self) -> IPWReport:
        """Profile every item of the dataset (after the warm-up) and return the report."""
        try:
            self.start()
            for i, item in enumerate(self.dataset):
                self.query(item, index=i)
        finally:
            self.close()
        return self.report()

    def report(self) -> IPWReport:
        if not self.records:
            raise ValueError("no query was profiled yet: call run() or query(item)")
        rep = IPWReport(
            name=self.name, records=list(self.records),
            meter_source=None if self.meter is None else self.meter.source,
            meter_scope=None if self.meter is None else self.meter.scope,
            fallback_reason=getattr(self.meter, "fallback_reason", None), idle_power_w=self.idle_power_w,
            machine=machine_state(), sampler_errors=list(self.sampler.errors) if self.sampler else [],
        )
        if rep.metered and (rep.total_energy_j or 0.0) <= 0:
            raise ValueError(f"{self.name}: the meter ({rep.meter_source}) counted no energy over {rep.n} queries; "
                             "zero power gives no IPW (a counter that did not advance, or windows shorter than its "
                             "update period: meter batches of queries instead)")
        return rep


def _synchronize_accelerator() -> None:
    """Wait for queued GPU work before reading a counter, so a query's energy lands in its own window."""
    import sys

    torch = sys.modules.get("torch")  # never import torch just for this
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


# ----- local / cloud routing -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RoutingResult:
    """A routing simulation over the same queries: `local_share` of queries sent to the local model, `servable`
    (the local model's own accuracy: the share it answers acceptably), routed accuracy beside all-cloud accuracy,
    and energy / CPU seconds / latency routed vs all-cloud (energy None when either side has none)."""

    router_accuracy: float
    local_share: float
    servable_locally: float
    accuracy: float
    cloud_accuracy: float
    energy_j: float | None
    cloud_energy_j: float | None
    energy_saving: float | None
    cpu_seconds: float
    cloud_cpu_seconds: float
    cpu_saving: float
    seconds: float
    cloud_seconds: float
    energy_label: str


def simulate_routing(local: IPWReport, cloud: IPWReport, *, router_accuracy: float = 1.0,
                     seed: int = 0) -> RoutingResult:
    """Route each query to `local` when the local model answers it correctly, else to `cloud` (the paper's oracle
    router); with `router_accuracy` < 1 each decision is flipped with probability 1 - router_accuracy (seeded).
    The reports must cover the same queries (matched by record index)."""
    if not 0.0 <= router_accuracy <= 1.0:
        raise ValueError(f"router_accuracy must be in [0, 1], got {router_accuracy}")
    loc = {r.index: r for r in local.records}
    cld = {r.index: r for r in cloud.records}
    if set(loc) != set(cld):
        raise ValueError(f"routing needs the same queries in both reports ({len(loc)} local vs {len(cld)} cloud "
                         "indices differ)")
    rng = random.Random(seed)
    chosen = []
    for i in sorted(loc):
        go_local = loc[i].correct >= 0.5
        if rng.random() >= router_accuracy:
            go_local = not go_local
        chosen.append(loc[i] if go_local else cld[i])
    n = len(chosen)
    with_energy = all(r.energy_j is not None for r in [*loc.values(), *cld.values()])
    energy = sum(r.energy_j for r in chosen) if with_energy else None
    cloud_energy = sum(r.energy_j for r in cld.values()) if with_energy else None
    cpu, cloud_cpu = sum(r.cpu_seconds for r in chosen), sum(r.cpu_seconds for r in cld.values())
    kinds = {local.kind, cloud.kind}
    label = "measured" if kinds == {"measured"} else "unmetered" if "unmetered" in kinds else "estimated"
    return RoutingResult(
        router_accuracy=router_accuracy,
        local_share=sum(r is loc[r.index] for r in chosen) / n,
        servable_locally=statistics.fmean(r.correct >= 0.5 for r in loc.values()),
        accuracy=statistics.fmean(float(r.correct) for r in chosen),
        cloud_accuracy=statistics.fmean(float(r.correct) for r in cld.values()),
        energy_j=energy, cloud_energy_j=cloud_energy,
        energy_saving=None if not with_energy or not cloud_energy else 1.0 - energy / cloud_energy,
        cpu_seconds=cpu, cloud_cpu_seconds=cloud_cpu, cpu_saving=1.0 - cpu / cloud_cpu if cloud_cpu > 0 else 0.0,
        seconds=sum(r.seconds for r in chosen), cloud_seconds=sum(r.seconds for r in cld.values()),
        energy_label=label if with_energy else "unmetered",
    )
