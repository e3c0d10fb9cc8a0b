"""`ReplicaRouter`: one backend over several replicas of a model; a replica that fails is taken out and reported.

    python examples/replica_router.py           # scripted replicas + one real URL where nobody listens (seconds)
    python examples/replica_router.py --serve   # also two `transformers serve` replicas of the default model, one
                                                # killed by its pid mid-run (needs the serving extra; a few minutes)

The router is a `Backend`: `chat`, `chat_batch` (conversations spread over the replicas, concurrently), `stream`,
`score` and their async forms work as on one backend; `router.report()` / `router.summary()` say what each replica
did and why one was taken out of rotation.
"""

import argparse
import os
import signal
import socket
import threading
import time

from hf_fastslow.backends import BackendError, ManualClock, ScriptedBackend
from hf_fastslow.backends.router import ReplicaRouter, ReplicasUnavailableError


def questions(k):
    return [[{"role": "user", "content": f"What is {i} + {i}? Answer with the number."}] for i in range(k)]


def a_url_nobody_listens_on():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}/v1"


def scripted_tour():
    def adder(name):
        return ScriptedBackend(lambda m, i, kw: f"{2 * int(m[-1]['content'].split()[2])} (from {name})", name=name)

    # a real EndpointBackend on a closed port: its requests are refused by the operating system
    dead = a_url_nobody_listens_on()
    router = ReplicaRouter([adder("replica-a"), dead, adder("replica-b")], model="demo-model",
                           replica_kwargs={"timeout": 5, "server": "openai"}, max_concurrency=1)
    out = router.chat_batch(questions(8), max_new_tokens=8)
    print(f"answered {sum(1 for row in out if row)} of 8:", [row[0].text for row in out[:4]], "...")
    print(router.summary())
    print("streamed:", "".join(router.stream(questions(5)[4])))

    # a replica answering HTTP 503 twice: retried with exponential backoff (a ManualClock: no real waiting)
    clock, busy = ManualClock(), [2]

    def overloaded(m, i, kw):
        if busy[0]:
            busy[0] -= 1
            raise BackendError("replica-c returned HTTP 503: overloaded")
        return "ok"

    single = ReplicaRouter([ScriptedBackend(overloaded, name="replica-c")], clock=clock, remove_after=5,
                           backoff_s=0.5, backoff_factor=2.0)
    print(f"after 2 HTTP 503s: {single.chat(questions(1)[0])[0].text!r}, backed off {clock.time():.1f} s "
          f"({single.stats.backoffs} waits of 0.5 s then 1.0 s), {single.stats.retries} retries")

    # nothing is lost silently: when no replica can answer, the error names every replica and why
    everyone_down = ReplicaRouter([a_url_nobody_listens_on(), a_url_nobody_listens_on()], model="demo-model",
                                  replica_kwargs={"timeout": 5, "server": "openai"}, remove_after=1)
    try:
        everyone_down.chat_batch(questions(2))
    except ReplicasUnavailableError as err:
        print(f"all replicas down: {len(err.failures)} rows reported, healthy now: {everyone_down.healthy()}")
        print("  ", str(err)[:300], "...")


def served_tour():
    from hf_fastslow.backends import LocalServer
    from hf_fastslow.default_model import default_model_path

    servers = [LocalServer(default_model_path(), threads=1) for _ in range(2)]
    starters = [threading.Thread(target=s.start) for s in servers]
    for t in starters:
        t.start()
    for t in starters:
        t.join()
    try:
        router = ReplicaRouter(servers, max_concurrency=2, backoff_s=0.2, max_new_tokens=8, temperature=0)
        print(f"2 replicas of {os.path.basename(router.model)}: pids {[s.pid for s in servers]}")
        result = {}
        worker = threading.Thread(target=lambda: result.update(out=router.chat_batch(questions(10))))
        worker.start()
        while router.report()[0].answered < 2 and worker.is_alive():
            time.sleep(0.05)
        os.kill(servers[0].pid, signal.SIGKILL)
        print(f"killed replica 0 (pid {servers[0].pid}) after it answered 2 requests")
        worker.join()
        out = result["out"]
        print(f"served: answered {sum(1 for row in out if row and row[0].text)} of 10, e.g. {out[0][0].text!r}")
        print(router.summary())
    finally:
        for s in servers:
            s.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--serve", action="store_true", help="also run two transformers serve replicas")
    args = parser.parse_args()
    scripted_tour()
    if args.serve:
        served_tour()
