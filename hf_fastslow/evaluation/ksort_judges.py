"""Rank judges for K-Sort Eval: a judge sees a prompt and K+1 outputs in a shown order and replies with the labels of
the outputs from best to worst ("Image 3, Image 1, ..."). Every judge goes through `parse_ranking`, which accepts
only a permutation of the shown labels: duplicated, missing or unknown labels raise `JudgeFormatError` (with the reply
and the reason), so a judge's garbage is counted by the caller, never dropped or guessed around.

- `TextRankJudge(backend)`: any LLM behind the package's `Backend` layer (in-process `HFLocalBackend`, an
  OpenAI-compatible `EndpointBackend`, `ScriptedBackend` in tests).
- `VLMRankJudge(model, processor)`: a local image-text-to-text model (`AutoModelForImageTextToText` +
  `AutoProcessor`); `VLMRankJudge(backend)`: a VLM server through `EndpointBackend`, images sent as data-URI
  `image_url` parts (videos as `video_url`), as the official code does.
- `PlackettLuceJudge`, `BiasedJudge`: simulated judges for synthetic arenas (outputs are `SyntheticOutput`s with a
  known quality); they reply in text too, so the same parser and failure accounting apply.
"""

from __future__ import annotations

import base64
import io
import math
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "DEFAULT_IMAGE_RUBRIC",
    "DEFAULT_TEXT_RUBRIC",
    "BiasedJudge",
    "JudgeFormatError",
    "LikelihoodRankJudge",
    "PlackettLuceJudge",
    "RankJudge",
    "ScriptedRankJudge",
    "SyntheticOutput",
    "TextRankJudge",
    "VLMRankJudge",
    "format_ranking",
    "parse_ranking",
]

# The reference's rubric ("rule augmentation", from the arena's voting guide), in the reference's output format.
DEFAULT_IMAGE_RUBRIC = (
    "You will be given {n} images. Your task is to rank them from best to worst based on visual aesthetics (50%) and "
    "alignment with the given description (50%): {prompt}. Aesthetics includes photorealism (30%), light and shadow "
    "(10%), and absence of artifacts (10%), and Alignment includes entity matching (30%) and style matching (20%). "
    "You MUST respond with only the sorted image names in the strict format: \"{example}\". Do NOT include any "
    "explanations, line breaks, or additional text. A ranking MUST always be returned and rejection is not allowed."
)
DEFAULT_TEXT_RUBRIC = (
    "You will be given {n} answers to the instruction below. Rank them from best to worst by correctness (50%), "
    "helpfulness and completeness (30%) and fluency (20%). You MUST respond with only the sorted answer names in the "
    "strict format: \"{example}\". Do NOT include any explanations or additional text."
)


class JudgeFormatError(ValueError):
    """A judge reply that is not a ranking of exactly the shown outputs; `.reply` and `.reason` say why."""

    def __init__(self, reason: str, reply: str):
        super().__init__(f"judge reply is not a ranking ({reason}): {reply[:200]!r}")
        self.reason = reason
        self.reply = reply


def _label(i: int, labels: str) -> str:
    return str(i + 1) if labels == "digits" else chr(ord("A") + i)


def format_ranking(order: Sequence[int], item_word: str = "Image", labels: str = "digits") -> str:
    """The reply a judge should give for `order` (shown indices, best first): "Image 2, Image 1, Image 3"."""
    return ", ".join(f"{item_word} {_label(i, labels)}" for i in order)


