"""Convert an AR model into a diffusion LM with hf_fastslow's trainers (`IDLMTrainer`, `BlockDiffusionTrainer`), save
it, reload it with plain `from_pretrained`, and decode with the matching loop.

    python examples/dlm_convert.py                          # tiny random Llama, I-DLM objective, ~1 min on 2 CPU cores
    python examples/dlm_convert.py --objective bd3          # BD3/SDAR-style block diffusion (block_diffusion_generate)
    python examples/dlm_convert.py --objective idlm --lora-gated   # R-ISD: activated LoRA on the mask slots only

The default run builds a 2-layer Llama with a character tokenizer and trains it on prompt/completion pairs
"a+b=" -> "c" (completion-only labels: prompts are never masked). Converting the embedded default model
(SmolLM2-135M-Instruct) is the same code with `--model default`: the mask token reuses an unused special token
(`ensure_mask_token(..., strategy="reuse")`, no embedding resize, tied embeddings kept), the pairs go through its chat
template, and `--lora` / `--lora-gated` train adapters. On 2 CPU cores that is a smoke conversion (~1-2 s per step at
batch 8, e.g. `--model default --lora-gated --steps 200`), not a quality one.
"""

import argparse
import random
import tempfile
import time

import torch
from datasets import Dataset

from hf_fastslow.generation.isd import introspective_acceptance_rate, isd_generate
from hf_fastslow.modeling.block_diffusion import block_diffusion_config
from hf_fastslow.trainers.block_diffusion_config import BlockDiffusionTrainingConfig
from hf_fastslow.trainers.block_diffusion_trainer import BlockDiffusionTrainer
from hf_fastslow.trainers.idlm_config import IDLMConfig
from hf_fastslow.trainers.idlm_trainer import IDLMTrainer

parser = argparse.ArgumentParser()
parser.add_argument("--model", default="tiny", choices=["tiny", "default"])
parser.add_argument("--objective", default="idlm", choices=["idlm", "bd3", "mdlm"])
parser.add_argument("--block-size", type=int, default=3, help="I-DLM: mask slots per block (ISD N - 1)")
parser.add_argument("--steps", type=int, default=None)
parser.add_argument("--lora", action="store_true", help="train a plain LoRA instead of all weights")
parser.add_argument("--lora-gated", action="store_true", help="R-ISD: activated LoRA on the noisy half (idlm only)")
parser.add_argument("--task", default="copy", choices=["copy", "add"],
                    help="copy: '38472910=' -> '38472910' (long answers: tokens per forward shows); add: 'a+b=' -> sum")
parser.add_argument("--ar-steps", type=int, default=300,
                    help="tiny model: plain SFT steps first, so that there is an AR model to convert (0 = convert the "
                         "random model; R-ISD then keeps the random model's outputs, being lossless)")
parser.add_argument("--verbose", action="store_true", help="print every answer")
cli = parser.parse_args()
torch.set_num_threads(1)  # a loaded 2-core box runs small ops faster on one thread
torch.manual_seed(0)


