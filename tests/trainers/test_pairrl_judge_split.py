"""PairRL's judge rows split across ranks: every real row judged on exactly one rank for any row count, equal
per-rank blocks (GRPO all-gathers them), whole generation groups, and padding kept out of the loss."""

import math

import pytest
import torch
from datasets import Dataset

from hf_fastslow.trainers import PairRLConfig, PairRLTrainer, VerifiableTask
from hf_fastslow.trainers.pairrl_trainer import PAD_ROLE, VERIFY_ROLE, SolverReward, judge_rows_for_rank
from tests.conftest import byte_tokenizer, tiny_llama

torch.set_num_threads(1)


@pytest.mark.parametrize("steps_per_generation", [1, 2])
@pytest.mark.parametrize("group", [1, 2, 3])
@pytest.mark.parametrize("world", [1, 2, 3])
def test_every_judge_row_lands_on_exactly_one_rank(world, group, steps_per_generation):
    for count in range(8):
        if count % group:
            continue  # the trainer builds whole groups of `num_generations` rows
        rows = [{"prompt": f"pair {i // group}", "role": VERIFY_ROLE, "row": i} for i in range(count)]
        blocks = [judge_rows_for_rank(rows, rank, world, group, steps_per_generation) for rank in range(world)]
        sizes = {len(block) for block, _ in blocks}
        assert len(sizes) == 1, (count, sizes)  # one size on every rank
        size = sizes.pop()
        assert size % steps_per_generation == 0 and (size * world) % group == 0
        assert size * world - count < math.lcm(group, world * steps_per_generation)  # no more padding than needed
        real_rows = [row for block, real in blocks for row in block[:real]]
        assert [r["row"] for r in real_rows] == list(range(count))  # each once, in order
        assert all(r["role"] == VERIFY_ROLE for r in real_rows)
        assert all(r["role"] == PAD_ROLE for block, real in blocks for r in block[real:])
        gathered = [r for block, _ in blocks for r in block]  # the order GRPO's all-gather sees
        for start in range(0, len(gathered), group):
            members = gathered[start : start + group]
            assert len({(r["role"], r["prompt"]) for r in members}) == 1, (count, world, members)
        if count == 0:
            assert blocks == [([], 0)] * world


def test_solver_reward_skips_padding_rows():
    reward = SolverReward(lambda prompts, completions, **kw: [1.0] * len(prompts))
    assert reward(["a", "b"], ["x", "y"], role=[PAD_ROLE, None]) == [None, 1.0]


class ParityTask(VerifiableTask):
    def score(self, prompt, completion, **columns):
        ok = bool(completion) and ord(completion[0]) % 2 == 0
        return float(ok), "even" if ok else "odd"


def test_padding_rows_train_nothing_and_leave_the_normaliser_alone(tmp_path):
    """One judge group of 3 rows with steps_per_generation=2 needs 3 padding rows: they are generated but carry no
    loss token and no advantage, and `num_items_in_batch` counts only real loss tokens."""
    merged_batches, judged = [], []

    class OneGroupPairRL(PairRLTrainer):
        def _build_judge_rows(self, batch):
            return super()._build_judge_rows(batch)[: self.num_generations]

        def _generate_and_score_completions(self, inputs):
            out = super()._generate_and_score_completions(inputs)
            merged_batches.append(out)
            return out

    tok = byte_tokenizer()
    args = PairRLConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, report_to="none", save_strategy="no",
                        per_device_train_batch_size=3, num_generations=3, steps_per_generation=2,
                        max_completion_length=6, max_steps=2, learning_rate=1e-3, logging_steps=1, seed=0,
                        max_solution_tokens=4)
    task = ParityTask()
    trainer = OneGroupPairRL(model=tiny_llama(vocab=len(tok)), reward_funcs=task, args=args,
                             train_dataset=Dataset.from_dict({"prompt": [[{"role": "user", "content": f"task {i}"}]
                                                                         for i in range(6)]}),
                             processing_class=tok)
    verify = type(trainer.verification_reward).__call__

    def counting(self, prompts, completions, completion_ids=None, role=None, **kw):
        judged.extend(r for r in role or [] if r == VERIFY_ROLE)
        return verify(self, prompts, completions, completion_ids, role=role, **kw)

    type(trainer.verification_reward).__call__ = counting
    try:
        trainer.train()
    finally:
        type(trainer.verification_reward).__call__ = verify
    logs = [h for h in trainer.state.log_history if "verifier/judge_rows" in h]
    assert logs and all(h["verifier/judge_rows"] in (0.0, 3.0) for h in logs)
    assert all(math.isfinite(h["loss"]) for h in trainer.state.log_history if "loss" in h)
    with_judges = [b for b in merged_batches if b["advantages"].shape[0] == 12]  # 6 solver + 3 judge + 3 padding
    assert with_judges, "the judge phase never ran (no correct solution in the batch?)"
    assert len(judged) == 3 * len(with_judges)  # only the real judge rows were scored
    for batch in with_judges:
        mask = batch["completion_mask"]
        assert mask[9:].sum() == 0 and torch.all(batch["advantages"][9:] == 0)
        assert mask[6:9].sum() > 0
        assert int(batch["num_items_in_batch"]) == int(mask.sum())  # one process: the real loss tokens only
