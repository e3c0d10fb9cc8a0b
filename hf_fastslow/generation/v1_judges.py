"""V1-Infer judge backends: anything with `complete(prompts) -> texts`.

`CallableJudge` wraps a function, `HFJudge` runs a local transformers model (one left-padded batched `generate` per
call), `EndpointJudge` calls an OpenAI-compatible `/chat/completions` server concurrently through the backend layer's
`EndpointBackend` (huggingface_hub's `InferenceClient`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

import torch

from ..backends.base import Capabilities
from ..backends.endpoint import EndpointBackend
from .padding import cut_at_eos, pad_token_id


class Judge(Protocol):
    """A judge backend: one reply per prompt. `calls` and `tokens` are running totals kept for cost accounting."""

    calls: int
    tokens: int

    def complete(self, prompts: Sequence[str]) -> list[str]: ...


class CallableJudge:
    """Wraps `fn(prompt) -> reply` (scripted judges in tests, or any custom client) as a `Judge`."""

    def __init__(self, fn: Callable[[str], str]):
        if not callable(fn):
            raise TypeError("CallableJudge needs a callable fn(prompt: str) -> str.")
        self.fn = fn
        self.calls = 0
        self.tokens = 0

    def complete(self, prompts: Sequence[str]) -> list[str]:
        self.calls += len(prompts)
        return [self.fn(p) for p in prompts]


class HFJudge:
    """A local transformers causal LM as judge: each `complete` is one left-padded batched `generate`
    (chunked by `batch_size`), the prompt wrapped in the tokenizer's chat template when it has one.

    Greedy by default so that the same pair always gets the same verdict (the tournament never re-asks a pair).
    """

    def __init__(
        self,
        model,
        tokenizer,
        max_new_tokens: int = 32,
        batch_size: int = 16,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_p: float = 1.0,
        system_prompt: str | None = None,
        max_prompt_tokens: int | None = None,
    ):
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}.")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
        self.model = model
        self.tokenizer = tokenizer
        self.max_new_tokens = max_new_tokens
        self.batch_size = batch_size
        self.do_sample = do_sample
        self.temperature = temperature
        self.top_p = top_p
        self.system_prompt = system_prompt
        self.max_prompt_tokens = max_prompt_tokens
        self.calls = 0
        self.tokens = 0
        self.truncated_prompts = 0

    def _render(self, prompt: str) -> str:
        if getattr(self.tokenizer, "chat_template", None):
            messages = [{"role": "user", "content": prompt}]
            if self.system_prompt is not None:
                messages.insert(0, {"role": "system", "content": self.system_prompt})
            return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return prompt

    @torch.no_grad()
    def complete(self, prompts: Sequence[str]) -> list[str]:
        replies: list[str] = []
        for start in range(0, len(prompts), self.batch_size):
            replies.extend(self._complete_batch([self._render(p) for p in prompts[start : start + self.batch_size]]))
        return replies

    def _complete_batch(self, texts: list[str]) -> list[str]:
        tok = self.tokenizer
        side = tok.padding_side
        tok.padding_side = "left"  # decoder-only batching: the new tokens must follow every prompt directly
        try:
            # Chat templates already carry the BOS/special tokens; adding them again would double them.
            enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        finally:
            tok.padding_side = side
        if self.max_prompt_tokens is not None and enc["input_ids"].shape[1] > self.max_prompt_tokens:
            # Keep the tail: it holds the rating instructions and the generation prompt.
            self.truncated_prompts += int((enc["attention_mask"].sum(1) > self.max_prompt_tokens).sum())
            enc = {k: v[:, -self.max_prompt_tokens :] for k, v in enc.items()}
        device = next(self.model.parameters()).device
        enc = {k: v.to(device) for k, v in enc.items()}
        pad_id = pad_token_id(tok)
        gen_kwargs = {"max_new_tokens": self.max_new_tokens, "do_sample": self.do_sample, "pad_token_id": pad_id}
        if self.do_sample:
            gen_kwargs.update(temperature=self.temperature, top_p=self.top_p)
        out = self.model.generate(**enc, **gen_kwargs)
        new = out[:, enc["input_ids"].shape[1] :]
        eos = tok.eos_token_id
        replies = []
        for row in new:
            ids = cut_at_eos(row.tolist(), eos)
            while ids and ids[-1] == pad_id and pad_id != eos:
                ids.pop()
            self.tokens += len(ids)
            replies.append(tok.decode(ids, skip_special_tokens=True))
        self.tokens += int(enc["attention_mask"].sum())
        self.calls += len(texts)
        return replies


# One reply per prompt, no log-probs: nothing to probe the server for.
_JUDGE_CAPABILITIES = Capabilities(native_n=False, logprobs=False, max_top_logprobs=0, streaming=True,
                                   continue_final_message=False, prompt_scoring=False, seed=True)


class EndpointJudge:
    """An OpenAI-compatible chat endpoint (vLLM, TGI, `transformers serve`, llama.cpp server, hosted APIs) as judge.

    `base_url` is the API root, e.g. `http://127.0.0.1:8000/v1`; each prompt becomes one request to
    `{base_url}/chat/completions` through `EndpointBackend` (`.backend`, whose ledger records every `complete`), up to
    `max_workers` in flight at once. Token counts come from the server's `usage` field when it reports one.
    Failures raise `BackendError` (a `RuntimeError`) naming the judge and its URL.
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key: str | None = None,
        max_tokens: int = 32,
        temperature: float = 0.0,
        top_p: float = 1.0,
        timeout: float = 120.0,
        max_workers: int = 8,
        system_prompt: str | None = None,
        extra_body: dict | None = None,
    ):
        if not isinstance(base_url, str) or not base_url.startswith(("http://", "https://")):
            raise ValueError(f"base_url must be an http(s) URL such as 'http://127.0.0.1:8000/v1', got {base_url!r}.")
        if max_workers < 1:
            raise ValueError(f"max_workers must be >= 1, got {max_workers}.")
        self.model = model
        self.api_key = api_key
        self.max_tokens = max_tokens
        self.temperature = temperature
        self.top_p = top_p
        self.timeout = timeout
        self.max_workers = max_workers
        self.system_prompt = system_prompt
        self.extra_body = dict(extra_body or {})
        self.backend = EndpointBackend(
            base_url, model, api_key=api_key, timeout=timeout, system=system_prompt, max_concurrency=max_workers,
            capabilities=_JUDGE_CAPABILITIES, name=f"EndpointJudge({base_url.rstrip('/')})",
            max_new_tokens=max_tokens, temperature=temperature, top_p=top_p, **self.extra_body,
        )
        self.url = self.backend.base_url + "/chat/completions"

    @property
    def calls(self) -> int:
        return self.backend.ledger.total().requests

    @property
    def tokens(self) -> int:
        return self.backend.ledger.total().total_tokens

    def complete(self, prompts: Sequence[str]) -> list[str]:
        if not prompts:
            return []
        replies = self.backend.chat_batch([[{"role": "user", "content": p}] for p in prompts])
        return [row[0].text for row in replies]
