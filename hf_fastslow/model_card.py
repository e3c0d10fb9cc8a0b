"""Hub model cards for checkpoints written by hf_fastslow converters and trainers."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from huggingface_hub import ModelCard, ModelCardData


def build_model_card(
    *,
    base_model: str | None,
    method: str,
    paper: str | None = None,
    tags: list[str] | None = None,
    figures: Mapping[str, Any] | None = None,
    description: str = "",
    usage: str | None = None,
    extra_sections: Mapping[str, str] | None = None,
) -> ModelCard:
    """A `huggingface_hub.ModelCard` with `library_name: hf_fastslow`, the base model, method tags and the
    measured figures (a table; pass only numbers you measured)."""
    all_tags = ["hf_fastslow", method] + [t for t in (tags or []) if t not in ("hf_fastslow", method)]
    data = ModelCardData(library_name="hf_fastslow", base_model=base_model, tags=all_tags)
    lines = [f"# {method} checkpoint", ""]
    if description:
        lines += [description, ""]
    if paper:
        lines += [f"Method: {paper}", ""]
    if base_model:
        lines += [f"Base model: `{base_model}`", ""]
    if figures:
        lines += ["## Measured figures", "", "| metric | value |", "|---|---|"]
        for key, value in figures.items():
            shown = f"{value:.4g}" if isinstance(value, float) else str(value)
            lines.append(f"| {key} | {shown} |")
        lines.append("")
    if usage:
        lines += ["## Usage", "", "```python", usage.strip(), "```", ""]
    for title, body in (extra_sections or {}).items():
        lines += [f"## {title}", "", body.strip(), ""]
    content = f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines)
    return ModelCard(content)


def save_model_card(save_directory: str | os.PathLike, **kwargs) -> ModelCard:
    """Build a card with `build_model_card(**kwargs)` and write it to `save_directory/README.md`."""
    card = build_model_card(**kwargs)
    os.makedirs(save_directory, exist_ok=True)
    card.save(os.path.join(save_directory, "README.md"))
    return card
