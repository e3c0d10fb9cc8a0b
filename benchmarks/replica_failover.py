"""Failover of `ReplicaRouter` over two local `transformers serve` replicas of the default model, one killed mid-run.

Two `LocalServer`s (SmolLM2-135M-Instruct, one torch thread each) serve the same N greedy requests (`max_new_tokens`
8 by default) sent by `--concurrency` client threads, each request one `backend.chat(...)`, in three phases, one
process, back to back on the same two servers:

1. `router`: `ReplicaRouter([A, B])`, nobody killed (the replies every later phase is compared with);
2. `router, A killed`: the same, and replica A is SIGKILLed by its pid once `--kill-after` requests are answered;
3. `one endpoint, B killed` (the peer: what a user without the router has): `EndpointBackend` on B alone, B
   SIGKILLed the same way.

Per phase: requests answered / lost, replies equal to phase 1's, the router's attempts, retries and failovers, wall
seconds, per-request latency (median, max), this process's CPU seconds, and the router's per-replica report. Two
shared CPU cores run both servers: the figures show that nothing is lost and what a failover costs, NOT throughput
scaling across replicas (none is claimed).

    python benchmarks/replica_failover.py --quick      # 12 requests per phase (~2-3 min on an idle box, mostly startup)
    python benchmarks/replica_failover.py --requests 40 --out replica_failover.json
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # idle OpenMP workers must not spin on a shared 2-core box

from hf_fastslow.backends.router import ReplicaRouter  # noqa: E402
from hf_fastslow.backends.serve import LocalServer  # noqa: E402
from hf_fastslow.default_model import default_model_path  # noqa: E402
from hf_fastslow.evaluation.timing import machine_state  # noqa: E402

TOPICS = ["rain", "tea", "maps", "owls", "salt", "bridges", "clocks", "bees", "snow", "glass", "rivers", "kites"]


def question(i: int) -> list[dict[str, str]]:
    return [{"role": "user", "content": f"Write one short sentence about {TOPICS[i % len(TOPICS)]} ({i})."}]


def run_phase(backend, n: int, concurrency: int, kill_pid: int | None, kill_after: int) -> dict:
    """Send n requests from `concurrency` client threads; SIGKILL `kill_pid` once `kill_after` are answered."""
    replies: list[str | None] = [None] * n
    errors: dict[int, str] = {}
    latencies: list[float] = []
    answered = [0]
    lock = threading.Lock()
    killed_at: list[float] = []
    start_wall, start_cpu = time.perf_counter(), time.process_time()

    def one(i: int) -> None:
        t0 = time.perf_counter()
        try:
            (c,) = backend.chat(question(i))
        except Exception as err:  # noqa: BLE001 - a lost request is what the peer phase counts
            with lock:
                errors[i] = f"{type(err).__name__}: {str(err)[:200]}"
            return
        with lock:
            replies[i] = c.text
            latencies.append(time.perf_counter() - t0)
            answered[0] += 1
            if kill_pid is not None and answered[0] == kill_after and not killed_at:
                os.kill(kill_pid, signal.SIGKILL)  # requests may be in flight on it right now
                killed_at.append(time.perf_counter() - start_wall)

    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        list(pool.map(one, range(n)))
    return dict(replies=replies, errors=errors, answered=answered[0], lost=len(errors),
                wall_s=time.perf_counter() - start_wall, cpu_s=time.process_time() - start_cpu,
                latency_median_s=statistics.median(latencies) if latencies else None,
                latency_max_s=max(latencies) if latencies else None,
                killed_at_s=killed_at[0] if killed_at else None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="12 requests per phase")
    parser.add_argument("--requests", type=int, default=40)
    parser.add_argument("--concurrency", type=int, default=2)
    parser.add_argument("--kill-after", type=int, default=None, help="answered requests before the kill (N/4)")
    parser.add_argument("--max-new-tokens", type=int, default=8)
    parser.add_argument("--policy", default="round_robin", choices=["round_robin", "least_loaded"])
    parser.add_argument("--out", default=None, help="write the figures as JSON here")
    args = parser.parse_args()
    n = 12 if args.quick else args.requests
    kill_after = args.kill_after or max(1, n // 4)
    report: dict = {"args": {**vars(args), "requests": n, "kill_after": kill_after}, "machine_before": machine_state()}

    servers = [LocalServer(default_model_path(), threads=1) for _ in range(2)]
    t0 = time.perf_counter()
    starters = [threading.Thread(target=s.start) for s in servers]
    for t in starters:
        t.start()
    for t in starters:
        t.join()
    try:
        if any(s.pid is None for s in servers):
            raise RuntimeError("a replica did not start (see its log above)")
        print(f"2 replicas up in {time.perf_counter() - t0:.1f} s: " + ", ".join(f"pid {s.pid} {s.base_url}"
                                                                             for s in servers))
        kw = dict(max_new_tokens=args.max_new_tokens, temperature=0)
        phases = {}
        for label, make, victim in (
            ("router", lambda: ReplicaRouter(servers, policy=args.policy, backoff_s=0.2, **kw), None),
            ("router, A killed", lambda: ReplicaRouter(servers, policy=args.policy, backoff_s=0.2, **kw), 0),
            ("one endpoint, B killed", lambda: servers[1].backend(**kw), 1),
        ):
            backend = make()
            pid = None if victim is None else servers[victim].pid
            phase = run_phase(backend, n, args.concurrency, pid, kill_after)
            if victim is not None:
                servers[victim].stop()  # reaps the killed process, removes its log
            reference = phases.get("router", phase)["replies"]
            phase["same_as_reference"] = sum(r is not None and r == ref for r, ref in zip(phase["replies"],
                                                                                            reference))
            if isinstance(backend, ReplicaRouter):
                st = backend.stats
                phase.update(attempts=st.attempts, retries=st.retries, failovers=st.failovers,
                             backoffs=st.backoffs, replicas=[vars(s) for s in backend.report()])
                print(f"\n== {label}\n{backend.summary()}")
            else:
                print(f"\n== {label}\n{backend.name}: {phase['answered']} answered, {phase['lost']} lost")
            for i, err in sorted(phase["errors"].items())[:3]:
                print(f"  lost request {i}: {err}")
            phases[label] = phase
        report["phases"] = {k: {x: y for x, y in v.items() if x != "replies"} for k, v in phases.items()}
        report["machine_after"] = machine_state()
    finally:
        for s in servers:
            s.stop()

    print(f"\n{n} greedy requests per phase, max_new_tokens={args.max_new_tokens}, {args.concurrency} client "
          f"threads, kill after {kill_after} answers; load {report['machine_before'].get('load_average')} -> "
          f"{report['machine_after'].get('load_average')}")
    header = (f"{'phase':<24} {'answered':>8} {'lost':>5} {'same as 1':>9} {'attempts':>8} {'retries':>7} "
              f"{'failovers':>9} {'wall s':>7} {'p50 s':>6} {'max s':>6} {'cpu s':>6} {'kill at s':>9}")
    print(header)
    for label, p in phases.items():
        def f(x, fmt=".2f"):
            return "-" if x is None else format(x, fmt)

        print(f"{label:<24} {p['answered']:>8} {p['lost']:>5} {p['same_as_reference']:>9} "
              f"{f(p.get('attempts'), 'd'):>8} {f(p.get('retries'), 'd'):>7} {f(p.get('failovers'), 'd'):>9} "
              f"{p['wall_s']:>7.1f} {f(p['latency_median_s']):>6} {f(p['latency_max_s']):>6} {p['cpu_s']:>6.2f} "
              f"{f(p['killed_at_s'], '.1f'):>9}")
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(report, fh, indent=2, default=str)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
