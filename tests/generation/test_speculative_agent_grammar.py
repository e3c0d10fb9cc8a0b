"""The agent grammar's one parser (streamed and whole, on well-formed turns and on garbage) and the clock stamps."""

import random

import pytest

from hf_fastslow.generation.agent_grammar import (
    AnswerAction,
    ClockFormat,
    PauseAction,
    RemoveAction,
    TimedEvent,
    ToolCallAction,
    TurnParser,
    format_action,
    parse_timeline,
    parse_turn,
    references,
    render_messages,
)

ACTIONS = [ToolCallAction(3, "lookup", {"entity": "Ada Holm", "relation": "employer"}),
           ToolCallAction(12, "send", {"to": "Bob", "text": "$3 and $11", "meta": {"cc": ["$2"]}}),
           RemoveAction(7), PauseAction(), AnswerAction("Carrow")]


@pytest.mark.parametrize("action", ACTIONS, ids=lambda a: type(a).__name__)
def test_canonical_actions_round_trip_with_and_without_reasoning(action):
    for prefix in ("", "<think>first the employer, then the city</think>\n"):
        turn = parse_turn(prefix + format_action(action))
        assert turn.valid and turn.action == action
        assert turn.think == prefix[7:-9].strip()


def test_references_are_the_dependencies():
    assert ACTIONS[1].deps == {3, 11, 2}
    assert references({"a": ["x", {"b": "$4$5"}], "n": 3}) == {4, 5}
    assert ACTIONS[0].deps == frozenset()


@pytest.mark.parametrize("seed", range(5))
def test_streaming_reports_the_action_exactly_when_its_closing_tag_arrives(seed):
    rng = random.Random(seed)
    for action in ACTIONS:
        text = "<think>hmm < not a tag</think> " + format_action(action) + " <pause>"
        cuts = sorted(rng.sample(range(1, len(text)), 6))
        pieces = [text[i:j] for i, j in zip([0, *cuts], [*cuts, len(text)])]
        parser, seen, end = TurnParser(), [], len("<think>hmm < not a tag</think> " + format_action(action))
        pos = 0
        for piece in pieces:
            pos += len(piece)
            got = parser.feed(piece)
            if got is not None:
                seen.append((got, pos))
        turn = parser.finish()
        assert len(seen) == 1 and seen[0][0] == action
        first_cover = next(p for p in [sum(map(len, pieces[:k + 1])) for k in range(len(pieces))] if p >= end)
        assert seen[0][1] == first_cover  # with the piece that closes it, not a piece later
        if not isinstance(action, PauseAction):
            assert [e.message for e in turn.errors] == ["a second action in one turn (ignored)"]
        assert parse_turn(text).action == turn.action and parse_turn(text).errors == turn.errors


@pytest.mark.parametrize("text, action, message", [
    ("<tool_call id=x>REMOVE</tool_call>", None, "'x' is not an integer"),
    ("<tool_call id=1.5>REMOVE</tool_call>", None, "'1.5' is not an integer"),
    ("<tool_call id=0>REMOVE</tool_call>", None, "ids start at 1"),
    ("<tool_call>REMOVE</tool_call>", None, "needs an id"),
    ('<tool_call id=2>{"name": "a", "arguments": [1]}</tool_call>', None, "arguments must be a JSON object"),
    ("<tool_call id=2>{name: a}</tool_call>", None, "not JSON"),
    ("<tool_call id=2>[]</tool_call>", None, "body must be"),
    ("<think>no end <pause>", None, "unclosed <think"),
    ("<answer>Paris", None, "unclosed <answer"),
    ("<tool_call id=2>REMOVE", None, "unclosed <tool_call id=2"),
    ("Paris <answer>Paris</answer>", AnswerAction("Paris"), "text outside"),
    ("<pause><answer>x</answer>", PauseAction(), "second action"),
    ("<foo>bar</foo><pause>", PauseAction(), "text outside"),
    ("</think><pause>", PauseAction(), "text outside"),
    ('<tool_call id="4">REMOVE</tool_call>', RemoveAction(4), None),
    ("<pause/>", PauseAction(), None),
    ("", None, None),
])
def test_malformed_turns_are_protocol_errors_never_exceptions(text, action, message):
    turn = parse_turn(text)
    assert turn.action == action
    if message is None:
        assert not turn.errors
    else:
        assert any(message in e.message for e in turn.errors), turn.errors
        assert not turn.valid
    assert turn.valid == (action is not None and message is None)


