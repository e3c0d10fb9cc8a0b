"""ReplicaRouter: policies, failover, backoff, removal and re-admission on scripted replicas (a ManualClock, so no
test sleeps), a replica that refuses connections (an EndpointBackend on a closed local port), then two real
`transformers serve` processes with one killed by its pid mid-run."""

import asyncio
import os
import signal
import socket
import threading
import time

import pytest

from hf_fastslow.backends import (
    BackendError,
    BackendFeatureError,
    BackendUnreachableError,
    Capabilities,
    ManualClock,
    ScriptedBackend,
    StreamChunk,
)
from hf_fastslow.backends.endpoint import EndpointBackend
from hf_fastslow.backends.router import ReplicaRouter, ReplicasUnavailableError, is_transport_failure
from tests.chat_server import ScriptedChatServer

BARE = Capabilities(native_n=False, logprobs=False, max_top_logprobs=0, streaming=True,
                    continue_final_message=False, prompt_scoring=False, seed=True)


def ask(i):
    return [{"role": "user", "content": f"question {i}"}]


def echo(name):
    """A replica answering '<name>: <the question>' (so a reply tells who answered what)."""
    return ScriptedBackend(lambda m, i, kw: f"{name}: {m[-1]['content']}", name=name)


def refusing(name, clock=None):
    def respond(m, i, kw):
        raise BackendUnreachableError(f"{name} is unreachable: connection refused")

    return ScriptedBackend(respond, name=name, clock=clock)


def answered_by(backend):
    return [c.messages[-1]["content"] for c in backend.calls]


def closed_port_url():
    with socket.socket() as s:  # bound then closed: nobody listens there
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}/v1"


# ----- policies ----------------------------------------------------------------------------------------------------
def test_round_robin_spreads_in_order_and_keeps_rows_in_place():
    a, b, c = echo("a"), echo("b"), echo("c")
    router = ReplicaRouter([a, b, c], max_concurrency=1, max_new_tokens=5)
    out = router.chat_batch([ask(i) for i in range(6)])
    assert [row[0].text for row in out] == [f"{'abc'[i % 3]}: question {i}" for i in range(6)]
    assert answered_by(a) == ["question 0", "question 3"] and answered_by(c) == ["question 2", "question 5"]
    assert [s.requests for s in router.report()] == [2, 2, 2]
    (record,) = router.ledger.records
    assert (record.kind, record.requests, record.samples) == ("chat", 6, 6)
    assert record.completion_tokens == sum(r.completion_tokens for b in (a, b, c) for r in b.ledger.records)
    assert router.stats.answered == 6 and router.stats.retries == router.stats.failovers == 0
    # n samples of one conversation stay together on one replica
    (samples,) = router.chat_batch([ask(9)], n=3, seed=0)
    assert len(samples) == 3 and len({c.text.split(":")[0] for c in samples}) == 1


def test_chat_batch_runs_conversations_on_replicas_concurrently():
    both_in_flight = threading.Barrier(2, timeout=20)  # breaks unless two replicas answer at the same time

    def meet(name):
        def respond(m, i, kw):
            both_in_flight.wait()
            return name

        return ScriptedBackend(respond, name=name)

    router = ReplicaRouter([meet("a"), meet("b")], max_concurrency=2)
    out = router.chat_batch([ask(0), ask(1), ask(2), ask(3)])
    assert sorted(row[0].text for row in out) == ["a", "a", "b", "b"]


def test_least_loaded_avoids_the_busy_replica_round_robin_does_not():
    for policy, expected_b in (("least_loaded", 3), ("round_robin", 2)):
        a, b = echo("a"), echo("b")
        router = ReplicaRouter([a, b], policy=policy)
        held = router.stream(ask("held"))  # an open stream keeps a request in flight on replica a
        next(held)
        assert [s.in_flight for s in router.report()] == [1, 0]
        for i in range(3):
            router.chat(ask(i))
        assert len(answered_by(b)) == expected_b, policy
        held.close()
        assert [s.in_flight for s in router.report()] == [0, 0]


