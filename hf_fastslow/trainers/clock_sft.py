"""Clock-based SFT data for speculative interaction agents (Hooper et al., arXiv 2605.13360, edge-model recipe):
teach a small model the streaming protocol by supervised fine-tuning on traces in which time is visible as clock
stamps (`<t=TICK>`, TICK = floor(seconds / tick_seconds); period and marker configurable) and the targets pause,
speculate safe calls, revise or drop them when a later chunk contradicts them, and commit unsafe calls only after the
final chunk.

Traces are not written by hand: `synthesize_episodes` runs the real runtime (`SpeculativeAgent`, and the sequential
ReAct baseline) on generated tasks under a virtual clock (`VirtualClockLoop`) with a scripted teacher as the model;
every model call becomes one `TimedEpisode` (the timed context it saw + the teacher's action), so training prompts
are exactly what the runtime renders at inference. `ClockTraceBuilder` turns an episode into chat messages and back
(the round trip recovers every stamped time to within one tick); `make_clock_sft_dataset` gives a `datasets.Dataset`
in trl's conversational prompt-completion format (loss on the action only, any chat template, no generation
markers needed), and `clock_sft_trainer` builds trl's `SFTTrainer` with a peft LoRA.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Sequence
from dataclasses import dataclass, field

from hf_fastslow.generation.agent_grammar import ClockFormat, PauseAction, TimedEvent, parse_timeline, parse_turn
from hf_fastslow.generation.agent_grammar import render_messages as _render

__all__ = ["ClockTraceBuilder", "TimedEpisode", "clock_sft_trainer", "make_clock_sft_dataset", "synthesize_episodes"]


@dataclass
class TimedEpisode:
    """A timed trace: `events` in time order (kinds of `agent_grammar.TimedEvent`); "action" events are the model's.
    A decision episode (what `synthesize_episodes` yields) ends with the one action to learn."""

    system: str | None
    events: list[TimedEvent] = field(default_factory=list)


class ClockTraceBuilder:
    """Renders timed episodes as chat messages with clock stamps, and parses them back."""

    def __init__(self, tokenizer=None, tick_seconds: float = 0.25, tick_marker: str = "<t={tick}>"):
        self.tokenizer = tokenizer
        self.clock = ClockFormat(tick_seconds, tick_marker)

    def build(self, episode: TimedEpisode) -> dict:
        """{"messages": [...]}: environment events as stamped user lines, actions as assistant messages."""
        return {"messages": _render(episode.system, episode.events, self.clock)}

    def parse(self, messages: list[dict[str, str]]) -> TimedEpisode:
        """Inverse of `build`: event times come back as the start of their tick (within one tick)."""
        system = next((m["content"] for m in messages if m["role"] == "system"), None)
        return TimedEpisode(system, parse_timeline(messages, self.clock))

    def prompt_completion(self, episode: TimedEpisode) -> dict:
        """trl's conversational prompt-completion row for a decision episode (the loss covers the action only)."""
        if not episode.events or episode.events[-1].kind != "action":
            raise ValueError("a decision episode ends with the action to learn")
        prompt = _render(episode.system, episode.events[:-1], self.clock)
        return {"prompt": prompt, "completion": [{"role": "assistant", "content": episode.events[-1].text}]}

    def count_tokens(self, row: dict) -> int:
        """Tokens of a prompt-completion row under the builder's tokenizer's chat template."""
        if self.tokenizer is None:
            raise ValueError("ClockTraceBuilder(tokenizer=...) is needed to count tokens")
        ids = self.tokenizer.apply_chat_template(row["prompt"] + row["completion"], tokenize=True)
        return len(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)