def parse_ranking(reply: str, n: int, item_word: str = "Image", *, labels: str = "digits",
                  strict: bool = True) -> list[int]:
    """Shown indices from best to worst. `strict`: the reply is exactly the list (quotes, a final period and
    surrounding whitespace tolerated); otherwise the first list of n labels anywhere in the reply is taken (prose
    around it tolerated). Either way the list must name each of the n labels exactly once."""
    if labels not in ("digits", "letters"):
        raise ValueError(f"labels must be 'digits' or 'letters', got {labels!r}.")
    if not isinstance(reply, str):
        raise JudgeFormatError(f"reply of type {type(reply).__name__}", repr(reply))
    token = r"\d+" if labels == "digits" else r"[A-Za-z]\b"
    item = rf"{re.escape(item_word)}\s*({token})"
    sep = r"\s*(?:,|>|;|\n|->)\s*"
    text = reply.strip().strip("\"'`").strip().rstrip(".").strip()
    if strict:
        if not re.fullmatch(rf"{item}(?:{sep}{item})*", text, flags=re.IGNORECASE):
            raise JudgeFormatError("not exactly a comma-separated list of labels", reply)
        found = re.findall(item, text, flags=re.IGNORECASE)
    else:
        match = re.search(rf"{item}(?:{sep}{item}){{{n - 1}}}", text, flags=re.IGNORECASE) if n > 1 else \
            re.search(item, text, flags=re.IGNORECASE)
        if match is None:
            raise JudgeFormatError(f"no list of {n} labels found", reply)
        found = re.findall(item, match.group(0), flags=re.IGNORECASE)
    idx = [int(x) - 1 if labels == "digits" else ord(x.upper()) - ord("A") for x in found]
    out_of_range = [found[k] for k, i in enumerate(idx) if not 0 <= i < n]
    if out_of_range:
        raise JudgeFormatError(f"unknown label(s) {out_of_range} (only 1..{n} were shown)" if labels == "digits"
                               else f"unknown label(s) {out_of_range}", reply)
    duplicated = sorted({i for i in idx if idx.count(i) > 1})
    if duplicated:
        raise JudgeFormatError(f"duplicated label(s) {[_label(i, labels) for i in duplicated]}", reply)
    missing = sorted(set(range(n)) - set(idx))
    if missing:
        raise JudgeFormatError(f"missing label(s) {[_label(i, labels) for i in missing]}", reply)
    return idx


class RankJudge:
    """Base of the judges: `reply(prompt, outputs) -> str` is the model call; `rank(prompt, outputs)` parses it into
    shown indices best-first (or raises `JudgeFormatError`). `last_reply` keeps the raw text for reports."""

    item_word = "Image"
    labels = "digits"
    strict = True

    def reply(self, prompt: str, outputs: Sequence[Any]) -> str:
        raise NotImplementedError

    def rank(self, prompt: str, outputs: Sequence[Any]) -> list[int]:
        self.last_reply = self.reply(prompt, outputs)
        return parse_ranking(self.last_reply, len(outputs), self.item_word, labels=self.labels, strict=self.strict)

    def instructions(self, rubric: str, prompt: str, n: int) -> str:
        example = format_ranking(range(n), self.item_word, self.labels)
        return rubric.format(n=n, prompt=prompt, example=example)


class ScriptedRankJudge(RankJudge):
    """`fn(prompt, outputs) -> str` as a judge (tests, or wrapping any other ranking service)."""

    def __init__(self, fn: Callable[[str, Sequence[Any]], str], item_word: str = "Image", strict: bool = True):
        self.fn, self.item_word, self.strict = fn, item_word, strict

    def reply(self, prompt, outputs):
        return self.fn(prompt, outputs)


class TextRankJudge(RankJudge):
    """An LLM ranks K+1 text answers through any `Backend` (greedy unless the backend's defaults say otherwise)."""

    def __init__(self, backend, rubric: str = DEFAULT_TEXT_RUBRIC, *, item_word: str = "Answer", strict: bool = True,
                 max_new_tokens: int = 40, **chat_kwargs: Any):
        self.backend, self.rubric, self.item_word, self.strict = backend, rubric, item_word, strict
        self.chat_kwargs = {"max_new_tokens": max_new_tokens, **chat_kwargs}

    def messages(self, prompt: str, outputs: Sequence[str]) -> list[dict[str, str]]:
        if not all(isinstance(o, str) for o in outputs):
            raise TypeError("TextRankJudge ranks text outputs (str); use VLMRankJudge for images.")
        body = "\n\n".join(f"{self.item_word} {_label(i, self.labels)}:\n{o.strip()}" for i, o in enumerate(outputs))
        return [{"role": "system", "content": self.instructions(self.rubric, prompt, len(outputs))},
                {"role": "user", "content": f"Instruction: {prompt}\n\n{body}\n\nRanking:"}]

    def reply(self, prompt, outputs):
        return self.backend.chat(self.messages(prompt, outputs), **self.chat_kwargs)[0].text


