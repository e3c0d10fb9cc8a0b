"""Benchmark: tiny diffusion LMs trained on CPU on multi-digit addition, beside an AR model of the same size trained
on the same tokens. One table: exact-match accuracy on a held-out set and tokens per forward (TPF) for the AR model's
greedy decoding, the block-diffusion baseline (several step counts / thresholds), ISD (N = 2, 3, 4) and RCD vs SeqD
(several thresholds).

The task: "a+b=s" with the profile's digit count (5 in the full profile), every number written least-significant digit
first (the order a carry is computed in), operands zero-padded, the sum written with one digit more, then EOS. Digit k
of the sum depends on every lower digit through the carry chain, so the answer has real left-to-right dependencies,
and a slot drafted j tokens ahead must resolve a carry chain of j digits by itself. Tokens: a character-level
tokenizer built in code (digits, "+", "=", <pad>, <eos>, <mask>).

Arms (same architecture, same seed, same initial weights, same training examples in the same order, same number of
clean tokens; the diffusion objectives see each sequence twice, [x_t | x_0], which is their compute cost, not more
data):
  AR        plain next-token SFT (trl SFTTrainer), decoded with greedy `generate`.
  I-DLM     IDLMTrainer (strict causal, logit shift, ce_alpha on the clean half), decoded with `isd_generate`
            (greedy, N = 2, 3, 4; ISD greedy returns the model's own causal greedy output, so its accuracy is that of
            the I-DLM model's AR mode), and with `block_diffusion_generate` in the causal pattern.
  BD3       BlockDiffusionTrainer (objective "bd3": bidirectional inside a block, random mask rate), decoded with
            `block_diffusion_generate` at several step counts / thresholds: the block-diffusion baseline.
  SeqD/RCD  the card's fairness protocol: both start from the BD3 model's weights and train on the same further
            tokens; SeqD continues the BD3 SFT without residuals, RCD trains with residuals from a frozen smaller
            reference DLM (RCDTrainer; the reference is a narrower BD3 model trained on the first half of the stage-1
            examples); decoded with `block_diffusion_generate` (SeqD) and `rcd_generate` (RCD, zero and self init).

    python benchmarks/dlm_synthetic.py --quick    # a smoke run of every arm (about a minute of CPU)
    python benchmarks/dlm_synthetic.py            # the full profile (the figures in docs/dlm.md; ~15 min of CPU)
    # the same, arms trained in parallel processes, then evaluated together:
    for a in AR I-DLM BD3 "ref RCD" SeqD; do python benchmarks/dlm_synthetic.py --save --no-eval --arms $a & done; wait
    python benchmarks/dlm_synthetic.py --load outputs/dlm_synthetic

`--plot PATH` draws accuracy against tokens per forward, one curve per decoder's threshold / step sweep.
"""


import argparse
import copy
import json
import math
import random
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch

DIGIT_CHARS = "0123456789"
OPERATOR_CHARS = "+="
PAD, EOS, MASK = "<pad>", "<eos>", "<mask>"


# -- task and tokenizer ------------------------------------------------------------------------------------------------
def char_tokenizer():
    """A character-level `PreTrainedTokenizerFast`: ids 0-2 are <pad>, <eos>, <mask>, then the digits, "+", "="."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate([PAD, EOS, MASK, *DIGIT_CHARS, *OPERATOR_CHARS])}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=None))
    backend.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token=PAD, eos_token=EOS, mask_token=MASK)


@dataclass(frozen=True)
class AdditionTask:
    """`digits`-digit addition, every number written least-significant digit first."""

    digits: int = 8

    @property
    def prompt_length(self) -> int:
        return 2 * self.digits + 2

    @property
    def answer_length(self) -> int:
        """Answer tokens: the sum's `digits + 1` digits and EOS."""
        return self.digits + 2

    def render(self, a: int, b: int) -> tuple[str, str]:
        """(prompt, answer) text of a + b; the answer ends before EOS."""
        d = self.digits
        if not (0 <= a < 10**d and 0 <= b < 10**d):
            raise ValueError(f"operands must have at most {d} digits (got {a}, {b})")
        prompt = f"{a:0{d}d}"[::-1] + "+" + f"{b:0{d}d}"[::-1] + "="
        return prompt, f"{a + b:0{d + 1}d}"[::-1]

    def parse_answer(self, text: str) -> int | None:
        """The integer an answer text stands for (None unless it is exactly `digits + 1` digits)."""
        if len(text) != self.digits + 1 or not text.isdigit():
            return None
        return int(text[::-1])

    def items(self, n: int, seed: int) -> list[dict]:
        """`n` problems `{"a", "b", "prompt", "answer"}` from a seeded generator (distinct seeds, distinct sets)."""
        rng = random.Random(seed)
        out = []
        for _ in range(n):
            a, b = rng.randrange(10**self.digits), rng.randrange(10**self.digits)
            prompt, answer = self.render(a, b)
            out.append({"a": a, "b": b, "prompt": prompt, "answer": answer})
        return out


