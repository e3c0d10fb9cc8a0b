"""FSTTrainer (fast-slow training, arXiv 2605.12484): tiny random Llama, char-level tokenizer built offline."""

from __future__ import annotations

import json
import math
import os
import re

import pytest
import torch

pytest.importorskip("trl")
from datasets import Dataset

from hf_fastslow.evaluation.memory import storage_bytes
from hf_fastslow.trainers import (
    FSTConfig,
    FSTTrainer,
    FunctionReflector,
    OpenAIReflector,
    VerifiableTask,
    load_fast_context,
)
from hf_fastslow.trainers.reflection import FrozenReflector, PolicyReflector, build_reflection_prompt
from hf_fastslow.trainers.tasks import feedback_for_reward_funcs
from tests.chat_server import ScriptedChatServer
from tests.conftest import byte_tokenizer, tiny_llama

torch.set_num_threads(1)
SEED_CONTEXT = "You are a helper."
RULE = "RULE: be brief"


def dataset(n=8, with_na=False):
    rows = []
    for i in range(n):
        a, b = i + 1, 2 * i + 3
        answer = None if with_na and i % 2 else str(a + b)
        rows.append({"prompt": [{"role": "system", "content": SEED_CONTEXT}, {"role": "user", "content": f"{a}+{b}"}],
                     "answer": answer})
    return Dataset.from_list(rows)


def system_of(prompt):
    return prompt[0]["content"] if prompt and prompt[0]["role"] == "system" else ""


class HouseRuleTask(VerifiableTask):
    """Scores the *context* a rollout ran under: 1 iff the system turn carries RULE; the feedback names the rule.

    A random tiny model's text carries no signal, so this makes "feedback says what to change" deterministic while
    exercising the real rollout -> feedback -> reflection -> acceptance path.
    """

    def __init__(self, say_rule=True):
        self.say_rule, self.seen_systems = say_rule, []

    def score(self, prompt, completion, answer=None, **columns):
        if answer is None:
            return None, "not applicable: no reference answer"
        self.seen_systems.append(system_of(prompt))
        if RULE in system_of(prompt):
            return 1.0, "correct: the house rule was followed"
        return 0.0, (f"wrong: the system prompt must say '{RULE}'" if self.say_rule else "wrong")


def rule_reflector(calls):
    def propose(context, records):
        calls.append(records)
        wanted = [m.group(1) for r in records for m in [re.search(r"must say '([^']+)'", r["Feedback"])] if m]
        # With no actionable feedback, propose a cosmetic edit: the minibatch check must reject it.
        return f"{context} {wanted[0]}" if wanted else f"{context} Think carefully."

    return FunctionReflector(propose)


def module_tensors(module):
    """Parameters and buffers (the memory walk does not enter modules)."""
    return list(module.parameters()) + list(module.buffers())


def config(tmp_path, **kw):
    base = dict(
        output_dir=str(tmp_path), use_cpu=True, bf16=False, report_to="none", seed=0,
        per_device_train_batch_size=4, num_generations=2, max_completion_length=6, max_steps=2,
        learning_rate=1e-2, logging_steps=1, save_strategy="no", gradient_checkpointing=False,
        fast_every_steps=2, pareto_set_size=4, reflection_minibatch_size=2, candidates_per_round=1,
        max_proposals_per_round=2, reflection_max_new_tokens=8, dataloader_num_workers=0,
    )
    base.update(kw)
    return FSTConfig(**base)


def make_trainer(tmp_path, reward_funcs, reflector=None, ds=None, **kw):
    return FSTTrainer(model=tiny_llama(vocab=len(byte_tokenizer())), reward_funcs=reward_funcs,
                      args=config(tmp_path, **kw), train_dataset=ds if ds is not None else dataset(),
                      processing_class=byte_tokenizer(),
                      reflector=reflector)