class LikelihoodRankJudge(RankJudge):
    """Score mode for small LLMs that cannot keep a ranking format: ranks the outputs by the judge model's mean
    per-token log-probability of each output as the reply to the prompt (`backend.score`, in-process models or a
    server returning prompt log-probs). It judges fluency / plausibility, not instruction following; ties keep the
    shown order. The ranking is rendered as text and parsed like any other judge's."""

    item_word = "Answer"

    def __init__(self, backend):
        backend.require("prompt_scoring", "LikelihoodRankJudge")
        self.backend = backend

    def reply(self, prompt, outputs):
        if not all(isinstance(o, str) and o.strip() for o in outputs):
            raise TypeError("LikelihoodRankJudge scores non-empty text outputs.")
        messages = [{"role": "user", "content": prompt}]
        means = []
        for o in outputs:
            logps = self.backend.score(messages, o.strip())
            means.append(sum(logps) / len(logps) if logps else -math.inf)
        order = sorted(range(len(outputs)), key=lambda i: -means[i])
        return format_ranking(order, self.item_word, self.labels)


def _image_bytes(item: Any) -> tuple[bytes, str]:
    """(bytes, mime) of a PIL image or an image / video file path."""
    if isinstance(item, (str, Path)):
        path = Path(item)
        mime = {".mp4": "video/mp4", ".png": "image/png", ".webp": "image/webp"}.get(path.suffix.lower(), "image/jpeg")
        return path.read_bytes(), mime
    if hasattr(item, "save"):
        buf = io.BytesIO()
        item.convert("RGB").save(buf, format="JPEG", quality=90)
        return buf.getvalue(), "image/jpeg"
    raise TypeError(f"VLMRankJudge needs PIL images or image/video file paths, got {type(item).__name__}.")


def _load_image(item: Any):
    from PIL import Image

    if isinstance(item, (str, Path)):
        with Image.open(item) as im:
            return im.convert("RGB")
    if hasattr(item, "convert"):
        return item.convert("RGB")
    raise TypeError(f"a local VLM judge needs PIL images or image file paths, got {type(item).__name__}.")