def disjoint_splits(task: AdditionTask, n_train: int, n_test: int, seed: int,
                    test_seed: int | None = None) -> tuple[list[dict], list[dict]]:
    """Training and held-out problems; held-out (a, b) pairs never appear in training. The held-out set comes from
    `test_seed` (default `seed`), so a continuation with other training examples keeps the same held-out set."""
    test = task.items(n_test, seed=(seed if test_seed is None else test_seed) + 1)
    held = {(r["a"], r["b"]) for r in test}
    train = [r for r in task.items(n_train + n_test, seed=seed) if (r["a"], r["b"]) not in held][:n_train]
    return train, test


def encode_rows(tok, rows: Sequence[dict]) -> list[dict]:
    """Pre-tokenized SFT rows: `input_ids` = prompt + answer + EOS, `labels` = the same with the prompt at -100 (the
    completion-only labels SFTTrainer would build; given here so the trainers skip dataset preparation)."""
    out = []
    for r in rows:  # one token per character: look the characters up directly (fast for 100k rows)
        prompt = tok.convert_tokens_to_ids(list(r["prompt"]))
        answer = tok.convert_tokens_to_ids(list(r["answer"])) + [tok.eos_token_id]
        out.append({"input_ids": prompt + answer, "labels": [-100] * len(prompt) + answer})
    return out


def decode_answers(tok, generated: torch.Tensor) -> list[str]:
    """Answer texts of generated rows [B, n] (new tokens only): everything before the first EOS (pad and mask kept
    out, so a row that never wrote a digit decodes to an empty answer)."""
    texts = []
    for row in generated.tolist():
        if tok.eos_token_id in row:
            row = row[: row.index(tok.eos_token_id)]
        texts.append(tok.decode([t for t in row if t not in (tok.pad_token_id, tok.mask_token_id)]))
    return texts


def exact_match(predicted: Sequence[str], rows: Sequence[dict]) -> float:
    """Share of rows whose predicted answer text equals the reference answer exactly (digits and length)."""
    if len(predicted) != len(rows):
        raise ValueError(f"{len(predicted)} predictions for {len(rows)} rows")
    if not rows:
        raise ValueError("no rows to score")
    return sum(p == r["answer"] for p, r in zip(predicted, rows)) / len(rows)


# -- model and training ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Profile:
    """Sizes of one run. `steps` for the AR / I-DLM / BD3 / reference arms, `extra_steps` for SeqD and RCD."""

    digits: int
    hidden: int
    layers: int
    steps: int
    extra_steps: int
    batch: int
    lr: float
    n_test: int
    ref_hidden: int
    ref_layers: int


PROFILES = {
    "quick": Profile(digits=3, hidden=32, layers=2, steps=40, extra_steps=10, batch=32, lr=3e-3, n_test=64,
                     ref_hidden=32, ref_layers=1),
    "full": Profile(digits=5, hidden=64, layers=3, steps=700, extra_steps=150, batch=64, lr=3e-3, n_test=500,
                    ref_hidden=32, ref_layers=2),
}


