"""Smoke run of the other trainers under 2 processes: early readout, feature sieve, block diffusion, I-DLM, RCD,
clock SFT (CARE healing is `workers.py heal`). Each trains 2 steps on a tiny random model; each rank reports, per
trainer, whether it ran, its final weights digest (DDP: the same on both ranks) and the logged losses.

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/distributed/smoke_trainers.py OUT [NAME ..]
"""

from __future__ import annotations

import os
import sys
import traceback

import torch
from datasets import Dataset
from transformers import LlamaConfig, LlamaForSequenceClassification

from tests.conftest import byte_tokenizer, tiny_llama
from tests.distributed.launcher import write_rank_result
from tests.distributed.workers import weights_digest


def classifier(num_labels):
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                      num_key_value_heads=2, num_labels=num_labels, pad_token_id=0)
    return LlamaForSequenceClassification(cfg)


def ids_dataset(n, num_labels, teacher=False):
    g = torch.Generator().manual_seed(0)
    cols = {"input_ids": torch.randint(3, 64, (n, 6), generator=g).tolist(), "attention_mask": [[1] * 6] * n,
            "labels": torch.randint(0, num_labels, (n,), generator=g).tolist()}
    if teacher:
        cols["teacher_logits"] = torch.randn(n, num_labels, generator=g).tolist()
    return Dataset.from_dict(cols)


def common(out, **kw):
    return dict(output_dir=out, use_cpu=True, report_to="none", seed=0, max_steps=2, logging_steps=1,
                save_strategy="no", dataloader_num_workers=0, **kw)


def early_readout(out):
    from hf_fastslow.trainers.early_readout_config import EarlyReadoutDistillationConfig
    from hf_fastslow.trainers.early_readout_trainer import EarlyReadoutDistillationTrainer

    args = EarlyReadoutDistillationConfig(**common(out, per_device_train_batch_size=4, readout_warmup_epochs=0.0))
    return EarlyReadoutDistillationTrainer(classifier(2), args=args, train_dataset=ids_dataset(16, 2, teacher=True))


def feature_sieve(out):
    from hf_fastslow.trainers.feature_sieve_config import FeatureSieveConfig
    from hf_fastslow.trainers.feature_sieve_trainer import FeatureSieveTrainer

    args = FeatureSieveConfig(**common(out, per_device_train_batch_size=4, learning_rate=1e-2, forget_every=1))
    return FeatureSieveTrainer(classifier(3), args=args, train_dataset=ids_dataset(16, 3))


def block_diffusion(out):
    from hf_fastslow.trainers.block_diffusion_config import BlockDiffusionTrainingConfig
    from hf_fastslow.trainers.block_diffusion_trainer import BlockDiffusionTrainer

    tok = byte_tokenizer()
    ds = Dataset.from_dict({"prompt": [f"{i}+{i + 3}=" for i in range(16)],
                            "completion": [f"{2 * i + 3};" for i in range(16)]})
    args = BlockDiffusionTrainingConfig(**common(out, bf16=False, per_device_train_batch_size=2, learning_rate=1e-3,
                                                 max_length=32, mask_token_id=len(tok), block_size=2))
    return BlockDiffusionTrainer(tiny_llama(vocab=len(tok) + 1, num_layers=2), args=args, train_dataset=ds,
                                 processing_class=tok)


def idlm(out):
    from hf_fastslow.trainers.idlm_config import IDLMConfig
    from hf_fastslow.trainers.idlm_trainer import IDLMTrainer

    tok = byte_tokenizer()
    ds = Dataset.from_dict({"prompt": [f"{i}+{i + 3}=" for i in range(16)],
                            "completion": [f"{2 * i + 3};" for i in range(16)]})
    args = IDLMConfig(**common(out, bf16=False, per_device_train_batch_size=2, learning_rate=1e-3, max_length=32,
                               mask_token_id=len(tok), block_length=2))
    return IDLMTrainer(tiny_llama(vocab=len(tok) + 1, num_layers=2), args=args, train_dataset=ds, processing_class=tok)


def rcd(out):
    from hf_fastslow.trainers.rcd_config import RCDTrainingConfig
    from hf_fastslow.trainers.rcd_trainer import RCDTrainer

    tok = byte_tokenizer()
    ds = Dataset.from_dict({"prompt": [f"{i}+{i + 3}=" for i in range(16)],
                            "completion": [f"{2 * i + 3};" for i in range(16)]})
    args = RCDTrainingConfig(**common(out, bf16=False, per_device_train_batch_size=2, learning_rate=1e-3,
                                      max_length=32, mask_token_id=len(tok), block_size=2))
    reference = tiny_llama(vocab=len(tok) + 1, num_layers=1, seed=1)  # the frozen reference DLM
    return RCDTrainer(tiny_llama(vocab=len(tok) + 1, num_layers=2), reference, args=args, train_dataset=ds,
                      processing_class=tok)


def clock_sft(out):
    from hf_fastslow.generation.agent_tasks import make_fact_tasks
    from hf_fastslow.trainers.clock_sft import clock_sft_trainer, make_clock_sft_dataset, synthesize_episodes

    rows = make_clock_sft_dataset(synthesize_episodes(make_fact_tasks(2, seed=5, correction_rate=0.5), seed=9)[:4])
    return clock_sft_trainer(tiny_llama(vocab=259, hidden=32, num_layers=2), byte_tokenizer(), rows, output_dir=out,
                             max_steps=2, learning_rate=1e-2, per_device_train_batch_size=1, use_cpu=True, bf16=False,
                             lora_r=4, lora_alpha=8, logging_steps=1)


TRAINERS = {"early_readout": early_readout, "feature_sieve": feature_sieve, "block_diffusion": block_diffusion,
            "idlm": idlm, "rcd": rcd, "clock_sft": clock_sft}


def main(out_dir: str, names=()) -> dict:
    torch.set_num_threads(1)
    report = {"rank": int(os.environ.get("RANK", "0"))}
    for name, build in TRAINERS.items():
        if names and name not in names:
            continue
        try:
            trainer = build(os.path.join(out_dir, name))
            trainer.train()
            report[name] = {"ok": True, "num_processes": trainer.accelerator.num_processes,
                            "weights": weights_digest(trainer.model), "global_step": trainer.state.global_step,
                            "losses": [h["loss"] for h in trainer.state.log_history if "loss" in h]}
        except Exception as err:  # report every trainer, not only the first failure
            report[name] = {"ok": False, "error": f"{type(err).__name__}: {err}",
                            "trace": traceback.format_exc()[-2000:]}
    write_rank_result(report)
    return report


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
