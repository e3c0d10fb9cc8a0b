"""The generated tasks of the #12 benchmarks: DTS word problems carry the right answers; the spurious-feature sweep
hands every size's training rows the teacher logits of their own text."""

import random
import re
from pathlib import Path

import pytest
import torch

from .test_benchmark_scripts import load

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"


def test_dts_easy_problems_answers_follow_their_template():
    dts = load(BENCH / "dts.py")
    problems = dts.word_problems(30, seed=3)
    assert problems == dts.word_problems(30, seed=3)
    assert problems != dts.word_problems(30, seed=4)
    rules = [lambda a, b, c: a - b - c, lambda a, b, c: a + b - c, lambda a, b, c: a - b + c]
    for i, p in enumerate(problems):
        a, b, c = (int(x) for x in re.findall(r"\d+", p["question"]))
        assert int(p["answer"]) == rules[i % 3](a, b, c) >= 1
        assert max(a, b, c) <= 14  # one-digit operands, the first one may reach b + c + 5


def test_dts_multistep_problems_and_unknown_kind():
    dts = load(BENCH / "dts.py")
    p = dts.word_problems(3, seed=0, kind="multistep")
    a, b, c, d = (int(x) for x in re.findall(r"\d+", p[0]["question"]))  # a marbles, b bags of c, gives away d
    assert int(p[0]["answer"]) == a + b * c - d
    with pytest.raises(ValueError, match="unknown problem kind"):
        dts.word_problems(3, seed=0, kind="hard")


def test_spurious_split_agreement_and_groups():
    sf = load(BENCH / "spurious_features.py")
    train = sf.make_split(2000, 0.95, random.Random(0))
    agree = sum(r["marker"] == r["label"] for r in train) / len(train)
    assert 0.93 < agree < 0.97
    balanced = sf.make_split(400, 0.5, random.Random(1))
    assert sorted({r["group"] for r in balanced}) == [0, 1, 2, 3]
    assert all(sum(r["group"] == g for r in balanced) == 100 for g in range(4))
    for r in train:  # label = polarity(adjective) XOR negation
        words = r["text"].split()
        polarity = int(any(w in sf.POSITIVE for w in words))
        assert r["label"] == polarity ^ int("not" in words)


def test_spurious_sweep_gives_each_size_the_logits_of_its_own_texts(monkeypatch):
    sf = load(BENCH / "spurious_features.py")
    labelled = []

    def fake_teacher(rows, args):  # a logit pair that names the text it was computed for
        labelled.extend(r["text"] for r in rows)
        return [[float(len(r["text"])), float(sum(map(ord, r["text"])))] for r in rows], (0.9, 0.95)

    seen = {}

    def fake_budget(n, logits, teacher_acc, args):
        rows = sf.make_split(n, 0.95, random.Random(args.seed))
        seen[n] = (rows, logits)
        return {}

    monkeypatch.setattr(sf, "teacher_logits", fake_teacher)
    monkeypatch.setattr(sf, "run_budget", fake_budget)
    threads = torch.get_num_threads()
    try:
        sf.main(["--train", "300", "120", "--seed", "5", "--threads", "1"])
    finally:
        torch.set_num_threads(threads)
    assert len(labelled) == len(set(labelled))  # each distinct text labelled once
    assert sorted(seen) == [120, 300]
    for rows, logits in seen.values():
        assert len(logits) == len(rows)
        for r, lg in zip(rows, logits):
            assert lg == [float(len(r["text"])), float(sum(map(ord, r["text"])))]
