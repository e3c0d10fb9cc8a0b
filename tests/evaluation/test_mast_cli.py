"""`hf-fastslow mast` in-process: heuristics on the fixtures, score + generate with a tiny saved judge, errors."""

import json

import pytest
import torch

from hf_fastslow.cli import main
from hf_fastslow.evaluation.mast_fixtures import fixture_traces
from hf_fastslow.evaluation.mast_report import evaluate_annotators
from hf_fastslow.evaluation.mast_taxonomy import MAST_CODES
from tests.conftest import byte_tokenizer, tiny_llama


def test_mast_verb_heuristics_on_fixtures(tmp_path, capsys):
    out = tmp_path / "r.json"
    assert main(["mast", "--methods", "heuristics", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    arm = report["annotators"]["heuristics"]
    assert len(report["traces"]) == 24 and len(arm["annotations"]) == 24
    assert arm["agreement"]["per_label"]["1.3"]["f1"] == 1.0
    assert "heuristics" in capsys.readouterr().out
    png = out.with_suffix(".png")
    assert png.exists() or "plot skipped" in capsys.readouterr().out


def test_mast_verb_with_a_tiny_judge_and_custom_traces(tmp_path):
    model_dir = tmp_path / "judge"
    model = tiny_llama(vocab=259, num_layers=1)
    model.config.max_position_embeddings = 4096  # byte tokens: the fixture prompts need ~3k positions
    model.generation_config.max_new_tokens = 4
    model.save_pretrained(model_dir)
    byte_tokenizer().save_pretrained(model_dir)
    traces = [t.to_dict() for t in fixture_traces()[:2]]
    (tmp_path / "traces.json").write_text(json.dumps(traces))
    out = tmp_path / "r.json"
    assert main(["mast", "--traces", str(tmp_path / "traces.json"), "--model", str(model_dir), "--methods",
                 "score,generate", "--max-new-tokens", "4", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    score, gen = report["annotators"]["score"], report["annotators"]["generate"]
    assert all(set(a["p_yes"]) == set(MAST_CODES) for a in score["annotations"])
    # a 4-token answer from a random model is garbage: counted per trace, decisions None, nothing dropped
    assert gen["unparsed"] == 2 and gen["garbage"] == 2 and gen["missing_decisions"] == 28
    assert gen["agreement"]["unparsed"] == 2 and gen["agreement"]["traces"] == 2
    assert "score vs generate" in report["pairwise"]


def test_mast_verb_errors(tmp_path):
    with pytest.raises(SystemExit, match="unknown --methods"):
        main(["mast", "--methods", "vote", "--out", str(tmp_path / "r.json")])
    (tmp_path / "t.json").write_text("{}")
    with pytest.raises(SystemExit, match="JSON list"):
        main(["mast", "--methods", "heuristics", "--traces", str(tmp_path / "t.json")])


def test_evaluate_annotators_records_a_failing_peer():
    class Broken:
        def annotate(self, trace):
            raise ConnectionError("server at 127.0.0.1:9 refused the connection")

    from hf_fastslow.evaluation.mast_heuristics import HeuristicAnnotator

    traces = fixture_traces()[:3]
    r = evaluate_annotators({"heuristics": HeuristicAnnotator(), "broken": Broken()}, traces)
    assert r["annotators"]["broken"]["failed_traces"] == 3
    assert "ConnectionError: server at 127.0.0.1:9 refused" in r["annotators"]["broken"]["errors"][0]
    assert "agreement" not in r["annotators"]["broken"] and "agreement" in r["annotators"]["heuristics"]
    assert torch.get_num_threads() >= 1
