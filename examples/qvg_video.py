"""QVG video KV cache: chunk-by-chunk generation with a (tiny, random) diffusers Wan transformer.

No video weights are downloaded: the transformer is built from a small config with random weights, so the latents
are not a video; the point is the mechanics and the memory. Swap in `WanTransformer3DModel.from_pretrained(...)` and
real text embeddings for a real model (an autoregressive, Self-Forcing-style checkpoint). Runs in ~10 s on a quiet CPU.

    python examples/qvg_video.py
"""

import torch
from diffusers import WanTransformer3DModel

from hf_fastslow.modeling.video_kv import VideoKVCache, VideoKVConfig
from hf_fastslow.modeling.wan_autoregressive import wan_autoregressive_rollout

torch.set_num_threads(1)
torch.manual_seed(0)
transformer = WanTransformer3DModel(
    patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=64, in_channels=16, out_channels=16,
    text_dim=32, freq_dim=32, ffn_dim=256, num_layers=2, rope_max_seq_len=64,
).eval()
noise = torch.randn(1, 16, 8, 16, 16)  # 8 latent frames of 16 x 16 -> 4 chunks of 2 frames, 128 tokens each
text = torch.randn(1, 8, 32)  # stands in for the text encoder's output

outputs = {}
for name, config in [
    ("exact", VideoKVConfig(compression="none")),
    ("QVG int2", VideoKVConfig(compression="qvg", nbits=2, num_centroids=16, asymmetric=True)),
    ("KIVI-style int2", VideoKVConfig(compression="kivi", nbits=2)),
]:
    cache = VideoKVCache(config)  # sink chunk exact, newest chunk exact, older chunks packed once each
    latents = wan_autoregressive_rollout(transformer, cache, noise, text, chunk_frames=2, num_steps=3)
    outputs[name] = latents
    err = float((latents - outputs["exact"]).norm() / outputs["exact"].norm())
    parts = cache.nbytes_by_part()
    print(f"[{name}] latents {tuple(latents.shape)}, cache {cache.nbytes():,} bytes "
          f"(sink {parts['sink']:,}, packed spans {parts['spans']:,}, recent {parts['recent']:,}), "
          f"held chunks {cache.held_chunks()}, latent error vs exact {err:.2e}")