class VLMRankJudge(RankJudge):
    """A vision-language model ranks K+1 images (or videos, endpoint only).

    `VLMRankJudge(model, processor)`: an in-process image-text-to-text model (greedy `generate`; the processor's chat
    template places the images). `VLMRankJudge(backend)`: an OpenAI-compatible VLM server through `EndpointBackend`
    (any `Backend` whose server takes `image_url` content parts)."""

    def __init__(self, model_or_backend, processor=None, rubric: str = DEFAULT_IMAGE_RUBRIC, *,
                 item_word: str = "Image", strict: bool = True, max_new_tokens: int = 40):
        self.processor = processor
        if processor is None:
            self.backend, self.model = model_or_backend, None
        else:
            self.backend, self.model = None, model_or_backend
        self.rubric, self.item_word, self.strict, self.max_new_tokens = rubric, item_word, strict, max_new_tokens

    def endpoint_messages(self, prompt: str, outputs: Sequence[Any]) -> list[dict[str, Any]]:
        parts: list[dict[str, Any]] = [{"type": "text", "text": f"Here are the {self.item_word.lower()}s:"}]
        for i, item in enumerate(outputs):
            data, mime = _image_bytes(item)
            kind = "video_url" if mime.startswith("video/") else "image_url"
            parts.append({"type": "text", "text": f"{self.item_word} {_label(i, self.labels)}:"})
            parts.append({"type": kind, kind: {"url": f"data:{mime};base64,{base64.b64encode(data).decode()}"}})
        return [{"role": "system", "content": self.instructions(self.rubric, prompt, len(outputs))},
                {"role": "user", "content": parts}]

    def local_messages(self, prompt: str, outputs: Sequence[Any]) -> list[dict[str, Any]]:
        parts: list[dict[str, Any]] = [{"type": "text", "text": self.instructions(self.rubric, prompt, len(outputs))}]
        for i, item in enumerate(outputs):
            parts.append({"type": "text", "text": f"{self.item_word} {_label(i, self.labels)}:"})
            parts.append({"type": "image", "image": _load_image(item)})
        return [{"role": "user", "content": parts}]

    def reply(self, prompt, outputs):
        if self.model is None:
            messages = self.endpoint_messages(prompt, outputs)
            return self.backend.chat(messages, max_new_tokens=self.max_new_tokens)[0].text
        import torch

        inputs = self.processor.apply_chat_template(
            self.local_messages(prompt, outputs), add_generation_prompt=True, tokenize=True, return_dict=True,
            return_tensors="pt",
        ).to(self.model.device)
        with torch.no_grad():
            out = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False)
        new_tokens = out[0, inputs["input_ids"].shape[1]:]
        return self.processor.decode(new_tokens, skip_special_tokens=True)


# ----- simulated judges for synthetic arenas -------------------------------------------------------------------------
@dataclass(frozen=True)
class SyntheticOutput:
    """An output of a synthetic arena: which model made it and its latent quality (the model's true skill)."""

    model: str
    quality: float


def _qualities(outputs: Sequence[Any]) -> list[float]:
    if not all(isinstance(o, SyntheticOutput) for o in outputs):
        raise TypeError("simulated judges rank SyntheticOutput items (Arena.synthetic's outputs).")
    return [o.quality for o in outputs]


class PlackettLuceJudge(RankJudge):
    """Ranks by quality + Gumbel(scale) noise, which samples a Plackett-Luce order with weights exp(quality / scale).
    The default scale 3.25 gives a noise std of 3.25 * pi / sqrt(6) = 4.17 = TrueSkill's beta. `garbage_rate` makes
    that share of replies unparseable (to exercise failure accounting)."""

    def __init__(self, scale: float = 3.25, seed: int = 0, garbage_rate: float = 0.0):
        if scale <= 0 or not 0 <= garbage_rate <= 1:
            raise ValueError("need scale > 0 and 0 <= garbage_rate <= 1.")
        self.scale, self.garbage_rate = scale, garbage_rate
        self.rng = random.Random(seed)

    def order(self, qualities: Sequence[float]) -> list[int]:
        noisy = [q - self.scale * math.log(-math.log(1.0 - self.rng.random())) for q in qualities]
        return sorted(range(len(noisy)), key=lambda i: -noisy[i])

    def reply(self, prompt, outputs):
        order = self.order(_qualities(outputs))
        if self.rng.random() < self.garbage_rate:
            return "I cannot rank these images."
        return format_ranking(order, self.item_word, self.labels)


class BiasedJudge(PlackettLuceJudge):
    """A Plackett-Luce judge that, on a `lapse` share of instances, ranks by a nuisance feature anti-correlated with
    quality (it returns the order reversed): a judge whose systematic errors the humans' ranking of the K known
    outputs can reveal, which is what posterior correction exploits."""

    def __init__(self, scale: float = 3.25, lapse: float = 0.3, seed: int = 0, garbage_rate: float = 0.0):
        super().__init__(scale, seed, garbage_rate)
        if not 0 <= lapse <= 1:
            raise ValueError(f"lapse must lie in [0, 1], got {lapse}.")
        self.lapse = lapse

    def order(self, qualities):
        order = super().order(qualities)
        return order[::-1] if self.rng.random() < self.lapse else order
