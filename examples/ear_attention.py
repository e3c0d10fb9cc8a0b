"""SVG-EAR sparse attention on the default model: the standalone op on one layer's captured q/k/v, then the
registered "ear" attention for a long prefill.

    python examples/ear_attention.py

EAR computes a `density` fraction of the (query, key) blocks of k-means-clustered tokens exactly, replaces every
other block by its key/value centroids, and picks the exact blocks by a probe of that replacement's error. The
SVG2-style peer picks blocks by estimated attention mass and drops the rest.
"""

from importlib import resources

import torch

from hf_fastslow import load_default_model
from hf_fastslow.evaluation.attn_error import capture_qkv, dense_attention, relative_error
from hf_fastslow.kernels.ear import ear_attention
from hf_fastslow.modeling.ear import EARConfig, disable_ear_attention, enable_ear_attention

torch.set_num_threads(1)
model, tok = load_default_model()  # SmolLM2-135M-Instruct, offline
text = resources.files("hf_fastslow").joinpath("data", "in_the_year_2889.txt").read_text()
ids = tok(text, return_tensors="pt").input_ids[:, :768]

# 1. The op on captured post-RoPE q/k/v of layer 15: the last 256 queries against the 512 keys before them.
layer = 15
t = capture_qkv(model, ids, layers=[layer])[layer]
q, k, v = t["q"][:, :, 512:], t["k"][:, :, :512], t["v"][:, :, :512]
reference = dense_attention(q, k, v)
for name, router, compensate in [("EAR", "error", True), ("SVG2-style", "score", False)]:
    out, info = ear_attention(q, k, v, density=0.2, num_q_clusters=16, num_k_clusters=48, router=router,
                              compensate=compensate, return_info=True)
    print(f"layer {layer}, density 0.2: {name} relative attention error {relative_error(out, reference):.3f} "
          f"({info.density:.3f} of the pairs computed exactly)")

# 2. The registered attention function: prefill in causal chunks of 256 (chunk 0 and each query's own chunk exact).
with torch.no_grad():
    dense_loss = model(ids, labels=ids).loss.item()
    enable_ear_attention(model, EARConfig(density=0.2, causal_chunk=256, min_q_len=512))
    ear_loss = model(ids, labels=ids).loss.item()
    short = model(ids[:, :100]).logits  # below min_q_len: plain SDPA
    disable_ear_attention(model)
    same_short = torch.equal(short, model(ids[:, :100]).logits)
print(f"next-token loss on {ids.shape[1]} tokens: SDPA {dense_loss:.4f}, EAR (density 0.2) {ear_loss:.4f}")
print(f"a 100-token forward below min_q_len is plain SDPA: {same_short}")