def test_train_end_to_end_with_policy_reflector(tmp_path):
    seen = []

    def length_reward(prompts, completions, completion_ids, **kwargs):
        seen.append(kwargs)
        return [float(sum(ids) % 5) for ids in completion_ids]  # varies across a group

    # The trained policy reflects on its own rollouts only when asked to (the default is a frozen copy).
    trainer = make_trainer(tmp_path, [HouseRuleTask(), length_reward], max_steps=3, reflection_model="policy")
    assert isinstance(trainer.reflector, PolicyReflector) and trainer.reflector.model is None  # no copy of weights
    before = [p.detach().clone() for p in trainer.model.parameters()]
    trainer.train()
    assert trainer.reflector.model is trainer.model  # bound to the live (unwrapped) policy by the fast rounds
    assert trainer.state.global_step == 3
    assert trainer._fast_rounds_done == 2  # before step 1 and before step 3 (T = 2)
    assert trainer.fast_history and all("outcome" in e for e in trainer.fast_history)
    assert any(not torch.equal(a, b.detach()) for a, b in zip(before, trainer.model.parameters()))
    logged = {k for entry in trainer.state.log_history for k in entry}
    assert {"fast/pool_size", "fast/best_pareto_score", "reward", "fast/contexts_per_batch"} <= logged
    # Dataset columns and the context id reach plain reward functions (TRL's reward contract).
    assert all("answer" in kw and "fast_context_id" in kw for kw in seen)


def test_default_reflector_is_a_frozen_copy_of_the_initial_policy(tmp_path):
    def varied(prompts, completions, completion_ids, **kwargs):  # varies inside a group, so RL moves the weights
        return [float(sum(ids) % 5) for ids in completion_ids]

    trainer = make_trainer(tmp_path, [HouseRuleTask(), varied], max_steps=3, fast_every_steps=2)  # no reflector named
    reflector, policy = trainer.reflector, trainer.model
    assert isinstance(reflector, FrozenReflector) and reflector.model is not policy
    initial = {n: p.detach().clone() for n, p in policy.named_parameters()}
    frozen = dict(reflector.model.named_parameters())
    assert frozen.keys() == initial.keys() and all(torch.equal(frozen[n], initial[n]) for n in initial)
    assert not reflector.model.training and not any(p.requires_grad for p in frozen.values())
    # Memory: the copy shares no storage with the policy; it holds exactly one more set of the policy's weights.
    held = storage_bytes(module_tensors(reflector.model), exclude=module_tensors(policy))
    assert held == storage_bytes(module_tensors(policy)) > 0
    calls = []
    generate = reflector.model.generate
    reflector.model.generate = lambda *a, **k: calls.append(1) or generate(*a, **k)
    trainer.train()
    # Rounds ran before steps 1 and 3 and asked the frozen model; RL moved the policy but never the reflector, even
    # in the round after two updates (a copy refreshed per round, or the live policy, would have moved).
    asked = [e for e in trainer.fast_history if not e["outcome"].startswith("skipped")]
    assert trainer._fast_rounds_done == 2 and len(calls) == len(asked) > 0 and {e["step"] for e in asked} == {0, 2}
    assert any(not torch.equal(p.detach(), initial[n]) for n, p in trainer.model.named_parameters())
    assert all(torch.equal(p, initial[n]) for n, p in reflector.model.named_parameters())
    optimized = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert not optimized & {id(p) for p in reflector.model.parameters()}  # no optimizer state for the reflector


