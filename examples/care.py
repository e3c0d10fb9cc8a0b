"""CARE on the default model: convert its grouped-query K/V to latents at half the KV width, answer one question with
the original and the converted model, print the KV bytes per token each caches, save and reload the converted model.

    python examples/care.py

CARE (arXiv 2603.17946) factorises each layer's K and V projections through a low-rank latent chosen on calibration
activations (here: 128 GSM8K questions, not the text the model is asked about); the converted model's cache holds only
the latents. Without healing (`hf_fastslow.trainers.KVHealingTrainer`) a 135M model loses some quality at 50%.
"""

import tempfile
import time

import torch

from hf_fastslow import load_default_model
from hf_fastslow.evaluation.prompts import gsm8k_rows
from hf_fastslow.modeling.care import (
    CAREConfig,
    care_kv_bytes_per_token,
    collect_kv_second_moments,
    convert_gqa_to_mla,
    from_pretrained_care,
    kv_width,
    latent_widths,
)

torch.set_num_threads(1)
model, tok = load_default_model()  # SmolLM2-135M-Instruct, offline

messages = [{"role": "user", "content": "The river town has a mill, a port and a bridge. Name the three things the "
                                        "town has, in one sentence."}]
enc = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)


def answer(name, m):
    t0 = time.perf_counter()
    with torch.no_grad():
        out = m.generate(**enc, max_new_tokens=24, do_sample=False)
    text = tok.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True).strip()
    print(f"[{name}] {time.perf_counter() - t0:.1f} s\n  {text}")
    return out


original = answer("original", model)
original_bytes = care_kv_bytes_per_token(model)["bytes_per_token"]

t0 = time.perf_counter()
questions = [tok(row["question"], return_tensors="pt").input_ids[0] for row in gsm8k_rows(160)]
slices = torch.stack([q[:32] for q in questions if len(q) >= 32][:128])  # 128 x 32 tokens, as a few batches
calibration = list(slices.split(32))
moments = collect_kv_second_moments(model, calibration)
model = convert_gqa_to_mla(model, moments, CAREConfig(rank=kv_width(model) // 2))  # in place
k_ranks, v_ranks = latent_widths(model)
print(f"converted in {time.perf_counter() - t0:.1f} s ({moments.n_tokens} calibration tokens); K latent widths "
      f"{min(k_ranks)}-{max(k_ranks)}, V {min(v_ranks)}-{max(v_ranks)} of {kv_width(model)}")
converted = answer("CARE 50% KV", model)
care_bytes = care_kv_bytes_per_token(model)["bytes_per_token"]
print(f"KV bytes per token (storage walk of a DynamicCache, fp32): original {original_bytes:.0f}, "
      f"CARE {care_bytes:.0f}")

with tempfile.TemporaryDirectory() as path:
    model.save_pretrained(path)
    reloaded = from_pretrained_care(path)  # no trust_remote_code
    with torch.no_grad():
        again = reloaded.generate(**enc, max_new_tokens=24, do_sample=False)
    print(f"reloaded: same tokens: {torch.equal(again, converted)}")
