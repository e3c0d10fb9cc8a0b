"""Measurement helpers shared by benchmarks, tests and examples: storage-walk memory (`memory`), perplexity through a
cache (`kv_ppl`), prompt and data loaders (`prompts`), interleaved wall-clock timing (`timing`), cache
tables (`kv_bench`), attention-output error vs dense (`attn_error`)."""

from .answers import answers_match, extract_answer, normalize_number
from .attn_error import attention_error_by_layer, capture_qkv, dense_attention, relative_error
from .kv_bench import cache_table_row, fit_line
from .prompts import (
    GSM8K_INSTRUCTION,
    HUMANEVAL_INSTRUCTION,
    arithmetic_problems,
    bundled_text_ids,
    chat_messages,
    chat_text,
    encode_chat,
    gsm8k_prompts,
    gsm8k_rows,
    humaneval_prompts,
    humaneval_rows,
)
from .timing import (
    ArmTimes,
    InterleavedRun,
    Spread,
    TimedCall,
    interleave,
    load_average,
    machine_state,
    paired_ratio_table,
    paired_ratios,
    quartiles,
    rotated,
    timed_call,
)

__all__ = [
    "answers_match",
    "extract_answer",
    "normalize_number",
    "attention_error_by_layer",
    "cache_table_row",
    "capture_qkv",
    "dense_attention",
    "fit_line",
    "relative_error",
    "GSM8K_INSTRUCTION",
    "HUMANEVAL_INSTRUCTION",
    "ArmTimes",
    "InterleavedRun",
    "Spread",
    "TimedCall",
    "arithmetic_problems",
    "bundled_text_ids",
    "chat_messages",
    "chat_text",
    "encode_chat",
    "gsm8k_prompts",
    "gsm8k_rows",
    "humaneval_prompts",
    "humaneval_rows",
    "interleave",
    "load_average",
    "machine_state",
    "paired_ratio_table",
    "paired_ratios",
    "quartiles",
    "rotated",
    "timed_call",
]
