"""Benchmark: Interleaved Head Attention (IHA, arXiv 2602.21371) on the default model (SmolLM2-135M-Instruct: 30
layers, 9 query heads, 3 KV heads), CPU, one process.

1. Conversion exactness: a left-padded batch of two prompts through the stock model (SDPA) and through the
   identity-initialised IHA conversion (init_noise=0) for each P in --pseudo-heads: max |delta logit| over real
   tokens, greedy `generate` token match, added parameters; the eager-vs-SDPA difference of the stock model on the
   same batch (the fp32 noise floor); the prefill wall-clock of stock and every P, interleaved in one process
   (`hf_fastslow.evaluation.timing.interleave`).
2. Multi-key retrieval fine-tune. Generated data (hard-needle is not installed here): `--pairs` lines "The code of
   the <adjective> <animal> is <4 digits>." then a question about one of the keys; the answer is scored as exact
   match of all answer tokens under teacher forcing (= greedy decoding of the answer). Same examples, same order,
   same steps for both arms:
     stock:  fine-tune the top `--layers` decoder layers of the unconverted model (all their weights),
     IHA:    the same layers converted to IHA (P = --ft-pseudo-heads, init_noise=1e-3 to leave the symmetric point),
             the same fine-tune plus the mixers (their own AdamW group, lr --mixer-lr, no weight decay).
   Only the top layers train, so the frozen lower layers run once: their output (the hidden state entering layer
   L - layers, from `output_hidden_states`) is computed for every example and both arms train a model made of the
   top layers, fed those hidden states as `inputs_embeds`. The script checks that this split model reproduces the
   full model's answer logits before training.

    python benchmarks/iha.py                       # both parts (about 8-10 min on the loaded 2-core box)
    python benchmarks/iha.py --skip-finetune       # exactness only (about 1 min)
    python benchmarks/iha.py --skip-exactness --eval 192   # the fine-tune with a 4x larger held-out set
    python benchmarks/iha.py --save outputs/iha-smollm2   # also save the fine-tuned IHA model + its model card
    python benchmarks/iha.py --quick --json iha.json       # both parts at reduced size (see QUICK)

`--json PATH` writes every figure the tables print (null for a part that was skipped).
"""

from __future__ import annotations

import argparse
import copy
import random
import sys
import time

import torch

from hf_fastslow.evaluation.cli_support import apply_quick, write_report_json
from hf_fastslow.evaluation.timing import Spread, paired_ratios

# --quick: exactness at P=3 only (3 timed rounds, 8 greedy tokens); the fine-tune on 32 training / 32 held-out examples,
# 2 epochs of the top 2 layers. Both arms and the task are the recorded ones; the sizes are not.
QUICK = dict(pseudo_heads=[3], repeats=3, new_tokens=8, train=32, eval=32, epochs=2, layers=2)
ADJECTIVES = ("amber brave calm dusty eager faint gentle hollow icy jolly keen lucky misty noble olive proud quiet "
              "rapid silver tidy urban vivid witty young zesty").split()
ANIMALS = ("fox owl bear crane deer eagle frog goose hawk ibis jay koala lynx moth newt otter panda quail raven seal "
           "tiger viper whale yak zebra").split()


# -- 1. exactness ------------------------------------------------------------------------------------------------------
def padded_prompts(tok):
    texts = ["Write one sentence about the sea.", "List three prime numbers and explain briefly why each one is prime."]
    prompts = [tok.apply_chat_template([{"role": "user", "content": t}], tokenize=False, add_generation_prompt=True)
               for t in texts]
    tok.padding_side = "left"
    return tok(prompts, return_tensors="pt", padding=True)