# ----- failover, removal, backoff ----------------------------------------------------------------------------------
def test_a_failing_replica_is_taken_out_with_its_reason_and_nothing_is_lost(caplog):
    clock = ManualClock()
    alive, dead = echo("alive"), refusing("dead")
    router = ReplicaRouter([dead, alive], clock=clock, max_concurrency=1, remove_after=2)
    with caplog.at_level("WARNING", logger="hf_fastslow.backends.router"):
        out = router.chat_batch([ask(i) for i in range(6)])
    assert [row[0].text for row in out] == [f"alive: question {i}" for i in range(6)]
    dead_status, alive_status = router.report()
    assert dead_status.removed and dead_status.failures == 2 and dead_status.answered == 0
    assert "2 consecutive failures" in dead_status.reason and "connection refused" in dead_status.reason
    assert alive_status.answered == 6 and not alive_status.removed
    assert router.healthy() == ["alive"]
    assert router.stats.failovers == 2 and router.stats.retries == 2 and router.stats.backoffs == 0
    assert router.ledger.records[-1].requests == 8  # 6 answers + 2 refused attempts
    assert [e[1:3] for e in router.events] == [("dead", "removed")]
    assert "dead taken out of rotation" in caplog.text
    assert clock.time() == 0.0  # failing over to another replica does not wait


def test_retries_back_off_exponentially_when_every_replica_failed():
    clock = ManualClock()
    failures_left = [4]
    lock = threading.Lock()

    def flaky(name):
        def respond(m, i, kw):
            with lock:
                if failures_left[0] > 0:
                    failures_left[0] -= 1
                    raise BackendError(f"{name} returned HTTP 503: overloaded")
            return f"{name} ok"

        return ScriptedBackend(respond, name=name, clock=clock)

    router = ReplicaRouter([flaky("a"), flaky("b")], clock=clock, remove_after=10, backoff_s=0.5, backoff_factor=2.0)
    (reply,) = router.chat(ask(0))
    # a, b fail -> wait 0.5 -> a, b fail -> wait 1.0 -> a answers
    assert reply.text == "a ok" and clock.time() == pytest.approx(1.5)
    assert (router.stats.backoffs, router.stats.retries, router.stats.attempts) == (2, 4, 5)
    assert router.stats.failovers == 0  # answered by the replica first picked, after retries

    capped = ReplicaRouter([refusing("x", clock)], clock=clock, remove_after=99, max_attempts=4, backoff_s=1.0,
                           backoff_factor=10.0, max_backoff_s=5.0)
    start = clock.time()
    with pytest.raises(ReplicasUnavailableError, match="gave up after 4 attempts") as info:
        capped.chat(ask(0))
    assert clock.time() - start == pytest.approx(1.0 + 5.0 + 5.0)
    assert info.value.results == [None] and len(info.value.failures[0]) == 4


def test_errors_that_are_the_callers_are_raised_unchanged_and_not_retried():
    def bad_request(m, i, kw):
        raise BackendError("server returned HTTP 400: unknown field")

    a, b = ScriptedBackend(bad_request, name="a"), echo("b")
    router = ReplicaRouter([a, b])
    with pytest.raises(BackendError, match="HTTP 400") as info:
        router.chat(ask(0))
    assert not isinstance(info.value, ReplicasUnavailableError)
    assert answered_by(b) == [] and router.report()[0].failures == 0 and not router.report()[0].removed
    assert router.stats.failed == 1
    with pytest.raises(TypeError):
        ReplicaRouter([ScriptedBackend(lambda m, i, kw: 3)]).chat(ask(0))
    assert is_transport_failure(BackendError("x returned HTTP 502: bad gateway"))
    assert is_transport_failure(ConnectionResetError()) and not is_transport_failure(ValueError("HTTP 500"))
    assert not is_transport_failure(BackendFeatureError("x returned HTTP 500"))


def test_rows_no_replica_can_answer_are_reported_with_every_reason_and_the_rest_returned():
    def picky(m, i, kw):  # answers everything but question 3
        if m[-1]["content"] == "question 3":
            raise BackendError("b returned HTTP 503: cannot")
        return "b: " + m[-1]["content"]

    router = ReplicaRouter([refusing("a"), ScriptedBackend(picky, name="b")], clock=ManualClock(), remove_after=10,
                           max_attempts=4, max_concurrency=1)
    with pytest.raises(ReplicasUnavailableError, match=r"1 of 5 conversations could not be answered") as info:
        router.chat_batch([ask(i) for i in range(5)])
    err = info.value
    assert [None if row is None else row[0].text for row in err.results] == [
        "b: question 0", "b: question 1", "b: question 2", None, "b: question 4"]
    assert [name for name, _ in err.failures[3]] == ["a", "b", "a", "b"]
    assert "connection refused" in err.failures[3][0][1] and "HTTP 503" in err.failures[3][1][1]
    assert {s.name for s in err.replicas} == {"a", "b"}
    assert router.stats.failed == 1 and router.stats.answered == 4


