"""Trainers under 2 real processes (torchrun, gloo, CPU): method state is the same on every rank by design.

Each test starts `torchrun --nproc_per_node 2` on tests/distributed/workers.py (stopped by pid on timeout) and
compares the ranks' JSON payloads. CI runs the FST and DAS ones (~1 min each on a loaded 2-core box); the rest are slow.
"""

from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("trl")

from tests.distributed.launcher import LaunchError, accelerate_command, launch  # noqa: E402
from tests.distributed.workers import main as run_in_process  # noqa: E402

WORKERS = "tests/distributed/workers.py"
TIMEOUT = 480


def two_ranks(method, out_dir, *args):
    ranks = launch(WORKERS, [method, str(out_dir), *args], nproc=2, timeout=TIMEOUT)
    assert [r["rank"] for r in ranks] == [0, 1] and all(r["num_processes"] == 2 for r in ranks)
    return ranks


def test_fst_two_ranks_share_one_pool_save_once_and_resume_on_one(tmp_path):
    from hf_fastslow.trainers import FSTTrainer, load_fast_context
    from tests.conftest import byte_tokenizer, tiny_llama
    from tests.distributed.workers import fst_args, fst_dataset, fst_parts, parse

    out = tmp_path / "fst"
    r0, r1 = two_ranks("fst", out, "--save-steps", "2")
    for key in ("fast_context", "fast_pool", "fast_scores", "outcomes", "fast_rollouts", "weights"):
        assert r0[key] == r1[key], key
    assert r0["outcomes"] == ["accepted"] and "RULE" in r0["fast_context"]
    # Reflection ran on the main process only; its proposal (tagged with rank 0's pid) reached both ranks.
    assert (r0["reflector_calls"], r1["reflector_calls"]) == (1, 0)
    # Each fast-round row was rolled out once, on one rank: 4 Pareto rows for each of the 2 candidates and a
    # 2-row minibatch for parent and child = 12 generations, split 6 / 6 (plus 2 steps x 2 RL rows per rank).
    assert r0["fast_rollouts"] == 12 and r0["task_calls"] == r1["task_calls"] == 6 + 4
    # Saved once: one state file and one weights file, readable by load_fast_context.
    assert load_fast_context(out) == r0["fast_context"]
    assert sorted(p.name for p in out.glob("*.safetensors")) == ["model.safetensors"]
    ckpt = out / "checkpoint-2"
    assert (ckpt / "fst_state.json").is_file() and (ckpt / "rng_state_1.pth").is_file()
    # The 2-rank checkpoint resumes on one process: the same pool and scores on the single rank.
    opts = parse(["fst", str(tmp_path / "resumed")])
    task_cls, reflector, _ = fst_parts(opts)
    tok = byte_tokenizer()
    trainer = FSTTrainer(model=tiny_llama(vocab=len(tok)), reward_funcs=task_cls(),
                         args=fst_args(str(tmp_path / "resumed"), opts, per_device_train_batch_size=4),
                         train_dataset=fst_dataset(), processing_class=tok, reflector=reflector)
    trainer.train(resume_from_checkpoint=str(ckpt))
    assert trainer.fast_pool == r0["fast_pool"] and trainer.fast_scores == r0["fast_scores"]
    assert trainer.fast_context == r0["fast_context"]


def test_das_two_ranks_draft_from_every_ranks_rollouts(tmp_path):
    r0, r1 = two_ranks("das", tmp_path, "--steps", "3")
    assert r0["history"] == r1["history"] and r0["problems_order"] == r1["problems_order"]
    assert r0["lengths"] == r1["lengths"]
    # Nothing lost, nothing doubled: the history holds every rank's rollouts (2 prompts x 4 generations x 3 steps
    # over 2 ranks = 12, 6 finished on each rank; no cap or window is reached).
    assert r0["local_rollouts"] == r1["local_rollouts"] == 6
    assert r0["rollouts_in_history"] == 12 == sum(len(v) for v in r0["history"].values())


