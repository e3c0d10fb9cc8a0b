"""Chunk-by-chunk (autoregressive) video generation with a diffusers Wan transformer and a `VideoKVCache`.

diffusers' Wan has no KV cache and no autoregressive loop; this is the small Self-Forcing-style driver the tests and
the benchmark run. For each chunk of `chunk_frames` latent frames:
1. denoise it from its noise with `num_steps` plain Euler steps on the transformer's flow prediction
   (x <- x + (sigma_next - sigma) * v(x, 1000 * sigma), sigmas from 1 to 0 with Wan's shift
   sigma' = shift * sigma / (1 + (shift - 1) * sigma): the update `FlowMatchEulerDiscreteScheduler.step` makes,
   written out so that no scheduler state is involved); every step attends to the cached earlier chunks and writes
   nothing;
2. commit it: one more forward on the denoised chunk at `context_timestep` (0: clean) inside `cache.committing()`
   writes its K/V (Self-Forcing's clean-context pass) and compresses the chunks that became final.
No classifier-free guidance (Self-Forcing-style models are distilled without it).
"""

from __future__ import annotations

from typing import Any

import torch

from .video_kv import VideoKVCache, apply_qvg, remove_qvg, video_kv_cache_of

__all__ = ["flow_sigmas", "wan_autoregressive_rollout"]


def flow_sigmas(num_steps: int, shift: float = 1.0) -> torch.Tensor:
    """num_steps + 1 flow-matching noise levels from 1 (noise) to 0 (clean), shifted as Wan does (float64)."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}.")
    if shift <= 0:
        raise ValueError(f"shift must be > 0, got {shift}.")
    s = torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float64)
    return shift * s / (1 + (shift - 1) * s)


def _chunk_bounds(num_frames: int, chunk_frames: int) -> list[tuple[int, int]]:
    return [(start, min(start + chunk_frames, num_frames)) for start in range(0, num_frames, chunk_frames)]


@torch.no_grad()
def wan_autoregressive_rollout(
    transformer: Any,
    cache: VideoKVCache,
    noise: torch.Tensor,
    encoder_hidden_states: torch.Tensor,
    *,
    chunk_frames: int,
    num_steps: int = 4,
    shift: float = 1.0,
    context_timestep: float = 0.0,
    prefix_latents: torch.Tensor | None = None,
    num_train_timesteps: int = 1000,
) -> torch.Tensor:
    """Generate `noise.shape[2]` latent frames chunk by chunk; returns (B, C, T_prefix + T, H, W) latents.

    noise: (B, C, T, H, W) the starting noise of every generated frame. prefix_latents: clean frames committed
    first (chunked the same way) without denoising, e.g. a conditioning frame or the video being continued.
    The cache continues from what it already holds. If `cache` is not installed on the transformer it is installed
    for the call (and removed after).
    """
    if chunk_frames < 1 or chunk_frames % transformer.config.patch_size[0]:
        raise ValueError(f"chunk_frames must be a positive multiple of the temporal patch size "
                         f"{transformer.config.patch_size[0]}, got {chunk_frames}.")
    if noise.dim() != 5 or noise.shape[2] == 0:
        raise ValueError(f"noise must be (B, C, T, H, W) with T > 0 latent frames; got {tuple(noise.shape)}.")
    installed = video_kv_cache_of(transformer)
    if installed is not None and installed is not cache:
        raise RuntimeError("another video KV cache is installed on this transformer; remove_qvg() it first.")
    if installed is None:
        apply_qvg(transformer, cache)
    try:
        sigmas = flow_sigmas(num_steps, shift)
        batch = noise.shape[0]

        def timestep(value: float) -> torch.Tensor:
            return torch.full((batch,), float(value), device=noise.device)

        def commit(chunk: torch.Tensor) -> None:
            with cache.committing():
                transformer(hidden_states=chunk, timestep=timestep(context_timestep),
                            encoder_hidden_states=encoder_hidden_states, return_dict=False)

        frames = []
        if prefix_latents is not None:
            for start, stop in _chunk_bounds(prefix_latents.shape[2], chunk_frames):
                chunk = prefix_latents[:, :, start:stop]
                commit(chunk)
                frames.append(chunk)
        for start, stop in _chunk_bounds(noise.shape[2], chunk_frames):
            x = noise[:, :, start:stop]
            for k in range(num_steps):
                sigma, sigma_next = float(sigmas[k]), float(sigmas[k + 1])
                velocity = transformer(hidden_states=x, timestep=timestep(num_train_timesteps * sigma),
                                       encoder_hidden_states=encoder_hidden_states, return_dict=False)[0]
                x = x + (sigma_next - sigma) * velocity
            commit(x)
            frames.append(x)
        return torch.cat(frames, dim=2)
    finally:
        if installed is None:
            remove_qvg(transformer)
