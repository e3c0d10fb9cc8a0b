"""XQuant and XQuant-CL caches on the default model: one greedy answer with three caches, and the bytes XQuant holds.

    python examples/xquant_cache.py

XQuant caches a low-bit copy of each attention layer's input (or, for grouped-query attention, its SVD latent) and
rebuilds K and V from it at every step; XQuant-CL stores low-bit differences between consecutive layers instead. The
newest `residual_length` tokens stay unquantized, so the window is set small here to let a ~200-token prompt show
the savings.
"""

import time

import torch

import hf_fastslow  # importing registers cache_implementation="xquant" and "xquant_cl"
from hf_fastslow import XQuantCache, XQuantConfig, load_default_model

torch.set_num_threads(1)
model, tok = load_default_model()  # SmolLM2-135M-Instruct, offline

passage = (
    "The river rises in a chain of mountain lakes, falls through a narrow gorge, and then spreads across a wide plain "
    "where farmers have drained the marshes for wheat and sugar beet. Three towns grew up along its banks: the old "
    "market town at the first bridge, a mill town below the gorge that once spun wool with water power, and a port at "
    "the estuary that now handles grain and timber. Floods in spring used to cover the lower fields every few years, "
    "so the port built stone embankments and the mill town kept its houses on raised ground."
)
messages = [{"role": "user", "content": passage + "\nWhich three towns lie on the river? Answer in one sentence."}]
enc = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
prompt_len = enc["input_ids"].shape[1]
window = {"group_size": 32, "residual_length": 32}


def answer(name, **generate_kwargs):
    t0 = time.perf_counter()
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=24, do_sample=False, **generate_kwargs)
    text = tok.decode(out[0, prompt_len:], skip_special_tokens=True).strip()
    print(f"[{name}] {time.perf_counter() - t0:.1f} s\n  {text}")


print(f"prompt: {prompt_len} tokens")
answer("DynamicCache (the default)")
# 1. by name, like transformers' own caches
answer("xquant, 4-bit", cache_implementation="xquant", cache_config={"nbits": 4, **window})
# 2. a cache object you keep (memory accounting, reuse across turns); mode="cl" is XQuant-CL, also reachable by name
#    as cache_implementation="xquant_cl"
cache = XQuantCache(model, XQuantConfig(nbits=2, mode="cl", **window))
answer("XQuant-CL, 2-bit", **hf_fastslow.cache_kwargs(model, cache))  # cache= or past_key_values=, per version
held, fp16 = cache.nbytes(), cache.fp16_kv_nbytes()
print(f"\nXQuant-CL cache after {cache.get_seq_length()} tokens: {held:,} bytes held; an fp16 K/V cache would hold "
      f"{fp16:,} ({fp16 / held:.1f}x more)")
print(f"plus {cache.factor_nbytes():,} bytes of factors kept once on the model and shared by every XQuant cache "
      "(they pay off from about 1K tokens on)")
