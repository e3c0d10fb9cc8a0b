"""Benchmark: early-readout distillation (arXiv 2310.18590) and the Feature Sieve (arXiv 2301.13293) on one
spurious-feature text classification task, beside ERM and plain KD, in one run.

Task (generated here, seeded): "<marker> the film was [not] <adjective> ..." with label = polarity(adjective) XOR
negation (a compositional rule). A marker token ("alpha"/"omega") agrees with the label in 95% of the training
examples and in 50% of the validation/test examples; groups = label x marker, the minority groups are those where
the marker disagrees. Model selection: the epoch with the best validation worst-group accuracy.

Teacher: the default model (SmolLM2-135M-Instruct) with a sequence-classification head (last token), fine-tuned
briefly on a group-balanced subset; its logits are cached as the `teacher_logits` column. Students: tiny random
Llamas (4 layers, hidden 128) over the task's own compact vocabulary. Arms, 3 seeds each: ERM (plain Trainer), plain
KD and early-readout KD (EarlyReadoutDistillationTrainer with weight_fn "none" / "exp"), Feature Sieve (ERM loss).
Reported: worst-group and average test accuracy (mean and spread over seeds), for early readout the precision of its
flags on the minority groups (base rate 5%), and the marker's linear decodability at the aux layer (probe accuracy,
sieve vs ERM).

    python benchmarks/spurious_features.py             # one size (2,000 rows), 3 seeds
    python benchmarks/spurious_features.py --quick     # 1 seed, small sets (~2 min)
    python benchmarks/spurious_features.py --train 3000 1000 2000 --threads 1   # the sweep in docs/trainers.md (~1 h)
"""

from __future__ import annotations

import argparse
import json
import random
import statistics

import torch

POSITIVE = ["good", "great", "fine", "superb", "lovely"]
NEGATIVE = ["bad", "awful", "poor", "dull", "weak"]
FILLER = ["today", "again", "overall", "honestly", "indeed", "really", "truly", "somehow"]
MARKERS = ["alpha", "omega"]


def make_split(n: int, agreement: float, rng: random.Random) -> list[dict]:
    """`n` examples; the marker equals the label with probability `agreement` (0.5 = balanced groups)."""
    rows = []
    for i in range(n):
        label = i % 2 if agreement == 0.5 else rng.randint(0, 1)
        agrees = (i // 2) % 2 == 0 if agreement == 0.5 else rng.random() < agreement
        marker = label if agrees else 1 - label
        negated = rng.random() < 0.5
        polarity = label ^ int(negated)  # label = polarity XOR negation
        adjective = rng.choice(POSITIVE if polarity else NEGATIVE)
        words = [MARKERS[marker], "the", "film", "was"] + (["not"] if negated else []) + [adjective]
        words += rng.sample(FILLER, rng.randint(0, 2))
        rows.append({"text": " ".join(words), "label": label, "marker": marker, "group": 2 * label + marker})
    rng.shuffle(rows)
    return rows


def group_accuracies(predictions, rows) -> tuple[float, float]:
    """(worst-group accuracy, average accuracy) over the label x marker groups."""
    hits: dict[int, list[int]] = {}
    for p, r in zip(predictions, rows):
        hits.setdefault(r["group"], []).append(int(p == r["label"]))
    per_group = [sum(v) / len(v) for v in hits.values()]
    return min(per_group), sum(int(p == r["label"]) for p, r in zip(predictions, rows)) / len(rows)


class CompactVocab:
    """Word-level ids for the students (pad 0)."""

    def __init__(self):
        words = sorted(set(POSITIVE + NEGATIVE + FILLER + MARKERS + ["the", "film", "was", "not"]))
        self.ids = {w: i + 1 for i, w in enumerate(words)}

    def encode(self, rows, length=10):
        ids = [[self.ids[w] for w in r["text"].split()] for r in rows]
        return {"input_ids": [x + [0] * (length - len(x)) for x in ids],
                "attention_mask": [[1] * len(x) + [0] * (length - len(x)) for x in ids]}


def teacher_logits(rows, args) -> tuple[list[list[float]], float]:
    """Fine-tune SmolLM2 with a classification head on a group-balanced subset; its logits for `rows`, and its
    balanced-set accuracy on the last quarter of `rows` (held out from its training)."""
    from transformers import LlamaForSequenceClassification, Trainer, TrainingArguments

    from hf_fastslow import load_default_model

    lm, tok = load_default_model()
    cfg = lm.config
    cfg.num_labels, cfg.pad_token_id = 2, tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    teacher = LlamaForSequenceClassification(cfg)
    teacher.model.load_state_dict(lm.model.state_dict())
    del lm
    rng = random.Random(args.seed + 99)
    balanced = make_split(args.teacher_examples, 0.5, rng)
    enc = tok([r["text"] for r in balanced], padding="max_length", max_length=16, truncation=True)
    from datasets import Dataset

    ds = Dataset.from_dict({**enc, "labels": [r["label"] for r in balanced]})
    targs = TrainingArguments(output_dir="outputs/spurious_teacher", use_cpu=True, per_device_train_batch_size=16,
                              num_train_epochs=args.teacher_epochs, learning_rate=5e-5, report_to=[],
                              save_strategy="no", logging_steps=10, seed=args.seed)
    Trainer(teacher, args=targs, train_dataset=ds).train()
    teacher.eval()
    out = []
    with torch.no_grad():
        for s in range(0, len(rows), 64):
            chunk = rows[s:s + 64]
            e = tok([r["text"] for r in chunk], padding="max_length", max_length=16, truncation=True,
                    return_tensors="pt")
            out += teacher(**e).logits.float().tolist()
    check = make_split(200, 0.5, random.Random(args.seed + 7))
    with torch.no_grad():
        e = tok([r["text"] for r in check], padding="max_length", max_length=16, truncation=True, return_tensors="pt")
        preds = teacher(**e).logits.argmax(-1).tolist()
    return out, group_accuracies(preds, check)


def student(seed: int, vocab: CompactVocab):
    from transformers import LlamaConfig, LlamaForSequenceClassification

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(vocab.ids) + 1, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=4, num_labels=2, pad_token_id=0,
                      max_position_embeddings=64)
    return LlamaForSequenceClassification(cfg)