@torch.no_grad()
def exactness(model, tok, pseudo_heads, new_tokens, repeats):
    """Exactness rows per P, the eager-vs-SDPA floor, the batch width, and the interleaved prefill timing."""
    from hf_fastslow.evaluation.timing import interleave
    from hf_fastslow.modeling.iha import IHAConfig, apply_iha

    enc = padded_prompts(tok)
    real = enc["attention_mask"].bool()
    ref = model(**enc).logits
    gen_kw = dict(max_new_tokens=new_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
    ref_gen = model.generate(**enc, **gen_kw)
    # The fp32 noise floor: the same stock model with eager instead of SDPA attention.
    eager = copy.deepcopy(model)
    eager.set_attn_implementation("eager")
    floor = (eager(**enc).logits - ref)[real].abs().max().item()
    del eager
    rows, arms = [], {"stock": lambda: model(**enc)}
    for p in pseudo_heads:
        iha = apply_iha(copy.deepcopy(model), IHAConfig(num_pseudo_heads=p, init_noise=0.0))
        got = iha(**enc).logits
        gen = iha.generate(**enc, **gen_kw)
        extra = sum(t.numel() for n, t in iha.named_parameters() if ".iha." in n)
        rows.append({"P": p, "max_dlogit": (got - ref)[real].abs().max().item(),
                     "greedy_match": bool(torch.equal(gen, ref_gen)), "extra_params": extra})
        arms[f"P={p}"] = lambda m=iha: m(**enc)
    timing = interleave(arms, repeats=repeats, warmup=1, rotate=True, keep_values=False)
    return rows, floor, int(enc["input_ids"].shape[1]), timing


def print_exactness(rows, floor, width, timing, args, n_params):
    print(f"\n## 1. Conversion exactness (identity init, init_noise=0): left-padded batch of 2, width {width} tokens; "
          f"greedy {args.new_tokens} tokens")
    print("| P | max abs delta logit (real tokens) | greedy tokens identical | added parameters | share of model |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['P']} | {r['max_dlogit']:.2e} | {'yes' if r['greedy_match'] else 'NO'} | {r['extra_params']:,} | "
              f"{100 * r['extra_params'] / n_params:.4f}% |")
    print(f"(fp32 noise floor: the stock model with eager vs SDPA attention on the same batch differs by {floor:.2e})")
    print(f"\nPrefill of that batch, CPU fp32, {args.repeats} interleaved rounds after 1 warm-up "
          f"({timing.describe_machine()}):")
    print("| arm | median ms (min-max) | wall / stock, paired per round | CPU / stock, paired per round |")
    print("|---|---|---|---|")
    for arm, times in timing.arms.items():
        cpu = Spread.of(paired_ratios(times.cpu, timing["stock"].cpu))
        print(f"| {arm} | {times.spread.scaled(1e3).format('.0f')} | "
              f"{Spread.of(timing.ratios(arm, 'stock')).format('.2f')} | {cpu.format('.2f')} |")


# -- 2. multi-key retrieval data ---------------------------------------------------------------------------------------
def retrieval_example(rng: random.Random, pairs: int) -> tuple[str, str]:
    keys: list[str] = []
    while len(keys) < pairs:
        key = f"{rng.choice(ADJECTIVES)} {rng.choice(ANIMALS)}"
        if key not in keys:
            keys.append(key)
    values = [str(rng.randrange(1000, 10000)) for _ in keys]
    asked = rng.randrange(pairs)
    context = "".join(f"The code of the {k} is {v}.\n" for k, v in zip(keys, values))
    prompt = (f"Remember the codes.\n{context}Question: What is the code of the {keys[asked]}?\n"
              f"Answer: The code of the {keys[asked]} is")
    return prompt, " " + values[asked]


def retrieval_split(tok, n, pairs, seed):
    """Examples as (token ids, index of the first answer token, answer length)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        prompt, answer = retrieval_example(rng, pairs)
        p_ids = tok(prompt).input_ids
        a_ids = tok(answer, add_special_tokens=False).input_ids
        out.append((p_ids + a_ids, len(p_ids), len(a_ids)))
    return out


def collate(examples, pad_id):
    """Right-padded ids, attention mask, and the (row, position, target) of every answer token."""
    width = max(len(ids) for ids, _, _ in examples)
    ids = torch.full((len(examples), width), pad_id)
    mask = torch.zeros_like(ids)
    rows, pos, tgt = [], [], []
    for i, (seq, start, length) in enumerate(examples):
        ids[i, : len(seq)] = torch.tensor(seq)
        mask[i, : len(seq)] = 1
        for j in range(start, start + length):
            rows.append(i)
            pos.append(j - 1)  # the logit at j - 1 predicts token j
            tgt.append(seq[j])
    return ids, mask, (torch.tensor(rows), torch.tensor(pos), torch.tensor(tgt))


def batches(examples, size, pad_id):
    return [collate(examples[i: i + size], pad_id) for i in range(0, len(examples), size)]


# -- split model: frozen bottom (run once) + trainable top -------------------------------------------------------
@torch.no_grad()
def bottom_pass(model, batch_list, split):
    """(hidden state entering layer `split`, the full model's answer logits) for every batch."""
    out = []
    for ids, mask, sel in batch_list:
        res = model.get_decoder()(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        rows, pos, _ = sel
        logits = model.lm_head(res.last_hidden_state[rows, pos])
        out.append((res.hidden_states[split], logits))
    return out


def top_model(model, layers):
    """A model made of the top `layers` decoder layers of `model` (+ final norm and head), weights copied."""
    cfg = copy.deepcopy(model.config)
    total = cfg.num_hidden_layers
    cfg.num_hidden_layers = layers
    if getattr(cfg, "layer_types", None):
        cfg.layer_types = list(cfg.layer_types)[-layers:]
    top = type(model)(cfg)
    state = {}
    for name, tensor in model.state_dict().items():
        if name.startswith("model.layers."):
            idx = int(name.split(".")[2])
            if idx < total - layers:
                continue
            name = name.replace(f"model.layers.{idx}.", f"model.layers.{idx - (total - layers)}.", 1)
        state[name] = tensor.clone()
    top.load_state_dict(state, strict=True)
    return top.eval()


def answer_logits(top, hidden, mask, sel):
    rows, pos, _ = sel
    h = top.get_decoder()(inputs_embeds=hidden, attention_mask=mask).last_hidden_state
    return top.lm_head(h[rows, pos])


def accuracy_and_nll(logits_list, batch_list):
    correct = total = 0
    nll, count = 0.0, 0
    for logits, (_, _, (rows, _, tgt)) in zip(logits_list, batch_list):
        hit = logits.argmax(-1) == tgt
        nll += torch.nn.functional.cross_entropy(logits.float(), tgt, reduction="sum").item()
        count += len(tgt)
        for r in rows.unique():
            correct += int(hit[rows == r].all())
            total += 1
    return correct / total, nll / count


@torch.no_grad()
def evaluate(top, hidden_list, batch_list):
    return accuracy_and_nll([answer_logits(top, h, b[1], b[2]) for h, b in zip(hidden_list, batch_list)], batch_list)


def finetune(top, hidden_list, batch_list, epochs, lr, mixer_lr, seed, mixers_only=False):
    from hf_fastslow.modeling.iha import iha_param_group, is_iha_model

    mixer_ids = set()
    groups = []
    if is_iha_model(top):
        group = iha_param_group(top, lr=mixer_lr)
        mixer_ids = {id(p) for p in group["params"]}
        groups.append(group)
    layer_params = [p for n, p in top.named_parameters() if n.startswith("model.layers.") and id(p) not in mixer_ids]
    if mixers_only:
        layer_params = []
    for p in top.parameters():
        p.requires_grad_(False)
    for g in groups + [{"params": layer_params}]:
        for p in g["params"]:
            p.requires_grad_(True)
    if layer_params:
        groups.append({"params": layer_params, "lr": lr, "weight_decay": 0.0})
    opt = torch.optim.AdamW(groups)
    order = list(range(len(batch_list)))
    rng = random.Random(seed)
    top.train()
    losses, t0 = [], time.perf_counter()
    for _ in range(epochs):
        rng.shuffle(order)
        for i in order:
            _, mask, sel = batch_list[i]
            loss = torch.nn.functional.cross_entropy(answer_logits(top, hidden_list[i], mask, sel), sel[2])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.item())
    top.eval()
    trainable = sum(p.numel() for p in top.parameters() if p.requires_grad)
    return losses, time.perf_counter() - t0, trainable


def write_back(model, top, layers, ft_cfg):
    """The full model with its top layers replaced by the fine-tuned IHA ones (a loadable IHA checkpoint)."""
    from hf_fastslow.modeling.iha import IHAConfig, apply_iha

    total = model.config.num_hidden_layers
    full = apply_iha(copy.deepcopy(model), IHAConfig(num_pseudo_heads=ft_cfg.num_pseudo_heads, init_noise=0.0,
                                                      layers=list(range(total - layers, total))))
    state = full.state_dict()
    for name, tensor in top.state_dict().items():
        if name.startswith("model.layers."):
            idx = int(name.split(".")[2])
            state[name.replace(f"model.layers.{idx}.", f"model.layers.{idx + total - layers}.", 1)] = tensor
    full.load_state_dict(state, strict=True)
    return full


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pseudo-heads", type=int, nargs="+", default=[1, 3, 9], help="P values of the exactness table")
    p.add_argument("--new-tokens", type=int, default=16, help="greedy tokens compared in the exactness table")
    p.add_argument("--repeats", type=int, default=3, help="timed prefill repeats (interleaved stock / IHA)")
    p.add_argument("--skip-finetune", action="store_true")
    p.add_argument("--skip-exactness", action="store_true")
    p.add_argument("--mixers-only-arm", action="store_true",
                   help="a third arm: the same IHA conversion with only the mixers trained (layers frozen)")
    p.add_argument("--pairs", type=int, default=6, help="key-value pairs per retrieval context")
    p.add_argument("--train", type=int, default=64, help="training examples")
    p.add_argument("--eval", type=int, default=48, help="held-out evaluation examples")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--layers", type=int, default=4, help="top decoder layers fine-tuned (and converted to IHA)")
    p.add_argument("--ft-pseudo-heads", type=int, default=3)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--mixer-lr", type=float, default=1e-2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--save", default=None, help="directory for the fine-tuned IHA checkpoint and its model card")
    p.add_argument("--quick", action="store_true", help="reduced sizes: " +
                   ", ".join(f"{k}={v}" for k, v in QUICK.items()))
    p.add_argument("--json", default=None, help="write every figure of the run to this JSON file")
    args = p.parse_args(argv)
    apply_quick(args, QUICK)
    started, cpu_started = time.perf_counter(), time.process_time()
    report = {"args": vars(args), "exactness": None, "finetune": None}

    def write_json():
        if args.json:
            report["wall_s"], report["cpu_s"] = time.perf_counter() - started, time.process_time() - cpu_started
            write_report_json(args.json, report)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    from hf_fastslow import load_default_model, save_model_card
    from hf_fastslow.modeling.iha import IHAConfig, apply_iha, from_pretrained_iha

    model, tok = load_default_model()
    n_params = sum(t.numel() for t in model.parameters())
    report["n_params"] = n_params
    print(f"# IHA benchmark: SmolLM2-135M-Instruct ({n_params:,} parameters), fp32 CPU, torch threads "
          f"{torch.get_num_threads()}; argv: {' '.join(sys.argv[1:]) or '(defaults)'}")

    rows, floor = [], None
    if not args.skip_exactness:
        rows, floor, width, timing = exactness(model, tok, args.pseudo_heads, args.new_tokens, args.repeats)
        print_exactness(rows, floor, width, timing, args, n_params)
        report["exactness"] = {
            "width": width, "new_tokens": args.new_tokens, "fp32_floor_eager_vs_sdpa": floor, "rows": rows,
            "prefill_ms_median": {arm: 1e3 * t.spread.median for arm, t in timing.arms.items()},
            "prefill_ms_min_max": {arm: [1e3 * t.spread.low, 1e3 * t.spread.high] for arm, t in timing.arms.items()},
            "prefill_wall_ratio_to_stock_median": {arm: Spread.of(timing.ratios(arm, "stock")).median
                                                   for arm in timing.arms},
            "prefill_cpu_ratio_to_stock_median": {
                arm: Spread.of(paired_ratios(t.cpu, timing["stock"].cpu)).median for arm, t in timing.arms.items()},
            "machine": timing.describe_machine()}
    if args.skip_finetune:
        write_json()
        return

    total = model.config.num_hidden_layers
    split = total - args.layers
    train = retrieval_split(tok, args.train, args.pairs, seed=args.seed + 1)
    held = retrieval_split(tok, args.eval, args.pairs, seed=args.seed + 2)
    pad = tok.pad_token_id
    train_b, eval_b = batches(train, args.batch, pad), batches(held, args.batch, pad)
    lengths = [len(ids) for ids, _, _ in train + held]
    t0 = time.perf_counter()
    train_h = [h for h, _ in bottom_pass(model, train_b, split)]
    eval_pass = bottom_pass(model, eval_b, split)
    eval_h = [h for h, _ in eval_pass]
    base_acc, base_nll = accuracy_and_nll([lg for _, lg in eval_pass], eval_b)
    bottom_s = time.perf_counter() - t0

    ft_cfg = IHAConfig(num_pseudo_heads=args.ft_pseudo_heads, init_noise=1e-3, seed=args.seed)
    results = {}
    arms = ("stock", "IHA") + (("IHA, mixers only",) if args.mixers_only_arm else ())
    for arm in arms:
        top = top_model(model, args.layers)
        if arm != "stock":
            apply_iha(top, ft_cfg)
        acc0, nll0 = evaluate(top, eval_h, eval_b)
        if arm == "stock" and abs(nll0 - base_nll) > 1e-3:
            raise RuntimeError(f"split model != full model (answer NLL {nll0:.5f} vs {base_nll:.5f})")
        losses, seconds, trainable = finetune(top, train_h, train_b, args.epochs, args.lr, args.mixer_lr, args.seed,
                                              mixers_only=arm == "IHA, mixers only")
        acc, nll = evaluate(top, eval_h, eval_b)
        mixers = sum(t.numel() for n, t in top.named_parameters() if ".iha." in n)
        results[arm] = dict(acc0=acc0, nll0=nll0, acc=acc, nll=nll, seconds=seconds, trainable=trainable,
                            mixers=mixers, steps=len(losses), first_loss=losses[0], last_loss=losses[-1], top=top)

    steps = results["stock"]["steps"]
    print(f"\n## 2. Multi-key retrieval fine-tune: {args.pairs} key-value pairs per context, {min(lengths)}-"
          f"{max(lengths)} tokens; {args.train} training / {args.eval} held-out examples; top {args.layers} of "
          f"{total} layers trained, {steps} steps of batch {args.batch} ({args.epochs} epochs), AdamW lr {args.lr}"
          f" (mixers {args.mixer_lr}); IHA P={args.ft_pseudo_heads}, init_noise=1e-3")
    print(f"(untrained default model on the held-out set: exact match {base_acc:.3f}, answer-token NLL "
          f"{base_nll:.3f}; frozen-bottom pass {bottom_s:.0f} s)")
    print("| arm | trainable parameters | IHA parameters (overhead) | held-out exact match before -> after | "
          "answer NLL before -> after | train loss first -> last step | train s |")
    print("|---|---|---|---|---|---|---|")
    for arm, r in results.items():
        share = f"{r['mixers']:,} ({100 * r['mixers'] / n_params:.4f}%)" if r["mixers"] else "0"
        print(f"| {arm} | {r['trainable']:,} | {share} | {r['acc0']:.3f} -> {r['acc']:.3f} | "
              f"{r['nll0']:.3f} -> {r['nll']:.3f} | {r['first_loss']:.3f} -> {r['last_loss']:.3f} | "
              f"{r['seconds']:.0f} |")

    report["finetune"] = {
        "pairs": args.pairs, "train": args.train, "eval": args.eval, "layers": args.layers, "epochs": args.epochs,
        "batch": args.batch, "ft_pseudo_heads": args.ft_pseudo_heads, "lengths": [min(lengths), max(lengths)],
        "untrained": {"exact_match": base_acc, "nll": base_nll}, "bottom_pass_s": bottom_s,
        "arms": {arm: {k: v for k, v in r.items() if k != "top"} for arm, r in results.items()}}
    write_json()

    if args.save:
        full = write_back(model, results["IHA"]["top"], args.layers, ft_cfg)
        full.save_pretrained(args.save)
        tok.save_pretrained(args.save)
        reloaded = from_pretrained_iha(args.save)
        ids, mask, sel = eval_b[0]
        with torch.no_grad():
            want = answer_logits(results["IHA"]["top"], eval_h[0], mask, sel)
            got = reloaded.lm_head(reloaded.get_decoder()(input_ids=ids, attention_mask=mask).last_hidden_state[
                sel[0], sel[1]])
        reload_diff = (got - want).abs().max().item()
        report["finetune"]["saved"] = args.save
        report["finetune"]["reload_max_dlogit"] = reload_diff
        write_json()
        print(f"\nsaved {args.save}; reloaded with from_pretrained_iha: max abs delta answer logit vs the trained "
              f"split model {reload_diff:.2e}")
        exact = {r["P"]: r for r in rows}
        figures = {f"conversion max abs delta logit, P={P}": r["max_dlogit"] for P, r in exact.items()}
        if floor is not None:
            figures["fp32 floor: stock eager vs SDPA max abs delta logit"] = floor
        figures |= {f"greedy {args.new_tokens} tokens identical, P={P}": "yes" if r["greedy_match"] else "no"
                    for P, r in exact.items()}
        figures |= {
            "IHA parameters in this checkpoint": results["IHA"]["mixers"],
            f"retrieval exact match, untrained ({args.pairs} pairs)": base_acc,
            "retrieval exact match, stock fine-tune (same steps)": results["stock"]["acc"],
            "retrieval exact match, IHA fine-tune (this checkpoint)": results["IHA"]["acc"],
            "reload max abs delta answer logit": reload_diff,
        }
        save_model_card(
            args.save, base_model="HuggingFaceTB/SmolLM2-135M-Instruct", method="iha",
            paper="Interleaved Head Attention, arXiv 2602.21371", tags=["attention"], figures=figures,
            description=(f"SmolLM2-135M-Instruct with its top {args.layers} decoder layers converted to IHA "
                         f"(P={args.ft_pseudo_heads} pseudo-heads per head) and fine-tuned for {steps} steps on a "
                         f"generated {args.pairs}-pair key-value retrieval task (benchmarks/iha.py). A toy check "
                         "of plumbing and trainability on CPU, not a reproduction of the paper's results."),
            usage=(f"from hf_fastslow.modeling.iha import from_pretrained_iha\n"
                   f"model = from_pretrained_iha({args.save!r})  # no trust_remote_code"),
        )


if __name__ == "__main__":
    main()