def test_all_replicas_down_raises_at_once_naming_every_replica():
    clock = ManualClock()
    router = ReplicaRouter([refusing("a"), refusing("b")], clock=clock, remove_after=1)
    with pytest.raises(ReplicasUnavailableError, match="no replica left to try") as info:
        router.chat(ask(0))
    message = str(info.value)
    assert "a: out of rotation" in message and "b: out of rotation" in message and "connection refused" in message
    assert router.healthy() == [] and clock.time() == 0.0
    with pytest.raises(ReplicasUnavailableError, match="no attempt made"):
        router.chat(ask(1))
    with pytest.raises(ReplicasUnavailableError, match="capabilities"):
        router.capabilities  # noqa: B018


def test_cooldown_gives_a_removed_replica_one_trial_request():
    clock = ManualClock()
    healed = [False]

    def sometimes(m, i, kw):
        if not healed[0]:
            raise BackendUnreachableError("a is unreachable: connection refused")
        return "a back"

    a, b = ScriptedBackend(sometimes, name="a"), echo("b")
    router = ReplicaRouter([a, b], clock=clock, remove_after=1, cooldown_s=10.0)
    router.chat(ask(0))  # a fails, b answers
    assert router.report()[0].removed
    clock.advance(5.0)
    router.chat(ask(1)), router.chat(ask(2))
    assert len(a.calls) == 1  # still cooling down
    clock.advance(5.0)
    assert router.chat(ask(3))[0].text == "b: question 3"  # the trial fails: removed again, b answers
    assert "failed its trial request" in router.report()[0].reason and len(a.calls) == 2
    healed[0] = True
    clock.advance(10.0)
    assert router.chat(ask(4))[0].text == "a back"
    status = router.report()[0]
    assert not status.removed and status.readmitted == 1
    assert [e[1:3] for e in router.events] == [("a", "removed"), ("a", "removed"), ("a", "readmitted")]


# ----- streams, score, async, capabilities --------------------------------------------------------------------------
class BreaksMidStream(ScriptedBackend):
    """Streams its first chunk, then loses the connection."""

    def _stream_batch(self, conversations, opts, chunk_tokens, meter):
        yield StreamChunk(0, "partial ", None, False)
        raise BackendUnreachableError("lost the connection")


def test_streams_fail_over_only_before_the_first_chunk():
    b = echo("b")
    router = ReplicaRouter([refusing("a"), b], clock=ManualClock())
    assert "".join(router.stream(ask(0), max_new_tokens=8)) == "b: question 0"
    record = router.ledger.records[-1]
    assert (record.kind, record.requests, record.samples, record.completion_tokens) == ("stream", 2, 1, 3)
    assert record.completion_tokens == b.ledger.records[-1].completion_tokens

    c = echo("c")
    router = ReplicaRouter([BreaksMidStream("never used", name="m"), c], clock=ManualClock())
    seen = []
    with pytest.raises(BackendUnreachableError, match="after the stream had started") as info:
        for delta in router.stream(ask(1)):
            seen.append(delta)
    assert seen == ["partial "] and c.calls == [] and not isinstance(info.value, ReplicasUnavailableError)
    assert router.report()[0].failures == 1 and router.stats.failed == 1


def test_score_async_and_shared_capabilities():
    def scorer(m, cont):
        return [-1.0] * len(cont.split())

    no_logprobs = Capabilities(native_n=True, logprobs=False, max_top_logprobs=0, streaming=True,
                               continue_final_message=True, prompt_scoring=True, seed=True)
    a = ScriptedBackend(lambda m, i, kw: "a", name="a", scorer=scorer, capabilities=no_logprobs)
    b = ScriptedBackend(lambda m, i, kw: "b", name="b", scorer=scorer)
    router = ReplicaRouter([refusing("dead"), a, b], clock=ManualClock(), remove_after=1)
    assert not router.capabilities.prompt_scoring  # the dead replica (no scorer) is still in rotation
    router.chat(ask(0))  # ... until it fails
    caps = router.capabilities
    assert not caps.logprobs and caps.prompt_scoring and caps.streaming
    with pytest.raises(BackendFeatureError, match=r"ReplicaRouter.*log-probs"):
        router.chat(ask(0), logprobs=True)
    assert router.score(ask(0), "two words") == [-1.0, -1.0]
    assert router.ledger.records[-1].kind == "score"
    out = asyncio.run(router.achat_batch([ask(1), ask(2)]))
    assert all(row[0].text in ("a", "b") for row in out)


