"""Speculative interaction agent vs sequential ReAct, in real time.

1. A protocol-following policy (the scripted teacher of the multi-hop fact task) while the user types at 8 words/s:
   the speculative agent looks things up while the user is still typing and sends the (unsafe) message only after
   the final chunk; ReAct starts when the user is done.
2. The same runtime on SmolLM2-135M-Instruct (HFLocalBackend): what an untrained 135M model emits under the grammar
   (the reason for clock SFT: see benchmarks/speculative_agent.py).
"""

import asyncio

import torch

from hf_fastslow import load_default_model
from hf_fastslow.backends import ScriptedBackend
from hf_fastslow.backends.hf_local import HFLocalBackend
from hf_fastslow.generation.agent_grammar import grammar_prompt, parse_turn
from hf_fastslow.generation.agent_tasks import TASK_EXAMPLE, make_fact_tasks, teacher_policy
from hf_fastslow.generation.speculative_agent import (
    SequentialReActAgent,
    SpeculativeAgent,
    feed_words,
    unsafe_violations,
)


async def episode(agent_cls, backend, task, words_per_second, **kw):
    tools = task.tools()
    system = grammar_prompt([t.prompt_line() for t in tools], TASK_EXAMPLE)
    agent = agent_cls(backend, tools, system_prompt=system, **kw)
    return await agent.run(feed_words(task.request, words_per_second))


def main():
    torch.set_num_threads(2)
    task = make_fact_tasks(1, seed=4, correction_rate=1.0, lookup_latency_s=0.4, send_latency_s=0.25)[0]
    print(f"user types: {task.request!r}\ngold: {task.answer}, message to {task.recipient}\n")
    for cls in (SpeculativeAgent, SequentialReActAgent):
        backend = ScriptedBackend(teacher_policy(task), token_delay_s=0.01)
        result = asyncio.run(episode(cls, backend, task, 8.0))
        print(f"{cls.__name__} (teacher policy): answer {result.answer!r}, correct {task.correct(result.answer)}, "
              f"latency after the final chunk {result.metrics.latency_after_final_s:.2f} s, "
              f"{result.metrics.tools_started} tool runs ({result.metrics.wasted_calls} wasted), "
              f"unsafe calls before commit: {len(unsafe_violations(result.events))}")
        for name, args, value in result.tool_log:
            print(f"    {name}{args} -> {value}")

    model, tok = load_default_model()
    backend = HFLocalBackend(model, tok, temperature=0)
    result = asyncio.run(episode(SpeculativeAgent, backend, task, 8.0, max_turns=1, max_new_tokens=32))
    turns = [e.text for e in result.events if e.kind == "turn"]
    valid = sum(parse_turn(t).valid for t in turns)
    print(f"\nSmolLM2-135M-Instruct, untrained: {len(turns)} turns, {valid} valid under the grammar; first turn: "
          f"{turns[0][:120]!r}")


if __name__ == "__main__":
    main()
