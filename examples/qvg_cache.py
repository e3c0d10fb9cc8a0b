"""The QVG cache on the default model: one greedy answer with DynamicCache, with QVG by name and with a QVG cache
object, and the bytes the QVG cache holds.

    python examples/qvg_cache.py

QVG (Quant VideoGen, arXiv 2602.02958) compresses the KV history chunk by chunk: k-means on each chunk's keys (before
RoPE) and values, subtract each token's centroid, repeat on the residual (progressive residual quantization), then
quantize the small residual to 2 or 4 bits. The first tokens (attention sinks) and the newest tokens stay exact. The
chunk is set small here so that a ~130-token prompt is mostly read back compressed.
"""

import time

import torch

import hf_fastslow  # importing registers cache_implementation="qvg"
from hf_fastslow import QVGCache, QVGConfig, load_default_model

torch.set_num_threads(1)
model, tok = load_default_model()  # SmolLM2-135M-Instruct, offline

passage = (
    "The river rises in a chain of mountain lakes, falls through a narrow gorge, and then spreads across a wide plain "
    "where farmers have drained the marshes for wheat and sugar beet. Three towns grew up along its banks: the old "
    "market town at the first bridge, a mill town below the gorge that once spun wool with water power, and a port at "
    "the estuary that now handles grain and timber."
)
messages = [{"role": "user", "content": passage + "\nWhich three towns lie on the river? Answer in one sentence."}]
enc = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
prompt_len = enc["input_ids"].shape[1]
chunking = {"chunk_tokens": 32, "num_centroids": 4}


def answer(name, **generate_kwargs):
    t0 = time.perf_counter()
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=24, do_sample=False, **generate_kwargs)
    text = tok.decode(out[0, prompt_len:], skip_special_tokens=True).strip()
    print(f"[{name}] {time.perf_counter() - t0:.1f} s\n  {text}")


print(f"prompt: {prompt_len} tokens")
answer("DynamicCache (the default)")
# 1. by name, like transformers' own caches
answer("qvg, 4-bit, 1 stage", cache_implementation="qvg", cache_config={"nbits": 4, **chunking})
# 2. a cache object you keep (memory accounting, reuse across turns)
cache = QVGCache(model, QVGConfig(nbits=2, num_stages=2, **chunking))
answer("QVG, 2-bit, 2 stages", **hf_fastslow.cache_kwargs(model, cache))  # cache= or past_key_values=, per version
held, packed, fp16 = cache.nbytes(), cache.packed_nbytes(), cache.fp16_kv_nbytes()
layer = cache.layers[0]
print(f"\nQVG cache after {cache.get_seq_length()} tokens per layer: {layer.n_sink} exact sink tokens, "
      f"{len(layer.spans)} compressed chunks, {layer.n_window} exact recent tokens")
print(f"{held:,} bytes held (of which {packed:,} in compressed chunks); an fp16 K/V cache would hold {fp16:,} "
      f"({fp16 / held:.1f}x more)")
