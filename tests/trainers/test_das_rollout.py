"""DAS TRL glue (hf_fastslow.trainers.das_rollout): the window callback and the GRPO rollout function; the old import
paths (hf_fastslow.generation, hf_fastslow.generation.das) still resolve, and importing generation/ does not import
trainers/."""

import os
import subprocess
import sys

import pytest
import torch

from hf_fastslow.generation import DASDrafter, SuffixHistory
from hf_fastslow.trainers import DASWindowCallback, das_rollout_func
from tests.conftest import tiny_llama

torch.set_num_threads(1)


def test_old_import_paths_resolve_to_the_moved_names():
    import hf_fastslow.generation as generation
    import hf_fastslow.generation.das as das

    assert generation.das_rollout_func is das.das_rollout_func is das_rollout_func
    assert generation.DASWindowCallback is das.DASWindowCallback is DASWindowCallback
    code = ("import sys, hf_fastslow.generation, hf_fastslow.generation.das; "
            "assert not [m for m in sys.modules if m.startswith('hf_fastslow.trainers')], 'imports trainers'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_window_callback_advances_history():
    hist = SuffixHistory(max_depth=4, window_steps=1)
    hist.add_rollout("p", [1, 2, 3])
    cb = DASWindowCallback(hist)

    class State:
        global_step = 1

    cb.on_step_begin(None, State(), None)
    assert hist.step == 1 and len(hist) == 0
    # Default window (sightings): a step starts a new round, so the next rollout of "q" is a new sighting.
    hist = SuffixHistory(max_depth=4, window_sightings=1)
    cb = DASWindowCallback(hist)
    hist.add_rollout("q", [1, 2])
    State.global_step = 2
    cb.on_step_begin(None, State(), None)
    hist.add_rollout("q", [3, 4])
    assert hist.step == 2 and list(hist.rollouts("q").values()) == [(3, 4)]


def test_grpo_rollout_func_smoke(tmp_path):
    """Two GRPO steps with DAS rollouts: one completion per (prompt x generation), history follows the steps."""
    pytest.importorskip("trl")
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    try:
        from hf_fastslow import default_model_path

        tok = AutoTokenizer.from_pretrained(default_model_path())
    except ImportError as err:
        pytest.skip(str(err))
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    model = tiny_llama(vocab=len(tok))
    for cfg in (model.config, model.generation_config):
        cfg.pad_token_id, cfg.eos_token_id, cfg.bos_token_id = tok.pad_token_id, tok.eos_token_id, tok.bos_token_id
    ds = Dataset.from_list([{"prompt": [{"role": "user", "content": f"What is {i} + {i}?"}]} for i in range(4)])

    def reward(completions, **kwargs):
        return [len(c[0]["content"]) / 100 for c in completions]

    args = GRPOConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, per_device_train_batch_size=4,
                      num_generations=4, max_completion_length=12, max_steps=2, logging_steps=1, report_to=[],
                      save_strategy="no")
    drafter = DASDrafter(history=SuffixHistory())
    rollout = das_rollout_func(drafter, batch_size=3)  # siblings split over two generate calls: still one sighting
    seen = []

    def counting_rollout(prompts, trainer):
        out = rollout(prompts, trainer)
        seen.append((len(prompts), len(out["completion_ids"]), trainer.state.global_step))
        assert all(0 < len(c) <= 12 for c in out["completion_ids"])
        return out

    trainer = GRPOTrainer(model=model, reward_funcs=reward, args=args, train_dataset=ds, processing_class=tok,
                          rollout_func=counting_rollout)
    trainer.train()
    assert [(p, c) for p, c, _ in seen] == [(4, 4), (4, 4)]  # num_generations rows per prompt, one completion each
    # Sighting window: both steps' prompts are kept (the step no longer evicts); siblings form one sighting each.
    hist = drafter.history
    assert hist.step == 1 and len(hist) == 8 and len(hist.problems) == 2
    assert all([len(s) for s in hist.sightings(p)] == [4] for p in hist.problems)
    assert drafter.stats.sequences == 8
