"""Clock-SFT data: stamps floor the elapsed time, the build/parse round trip, determinism of the synthesized episodes,
targets that follow the protocol (speculation before the final chunk, revisions on a correction), and trl's
SFTTrainer training a LoRA on the rows with the loss on the action only."""

import pytest
import torch

from hf_fastslow.generation.agent_grammar import ClockFormat, TimedEvent, ToolCallAction, parse_turn
from hf_fastslow.generation.agent_tasks import make_fact_tasks
from hf_fastslow.trainers.clock_sft import (
    ClockTraceBuilder,
    TimedEpisode,
    clock_sft_trainer,
    make_clock_sft_dataset,
    synthesize_episodes,
)
from tests.conftest import byte_tokenizer, tiny_llama


def test_stamps_count_floor_of_elapsed_over_tick_and_round_trip_within_one_tick():
    builder = ClockTraceBuilder(tick_seconds=0.4, tick_marker="[{tick}]")
    times = [0.0, 0.39, 0.41, 1.2, 3.99, 4.0]
    events = [TimedEvent(t, "user", f"w{i}") for i, t in enumerate(times)] + [TimedEvent(4.0, "action", "<pause>")]
    messages = builder.build(TimedEpisode("sys", events))["messages"]
    stamps = [line.split("]")[0] + "]" for line in messages[1]["content"].splitlines()]
    assert stamps == ["[0]", "[0]", "[1]", "[3]", "[9]", "[10]"]  # 1.2 s is 3 ticks despite 1.2 / 0.4 < 3 in floats
    back = builder.parse(messages)
    assert back.system == "sys" and [e.text for e in back.events] == [e.text for e in events]
    assert all(-1e-9 <= want.t - got.t < 0.4 for got, want in zip(back.events, events))
    assert builder.build(back)["messages"] == messages


@pytest.fixture(scope="module")
def episodes():
    return synthesize_episodes(make_fact_tasks(6, seed=5, correction_rate=0.5), seed=9)


def test_synthesized_episodes_are_deterministic(episodes):
    again = synthesize_episodes(make_fact_tasks(6, seed=5, correction_rate=0.5), seed=9)
    builder = ClockTraceBuilder()
    assert [builder.build(e) for e in again] == [builder.build(e) for e in episodes]
    other = synthesize_episodes(make_fact_tasks(6, seed=5, correction_rate=0.5), seed=10)
    assert [builder.build(e) for e in other] != [builder.build(e) for e in episodes]  # the seed draws the timing


def test_synthesized_targets_follow_the_protocol(episodes):
    builder = ClockTraceBuilder()
    speculated = revised = committed_after_final = 0
    for episode in episodes:
        row = builder.prompt_completion(episode)
        assert row["prompt"][0]["role"] == "system" and row["prompt"][-1]["role"] == "user"
        turn = parse_turn(row["completion"][0]["content"])
        assert turn.valid
        context = [e for e in episode.events[:-1]]
        final = any(e.kind == "user_final" for e in context)
        if isinstance(turn.action, ToolCallAction):
            issued = {e.call_id for e in context if e.kind == "action"}
            speculated += not final
            revised += turn.action.call_id in issued
            if turn.action.name == "send_message":
                # the teacher queues the message as soon as the recipient is named; the runtime holds it
                committed_after_final += final
        # the clock in every prompt never runs backwards
        times = [e.t for e in context]
        assert times == sorted(times)
    assert speculated > 5 and revised >= 1 and committed_after_final >= 0


def test_dataset_formats_and_bad_inputs(episodes):
    ds = make_clock_sft_dataset(episodes[:5])
    assert ds.column_names == ["prompt", "completion"] and len(ds) == 5
    assert make_clock_sft_dataset(episodes[:2], format="messages").column_names == ["messages"]
    with pytest.raises(ValueError, match="format must be"):
        make_clock_sft_dataset(episodes[:2], format="text")
    with pytest.raises(ValueError, match="ends with the action"):
        ClockTraceBuilder().prompt_completion(TimedEpisode("s", [TimedEvent(0.0, "user", "hi")]))
    with pytest.raises(ValueError, match="unknown agent kind"):
        synthesize_episodes(make_fact_tasks(1, seed=0), seed=0, agents=("eager",))


def test_sft_trainer_learns_the_actions_only(episodes, tmp_path):
    tok = byte_tokenizer()
    model = tiny_llama(vocab=259, hidden=32, num_layers=2)
    rows = make_clock_sft_dataset(episodes[:4])
    trainer = clock_sft_trainer(model, tok, rows, output_dir=str(tmp_path), max_steps=2, learning_rate=1e-2,
                                per_device_train_batch_size=2, use_cpu=True, bf16=False, lora_r=4, lora_alpha=8)
    first = trainer.train_dataset[0]
    completion = rows[0]["completion"][0]["content"]
    supervised = sum(label != -100 for label in first["labels"])
    assert len(completion.encode()) <= supervised <= len(completion.encode()) + 3  # the action (+ end of turn)...
    assert len(first["input_ids"]) > 3 * supervised  # ...and not the long timed prompt
    lora = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if "lora_B" in n}
    trainer.train()
    assert lora and any(not torch.equal(p, lora[n]) for n, p in trainer.model.named_parameters() if n in lora)
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in trainer.state.log_history if "loss" in h)


def test_clock_format_is_shared_with_the_runtime():
    builder = ClockTraceBuilder(tick_seconds=0.5, tick_marker="<clock {tick}>")
    assert builder.clock == ClockFormat(0.5, "<clock {tick}>")
    eps = synthesize_episodes(make_fact_tasks(1, seed=0), seed=0, builder=builder, agents=("speculative",))
    text = builder.build(eps[0])["messages"][1]["content"]
    assert text.startswith("<clock 0> user: Hey,")