def test_named_and_object_reflectors_are_frozen_and_bad_values_fail_clearly(tmp_path):
    named_dir = tmp_path / "reflector"
    other = tiny_llama(vocab=len(byte_tokenizer()), seed=7)
    other.save_pretrained(named_dir)
    byte_tokenizer().save_pretrained(named_dir)
    trainer = make_trainer(tmp_path / "named", HouseRuleTask(), reflection_model=str(named_dir))
    assert isinstance(trainer.reflector, FrozenReflector)
    assert not any(p.requires_grad for p in trainer.reflector.model.parameters())
    want = dict(other.named_parameters())
    assert all(torch.equal(p, want[n]) for n, p in trainer.reflector.model.named_parameters())

    obj = tiny_llama(vocab=len(byte_tokenizer()), seed=3).train()
    trainer = make_trainer(tmp_path / "object", HouseRuleTask(), reflector=obj)
    assert trainer.reflector.model is obj and not obj.training and not any(p.requires_grad for p in obj.parameters())
    assert trainer.reflector.tokenizer is trainer.processing_class

    with pytest.raises(ValueError, match="reflection_model must be 'frozen', 'policy'"):
        config(tmp_path, reflection_model=" ")
    with pytest.raises(ValueError, match="not a loadable model.*'frozen'.*'policy'"):
        make_trainer(tmp_path / "typo", HouseRuleTask(), reflection_model=str(tmp_path / "no-such-model"))
    policy = tiny_llama(vocab=len(byte_tokenizer()))
    with pytest.raises(ValueError, match="reflector='policy'"):
        FSTTrainer(model=policy, reward_funcs=HouseRuleTask(), args=config(tmp_path / "self"), train_dataset=dataset(),
                   processing_class=byte_tokenizer(), reflector=policy)
    assert all(p.requires_grad for p in policy.parameters())  # refused before anything was frozen
    with pytest.raises(TypeError, match="Cannot build a reflector from 42"):
        make_trainer(tmp_path / "int", HouseRuleTask(), reflector=42)


def test_context_changes_when_feedback_says_so(tmp_path):
    task, calls = HouseRuleTask(say_rule=True), []
    trainer = make_trainer(tmp_path, task, reflector=rule_reflector(calls), max_steps=1)
    assert trainer.fast_context == SEED_CONTEXT
    trainer.train()
    assert calls and RULE in trainer.fast_context and trainer.fast_context != SEED_CONTEXT
    assert [e["outcome"] for e in trainer.fast_history] == ["accepted"]
    assert trainer.fast_scores[0] == [0.0] * 4 and trainer.fast_scores[1] == [1.0] * 4
    # The reflector saw the evaluator's feedback text, and the RL rollouts ran under the learned context.
    assert any("must say" in r["Feedback"] for r in calls[0])
    rl_systems = task.seen_systems[-trainer.args.per_device_train_batch_size:]
    assert all(RULE in s for s in rl_systems)


def test_context_stays_when_feedback_does_not_say_so(tmp_path):
    calls = []
    trainer = make_trainer(tmp_path, HouseRuleTask(say_rule=False), reflector=rule_reflector(calls), max_steps=1)
    trainer.train()
    assert len(calls) == 2  # both proposals were made and evaluated ...
    assert all(e["outcome"] == "rejected: not better on minibatch" for e in trainer.fast_history)
    assert trainer.fast_pool == [SEED_CONTEXT] and trainer.fast_context == SEED_CONTEXT  # ... and rejected

    class Solved(VerifiableTask):
        def score(self, prompt, completion, **columns):
            return 1.0, "correct"

    calls.clear()
    trainer = make_trainer(tmp_path, Solved(), reflector=rule_reflector(calls), max_steps=1)
    trainer.train()
    assert calls == [] and trainer.fast_context == SEED_CONTEXT  # nothing to fix: the reflector is not even asked
    assert {e["outcome"] for e in trainer.fast_history} == {"skipped: minibatch already solved"}