@pytest.mark.slow
def test_accelerate_launch_multi_gpu_flag_starts_two_gloo_processes_on_cpu(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("checks the CPU-only spelling")
    args = ["das", str(tmp_path), "--steps", "2"]
    r0, r1 = launch(WORKERS, nproc=2, timeout=TIMEOUT, command=accelerate_command(WORKERS, args, nproc=2))
    assert (r0["rank"], r1["rank"], r0["num_processes"]) == (0, 1, 2)
    assert r0["history"] == r1["history"] and r0["rollouts_in_history"] == 2 * r0["local_rollouts"]


@pytest.mark.slow
def test_das_without_sharing_keeps_a_history_per_rank(tmp_path):
    r0, r1 = two_ranks("das", tmp_path, "--steps", "3", "--no-share")
    assert r0["rollouts_in_history"] == r0["local_rollouts"] == 6  # its own rollouts only
    assert r0["history"] != r1["history"]


@pytest.mark.slow
def test_das_shared_rollouts_are_bounded(tmp_path):
    r0, r1 = two_ranks("das", tmp_path, "--steps", "3", "--max-shared", "1")
    assert r0["history"] == r1["history"]
    assert r0["rollouts_in_history"] == 3 * 2  # one rollout per rank per call


@pytest.mark.slow
@pytest.mark.parametrize("odd", [False, True], ids=["even_rows", "three_rows_on_two_ranks"])
def test_pairrl_judges_every_pair_once_across_ranks(tmp_path, odd):
    # odd: num_generations=3 and one judge group per step, so 3 judge rows over 2 ranks (rank 1 gets padding only).
    r0, r1 = two_ranks("pairrl", tmp_path, *(["--generations", "3", "--judge-groups", "1"] if odd else []))
    assert r0["judge_rows_built"] == r1["judge_rows_built"]  # the same global list on both ranks
    built = sum(r0["judge_rows_built"])
    assert built > 0 and len(r0["judged"]) + len(r1["judged"]) == built  # every row once, none twice
    if odd:
        assert set(r0["judge_rows_built"]) <= {0, 3} and (len(r0["judged"]), len(r1["judged"])) == (built, 0)
    else:
        assert len(r0["judged"]) == len(r1["judged"])  # split evenly
    assert r0["weights"] == r1["weights"]


@pytest.mark.slow
def test_kv_healing_two_ranks_equal_one_process_with_accumulation(tmp_path):
    """2 ranks x batch 2 == 1 process x batch 2 x accumulation 2: same data, same loss scaling, same final weights;
    `save_model` writes once (rank 0)."""
    from safetensors.torch import load_file

    r0, r1 = two_ranks("heal", tmp_path / "two")
    assert (r0["should_save"], r1["should_save"]) == (True, False)
    single = run_in_process(["heal", str(tmp_path / "one")])
    assert single["num_processes"] == 1
    two, one = load_file(tmp_path / "two" / "model.safetensors"), load_file(tmp_path / "one" / "model.safetensors")
    assert two.keys() == one.keys()
    for name in one:
        torch.testing.assert_close(two[name], one[name], rtol=1e-5, atol=1e-6, msg=name)
    assert r0["losses"] == pytest.approx(single["losses"], rel=1e-5)


@pytest.mark.slow
def test_launch_without_use_cpu_on_a_cpu_box_fails_clearly(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("on a GPU machine torchrun without use_cpu is a correct launch")
    with pytest.raises(LaunchError, match="MisconfiguredLaunchError.*use_cpu=True"):
        launch(WORKERS, ["fst", str(tmp_path), "--no-cpu-flag"], nproc=2, timeout=TIMEOUT)


def test_launch_check_and_shards_in_process(monkeypatch):
    from hf_fastslow.trainers.distributed import (
        MisconfiguredLaunchError,
        check_distributed_launch,
        rank_shard,
        unshard,
    )

    class Acc:
        num_processes, distributed_type = 1, "DistributedType.NO"

    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(MisconfiguredLaunchError, match="use_cpu=True"):
        check_distributed_launch(Acc(), "X")
    Acc.num_processes, Acc.distributed_type = 2, "DistributedType.XLA"
    with pytest.raises(MisconfiguredLaunchError, match="XLA"):
        check_distributed_launch(Acc(), "X")
    check_distributed_launch(Acc(), "X", needs_object_gather=False)
    monkeypatch.delenv("WORLD_SIZE")
    Acc.num_processes, Acc.distributed_type = 1, "DistributedType.NO"
    check_distributed_launch(Acc(), "X")
    items = list(range(7))
    shards = [rank_shard(items, r, 3) for r in range(3)]
    assert sorted(sum(shards, [])) == items and unshard(shards, 7) == items
    assert os.environ.get("WORLD_SIZE") is None


@pytest.mark.slow
def test_other_trainers_run_under_two_processes(tmp_path):
    """Early readout, feature sieve, block diffusion, I-DLM, RCD and clock SFT train 2 steps under 2 ranks; DDP
    keeps the weights equal."""
    from tests.distributed.smoke_trainers import TRAINERS

    r0, r1 = launch("tests/distributed/smoke_trainers.py", [str(tmp_path)], nproc=2, timeout=TIMEOUT)
    for name in TRAINERS:
        assert r0[name]["ok"], (name, r0[name].get("trace"))
        assert r0[name]["num_processes"] == 2 and r0[name]["global_step"] == 2
        assert r0[name]["weights"] == r1[name]["weights"], name


def test_staged_rollouts_are_drafted_from_but_published_only_when_asked():
    """The DAS drafter's staged recording (what the cross-rank all-gather builds on), in one process."""
    from hf_fastslow.generation import DASDrafter, SuffixHistory
    from hf_fastslow.generation.speculative import speculative_generate
    from tests.conftest import tiny_llama

    model = tiny_llama(vocab=64)
    model.generation_config.pad_token_id, model.generation_config.eos_token_id = 0, None
    drafter = DASDrafter(history=SuffixHistory(max_depth=8), cost_aware=False, budget=None, use_local=False)
    prompt = torch.tensor([[5, 6, 7, 8]])
    kw = dict(max_new_tokens=12, do_sample=False, custom_generate=speculative_generate, drafter=drafter,
              problem_ids=["p"])
    with drafter.staged_recording() as staged:
        first = model.generate(prompt, **kw)
        assert len(drafter.history) == 0 and [p for p, _, _ in staged.finished] == ["p"]
        before = drafter.stats.accepted
        second = model.generate(prompt, **kw)  # greedy: the staged first rollout drafts the whole answer
        assert torch.equal(first, second) and drafter.stats.accepted - before >= 8
    assert len(drafter.history) == 0
    assert drafter.publish_rollouts(staged.finished) == 2 and len(drafter.history) == 2
    assert drafter.history.predicted_length("p") == 12