def tiny_llama(tok, hidden: int, layers: int, seed: int, max_positions: int = 64):
    """A small Llama for the character vocabulary (4 heads, MHA, tied embeddings), seeded."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=3 * hidden,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=4,
                         max_position_embeddings=max_positions, tie_word_embeddings=True,
                         pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=None)
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def training_args(config_cls, profile: Profile, out_dir: str, steps: int, seed: int, **extra):
    """The same optimisation settings for every arm (only the objective fields differ)."""
    return config_cls(
        output_dir=out_dir, per_device_train_batch_size=profile.batch, max_steps=steps, learning_rate=profile.lr,
        lr_scheduler_type="cosine", warmup_steps=min(100, steps // 10), weight_decay=0.0, max_grad_norm=1.0,
        logging_steps=max(1, steps // 10), save_strategy="no", report_to=[], seed=seed, data_seed=seed,
        use_cpu=True, dataloader_num_workers=0, max_length=None, disable_tqdm=True,
        gradient_checkpointing=False, dataset_kwargs={"skip_prepare_dataset": True}, **extra)


@dataclass
class TrainedArm:
    name: str
    model: object
    seconds: float
    sequences: int  # training sequences seen (steps x batch)
    tokens: int  # clean tokens seen (each sequence counted once)
    final_loss: float | None


def train(name: str, trainer_cls, args, model, dataset, tok, **trainer_kw) -> TrainedArm:
    """Train `model` with `trainer_cls(model, args, train_dataset=dataset, processing_class=tok, **trainer_kw)`."""
    trainer = trainer_cls(model=model, args=args, train_dataset=dataset, processing_class=tok, **trainer_kw)
    start = time.perf_counter()
    result = trainer.train()
    seconds = time.perf_counter() - start
    seqs = args.max_steps * args.per_device_train_batch_size
    length = len(dataset[0]["input_ids"])
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    print(f"  trained {name}: {args.max_steps} steps, {seqs} sequences, {seqs * length} tokens, {seconds:.0f} s, "
          f"final logged loss {losses[-1] if losses else float('nan'):.4f} (train loss {result.training_loss:.4f})",
          flush=True)
    trained = trainer.model.eval()
    return TrainedArm(name, trained, seconds, seqs, seqs * length, losses[-1] if losses else None)


# -- decoding and scoring ----------------------------------------------------------------------------------------------
@dataclass
class Row:
    """One line of the table."""

    method: str
    model: str
    setting: str
    accuracy: float
    tpf: float  # mean over held-out rows of the row's tokens per forward
    tpf_after_prefill: float  # the same without counting the prefill forward
    extra: str = ""


def prompt_batches(tok, rows: Sequence[dict], batch: int):
    """Input ids [b, P] of consecutive chunks of `rows`; every prompt has the same length, so no padding is needed."""
    for i in range(0, len(rows), batch):
        yield torch.tensor([tok.convert_tokens_to_ids(list(r["prompt"])) for r in rows[i:i + batch]])


@torch.no_grad()
def decode(model, tok, task: AdditionTask, rows: Sequence[dict], batch: int, **generate_kw) -> dict:
    """Greedy-decode every held-out prompt with `model.generate(**generate_kw)`; accuracy, mean TPF per row and the
    generated answers. `generate_kw` without `custom_generate` is plain AR greedy (TPF 1 by construction: one forward
    per token, the prefill giving the first; counted here the same way as the DLM loops count theirs)."""
    answers, tpf, tpf_after, accepted = [], [], [], []
    for ids in prompt_batches(tok, rows, batch):
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                             max_new_tokens=task.answer_length, eos_token_id=tok.eos_token_id,
                             pad_token_id=tok.pad_token_id, return_dict_in_generate=True, **generate_kw)
        new = out.sequences[:, ids.shape[1]:]
        answers += decode_answers(tok, new)
        row_tpf = getattr(out, "tokens_per_forward", None)
        forwards = getattr(out, "num_forwards", None)
        if row_tpf is None:  # plain generate: every row takes one forward per token it writes (the prefill the first)
            lengths = [(r.index(tok.eos_token_id) + 1 if tok.eos_token_id in r else len(r)) for r in new.tolist()]
            row_tpf, forwards = torch.ones(len(ids)), torch.tensor(lengths)
        tpf += row_tpf.float().tolist()
        # the same count without the prefill forward (what the papers' long generations approach)
        forwards = forwards.float()
        tpf_after += (row_tpf.float() * forwards / (forwards - 1).clamp(min=1)).tolist()
        rate = getattr(out, "acceptance_rate", None)
        if rate is not None:
            accepted += [x for x in rate.float().tolist() if not math.isnan(x)]
    return {"accuracy": exact_match(answers, rows), "tpf": sum(tpf) / len(tpf),
            "tpf_after_prefill": sum(tpf_after) / len(tpf_after), "answers": answers,
            "acceptance": sum(accepted) / len(accepted) if accepted else None}


# -- the benchmark -----------------------------------------------------------------------------------------------------
BLOCK = 4  # block size of the BD3 / SeqD / RCD models (the prompt length 2 * digits + 2 is a multiple of it for odd
# digit counts, so decoding blocks start where training blocks start)
IDLM_BLOCK_LENGTH = 3  # I-DLM mask slots per noisy block: serves ISD N = 2, 3, 4
ISD_STRIDES = (2, 3, 4)
BLOCK_SETTINGS = ((4, None), (2, None), (1, None), (4, 0.9), (4, 0.7), (4, 0.5))  # (steps per block, threshold)
RCD_THRESHOLDS = (0.9, 0.7, 0.5, 0.3)


def build_datasets(tok, task: AdditionTask, profile: Profile, seed: int, test_seed: int | None = None):
    """(first-stage dataset, second-stage dataset for SeqD/RCD, held-out rows). Every example is seen once."""
    from datasets import Dataset

    first, second = profile.steps * profile.batch, profile.extra_steps * profile.batch
    train, test = disjoint_splits(task, first + second, profile.n_test, seed, test_seed)
    stage1 = Dataset.from_list(encode_rows(tok, train[:first]))
    stage2 = Dataset.from_list(encode_rows(tok, train[first:]))
    return stage1, stage2, test


ARMS = ("AR", "I-DLM", "BD3", "ref", "SeqD", "RCD")


def train_all(profile: Profile, tok, stage1, stage2, seed: int, out_dir: str, arms_to_train: Sequence[str] = ARMS,
              save: bool = False, init_from: str | None = None,
              idlm_ce_alpha: float | None = None) -> dict[str, TrainedArm]:
    """Train the requested arms, in `ARMS` order. SeqD and RCD start from the BD3 weights and RCD needs the reference:
    trained in this call, or (another process's `save=True` run) loaded from `out_dir/models`, waited for.
    `init_from`: continue the AR / I-DLM / BD3 / ref arms from the weights a `--save` run wrote there.
    `idlm_ce_alpha`: I-DLM's fixed clean-CE weight (None: the paper's auto-balance)."""
    from trl import SFTConfig, SFTTrainer

    from hf_fastslow.trainers.block_diffusion_config import BlockDiffusionTrainingConfig
    from hf_fastslow.trainers.block_diffusion_trainer import BlockDiffusionTrainer
    from hf_fastslow.trainers.idlm_config import IDLMConfig
    from hf_fastslow.trainers.idlm_trainer import IDLMTrainer

    unknown = set(arms_to_train) - set(ARMS)
    if unknown:
        raise ValueError(f"unknown arms {sorted(unknown)}; choose from {ARMS}")
    mask = tok.mask_token_id
    arms: dict[str, TrainedArm] = {}

    def fresh(hidden=profile.hidden, layers=profile.layers):
        return tiny_llama(tok, hidden, layers, seed)

    def start(name, hidden=profile.hidden, layers=profile.layers):
        model = fresh(hidden, layers)
        if init_from is not None:
            model.load_state_dict(load_arms(init_from, names=(name,))[name].model.state_dict())
        return model

    def done(arm: TrainedArm) -> None:
        arms[arm.name] = arm
        if save:
            save_arms({arm.name: arm}, tok, out_dir)

    def needed(name: str) -> TrainedArm:
        while name not in arms:
            loaded = load_arms(out_dir, names=(name,))
            if name in loaded:
                arms[name] = loaded[name]
            else:
                time.sleep(20)  # trained by another process of the same run
        return arms[name]

    def copy_of(arm: TrainedArm):
        # A fresh module with the trained weights, not copy.deepcopy: trl's SFTTrainer replaces `model.forward` by a
        # closure over the model it trained, so a deep copy would still run (and train) the original's parameters.
        model = fresh()
        model.load_state_dict(arm.model.state_dict())
        model.config.block_diffusion = copy.deepcopy(arm.model.config.block_diffusion)
        return model.train()

    def bd3_args(name, steps, config_cls=BlockDiffusionTrainingConfig, lr_scale=1.0):
        args = training_args(config_cls, profile, f"{out_dir}/{name}", steps, seed, objective="bd3",
                             block_size=BLOCK, logit_shift=False, mask_token_id=mask)
        args.learning_rate *= lr_scale
        return args

    if "AR" in arms_to_train:
        done(train("AR", SFTTrainer, training_args(SFTConfig, profile, f"{out_dir}/ar", profile.steps, seed),
                   start("AR"), stage1, tok))
    if "I-DLM" in arms_to_train:
        balance = {"auto_balance": True} if idlm_ce_alpha is None else {"ce_alpha": idlm_ce_alpha}
        args = training_args(IDLMConfig, profile, f"{out_dir}/idlm", profile.steps, seed, mask_token_id=mask,
                             block_length=IDLM_BLOCK_LENGTH, **balance)
        done(train("I-DLM", IDLMTrainer, args, start("I-DLM"), stage1, tok))
    if "BD3" in arms_to_train:
        done(train("BD3", BlockDiffusionTrainer, bd3_args("bd3", profile.steps), start("BD3"), stage1, tok))
    if "ref" in arms_to_train:
        done(train("ref", BlockDiffusionTrainer, bd3_args("ref", profile.steps // 2),
                   start("ref", profile.ref_hidden, profile.ref_layers), stage1, tok))
    # The fairness protocol: SeqD and RCD start from the same BD3 weights and see the same further examples in the
    # same order, at the same (lower) learning rate; only the residual inputs differ.
    if "SeqD" in arms_to_train:
        done(train("SeqD", BlockDiffusionTrainer, bd3_args("seqd", profile.extra_steps, lr_scale=1 / 3),
                   copy_of(needed("BD3")), stage2, tok))
    if "RCD" in arms_to_train:
        from hf_fastslow.trainers.rcd_config import RCDTrainingConfig
        from hf_fastslow.trainers.rcd_trainer import RCDTrainer

        args = bd3_args("rcd", profile.extra_steps, RCDTrainingConfig, lr_scale=1 / 3)
        done(train("RCD", RCDTrainer, args, copy_of(needed("BD3")), stage2, tok, ref_model=needed("ref").model))
    return {name: arm for name, arm in arms.items() if name in arms_to_train}


def evaluate_all(arms: dict[str, TrainedArm], tok, task: AdditionTask, test: list[dict], batch: int) -> list[Row]:
    rows: list[Row] = []

    def add(method, arm, setting, result, extra=""):
        if result.get("acceptance") is not None:
            extra = (extra + f"; acceptance {result['acceptance']:.3f}").lstrip("; ")
        rows.append(Row(method, arm, setting, result["accuracy"], result["tpf"], result["tpf_after_prefill"], extra))
        print(f"  {method:22s} {arm:6s} {setting:24s} accuracy {result['accuracy']:.3f}  TPF {result['tpf']:.2f} "
              f"({result['tpf_after_prefill']:.2f} after prefill)  {extra}", flush=True)

    if "AR" in arms:
        add("AR greedy", "AR", "generate", decode(arms["AR"].model, tok, task, test, batch))
    if "I-DLM" in arms:
        from hf_fastslow.generation.isd import isd_generate

        idlm = arms["I-DLM"].model
        own = decode(idlm, tok, task, test, batch)
        add("AR greedy", "I-DLM", "generate (causal anchor)", own)
        for n in ISD_STRIDES:
            res = decode(idlm, tok, task, test, batch, custom_generate=isd_generate, gen_block_size=n,
                         mask_token_id=tok.mask_token_id)
            same = sum(a == b for a, b in zip(res["answers"], own["answers"]))
            add("ISD greedy", "I-DLM", f"N={n}", res, f"{same}/{len(test)} answers == its generate")
    from hf_fastslow.generation.block_diffusion import block_diffusion_generate

    if "BD3" in arms:
        for steps, threshold in BLOCK_SETTINGS:
            res = decode(arms["BD3"].model, tok, task, test, batch, custom_generate=block_diffusion_generate,
                         block_size=BLOCK, steps=steps, threshold=threshold)
            add("block diffusion", "BD3", f"b={BLOCK} steps={steps} thr={threshold}", res)
    if "I-DLM" in arms:
        for steps, threshold in ((IDLM_BLOCK_LENGTH, None), (IDLM_BLOCK_LENGTH, 0.9)):
            res = decode(arms["I-DLM"].model, tok, task, test, batch, custom_generate=block_diffusion_generate,
                         block_size=IDLM_BLOCK_LENGTH, steps=steps, threshold=threshold)
            add("block diffusion", "I-DLM", f"b={IDLM_BLOCK_LENGTH} causal steps={steps} thr={threshold}", res)
    if "RCD" in arms:
        from hf_fastslow.generation.rcd import rcd_generate

        for threshold in RCD_THRESHOLDS:
            res = decode(arms["SeqD"].model, tok, task, test, batch, custom_generate=block_diffusion_generate,
                         block_size=BLOCK, steps=BLOCK, threshold=threshold)
            add("SeqD (block diffusion)", "SeqD", f"b={BLOCK} thr={threshold}", res)
            for init in ("zero", "self"):  # "self": one extra target pass per block, counted in TPF
                res = decode(arms["RCD"].model, tok, task, test, batch, custom_generate=rcd_generate,
                             block_size=BLOCK, steps=BLOCK, threshold=threshold, init=init)
                add(f"RCD ({init} init)", "RCD", f"b={BLOCK} thr={threshold}", res)
    return rows


def print_table(rows: list[Row], arms: dict[str, TrainedArm], profile: Profile, args) -> None:
    print(f"\n## Addition, {profile.digits}-digit operands, {args.profile} profile, seed {args.seed}: exact match on "
          f"{profile.n_test} held-out problems, greedy, tokens per forward (prefill counted; AR = 1)")
    print("\n| model | trained on | steps | tokens | train s |\n|---|---|---|---|---|")
    for name, arm in arms.items():
        base = "BD3 weights + " if name in ("SeqD", "RCD") else ""
        print(f"| {name} | {base}{arm.sequences} sequences | {arm.sequences // profile.batch} | {arm.tokens} | "
              f"{arm.seconds:.0f} |")
    print("\n| method | model | setting | accuracy | tokens/forward | tokens/forward after prefill | note |\n"
          "|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r.method} | {r.model} | {r.setting} | {100 * r.accuracy:.1f}% | {r.tpf:.2f} | "
              f"{r.tpf_after_prefill:.2f} | {r.extra} |")


def plot_rows(rows: list[Row], path: str) -> None:
    """Accuracy vs tokens per forward: one marker series per (method, model), points in sweep order."""
    from hf_fastslow.evaluation.cli_support import pyplot_or_reason

    plt, reason = pyplot_or_reason()
    if plt is None:
        print(reason)
        return
    series: dict[str, list[Row]] = {}
    for r in rows:
        series.setdefault(f"{r.method} ({r.model})", []).append(r)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, points in series.items():
        ax.plot([r.tpf for r in points], [100 * r.accuracy for r in points], marker="o", label=label)
    ax.set_xlabel("tokens per forward (prefill counted)")
    ax.set_ylabel("exact match, %")
    ax.set_title("multi-digit addition: accuracy vs tokens per forward")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"plot written to {path}")


def save_arms(arms: dict[str, TrainedArm], tok, out_dir: str) -> None:
    """`save_pretrained` of every trained model (config carries its BlockDiffusionConfig) + the tokenizer + a record of
    its training, so `--load` can evaluate without retraining."""
    from hf_fastslow.model_card import save_model_card

    for name, arm in arms.items():
        path = f"{out_dir}/models/{name}"
        arm.model.save_pretrained(path)
        tok.save_pretrained(path)
        record = {"seconds": arm.seconds, "sequences": arm.sequences, "tokens": arm.tokens,
                  "final_loss": arm.final_loss}
        # A Hub model card with what was measured at save time (training figures; the accuracy table is printed by
        # the evaluation, which may run later from --load).
        save_model_card(path, base_model=None, method=f"dlm-synthetic-{name}", figures={
            "training sequences": arm.sequences, "training tokens": arm.tokens,
            "final training loss": arm.final_loss, "training seconds (loaded 2-core CPU)": arm.seconds},
            description="A tiny Llama trained from scratch by benchmarks/dlm_synthetic.py (reversed multi-digit "
                        "addition, character tokenizer).")
        with open(f"{path}/training.json", "w") as fh:
            json.dump(record, fh)


def load_arms(load_dir: str, names: Sequence[str] = ARMS) -> dict[str, TrainedArm]:
    from pathlib import Path

    from transformers import LlamaForCausalLM

    arms = {}
    for name in names:
        path = Path(load_dir) / "models" / name
        if (path / "training.json").is_file():  # written last
            record = json.loads((path / "training.json").read_text())
            arms[name] = TrainedArm(name, LlamaForCausalLM.from_pretrained(path).eval(), **record)
    return arms


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", dest="profile", action="store_const", const="quick", default="full")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--eval-batch", type=int, default=125)
    p.add_argument("--arms", nargs="*", default=list(ARMS), choices=ARMS,
                   help="train only these arms; with --save several processes can train disjoint arms into the same "
                        "--out (SeqD/RCD wait for BD3/ref there) and one --load run evaluates them all")
    p.add_argument("--no-eval", action="store_true", help="train (and --save) only")
    p.add_argument("--idlm-ce-alpha", type=float, default=None,
                   help="I-DLM clean-CE weight (default: auto-balance, alpha = stopgrad(CE_noisy / CE_clean))")
    p.add_argument("--init-from", default=None, help="continue AR/I-DLM/BD3/ref from a --save run's models")
    p.add_argument("--steps", type=int, default=None, help="override the profile's first-stage steps")
    p.add_argument("--data-seed", type=int, default=None, help="training examples' seed (default: --seed)")
    p.add_argument("--out", default="outputs/dlm_synthetic", help="trainer output dirs, the JSON results, --save")
    p.add_argument("--save", action="store_true", help="save_pretrained every trained model under OUT/models")
    p.add_argument("--load", default=None, help="evaluate the models a --save run wrote to LOAD/models (no training)")
    p.add_argument("--plot", default=None, help="write accuracy vs tokens per forward to this PNG")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    profile = PROFILES[args.profile]
    if args.steps is not None:
        profile = Profile(**{**asdict(profile), "steps": args.steps})
    tok, task = char_tokenizer(), AdditionTask(profile.digits)
    print(f"profile {args.profile}: {asdict(profile)}; torch threads {args.threads}", flush=True)
    stage1, stage2, test = build_datasets(tok, task, profile, args.seed)
    if args.data_seed is not None:  # other training examples (a continuation), the same held-out set
        stage1, stage2, _ = build_datasets(tok, task, profile, args.data_seed, test_seed=args.seed)
    start = time.perf_counter()
    if args.load:
        arms = load_arms(args.load)
    else:
        arms = train_all(profile, tok, stage1, stage2, args.seed, args.out, args.arms, save=args.save,
                         init_from=args.init_from, idlm_ce_alpha=args.idlm_ce_alpha)
    if args.no_eval:
        return []
    rows = evaluate_all(arms, tok, task, test, args.eval_batch)
    print_table(rows, arms, profile, args)
    print(f"\ntotal {time.perf_counter() - start:.0f} s")
    with open(f"{args.out}/results_{args.profile}_seed{args.seed}.json", "w") as fh:
        json.dump({"profile": asdict(profile), "rows": [asdict(r) for r in rows],
                   "arms": {k: {"seconds": a.seconds, "sequences": a.sequences, "tokens": a.tokens,
                                "final_loss": a.final_loss} for k, a in arms.items()}}, fh, indent=1)
    if args.plot:
        plot_rows(rows, args.plot)
    return rows


if __name__ == "__main__":
    main()