def test_checkpoint_save_resume_round_trip(tmp_path):
    out = tmp_path / "run"
    trainer = make_trainer(out, HouseRuleTask(), reflector=rule_reflector([]), max_steps=2, fast_every_steps=3,
                           save_strategy="steps", save_steps=2)
    trainer.train()
    learned = trainer.fast_context
    ckpt = out / "checkpoint-2"
    assert RULE in learned and load_fast_context(ckpt) == learned
    state = json.loads((ckpt / "fst_state.json").read_text())
    assert state["pool"] == trainer.fast_pool and state["rounds_done"] == 1

    task, calls = HouseRuleTask(), []
    resumed = make_trainer(out, task, reflector=rule_reflector(calls), max_steps=3, fast_every_steps=3,
                           save_strategy="no")
    assert resumed.fast_context == SEED_CONTEXT
    resumed.train(resume_from_checkpoint=str(ckpt))
    assert resumed.state.global_step == 3 and calls == []  # no new round was due: T = 3
    assert resumed.fast_context == learned and resumed.fast_pool == trainer.fast_pool
    # No round ran after the resume, so everything the fast weights carry is exactly the checkpoint's.
    assert resumed.fast_scores == state["scores"] and resumed.fast_history == state["history"]
    assert resumed._pareto_indices == state["pareto_indices"] and resumed.fast_rollouts == state["fast_rollouts"]
    assert resumed._fast_rounds_done == 1 and json.loads(json.dumps(resumed._fst_state()["rng_state"])) == \
        state["rng_state"]
    assert all(RULE in s for s in task.seen_systems[-4:])  # step 3 rolled out under the restored context

    final = tmp_path / "final"
    resumed.save_model(str(final))
    assert load_fast_context(final) == learned
    assert (final / "model.safetensors").is_file() and RULE in (final / "README.md").read_text()

    with pytest.raises(FileNotFoundError, match="fst_state.json"):
        os.remove(ckpt / "fst_state.json")
        make_trainer(out, HouseRuleTask(), max_steps=3).train(resume_from_checkpoint=str(ckpt))


def test_resume_continues_exactly_like_an_uninterrupted_run(tmp_path):
    # Rounds run before steps 1 and 3; the checkpoint at step 2 holds round 1 only, so the resumed run's round 2
    # draws its parent and minibatches from the restored RNG. Everything must then match the uninterrupted run.
    def run(out, **kw):
        return make_trainer(out, HouseRuleTask(), reflector=rule_reflector([]), max_steps=3, fast_every_steps=2,
                            **kw)

    full = run(tmp_path / "full", save_strategy="steps", save_steps=2)
    full.train()
    resumed = run(tmp_path / "resumed", save_strategy="no")
    resumed.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-2"))
    assert full._fast_rounds_done == resumed._fast_rounds_done == 2 and resumed.state.global_step == 3
    assert [e["step"] for e in resumed.fast_history].count(2) == 2  # round 2 ran after the resume (2 proposals)
    expected, got = full._fst_state(), resumed._fst_state()
    for key in ("global_step", "pool", "scores", "pareto_indices", "rounds_done", "fast_rollouts", "history",
                "rng_state", "fast_context"):
        assert got[key] == expected[key], key
    # The restored generator goes on drawing what the uninterrupted one draws.
    assert [resumed._fst_rng.random() for _ in range(5)] == [full._fst_rng.random() for _ in range(5)]


def test_ties_go_to_the_older_candidate(tmp_path):
    trainer = make_trainer(tmp_path, HouseRuleTask(), reflector=rule_reflector([]), max_pool_size=2)
    # c1 and c2 tie on the mean (and are each best on two items); c0 is dominated.
    trainer.fast_pool = ["c0", "c1", "c2"]
    trainer.fast_scores = [[0.0, 0.0, 0.0, 0.0], [1.0, 0.0, 1.0, 0.0], [0.0, 1.0, 0.0, 1.0]]
    assert trainer.fast_context == "c1"
    assert trainer.pareto_frontier() == {1: 2, 2: 2}
    assert trainer.rollout_contexts(4) == [1, 2, 1, 2]  # the older tied context fills each group's first slot
    trainer.fast_scores[2] = [1.0, 1.0, 1.0, 0.0]  # a strictly better newcomer does take over
    assert trainer.fast_context == "c2"
    # Pruning among equals (same frontier wins, same mean) drops the newest: an unproven edit never evicts its elder.
    trainer.fast_pool = ["c0", "c1", "c2"]
    trainer.fast_scores = [[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]]
    trainer._prune_pool()
    assert trainer.fast_pool == ["c0", "c1"] and trainer.fast_context == "c0"


