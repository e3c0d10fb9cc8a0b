"""Reflection models for FST's fast weights (Tiwari et al., "Learning, Fast and Slow", arXiv 2605.12484).

A reflector reads the current system context and a "reflective dataset" (inputs, generated outputs, feedback text
from the task's evaluator) and proposes a rewritten context. The paper's reflection LM is frozen (never trained).
Back-ends:

* `FrozenReflector` - a local causal LM in eval mode with gradients off: by default a frozen copy of the initial policy
  (one model's weights of extra memory), or a named model / model object;
* `PolicyReflector` - the policy being trained, with its current weights (no extra memory; opt-in, not the paper's);
* `HFReflector` - a local causal LM used as given (`transformers` `generate`);
* `OpenAIReflector` - any OpenAI-compatible `/chat/completions` endpoint (vLLM, TGI, `transformers serve`, hosted APIs),
  through the backend layer's `EndpointBackend`;
* `FunctionReflector` - a Python callable, e.g. a rule-based rewriter or a scripted reflector in tests.

`make_reflector("frozen" | "policy" | "<local path or model id>" | "http(s)://host/v1" | model | callable, ...)`
builds one from `FSTConfig.reflection_model` or `FSTTrainer(reflector=...)`.
"""

from __future__ import annotations

import copy
import os
import re
from collections.abc import Callable, Sequence
from typing import Any

import torch

from ..backends.base import Capabilities
from ..backends.endpoint import EndpointBackend
from ..generation.padding import pad_token_id

Record = dict[str, Any]  # {"Inputs": str, "Generated Outputs": str, "Feedback": str, "Score": float | None}


def build_reflection_prompt(current_context: str, records: Sequence[Record]) -> str:
    """The instruction sent to the reflection LM: current context, examples with feedback, the rewrite request."""
    shown = current_context if current_context.strip() else "(empty: the assistant had no instructions)"
    lines = [
        "An assistant solved a task while following the instructions (system prompt) below.",
        "```",
        shown,
        "```",
        "",
        "Here are task inputs, the assistant's responses and the evaluator's feedback on each response:",
    ]
    for i, rec in enumerate(records, 1):
        score = rec.get("Score")
        lines += [
            "",
            f"### Example {i}" + (f" (score {score:.3g})" if isinstance(score, (int, float)) else ""),
            f"Input: {rec.get('Inputs', '')}",
            f"Response: {rec.get('Generated Outputs', '')}",
            f"Feedback: {rec.get('Feedback', '')}",
        ]
    lines += [
        "",
        (
            "Write an improved system prompt for the assistant. Use the feedback: state explicitly every requirement "
            "it reveals (for example the exact answer format), add any strategy that would have fixed the failed "
            "examples, and keep the parts of the current instructions that still help. Reply with the new system "
            "prompt only, between ``` marks."
        ),
    ]
    return "\n".join(lines)


_FENCE = re.compile(r"```([^\n`]*)\n?(.*?)```", re.DOTALL)


def extract_context(text: str) -> str:
    """The proposed context inside the reply's last ``` block (the whole reply if it has none)."""
    blocks = _FENCE.findall(text or "")
    if not blocks:
        # An unterminated fence is common with a small max_new_tokens: take what follows it.
        body = (text or "").split("```", 1)[-1] if "```" in (text or "") else (text or "")
        return body.strip()
    tag, body = blocks[-1]
    # "```text\n...": a one-word tag is a language name; "```You are ...```" (words on the fence line) is content.
    if tag.strip() and (" " in tag.strip() or not body.strip()):
        body = tag + "\n" + body
    return body.strip()


class Reflector:
    """Base class: override `complete` (one LM call) or, for full control, `propose`."""

    def complete(self, prompt: str) -> str:
        raise NotImplementedError(f"{type(self).__name__} must implement `complete(prompt) -> str`.")

    def propose(self, current_context: str, records: Sequence[Record]) -> str:
        """A rewritten context ("" = no proposal; the trainer then keeps the parent)."""
        return extract_context(self.complete(build_reflection_prompt(current_context, records)))

    def bind_policy(self, model: torch.nn.Module, tokenizer: Any) -> None:
        """Called by the trainer before each fast round with the (unwrapped) policy; only `PolicyReflector` uses it."""


