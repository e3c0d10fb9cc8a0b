"""`hf-fastslow` command line: `demo` (the default model with and without XQuant), `info`, and one verb per tool
whose parser lives beside the tool (`_VERB_MODULES`: each module has `add_parser(subparsers)` that sets `func`)."""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import time

# Verbs defined beside their tools; imported lazily at parse time so `hf-fastslow info` stays fast. A verb module
# must import only the standard library at module level (its heavy imports go inside its `func`).
_VERB_MODULES = (
    "hf_fastslow.evaluation.ipw_cli",
    "hf_fastslow.evaluation.ksort_cli",
    "hf_fastslow.evaluation.mast_cli",
    "hf_fastslow.bench.cli",
)


def _demo(args) -> int:
    import torch
    from tqdm.auto import tqdm

    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from transformers import DynamicCache

    from hf_fastslow import XQuantCache, XQuantConfig, load_default_model
    from hf_fastslow.evaluation.kv_ppl import bundled_text, cache_perplexity

    bar = tqdm(total=6, desc="hf-fastslow demo", unit="step")
    bar.set_postfix_str("loading SmolLM2-135M-Instruct (first run converts the GGUF, ~30 s)")
    model, tok = load_default_model()
    bar.update(1)

    xq_config = XQuantConfig(nbits=args.nbits, mode=args.mode, group_size=64, residual_length=64)
    messages = [{"role": "user", "content": args.prompt}]
    enc = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    ppl_ids = tok(bundled_text(), return_tensors="pt").input_ids[:, : args.ppl_tokens]
    rows, answers = [], {}
    for name, make_cache, gen_kwargs in (
        ("DynamicCache (fp32)", lambda: DynamicCache(config=model.config), {}),
        (f"XQuant {args.mode} {args.nbits}-bit", lambda: XQuantCache(model, xq_config),
         {"cache_implementation": "xquant", "cache_config": xq_config.to_dict()}),
    ):
        bar.set_postfix_str(f"{name}: answering")
        t0 = time.perf_counter()
        with torch.no_grad():
            out = model.generate(**enc, max_new_tokens=args.max_new_tokens, do_sample=False,
                                 return_dict_in_generate=True, **gen_kwargs)
        dt = time.perf_counter() - t0
        new = out.sequences[0, enc["input_ids"].shape[1]:]
        answers[name] = tok.decode(new, skip_special_tokens=True).strip()
        bar.update(1)
        bar.set_postfix_str(f"{name}: perplexity on {ppl_ids.shape[1]} tokens")
        r = cache_perplexity(model, ppl_ids, make_cache, chunk=64)
        cache = r["cache"]
        if isinstance(cache, XQuantCache):
            held = cache.nbytes() + cache.factor_nbytes()  # the shared factors count: a user pays for them too
        else:
            from hf_fastslow.evaluation.memory import held_tensor_bytes

            held = held_tensor_bytes(cache)
        cfg = model.config
        fp16_kv = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * (cfg.hidden_size // cfg.num_attention_heads) * 2
        fp16_kv *= ppl_ids.shape[1]
        rows.append((name, held, fp16_kv / held, r["ppl"], len(new) / dt))
        bar.update(1)
    bar.close()

    print(f"\nPrompt: {args.prompt}")
    for name, text in answers.items():
        print(f"\n[{name}]\n{text}")
    print(f"\n| cache | bytes held after {ppl_ids.shape[1]} tokens | x less than fp16 K/V | perplexity | tokens/s |")
    print("|---|---|---|---|---|")
    for name, held, ratio, ppl, speed in rows:
        print(f"| {name} | {held:,} | {ratio:.2f}x | {ppl:.3f} | {speed:.1f} |")
    print("\nPerplexity: the bundled public-domain text, teacher-forced in chunks of 64 tokens through the cache "
          "(newest < 64 tokens unquantized). tokens/s: greedy answer above, one process, "
          f"{args.threads} thread(s).")
    return 0


def _info(args) -> int:
    import torch
    import transformers

    import hf_fastslow
    from hf_fastslow.integrations import cache_kwarg_name, registered_cache_implementations
    from hf_fastslow.kernels import current_backend, triton_available

    print(f"hf_fastslow {hf_fastslow.__version__}")
    print(f"torch {torch.__version__} (cuda: {torch.cuda.is_available()}), transformers {transformers.__version__}")
    print(f"cache keyword: {cache_kwarg_name()}; registered cache implementations: "
          f"{', '.join(registered_cache_implementations())}")
    print(f"kernels: backend={current_backend().value}, triton installed={triton_available()}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hf-fastslow", description="hf_fastslow command line")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="answer a prompt with the default model, with and without XQuant")
    demo.add_argument("--prompt", default="Explain in three sentences why the sky is blue.")
    demo.add_argument("--max-new-tokens", type=int, default=64)
    demo.add_argument("--nbits", type=int, default=4, choices=(2, 3, 4, 8))
    demo.add_argument("--mode", default="auto", choices=("auto", "x", "latent", "cl"))
    demo.add_argument("--ppl-tokens", type=int, default=512)
    demo.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a shared box)")
    demo.set_defaults(func=_demo)
    info = sub.add_parser("info", help="versions, registered integrations, kernel backend")
    info.set_defaults(func=_info)
    for module_name in _VERB_MODULES:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as err:
            if not err.name or not module_name.startswith(err.name):  # a verb's own missing dependency is a bug
                raise
            continue
        module.add_parser(sub)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
