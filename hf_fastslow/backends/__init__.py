"""One backend layer for the test-time-scaling methods and agent runtimes: a local transformers model
(`HFLocalBackend`), an OpenAI-compatible server (`EndpointBackend`, e.g. `transformers serve`, vLLM, TGI), and the
scripted `ScriptedBackend` for tests, and `ReplicaRouter` over several replicas. All share `Backend`'s API and
per-call accounting (`Ledger`)."""

from .base import (
    Backend,
    BackendError,
    BackendFeatureError,
    BackendUnreachableError,
    CallRecord,
    Capabilities,
    Completion,
    GenerationOptions,
    Ledger,
    Messages,
    StreamChunk,
    Usage,
)
from .endpoint import TRANSFORMERS_SERVE, EndpointBackend
from .hf_local import HFLocalBackend, LogProbRecorder
from .router import POLICIES, ReplicaRouter, ReplicaStatus, ReplicasUnavailableError, RouterStats, is_transport_failure
from .serve import LocalServer, serving_available
from .streamers import BatchChunkStreamer, TokenChunk
from .testing import ManualClock, ScriptedBackend

__all__ = [
    "TRANSFORMERS_SERVE",
    "Backend",
    "BackendError",
    "BackendFeatureError",
    "BackendUnreachableError",
    "BatchChunkStreamer",
    "CallRecord",
    "Capabilities",
    "Completion",
    "EndpointBackend",
    "GenerationOptions",
    "HFLocalBackend",
    "Ledger",
    "LocalServer",
    "LogProbRecorder",
    "POLICIES",
    "ReplicaRouter",
    "ReplicaStatus",
    "ReplicasUnavailableError",
    "RouterStats",
    "ManualClock",
    "Messages",
    "ScriptedBackend",
    "StreamChunk",
    "TokenChunk",
    "Usage",
    "is_transport_failure",
    "serving_available",
]