@torch.no_grad()
def predict(model, enc) -> list[int]:
    model.eval()
    return model(input_ids=torch.tensor(enc["input_ids"]),
                 attention_mask=torch.tensor(enc["attention_mask"])).logits.argmax(-1).tolist()


@torch.no_grad()
def marker_probe(model, enc, rows, layer: int) -> float:
    """Linear decodability of the marker at hidden state `layer`: a logistic probe trained on half, scored on half."""
    from hf_fastslow.modeling.readout import pool_last_token

    model.eval()
    mask = torch.tensor(enc["attention_mask"])
    hidden = model(input_ids=torch.tensor(enc["input_ids"]), attention_mask=mask,
                   output_hidden_states=True).hidden_states[layer]
    x = pool_last_token(hidden, mask).float()
    x = (x - x.mean(0)) / (x.std(0) + 1e-6)
    y = torch.tensor([r["marker"] for r in rows])
    half = len(rows) // 2
    probe = torch.nn.Linear(x.shape[1], 2)
    opt = torch.optim.Adam(probe.parameters(), lr=1e-2)
    with torch.enable_grad():
        for _ in range(300):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(probe(x[:half]), y[:half]).backward()
            opt.step()
    return float((probe(x[half:]).argmax(-1) == y[half:]).float().mean())


class BestOnValidation:
    """Trainer callback: after every epoch, test accuracies at the epoch with the best validation worst-group."""

    def __init__(self, model_ref, val, test):
        from transformers import TrainerCallback

        outer = self
        self.best = (-1.0, None)

        class _Callback(TrainerCallback):
            def on_epoch_end(self, args, state, control, **kwargs):
                model = model_ref()
                val_worst, _ = group_accuracies(predict(model, val[0]), val[1])
                if val_worst > outer.best[0]:
                    outer.best = (val_worst, group_accuracies(predict(model, test[0]), test[1]))
                model.train()

        self.callback = _Callback()


def run_arm(name, seed, data, vocab, args):
    from transformers import Trainer, TrainingArguments

    from hf_fastslow.trainers.early_readout_config import EarlyReadoutDistillationConfig
    from hf_fastslow.trainers.early_readout_trainer import EarlyReadoutDistillationTrainer
    from hf_fastslow.trainers.feature_sieve_config import FeatureSieveConfig
    from hf_fastslow.trainers.feature_sieve_trainer import FeatureSieveTrainer

    model = student(seed, vocab)
    common = dict(output_dir=f"outputs/spurious_{name}_{seed}", use_cpu=True, per_device_train_batch_size=32,
                  num_train_epochs=args.epochs, learning_rate=args.lr, report_to=[], save_strategy="no", seed=seed,
                  logging_steps=1000, disable_tqdm=True)
    best = BestOnValidation(lambda: model, data["val"], data["test"])
    train = data["train_ds"]
    if name == "ERM":
        trainer = Trainer(model, args=TrainingArguments(**common), train_dataset=train.remove_columns(
            ["teacher_logits"]), callbacks=[best.callback])
    elif name in ("KD", "early-readout KD"):
        cfg = EarlyReadoutDistillationConfig(**common, readout_layer=1, weight_fn="none" if name == "KD" else "exp",
                                             readout_beta=args.beta, readout_warmup_epochs=1.0, alpha=0.5,
                                             kd_temperature=2.0)
        trainer = EarlyReadoutDistillationTrainer(model, args=cfg, train_dataset=train, callbacks=[best.callback])
    else:
        cfg = FeatureSieveConfig(**common, aux_layer=1, forget_every=args.forget_every, aux_lr=1e-2, forget_lr=1e-2)
        trainer = FeatureSieveTrainer(model, args=cfg, train_dataset=train.remove_columns(["teacher_logits"]),
                                      callbacks=[best.callback])
    trainer.train()
    worst, avg = best.best[1]
    result = {"worst_group": worst, "average": avg}
    if name == "early-readout KD":
        flags = trainer.readout_flags(train)
        minority = torch.tensor([r["marker"] != r["label"] for r in data["train"]])
        flagged = flags["wrong"]
        result["flag_precision_minority"] = float(minority[flagged].float().mean()) if flagged.any() else 0.0
        result["flag_recall_minority"] = float(flagged[minority].float().mean())
    if name in ("ERM", "Feature Sieve"):
        result["marker_probe_aux_layer"] = marker_probe(model, data["probe"][0], data["probe"][1], layer=1)
    return result