def synthesize_episodes(tasks, seed: int, builder: ClockTraceBuilder | None = None, *,
                        words_per_second: tuple[float, float] = (2.0, 4.0), words_per_chunk: int = 3,
                        seconds_per_token: float = 0.03,
                        agents: Sequence[str] = ("speculative", "react"), pause_keep: float = 0.25,
                        system_prompt: str | None = None) -> list[TimedEpisode]:
    """Decision episodes from running the runtime with the scripted teacher (`agent_tasks.teacher_policy`) on each
    task, for each agent kind, under a virtual clock: typing speed drawn per task from `words_per_second` (the
    request arrives in chunks of `words_per_chunk` words, as the agent will be fed at inference), tool
    latencies scaled by a factor in [0.5, 1.5]. Pauses dominate a word-by-word stream, so only a `pause_keep` share
    of the pause decisions is kept (seeded). Same inputs, same episodes."""
    from hf_fastslow.backends import ScriptedBackend
    from hf_fastslow.generation.agent_tasks import TASK_EXAMPLE, teacher_policy
    from hf_fastslow.generation.agent_tools import InlineStream, run_virtual
    from hf_fastslow.generation.speculative_agent import SequentialReActAgent, SpeculativeAgent, feed_words

    builder = builder or ClockTraceBuilder()
    kinds = {"speculative": SpeculativeAgent, "react": SequentialReActAgent}
    unknown = set(agents) - set(kinds)
    if unknown:
        raise ValueError(f"unknown agent kind(s) {sorted(unknown)}; choose from {sorted(kinds)}")
    rng = random.Random(seed)
    episodes: list[TimedEpisode] = []
    for task in tasks:
        rate = rng.uniform(*words_per_second)
        scale = rng.uniform(0.5, 1.5)
        task = dataclasses.replace(task, lookup_latency_s=task.lookup_latency_s * scale,
                                   send_latency_s=task.send_latency_s * scale)
        for kind in agents:
            backend = ScriptedBackend(teacher_policy(task, builder.clock))
            tools = task.tools()
            prompt = system_prompt
            if prompt is None:
                from hf_fastslow.generation.agent_grammar import grammar_prompt

                prompt = grammar_prompt([t.prompt_line() for t in tools], TASK_EXAMPLE)
            agent = kinds[kind](InlineStream(backend, seconds_per_token), tools, system_prompt=prompt,
                                tick_seconds=builder.clock.tick_seconds, clock_marker=builder.clock.marker)
            run_virtual(agent.run(feed_words(task.request, rate, words_per_chunk)))
            for call in backend.calls:
                target = backend.responder(call.messages, 0, {})
                if isinstance(parse_turn(target).action, PauseAction) and rng.random() >= pause_keep:
                    continue
                seen = builder.parse(call.messages)
                t = seen.events[-1].t if seen.events else 0.0
                episodes.append(TimedEpisode(seen.system, [*seen.events, TimedEvent(t, "action", target)]))
    return episodes


def make_clock_sft_dataset(episodes: Sequence[TimedEpisode], builder: ClockTraceBuilder | None = None,
                           format: str = "prompt_completion"):
    """A `datasets.Dataset` for trl's SFTTrainer: "prompt_completion" rows (default) or whole "messages" traces."""
    from datasets import Dataset

    builder = builder or ClockTraceBuilder()
    if format == "prompt_completion":
        rows = [builder.prompt_completion(e) for e in episodes]
    elif format == "messages":
        rows = [builder.build(e) for e in episodes]
    else:
        raise ValueError(f"format must be 'prompt_completion' or 'messages', got {format!r}")
    return Dataset.from_list(rows)


def clock_sft_trainer(model, tokenizer, train_dataset, *, output_dir: str, lora_r: int = 16, lora_alpha: int = 32,
                      target_modules: Sequence[str] | str = "all-linear", **sft_config):
    """trl `SFTTrainer` with a peft LoRA on `model` for a clock-SFT dataset; `sft_config` goes to `SFTConfig`
    (e.g. max_steps, learning_rate, per_device_train_batch_size, use_cpu=True, bf16=False, max_length)."""
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    # No truncation by default: trl cuts from the right, i.e. the action - the only supervised part - goes first.
    defaults = {"report_to": "none", "logging_steps": 10, "save_strategy": "no", "max_length": None}
    args = SFTConfig(output_dir=output_dir, **{**defaults, **sft_config})
    peft_config = LoraConfig(r=lora_r, lora_alpha=lora_alpha, target_modules=target_modules, task_type="CAUSAL_LM")
    return SFTTrainer(model=model, args=args, train_dataset=train_dataset, processing_class=tokenizer,
                      peft_config=peft_config)