def test_random_garbage_never_crashes_and_is_never_valid_by_accident():
    rng = random.Random(0)
    alphabet = ["<", ">", "/", "think", "tool_call", " id=", "1", "x", "pause", "answer", "REMOVE", "{", "}", '"name"',
                ":", " ", "\n", "$1", "</tool_call>", "<tool_call id=1>", "<answer>", "</answer>", "<pause>"]
    valid = 0
    for _ in range(3000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 25)))
        parser = TurnParser()
        for i in range(0, len(text), 3):
            parser.feed(text[i:i + 3])
        turn = parser.finish()
        assert turn.valid == (turn.action is not None and not turn.errors)
        if turn.valid:  # a valid turn re-parses to the same action from its canonical form
            valid += 1
            assert parse_turn(format_action(turn.action)).action == turn.action
    assert valid > 10


def test_clock_ticks_floor_the_elapsed_time_and_read_back_within_one_tick():
    clock = ClockFormat(0.25)
    assert [clock.tick(t) for t in (0.0, 0.2499, 0.25, 0.75, 1.3, 10.0)] == [0, 0, 1, 3, 5, 40]
    assert clock.stamp(1.3) == "<t=5>" and clock.read("<t=5> user: hi") == (1.25, "user: hi")
    assert clock.read("user: hi") == (None, "user: hi")
    custom = ClockFormat(0.5, "[{tick} ticks]")
    assert custom.stamp(2.2) == "[4 ticks]" and custom.read("[4 ticks] result 1: x") == (2.0, "result 1: x")
    with pytest.raises(ValueError, match="tick_seconds"):
        ClockFormat(0)
    with pytest.raises(ValueError, match="marker"):
        ClockFormat(1.0, "<t>")


def test_render_then_parse_recovers_the_timeline():
    clock = ClockFormat(0.3)
    events = [TimedEvent(0.0, "user", "find Ada"), TimedEvent(0.41, "user", "Holm's"),
              TimedEvent(0.41, "action", format_action(ACTIONS[0]), 3), TimedEvent(1.77, "result", "Kelvar", 3),
              TimedEvent(1.9, "cancelled", call_id=4), TimedEvent(2.2, "error", "unknown tool 'x'"),
              TimedEvent(2.5, "user_final", "thanks"), TimedEvent(2.5, "action", "<pause>")]
    messages = render_messages("sys", events, clock)
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user", "assistant"]
    assert messages[3]["content"].splitlines() == ["<t=5> result 3: Kelvar", "<t=6> cancelled 4",
                                                   "<t=7> error: unknown tool 'x'", "<t=8> user (done): thanks"]
    back = parse_timeline(messages, clock)
    assert [(e.kind, e.text, e.call_id) for e in back] == [(e.kind, e.text, e.call_id) for e in events]
    for got, want in zip(back, events):
        assert 0 <= want.t - got.t < clock.tick_seconds
    assert render_messages("sys", back, clock) == messages


def test_stop_at_action_judges_a_turn_up_to_its_action():
    text = "<think>ok</think><pause> trailing <junk"
    assert not parse_turn(text).valid
    turn = parse_turn(text, stop_at_action=True)
    assert turn.valid and turn.action == PauseAction() and turn.think == "ok"
    parser = TurnParser(stop_at_action=True)
    assert parser.feed("<pause><answer>x</answer>") == PauseAction()
    assert parser.finish().valid
    assert not parse_turn("junk <pause>", stop_at_action=True).valid  # what comes before still counts
