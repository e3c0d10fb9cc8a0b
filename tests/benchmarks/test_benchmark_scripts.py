"""Every benchmark script imports (its helpers exist under the names it uses) and exposes `main`; the shared
loaders give the benchmarks the task items they were run with."""

import importlib.util
from pathlib import Path

import pytest
import torch

BENCHMARKS = sorted((Path(__file__).resolve().parents[2] / "benchmarks").glob("*.py"))


def load(path: Path):
    threads = torch.get_num_threads()  # fst.py sets one thread at import; the rest of the session keeps its own
    spec = importlib.util.spec_from_file_location(f"benchmark_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    finally:
        torch.set_num_threads(threads)
    return module


@pytest.mark.parametrize("path", BENCHMARKS, ids=[p.stem for p in BENCHMARKS])
def test_benchmark_script_imports(path):
    try:
        module = load(path)
    except ModuleNotFoundError as err:
        if (err.name or "").split(".")[0] == "hf_fastslow":
            raise
        pytest.skip(f"{path.name} needs {err.name}, an optional dependency not installed here")
    assert callable(module.main)


def test_arithmetic_benchmarks_phrase_the_same_problems_their_own_way():
    pytest.importorskip("trl")
    from hf_fastslow.evaluation.prompts import arithmetic_problems

    scripts = {p.stem: p for p in BENCHMARKS}
    base = arithmetic_problems(6, seed=11)
    fst_items = load(scripts["fst"]).ArithmeticTask("+").items(6, seed=11)
    assert [r["prompt"][-1]["content"] for r in fst_items] == [p["question"] for p in base]
    assert fst_items[0]["prompt"][0]["role"] == "system"
    assert [r["expected_reply"] for r in fst_items] == [f"{p['a']} + {p['b']} = {p['answer']}." for p in base]
    assert load(scripts["v1_infer"]).addition_items(6, seed=11) == [
        {"question": p["question"], "answer": f"#### {p['answer']}"} for p in base]
    assert load(scripts["pairrl"]).make_problems(6, seed=11) == [
        {"question": p["question"] + " Reply with just the number.", "answer": str(p["answer"])} for p in base]