def char_tokenizer():
    """A character tokenizer for digits and '+', '=' with pad/eos/bos and a <|mask|> that no text produces."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(["<pad>", "</s>", "<s>", "<|mask|>", *"0123456789+="])}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    backend.decoder = decoders.Fuse()  # characters join without spaces
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="</s>", bos_token="<s>")


def make_pair(rng):
    if cli.task == "copy":
        digits = "".join(rng.choice("0123456789") for _ in range(8))
        return f"{digits}=", digits
    a, b = rng.randrange(100), rng.randrange(100)
    return f"{a}+{b}=", str(a + b)


rng = random.Random(0)
pairs = [make_pair(rng) for _ in range(2000)]
if cli.model == "tiny":
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = char_tokenizer()
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                         max_position_embeddings=64, pad_token_id=0, eos_token_id=1, bos_token_id=2))
    mask_id = tok.convert_tokens_to_ids("<|mask|>")
    data = Dataset.from_dict({"prompt": [p for p, _ in pairs], "completion": [c for _, c in pairs]})
    steps, batch, lr, max_length, checkpointing = cli.steps or 400, 32, 3e-3, 24, False
else:
    from hf_fastslow import load_default_model
    from hf_fastslow.modeling.block_diffusion import ensure_mask_token

    model, tok = load_default_model()
    mask_id = ensure_mask_token(model, tok, strategy="reuse")
    data = Dataset.from_dict({"prompt": [[{"role": "user", "content": p}] for p, _ in pairs],
                              "completion": [[{"role": "assistant", "content": c}] for _, c in pairs]})
    steps, batch, lr, max_length, checkpointing = cli.steps or 50, 8, 1e-4, 64, True

common = dict(output_dir=tempfile.mkdtemp(prefix="dlm_convert_"), use_cpu=not torch.cuda.is_available(),
              report_to="none", save_strategy="no", per_device_train_batch_size=batch, max_steps=steps,
              learning_rate=lr, lr_scheduler_type="cosine", warmup_steps=max(1, steps // 30),
              logging_steps=max(1, steps // 5), max_length=max_length, mask_token_id=mask_id, seed=0,
              disable_tqdm=True, gradient_checkpointing=checkpointing)


def greedy_answers(m, prompts):
    outs = []
    for prompt in prompts:
        ids = tok(prompt, return_tensors="pt").input_ids
        with torch.no_grad():
            seq = m.generate(ids, do_sample=False, max_new_tokens=12, pad_token_id=tok.pad_token_id)
        outs.append(tok.decode(seq[0, ids.shape[1]:], skip_special_tokens=True).strip())
    return outs


if cli.model == "tiny" and cli.ar_steps:
    from trl import SFTConfig, SFTTrainer

    ar_args = {k: v for k, v in common.items() if k != "mask_token_id"}
    ar_args.update(output_dir=tempfile.mkdtemp(prefix="dlm_ar_"), max_steps=cli.ar_steps,
                   logging_steps=cli.ar_steps, bf16=False)
    t0 = time.perf_counter()
    SFTTrainer(model, args=SFTConfig(**ar_args), train_dataset=data, processing_class=tok).train()
    print(f"AR model: {cli.ar_steps} SFT steps in {time.perf_counter() - t0:.0f} s")

peft_config = None
if cli.lora:
    from peft import LoraConfig

    peft_config = LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM")
if cli.objective == "idlm":
    args = IDLMConfig(block_length=cli.block_size, lora_gated=cli.lora_gated, **common)
    trainer = IDLMTrainer(model, args=args, train_dataset=data, processing_class=tok, peft_config=peft_config)
else:
    if cli.lora_gated:
        parser.error("--lora-gated is R-ISD training: use --objective idlm")
    args = BlockDiffusionTrainingConfig(objective=cli.objective, block_size=cli.block_size, **common)
    trainer = BlockDiffusionTrainer(model, args=args, train_dataset=data, processing_class=tok,
                                    peft_config=peft_config)

test_rng = random.Random(1)
tests = [make_pair(test_rng) for _ in range(16)]
prompts = [p for p, _ in tests]
if cli.model == "default":
    prompts = [tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
               for p in prompts]
model.eval()
before = greedy_answers(model, prompts)
print(f"AR greedy before conversion: {sum(a == t for a, (_, t) in zip(before, tests))}/{len(tests)} answers right")

held_out = Dataset.from_dict({"prompt": [p for p, _ in tests], "completion": [c for _, c in tests]})
if cli.model == "default":
    held_out = Dataset.from_dict({"prompt": [[{"role": "user", "content": p}] for p, _ in tests],
                                  "completion": [[{"role": "assistant", "content": c}] for _, c in tests]})
start = trainer.evaluate(held_out)
t0 = time.perf_counter()
trainer.train()
end = trainer.evaluate(held_out)
print(f"trained {steps} steps in {time.perf_counter() - t0:.0f} s on {trainer.total_train_tokens} tokens; held-out "
      f"denoising CE {start['eval_noisy_ce']:.3f} -> {end['eval_noisy_ce']:.3f}, denoising accuracy "
      f"{start['eval_mean_token_accuracy']:.2f} -> {end['eval_mean_token_accuracy']:.2f}")

out_dir = tempfile.mkdtemp(prefix="dlm_converted_")
trainer.save_model(out_dir)
if trainer.model is model:  # a full model: a plain from_pretrained folder with the BlockDiffusionConfig in config.json
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out_dir)
else:  # an adapter folder (+ block_diffusion_config.json); generate with the trained peft model
    model = trainer.model
    if checkpointing:  # Trainer leaves it on; peft's aLoRA hooks would then wait for a backward at every decode forward
        model.gradient_checkpointing_disable()
print(f"saved to {out_dir}; block diffusion config: {block_diffusion_config(model)}")

model.eval()
correct = forwards = generated = same = 0
alphas = []
for (_, answer), prompt, ar_text in zip(tests, prompts, before, strict=True):
    ids = tok(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        if cli.objective == "idlm":
            out = model.generate(ids, custom_generate=isd_generate, gen_block_size=cli.block_size + 1,
                                 mask_token_id=mask_id, do_sample=False, max_new_tokens=12,
                                 return_dict_in_generate=True, pad_token_id=tok.pad_token_id)
            # introspective acceptance on the right answer (teacher-forced): how often a mask-slot draft would pass
            reference = torch.cat([ids, tok(answer, add_special_tokens=False, return_tensors="pt").input_ids,
                                   torch.tensor([[tok.eos_token_id]])], dim=1)
            if reference.shape[1] - ids.shape[1] >= 3:  # two exact tokens come first, then drafted ones
                alphas.append(introspective_acceptance_rate(model, reference, cli.block_size + 1,
                                                            prompt_length=ids.shape[1], mask_token_id=mask_id))
        else:
            from hf_fastslow.generation.block_diffusion import block_diffusion_generate

            out = model.generate(ids, custom_generate=block_diffusion_generate, steps=cli.block_size, threshold=0.9,
                                 max_new_tokens=12, return_dict_in_generate=True, pad_token_id=tok.pad_token_id)
    seq, tpf = out.sequences, float(out.tokens_per_forward[0])
    text = tok.decode(seq[0, ids.shape[1]:], skip_special_tokens=True).strip()
    correct += text == answer
    same += text == ar_text
    if cli.verbose:
        print(repr(prompt), repr(text))
    new = int((seq[0, ids.shape[1]:] != tok.pad_token_id).sum())
    generated, forwards = generated + new, forwards + new / tpf
name = f"ISD (greedy, N={cli.block_size + 1})" if cli.objective == "idlm" else "block diffusion (threshold 0.9)"
extra = f", introspective acceptance {sum(alphas) / len(alphas):.2f}" if alphas else ""
print(f"{name}: {correct}/{len(tests)} answers right, {same}/{len(tests)} equal to the AR model's greedy before "
      f"conversion, {generated / forwards:.2f} tokens per forward{extra}")