class FunctionReflector(Reflector):
    """Wraps `fn(current_context, records) -> new_context` (rule-based rewriters, scripted tests)."""

    def __init__(self, fn: Callable[[str, Sequence[Record]], str]):
        self.fn = fn

    def propose(self, current_context: str, records: Sequence[Record]) -> str:
        return str(self.fn(current_context, records) or "").strip()


class HFReflector(Reflector):
    """A local causal LM used through `generate` (chat template applied when the tokenizer has one)."""

    def __init__(
        self,
        model: torch.nn.Module | None = None,
        tokenizer: Any = None,
        max_new_tokens: int = 256,
        temperature: float = 0.7,
        do_sample: bool = True,
    ):
        self.model, self.tokenizer = model, tokenizer
        self.max_new_tokens, self.temperature, self.do_sample = max_new_tokens, temperature, do_sample

    @classmethod
    def from_pretrained(cls, name_or_path: str, dtype: torch.dtype = torch.float32, **kwargs) -> HFReflector:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tok = AutoTokenizer.from_pretrained(name_or_path)
        model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=dtype).eval()
        return cls(model, tok, **kwargs)

    def _encode(self, prompt: str) -> dict[str, torch.Tensor]:
        tok = self.tokenizer
        if getattr(tok, "chat_template", None):
            ids = tok.apply_chat_template(
                [{"role": "user", "content": prompt}], add_generation_prompt=True, return_dict=True,
                return_tensors="pt",
            )
            return {"input_ids": ids["input_ids"], "attention_mask": ids["attention_mask"]}
        enc = tok(prompt, return_tensors="pt")
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}

    def complete(self, prompt: str) -> str:
        if self.model is None or self.tokenizer is None:
            raise ValueError(
                f"{type(self).__name__} has no model/tokenizer (a PolicyReflector is bound by the trainer)."
            )
        device = next(self.model.parameters()).device
        inputs = {k: v.to(device) for k, v in self._encode(prompt).items()}
        gen_kwargs: dict[str, Any] = {"max_new_tokens": self.max_new_tokens, "do_sample": self.do_sample,
                                      "pad_token_id": pad_token_id(self.tokenizer)}
        if self.do_sample:
            gen_kwargs["temperature"] = self.temperature
        with torch.no_grad():
            out = self.model.generate(**inputs, **gen_kwargs)
        return self.tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)


def freeze_model(model: torch.nn.Module) -> torch.nn.Module:
    """`model` in eval mode with every parameter's `requires_grad` off (and gradient checkpointing, which trl may have
    switched on for training, off: it only slows `generate`)."""
    if getattr(model, "is_gradient_checkpointing", False) and hasattr(model, "gradient_checkpointing_disable"):
        model.gradient_checkpointing_disable()
    return model.eval().requires_grad_(False)


class FrozenReflector(HFReflector):
    """A local causal LM that is never trained: eval mode, `requires_grad=False`, outside every optimizer.

    `FrozenReflector.copy_of(policy, tokenizer)` is FST's default reflector: a deep copy of the policy as it is when
    the trainer is built, so reflection quality does not drift with RL. It holds one model's weights of extra memory.
    """

    def __init__(self, model: torch.nn.Module, tokenizer: Any, **kwargs):
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"FrozenReflector needs a torch.nn.Module, got {type(model).__name__}.")
        super().__init__(freeze_model(model), tokenizer, **kwargs)

    @classmethod
    def copy_of(cls, policy: torch.nn.Module, tokenizer: Any, **kwargs) -> FrozenReflector:
        """A frozen deep copy of `policy`: its weights now, unaffected by later updates to `policy`."""
        return cls(copy.deepcopy(policy), tokenizer, **kwargs)


class PolicyReflector(HFReflector):
    """The policy reflects on its own rollouts (the trainer binds its current weights before each fast round)."""

    def bind_policy(self, model: torch.nn.Module, tokenizer: Any) -> None:
        self.model, self.tokenizer = model, tokenizer