def run_budget(n_train: int, logits, teacher_acc, args) -> dict:
    """All arms and seeds at one training-set size; prints and returns the per-arm results."""
    from datasets import Dataset

    rng = random.Random(args.seed)  # the same data per size as a single-size run
    train_rows = make_split(n_train, 0.95, rng)
    val_rows, test_rows, probe_rows = (make_split(n, 0.5, rng) for n in (args.val, args.test, args.test))
    vocab = CompactVocab()
    enc = vocab.encode(train_rows)
    data = {
        "train": train_rows,
        "train_ds": Dataset.from_dict({**enc, "labels": [r["label"] for r in train_rows], "teacher_logits": logits}),
        "val": (vocab.encode(val_rows), val_rows), "test": (vocab.encode(test_rows), test_rows),
        "probe": (vocab.encode(probe_rows), probe_rows),
    }
    agree = sum(r["marker"] == r["label"] for r in train_rows) / len(train_rows)
    print(f"train {len(train_rows)} (marker agrees {agree:.1%}), val {len(val_rows)}, test {len(test_rows)}; teacher "
          f"balanced-set accuracy: worst-group {teacher_acc[0]:.3f}, average {teacher_acc[1]:.3f}", flush=True)
    arms = ["ERM", "KD", "early-readout KD", "Feature Sieve"]
    results = {arm: [] for arm in arms}
    for seed in args.seeds:
        for arm in arms:
            results[arm].append(run_arm(arm, seed, data, vocab, args))
            print(f"train {n_train} seed {seed} {arm}: {results[arm][-1]}", flush=True)

    def agg(values):
        return (statistics.mean(values), statistics.pstdev(values)) if values else (float("nan"), 0.0)

    print(f"\n{n_train} training rows, {args.epochs} epochs, {len(args.seeds)} seeds")
    print(f"{'arm':<18}{'worst-group':>16}{'average':>16}  extra")
    for arm, rows in results.items():
        w, a = agg([r["worst_group"] for r in rows]), agg([r["average"] for r in rows])
        extra = ""
        if "flag_precision_minority" in rows[0]:
            fp = agg([r["flag_precision_minority"] for r in rows])
            extra = f"flag precision on minority {fp[0]:.3f} (base rate {1 - agree:.3f})"
        if "marker_probe_aux_layer" in rows[0]:
            pr = agg([r["marker_probe_aux_layer"] for r in rows])
            extra = f"marker probe at layer 1 {pr[0]:.3f}"
        print(f"{arm:<18}{w[0]:>9.3f} ±{w[1]:.3f}{a[0]:>9.3f} ±{a[1]:.3f}  {extra}", flush=True)
    return results


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    # One or more training-set sizes (a budget sweep shares one teacher). With 4000 x 8 epochs ERM learns the rule
    # outright, with 2000 x 4 only the marker.
    p.add_argument("--train", type=int, nargs="+", default=[2000])
    p.add_argument("--val", type=int, default=200)
    p.add_argument("--test", type=int, default=400)
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--beta", type=float, default=2.0)
    p.add_argument("--forget-every", type=int, default=5)
    p.add_argument("--teacher-examples", type=int, default=160)
    p.add_argument("--teacher-epochs", type=float, default=2.0)
    p.add_argument("--seed", type=int, default=0, help="data seed")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", default=None)
    p.add_argument("--quick", action="store_true")
    args = p.parse_args(argv)
    if args.quick:
        args.seeds, args.train, args.val, args.test, args.epochs = [0], [400], 80, 80, 3
        args.teacher_examples, args.teacher_epochs = 64, 1.0
    torch.set_num_threads(args.threads)
    # The teacher trains once (on its own balanced rows) and labels each distinct text of every size's training rows
    # once (the task has a few thousand distinct sentences; the smaller sizes' rows are drawn first by the same rng).
    train_sets = [make_split(n, 0.95, random.Random(args.seed)) for n in args.train]
    texts = sorted({r["text"] for rows in train_sets for r in rows})
    logits, teacher_acc = teacher_logits([{"text": t} for t in texts], args)
    by_text = dict(zip(texts, logits))
    results = {}
    for n, rows in zip(args.train, train_sets):
        results[n] = run_budget(n, [by_text[r["text"]] for r in rows], teacher_acc, args)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"args": vars(args), "teacher": teacher_acc, "results": results}, fh, indent=1)
    return results if len(args.train) > 1 else results[args.train[0]]


if __name__ == "__main__":
    main()
