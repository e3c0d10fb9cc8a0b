"""Residual Context Diffusion (RCD) on a tiny random Llama (runs in seconds, no download).

    python examples/rcd.py

RCD feeds every still-masked slot of a block, at the next denoising step, `(1 - alpha) E([MASK]) + alpha E^T p`: the
soft token of the distribution it predicted, weighted by that distribution's normalized entropy. The example shows
1. the decoding API (`rcd_generate`, the four initializations) beside the block-diffusion baseline,
2. that a zero residual weight is the baseline token for token,
3. two RCDTrainer steps against a frozen reference DLM (the paper's stage 2), with the residual weight it logged.
The models are random (not trained DLMs), so the text is noise: the example shows the API, not quality.
"""

import tempfile

import torch
from datasets import Dataset
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from hf_fastslow.generation.block_diffusion import block_diffusion_generate
from hf_fastslow.generation.padding import left_pad
from hf_fastslow.generation.rcd import rcd_generate
from hf_fastslow.modeling.block_diffusion import BlockDiffusionConfig, attach_block_diffusion
from hf_fastslow.trainers.rcd_config import RCDTrainingConfig
from hf_fastslow.trainers.rcd_trainer import RCDTrainer

torch.manual_seed(0)
torch.set_num_threads(1)
MASK = 127


def tiny(layers, seed):
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, pad_token_id=0, eos_token_id=1, bos_token_id=2)
    model = LlamaForCausalLM(config).eval()
    return attach_block_diffusion(model, BlockDiffusionConfig(mask_token_id=MASK, block_size=4, attention="block"))


model, ref = tiny(2, 0), tiny(1, 1)  # target and a smaller reference DLM of the same vocabulary
ids, mask = left_pad([[5, 6, 7, 8, 9, 10, 11], [12, 13, 14]], pad_id=0)
# A random model spreads its probability thin (top-1 ~ 1/vocab), so the threshold that commits several slots per
# forward is tiny here; a trained DLM uses about 0.9.
common = dict(attention_mask=mask, block_size=4, threshold=0.0105, max_new_tokens=12, do_sample=False,
              eos_token_id=None, return_dict_in_generate=True)

# 1. baseline vs RCD with each initialization of a block's first step
base = model.generate(ids, custom_generate=block_diffusion_generate, **common)
print(f"baseline          : {base.sequences[:, ids.shape[1]:].tolist()}  "
      f"TPF {[round(x, 2) for x in base.tokens_per_forward.tolist()]}")
for init, extra in [("zero", {}), ("self", {}), ("dirichlet", {}), ("ref", {"ref_model": ref})]:
    out = model.generate(ids, custom_generate=rcd_generate, init=init, t_res=1.0, **extra, **common)
    tpf = [round(x, 2) for x in out.tokens_per_forward.tolist()]
    print(f"RCD init={init:9s}: {out.sequences[:, ids.shape[1]:].tolist()}  TPF {tpf}")

# 2. zero residual weight: the baseline, token for token
zero = model.generate(ids, custom_generate=rcd_generate, alpha_mode="fixed", fixed_alpha=0.0, **common)
print(f"alpha=0 equals the baseline: {torch.equal(zero.sequences, base.sequences)}")

# 3. RCD training (stage 2): residuals from the frozen reference on the noisy half's masked slots
with tempfile.TemporaryDirectory() as out_dir:
    data = Dataset.from_dict({"input_ids": [[5 + (i + j) % 100 for j in range(16)] for i in range(8)]})
    args = RCDTrainingConfig(output_dir=out_dir, objective="bd3", block_size=4, mask_token_id=MASK, max_steps=2,
                             per_device_train_batch_size=4, learning_rate=1e-3, logging_steps=1, use_cpu=True,
                             report_to="none", save_strategy="no", bf16=False, max_length=16)
    # a word-level tokenizer over the 128 ids (the data is pre-tokenized; SFTTrainer wants a processing class)
    backend = Tokenizer(models.WordLevel({f"t{i}": i for i in range(128)}, unk_token="t3"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="t0", eos_token="t1", bos_token="t2")
    trainer = RCDTrainer(model.train(), ref_model=ref, args=args, train_dataset=data, processing_class=tok)
    trainer.train()
    for log in trainer.state.log_history:
        if "loss" in log:
            print(f"step {log['step']}: loss {log['loss']:.3f}, mean residual weight alpha {log['residual_alpha']:.3f}")