# One reply per prompt, no log-probs: nothing to probe the server for.
_REFLECTOR_CAPABILITIES = Capabilities(native_n=False, logprobs=False, max_top_logprobs=0, streaming=True,
                                       continue_final_message=False, prompt_scoring=False, seed=True)


class OpenAIReflector(Reflector):
    """An OpenAI-compatible chat endpoint (`{base_url}/chat/completions`), e.g. a vLLM, TGI or `transformers serve`
    server, through `EndpointBackend` (`.backend`; its ledger records every call). Failures raise `BackendError`
    (a `RuntimeError`) naming the reflector and its URL."""

    def __init__(
        self,
        base_url: str,
        model: str | None = None,
        api_key: str | None = None,
        max_tokens: int = 512,
        temperature: float = 0.7,
        timeout: float = 120.0,
    ):
        self.base_url = base_url.rstrip("/")
        self.model, self.api_key = model, api_key
        self.max_tokens, self.temperature, self.timeout = max_tokens, temperature, timeout
        self.backend = EndpointBackend(
            self.base_url, model, api_key=api_key, timeout=timeout, capabilities=_REFLECTOR_CAPABILITIES,
            name=f"OpenAIReflector({self.base_url})", max_new_tokens=max_tokens, temperature=temperature,
        )

    def complete(self, prompt: str) -> str:
        return self.backend.chat([{"role": "user", "content": prompt}])[0].text


REFLECTOR_CHOICES = ("'frozen' (a frozen copy of the initial policy, the default)", "'policy' (the trained policy)",
                     "an http(s)://.../v1 endpoint URL", "a local model path or Hub id (loaded frozen)",
                     "a torch.nn.Module (used frozen)", "a Reflector", "a callable(current_context, records) -> str")


def make_reflector(
    spec: str | Reflector | Callable | torch.nn.Module | None,
    *,
    policy: torch.nn.Module | None = None,
    tokenizer: Any = None,
    endpoint_model: str | None = None,
    api_key_env: str | None = "OPENAI_API_KEY",
    max_new_tokens: int = 256,
    temperature: float = 0.7,
) -> Reflector:
    """Build a reflector.

    `"frozen"` (or None) -> `FrozenReflector.copy_of(policy, tokenizer)`; `"policy"` -> `PolicyReflector` (bound to
    the live policy by the trainer); `"http(s)://..."` -> `OpenAIReflector`; another string -> a local model loaded
    frozen (`FrozenReflector.from_pretrained`); an `nn.Module` -> `FrozenReflector(module, tokenizer)`; a `Reflector`
    is returned as is; a callable becomes a `FunctionReflector`.
    """
    gen = {"max_new_tokens": max_new_tokens, "temperature": temperature}
    if isinstance(spec, Reflector):
        return spec
    if isinstance(spec, torch.nn.Module):
        if tokenizer is None:
            raise ValueError("A model object as reflector needs a tokenizer (the trainer passes its processing_class).")
        return FrozenReflector(spec, tokenizer, **gen)
    if spec is None or spec == "frozen":
        if policy is None or tokenizer is None:
            raise ValueError("The 'frozen' reflector copies the initial policy: pass policy= and tokenizer=.")
        return FrozenReflector.copy_of(policy, tokenizer, **gen)
    if spec == "policy":
        return PolicyReflector(**gen)
    if callable(spec):
        return FunctionReflector(spec)
    if isinstance(spec, str) and spec.startswith(("http://", "https://")):
        key = os.environ.get(api_key_env) if api_key_env else None
        return OpenAIReflector(spec, model=endpoint_model, api_key=key, max_tokens=max_new_tokens,
                               temperature=temperature)
    if isinstance(spec, str) and spec.strip():
        try:
            return FrozenReflector.from_pretrained(spec, **gen)
        except (OSError, ValueError) as err:
            raise ValueError(f"Reflector {spec!r} is not a loadable model ({type(err).__name__}: {err}). A reflector "
                             "is one of: " + "; ".join(REFLECTOR_CHOICES) + ".") from err
    raise TypeError(f"Cannot build a reflector from {spec!r} ({type(spec).__name__}); pass one of: "
                    + "; ".join(REFLECTOR_CHOICES) + ".")
