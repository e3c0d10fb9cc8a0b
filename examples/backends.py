"""The backend layer on the default model: the same calls in-process and over `transformers serve`.

    python examples/backends.py            # HFLocalBackend (SmolLM2-135M-Instruct in this process)
    python examples/backends.py --serve    # also starts `transformers serve` (needs the serving extra) and runs the
                                           # same calls through EndpointBackend

Every call is accounted in the backend's ledger (tokens, wall and CPU seconds, time to first text for streams); a
feature the backend lacks (log-probs, scoring over `transformers serve`) fails at once with what to do instead.
"""

import argparse

import torch

from hf_fastslow import load_default_model
from hf_fastslow.backends import Backend, BackendFeatureError, HFLocalBackend, LocalServer
from hf_fastslow.default_model import default_model_path

QUESTION = [{"role": "user", "content": "What is 12 + 7? Answer with the number."}]


def tour(backend: Backend) -> None:
    print(f"== {backend.name}")
    caps = backend.capabilities
    print(f"capabilities: native n {caps.native_n}, log-probs {caps.logprobs}, streaming {caps.streaming}, "
          f"continuation {caps.continue_final_message}, scoring {caps.prompt_scoring}")
    mark = backend.ledger.mark()

    (greedy,) = backend.chat(QUESTION, temperature=0)
    print(f"greedy: {greedy.text!r} ({greedy.prompt_tokens} prompt + {greedy.completion_tokens} new tokens)")

    samples = backend.chat(QUESTION, n=3, temperature=0.8, seed=0)
    print("3 samples (seeds 0, 1, 2 when fanned out):", [c.text for c in samples])

    try:
        (c,) = backend.chat(QUESTION, temperature=0, top_logprobs=3)
        confidence = -sum(sum(top) / len(top) for top in c.top_logprobs) / len(c.top_logprobs)
        print(f"log p of the greedy tokens {[round(x, 2) for x in c.token_logprobs[:5]]}...; "
              f"mean -top-3 log-prob {confidence:.2f}")
    except BackendFeatureError as err:
        print("log-probs:", err)

    deltas = list(backend.stream(QUESTION, temperature=0))
    print(f"streamed {len(deltas)} deltas, joined == greedy text: {''.join(deltas) == greedy.text}")

    other = [{"role": "user", "content": "Name a fruit."}]
    rows = {0: "", 1: ""}
    for chunk in backend.stream_batch([QUESTION, other], chunk_tokens=4, temperature=0):
        rows[chunk.row] += chunk.text
    print(f"stream_batch, 2 rows in chunks of 4 tokens: {rows}")

    partial = QUESTION + [{"role": "assistant", "content": "The answer is"}]
    (cont,) = backend.chat(partial, continue_final_message=True, temperature=0)
    print(f"continuing 'The answer is': {cont.text!r}")

    try:
        print(f"score(' 19'): log p per token {[round(x, 2) for x in backend.score(QUESTION, ' 19')]}")
    except BackendFeatureError as err:
        print("score:", err)

    usage = backend.ledger.since(mark)
    ttfts = [r.ttft_s for r in backend.ledger.records[mark:] if r.ttft_s is not None]
    print(f"ledger: {usage.calls} calls, {usage.requests} requests, {usage.prompt_tokens} prompt + "
          f"{usage.completion_tokens} completion tokens, {usage.seconds:.1f} s wall, {usage.cpu_seconds:.1f} s CPU "
          f"in this process; stream TTFT {[round(t, 2) for t in ttfts]} s\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--serve", action="store_true", help="also run the calls against `transformers serve`")
    args = parser.parse_args()
    torch.set_num_threads(1)
    model, tok = load_default_model()  # SmolLM2-135M-Instruct, offline
    tour(HFLocalBackend(model, tok, max_new_tokens=12))
    if args.serve:
        with LocalServer(default_model_path(), threads=1) as server:
            print(f"transformers serve is up at {server.base_url} (pid {server.pid})")
            tour(server.backend(tokenizer=tok, max_new_tokens=12))
        print("server stopped")


if __name__ == "__main__":
    main()
