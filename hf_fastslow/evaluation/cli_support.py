"""Pieces the evaluation verbs (`hf-fastslow ipw | ksort | mast`) share: the judged / profiled model from the command
line (a local model folder, the default model, or an OpenAI-compatible endpoint) and matplotlib's pyplot, or the reason
a plot is skipped; and what the benchmark scripts share: the --quick overrides and the JSON report with the machine's
load beside it."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any


def backend_from_args(
    model: str = "default", *, endpoint: str | None = None, served_model: str | None = None, threads: int = 1,
    dtype: str = "fp32", **generation_defaults: Any,
):
    """An `EndpointBackend(endpoint, served_model)` when `endpoint` is given, else an `HFLocalBackend` over `model`
    ("default": the embedded SmolLM2-135M-Instruct; otherwise a local folder or Hub id for `from_pretrained`)."""
    if endpoint:
        from hf_fastslow.backends.endpoint import EndpointBackend

        return EndpointBackend(endpoint, served_model, **generation_defaults)
    import torch

    from hf_fastslow.backends.hf_local import HFLocalBackend

    torch.set_num_threads(threads)
    if model == "default":
        from hf_fastslow import load_default_model

        lm, tok = load_default_model()
    else:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        lm = AutoModelForCausalLM.from_pretrained(model)
        tok = AutoTokenizer.from_pretrained(model)
    if dtype == "bf16":
        lm = lm.to(torch.bfloat16)
    elif dtype != "fp32":
        raise ValueError(f"dtype must be 'fp32' or 'bf16', got {dtype!r}")
    return HFLocalBackend(lm.eval(), tok, **generation_defaults)


def pyplot_or_reason():
    """`(pyplot, None)` with the headless Agg backend, or `(None, reason)` when matplotlib cannot be imported."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as err:
        return None, f"plot skipped: matplotlib is not installed ({err})"
    return plt, None


def apply_quick(args, overrides: dict[str, Any]):
    """When `args.quick` is set, set every `overrides` item on `args` (a script's QUICK sizes win over its flags).
    Returns `args`."""
    if args.quick:
        for key, value in overrides.items():
            setattr(args, key, value)
    return args


def write_report_json(path: str | Path | None, report: dict) -> None:
    """Write `report` to `path` (nothing when None), with the load average and this process's CPU seconds so far (a
    timing read later needs to know how busy the machine was)."""
    if not path:
        return
    from hf_fastslow.evaluation.timing import load_average

    report["load_average"] = load_average()
    report["process_cpu_s"] = time.process_time()
    Path(path).write_text(json.dumps(report, indent=1))
    print(f"JSON: {path}")
