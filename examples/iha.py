"""Interleaved Head Attention (IHA) on the default model: an exact conversion, a few mixer-only training steps, and a
save/reload round trip.

    python examples/iha.py

Every attention head gets P pseudo-heads mixed from all heads' queries, keys and values; one attention runs over the
P-times longer interleaved sequence and a learned collapse folds the P outputs back. With the identity
initialisation (init_noise=0) the converted model is the original one; training starts from init_noise > 0, because
from the exact identity the P copies of a head receive identical gradients and never separate.
"""

import tempfile

import torch

from hf_fastslow import load_default_model
from hf_fastslow.modeling.iha import IHAConfig, apply_iha, from_pretrained_iha, iha_param_group, mark_only_iha_trainable

torch.set_num_threads(1)
model, tok = load_default_model()  # SmolLM2-135M-Instruct: 30 layers, 9 query heads, 3 KV heads
messages = [{"role": "user", "content": "Name two rivers in Europe."}]
enc = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)

with torch.no_grad():
    ref_logits = model(**enc).logits
    ref_tokens = model.generate(**enc, max_new_tokens=12, do_sample=False)

# 1. exact conversion: P = 3 pseudo-heads per head, identity mixing
model = apply_iha(model, IHAConfig(num_pseudo_heads=3, init_noise=0.0))
with torch.no_grad():
    delta = (model(**enc).logits - ref_logits).abs().max().item()
    same = torch.equal(model.generate(**enc, max_new_tokens=12, do_sample=False), ref_tokens)
print(f"identity conversion: max |delta logit| = {delta:.1e}, same greedy tokens: {same}")

# 2. fine-tuning: start from a fresh conversion with init_noise > 0 and train only the mixers
model, _ = load_default_model()
model = apply_iha(model, IHAConfig(num_pseudo_heads=3, init_noise=1e-3))
n_mixer = mark_only_iha_trainable(model)
opt = torch.optim.AdamW([iha_param_group(model, lr=1e-2)])
text = tok("The Danube flows through Vienna, Budapest and Belgrade to the Black Sea.", return_tensors="pt")
model.train()
losses = []
for _ in range(3):
    loss = model(**text, labels=text["input_ids"]).loss
    opt.zero_grad()
    loss.backward()
    opt.step()
    losses.append(loss.item())
model.eval()
share = 100 * n_mixer / sum(p.numel() for p in model.parameters())
print(f"trained {n_mixer:,} IHA parameters ({share:.4f}% of the model): loss {losses[0]:.3f} -> {losses[-1]:.3f}")

# 3. save_pretrained writes the IHA settings into config.json; from_pretrained_iha rebuilds the mixers before loading
with tempfile.TemporaryDirectory() as path, torch.no_grad():
    model.save_pretrained(path)
    reloaded = from_pretrained_iha(path)
    same = torch.equal(reloaded(**enc).logits, model(**enc).logits)
print(f"saved and reloaded with from_pretrained_iha: logits identical: {same}")