def test_reward_contract_none_is_not_applicable(tmp_path):
    task, calls = HouseRuleTask(), []
    ds = dataset(8, with_na=True)
    user = [{"role": "user", "content": "p"}]
    assert task([user, user], ["x", "y"], answer=["3", None], trainer_state=None) == [0.0, None]
    mixed = feedback_for_reward_funcs([task, lambda prompts, completions, **kw: [None, 0.5]], [1.0, 2.0],
                                      [[{"role": "user", "content": "p"}]] * 2, ["x", "y"], answer=[None, None])
    assert mixed[0][0] is None and mixed[1][0] == 1.0 and "not applicable" in mixed[0][1]
    trainer = make_trainer(tmp_path, task, reflector=rule_reflector(calls), ds=ds, max_steps=2)
    trainer.train()
    # A step whose rows are all not applicable logs reward None (trl); otherwise N/A rows are left out of the mean:
    # every applicable rollout ran under the learned context and scored 1, so counting N/A rows as 0 would show < 1.
    rewards = [e["reward"] for e in trainer.state.log_history if "reward" in e]
    scored = [r for r in rewards if r is not None and not math.isnan(r)]
    assert scored and all(r == 1.0 for r in scored)
    # On the Pareto set, not-applicable rows score 0 for every candidate; applicable ones follow the context.
    na = [j for j, i in enumerate(trainer._pareto_indices) if ds[i]["answer"] is None]
    assert na and all(row[j] == 0.0 for row in trainer.fast_scores for j in na)
    assert RULE in trainer.fast_context
    best = trainer.fast_scores[trainer.fast_pool.index(trainer.fast_context)]
    assert all(best[j] == 1.0 for j in range(len(best)) if j not in na)


def test_openai_compatible_reflector_against_local_server():
    def respond(body):
        return 500 if body.get("model") == "broken" else "Sure:\n```\nAlways add units.\n```"

    with ScriptedChatServer(respond) as srv:
        url = srv.url
        records = [{"Inputs": "2+2", "Generated Outputs": "5", "Feedback": "expected 4 with units", "Score": 0.0}]
        new = OpenAIReflector(url, model="judge", api_key="k").propose("Be correct.", records)
        assert new == "Always add units."
        req = srv.requests[0]
        path, auth, body = req["path"], req["auth"], req["body"]
        assert path == "/v1/chat/completions" and auth == "Bearer k" and body["model"] == "judge"
        assert "expected 4 with units" in body["messages"][0]["content"]
        assert body["messages"][0]["content"] == build_reflection_prompt("Be correct.", records)
        with pytest.raises(RuntimeError, match="HTTP 500"):
            OpenAIReflector(url, model="broken").propose("Be correct.", records)


def test_bad_config_errors(tmp_path):
    with pytest.raises(ValueError, match="num_generations"):
        config(tmp_path, num_generations=1)
    with pytest.raises(ValueError, match="bf16"):
        FSTConfig(output_dir=str(tmp_path), bf16=True, report_to="none")
    with pytest.raises(ValueError, match="epsilon_high"):
        config(tmp_path, epsilon_high=0.5)
    with pytest.raises(ValueError, match="loss_type"):
        config(tmp_path, loss_type="ppo_clip")
    with pytest.raises(ValueError, match="prompt_sampling"):
        config(tmp_path, prompt_sampling="random")
    assert config(tmp_path).epsilon_high == 5.0 and config(tmp_path).loss_type == "cispo"
    with pytest.raises(ValueError, match="empty"):
        make_trainer(tmp_path, HouseRuleTask(), ds=Dataset.from_list([]))
    with pytest.raises(TypeError, match="reward models"):
        make_trainer(tmp_path, tiny_llama())
    with pytest.raises(TypeError, match="FSTConfig"):
        from trl import GRPOConfig

        FSTTrainer(model=tiny_llama(), reward_funcs=HouseRuleTask(), train_dataset=dataset(),
                   args=GRPOConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, report_to="none"))
