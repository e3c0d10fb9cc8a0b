"""hf_fastslow: recent inference and training methods as Hugging Face-native building blocks.

Importing the package registers its integrations with transformers (e.g. `cache_implementation="xquant"`).
"""

from __future__ import annotations

__version__ = "0.1.0"

from . import integrations as integrations  # noqa: E402  (the version gate runs first)
from .default_model import default_model_path, load_default_model  # noqa: E402
from .integrations import (  # noqa: E402
    cache_kwarg_name,
    cache_kwargs,
    register_attention,
    register_cache_implementation,
    unregister_cache_implementation,
)
from .model_card import build_model_card, save_model_card  # noqa: E402

__all__ = [
    "__version__",
    "build_model_card",
    "cache_kwarg_name",
    "cache_kwargs",
    "default_model_path",
    "load_default_model",
    "register_attention",
    "register_cache_implementation",
    "save_model_card",
    "unregister_cache_implementation",
]

from .quantizers import (  # noqa: E402
    QVGCache,
    QVGConfig,
    XQuantCache,
    XQuantConfig,
    qvg_cache_factory,
    xquant_cache_factory,
    xquant_cl_cache_factory,
)

__all__ += ["QVGCache", "QVGConfig", "XQuantCache", "XQuantConfig"]

# Built-in cache implementations: generate(cache_implementation="xquant" | "xquant_cl", cache_config={...}).
register_cache_implementation("xquant", xquant_cache_factory)
register_cache_implementation("xquant_cl", xquant_cl_cache_factory)
register_cache_implementation("qvg", qvg_cache_factory)
