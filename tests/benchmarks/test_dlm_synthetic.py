"""benchmarks/dlm_synthetic.py: the addition task, its character tokenizer, the exact-match scorer (which must score
noise at ~0), and the quick profile's pieces on a tiny budget."""

from __future__ import annotations

import importlib.util
import random
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "dlm_synthetic.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("benchmark_dlm_synthetic", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their module through sys.modules
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tok(bench):
    return bench.char_tokenizer()


def test_tokenizer_round_trips_every_problem_and_has_the_special_tokens(bench, tok):
    task = bench.AdditionTask(digits=5)
    assert (tok.pad_token_id, tok.eos_token_id, tok.mask_token_id) == (0, 1, 2)
    assert len(tok) == 3 + 10 + 2
    for row in task.items(50, seed=3):
        text = row["prompt"] + row["answer"]
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert len(ids) == len(text)  # one token per character
        assert tok.decode(ids) == text
    ids = tok("12+3=", add_special_tokens=False)["input_ids"] + [tok.eos_token_id, tok.pad_token_id]
    assert tok.decode(ids, skip_special_tokens=True) == "12+3="


def test_addition_rows_are_correct_sums_written_least_significant_digit_first(bench):
    task = bench.AdditionTask(digits=3)
    assert task.render(123, 489) == ("321+984=", "2160")  # 612, zero-padded to 4 digits, reversed
    assert task.render(999, 1) == ("999+100=", "0001")
    assert (task.prompt_length, task.answer_length) == (8, 5)
    for row in task.items(200, seed=0):
        assert task.parse_answer(row["answer"]) == row["a"] + row["b"]
        assert len(row["prompt"]) == task.prompt_length and len(row["answer"]) + 1 == task.answer_length
    assert task.parse_answer("216") is None and task.parse_answer("21a0") is None
    with pytest.raises(ValueError, match="at most 3 digits"):
        task.render(1000, 1)
    assert task.items(5, seed=1) == task.items(5, seed=1) != task.items(5, seed=2)


def test_splits_are_disjoint_and_encoding_masks_only_the_answer(bench, tok):
    task = bench.AdditionTask(digits=2)
    train, test = bench.disjoint_splits(task, n_train=300, n_test=100, seed=0)
    assert len(train) == 300 and len(test) == 100
    assert not {(r["a"], r["b"]) for r in train} & {(r["a"], r["b"]) for r in test}
    enc = bench.encode_rows(tok, train[:4])
    for row, r in zip(enc, train[:4]):
        assert len(row["input_ids"]) == task.prompt_length + task.answer_length
        assert row["input_ids"][-1] == tok.eos_token_id
        assert row["labels"] == [-100] * task.prompt_length + row["input_ids"][task.prompt_length:]
        assert tok.decode(row["input_ids"][: task.prompt_length]) == r["prompt"]


def test_scorer_gives_one_to_the_truth_and_about_zero_to_noise(bench, tok):
    task = bench.AdditionTask(digits=4)
    rows = task.items(300, seed=7)
    answer_ids = [tok(r["answer"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for r in rows]
    truth = torch.tensor(answer_ids)
    assert bench.exact_match(bench.decode_answers(tok, truth), rows) == 1.0
    # Noise: random digit strings of the right length, and random tokens of the whole vocabulary.
    g = torch.Generator().manual_seed(0)
    digits = torch.randint(3, 13, truth.shape, generator=g)
    assert bench.exact_match(bench.decode_answers(tok, digits), rows) < 0.01
    anything = torch.randint(0, len(tok), truth.shape, generator=g)
    assert bench.exact_match(bench.decode_answers(tok, anything), rows) < 0.01
    # Shuffled answers (right format, wrong problem) and one wrong digit score 0.
    shuffled = truth[torch.randperm(len(rows), generator=g)]
    assert bench.exact_match(bench.decode_answers(tok, shuffled), rows) < 0.02
    one_off = truth.clone()
    one_off[:, 0] = 3 + (one_off[:, 0] - 3 + 1) % 10
    assert bench.exact_match(bench.decode_answers(tok, one_off), rows) == 0.0
    # Text after EOS is ignored; a missing EOS with extra digits is wrong; pad/mask tokens are dropped.
    tail = torch.cat([truth, torch.randint(3, 13, (len(rows), 3), generator=g)], dim=1)
    assert bench.exact_match(bench.decode_answers(tok, tail), rows) == 1.0
    no_eos = tail.clone()
    no_eos[:, truth.shape[1] - 1] = 3
    assert bench.exact_match(bench.decode_answers(tok, no_eos), rows) == 0.0
    with pytest.raises(ValueError):
        bench.exact_match(["1"], rows)


def test_random_digit_answers_almost_never_match(bench):
    task = bench.AdditionTask(digits=3)
    rows = task.items(500, seed=11)
    rng = random.Random(0)
    guesses = ["".join(rng.choice("0123456789") for _ in range(4)) for _ in rows]
    assert bench.exact_match(guesses, rows) < 0.01


@pytest.mark.slow  # ~15 s of CPU, ~50 s wall on the loaded 2-core box
def test_every_arm_trains_and_every_decoder_runs_on_a_tiny_budget(bench, tok, tmp_path):
    """The quick profile's pieces end to end at a few steps: six arms train, every table row decodes, the ISD rows
    reproduce the I-DLM model's own greedy answers, and SeqD/RCD start from the BD3 weights (not from a deep copy that
    would train the BD3 model in their place)."""
    pytest.importorskip("trl")
    profile = bench.Profile(digits=3, hidden=32, layers=1, steps=3, extra_steps=2, batch=8, lr=3e-3, n_test=12,
                            ref_hidden=16, ref_layers=1)
    task = bench.AdditionTask(profile.digits)
    stage1, stage2, test = bench.build_datasets(tok, task, profile, seed=0)
    assert len(stage1) == 24 and len(stage2) == 16
    arms = bench.train_all(profile, tok, stage1, stage2, seed=0, out_dir=str(tmp_path))
    assert set(arms) == {"AR", "I-DLM", "BD3", "ref", "SeqD", "RCD"}
    bd3 = arms["BD3"].model.state_dict()
    for name in ("SeqD", "RCD"):
        moved = [k for k, v in arms[name].model.state_dict().items() if not torch.equal(v, bd3[k])]
        assert moved, f"{name} did not train its own copy"
    assert arms["AR"].tokens == arms["I-DLM"].tokens == arms["BD3"].tokens == 24 * (task.prompt_length
                                                                                    + task.answer_length)
    rows = bench.evaluate_all(arms, tok, task, test, batch=5)
    methods = [(r.method, r.setting) for r in rows]
    assert len(rows) == 1 + 1 + len(bench.ISD_STRIDES) + len(bench.BLOCK_SETTINGS) + 2 + 3 * len(bench.RCD_THRESHOLDS)
    assert ("ISD greedy", "N=4") in methods
    for r in rows:
        assert 0.0 <= r.accuracy <= 1.0 and r.tpf > 0
        if r.method == "ISD greedy":
            assert r.extra.startswith(f"{len(test)}/{len(test)} answers == its generate")
    bench.save_arms(arms, tok, str(tmp_path))
    loaded = bench.load_arms(str(tmp_path))
    assert set(loaded) == set(arms)
    assert loaded["BD3"].model.config.block_diffusion == arms["BD3"].model.config.block_diffusion