def test_configuration_errors_are_clear():
    with pytest.raises(ValueError, match="non-empty list"):
        ReplicaRouter([])
    with pytest.raises(ValueError, match="policy"):
        ReplicaRouter([echo("a")], policy="random")
    with pytest.raises(ValueError, match="pass model="):
        ReplicaRouter(["http://127.0.0.1:1/v1"])
    with pytest.raises(TypeError, match="replica_kwargs"):
        ReplicaRouter([echo("a")], do_sample=True)
    x = EndpointBackend("http://127.0.0.1:1/v1", "model-x", capabilities=BARE)
    y = EndpointBackend("http://127.0.0.1:2/v1", "model-y", capabilities=BARE)
    with pytest.raises(ValueError, match=r"different models \['model-x', 'model-y'\].*allow_mixed_models"):
        ReplicaRouter([x, y])
    with pytest.raises(ValueError, match="model='model-z'"):
        ReplicaRouter([x], model="model-z")
    assert ReplicaRouter([x, y], allow_mixed_models=True).model is None
    assert ReplicaRouter([x, echo("a")]).model == "model-x"
    with pytest.raises(ValueError, match="already a Backend"):
        ReplicaRouter([echo("a")], replica_kwargs={"timeout": 5})
    from hf_fastslow.backends.serve import LocalServer

    with pytest.raises(ValueError, match="not running"):
        ReplicaRouter([LocalServer("some/model")])
    twins = ReplicaRouter([echo("same"), echo("same")])
    assert [s.name for s in twins.report()] == ["same#0", "same#1"]


# ----- real sockets ----------------------------------------------------------------------------------------------
def test_a_replica_that_refuses_connections_is_failed_over_and_removed():
    dead_url = closed_port_url()
    calls = []

    def respond(body):
        calls.append(body)
        return 503 if len(calls) == 1 else f"answer {len(calls)}"

    with ScriptedChatServer(respond) as live:
        router = ReplicaRouter([dead_url, live.url], model="m", clock=ManualClock(), max_concurrency=1,
                               replica_kwargs=dict(capabilities=BARE, server="openai", timeout=5))
        out = router.chat_batch([ask(i) for i in range(4)], max_new_tokens=4)
    assert all(row[0].text.startswith("answer") for row in out)
    dead, alive = router.report()
    assert dead.removed and dead_url in dead.reason and "unreachable" in dead.reason
    # the stub's one HTTP 503 counted as a failure, then its answers reset the streak: it stays in rotation
    assert alive.failures == 1 and alive.consecutive_failures == 0 and not alive.removed
    assert alive.answered == 4 and calls[-1]["max_tokens"] == 4


# ----- the real server ---------------------------------------------------------------------------------------------
@pytest.mark.serve
def test_two_served_replicas_one_killed_mid_run_every_request_answered(served_model):
    # the session's server survives; a second LocalServer of the same model is the one killed by its pid
    from hf_fastslow.backends.serve import LocalServer

    victim = LocalServer(served_model.model_path, threads=1).start()
    try:
        router = ReplicaRouter([victim, served_model], max_concurrency=2, backoff_s=0.2, max_new_tokens=4,
                               temperature=0)
        result: dict = {}

        def run():
            try:
                result["out"] = router.chat_batch([ask(i) for i in range(16)])
            except Exception as err:  # noqa: BLE001 - checked below
                result["error"] = err

        worker = threading.Thread(target=run)
        worker.start()
        deadline = time.monotonic() + 300
        while router.report()[0].answered < 2 and worker.is_alive() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert worker.is_alive(), "the run ended before the kill: nothing was tested"
        os.kill(victim.pid, signal.SIGKILL)  # mid-run: requests may be in flight on it
        worker.join(timeout=300)
        assert "error" not in result, result.get("error")
        out = result["out"]
        assert len(out) == 16 and all(row and row[0].text for row in out)
        killed, survivor = router.report()
        assert killed.removed and killed.failures >= 1 and "unreachable" in killed.reason, router.summary()
        assert killed.answered + survivor.answered == 16 and not survivor.removed
        assert router.stats.answered == 16 and router.stats.failed == 0 and router.stats.failovers >= 1
    finally:
        victim.stop()
