"""Content-addressed, immutable artifact store for Arrow datasets and checkpoints.

Layout under ``root``::

    objects/<id>/manifest.json   kind, name, files (sha256, bytes), schema, num_rows, parents, meta
    objects/<id>/<files...>      data.arrow for datasets, model.safetensors (+ optim) for checkpoints
    refs/<name>                  text file holding the id most recently written under that name
    tmp/                         staging; everything is written here, fsynced, then renamed

An artifact's id is the sha256 of its canonical manifest (which holds every file's sha256), so
the same content always gets the same id and a new version is a new id. Every read verifies the
files against the manifest; a mismatch raises :class:`IntegrityError` naming the artifact.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc

MANIFEST = "manifest.json"
DATA_FILE = "data.arrow"


class IntegrityError(RuntimeError):
    """An artifact's files do not match its manifest."""


class ArtifactNotFound(KeyError):
    pass


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temp file in the same dir, fsync, rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def canonical_json(obj) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


@dataclass
class Artifact:
    id: str
    path: Path
    manifest: dict

    @property
    def kind(self) -> str:
        return self.manifest["kind"]

    @property
    def name(self) -> str:
        return self.manifest["name"]

    @property
    def meta(self) -> dict:
        return self.manifest.get("meta", {})

    @property
    def parents(self) -> list[str]:
        return self.manifest.get("parents", [])

    def file(self, name: str) -> Path:
        if name not in self.manifest["files"]:
            raise KeyError(f"artifact {self.id[:12]} ({self.name}) has no file {name!r}")
        return self.path / name


class Staging:
    """A temp directory that becomes an artifact on :meth:`ArtifactStore.commit`."""

    def __init__(self, path: Path):
        self.path = path

    def __truediv__(self, name: str) -> Path:
        return self.path / name


class ArtifactStore:
    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.objects = self.root / "objects"
        self.refs = self.root / "refs"
        self.tmp = self.root / "tmp"
        for d in (self.objects, self.refs, self.tmp):
            d.mkdir(parents=True, exist_ok=True)

    # ---- writing ---------------------------------------------------------------------------
    def stage(self) -> Staging:
        p = self.tmp / f"stage-{uuid.uuid4().hex}"
        p.mkdir()
        return Staging(p)

    def discard(self, staging: Staging) -> None:
        shutil.rmtree(staging.path, ignore_errors=True)

    def commit(self, staging: Staging, *, kind: str, name: str, parents: list[str] = (),
               meta: dict | None = None, schema: str | None = None,
               num_rows: int | None = None) -> Artifact:
        """Hash the staged files, write the manifest and move the directory into place."""
        files = {}
        for f in sorted(staging.path.iterdir()):
            if f.name == MANIFEST:
                raise ValueError("staged files may not include manifest.json")
            with open(f, "rb+") as fh:
                os.fsync(fh.fileno())
            files[f.name] = {"sha256": sha256_file(f), "bytes": f.stat().st_size}
        manifest = {
            "format": 1, "kind": kind, "name": name, "files": files,
            "parents": list(parents), "meta": meta or {},
        }
        if schema is not None:
            manifest["schema"] = schema
        if num_rows is not None:
            manifest["num_rows"] = int(num_rows)
        art_id = hashlib.sha256(canonical_json(manifest)).hexdigest()
        manifest["id"] = art_id
        atomic_write_bytes(staging.path / MANIFEST, json.dumps(manifest, indent=1, sort_keys=True).encode())
        fsync_dir(staging.path)
        dest = self.objects / art_id
        if dest.exists() and not self.is_valid(art_id):
            self.remove(art_id)  # a corrupt copy of this very content: replace it
        if dest.exists():  # same content already stored: keep the existing one
            self.discard(staging)
        else:
            try:
                os.rename(staging.path, dest)
            except OSError:
                if not dest.exists():
                    raise
                self.discard(staging)
            fsync_dir(self.objects)
        self.set_ref(name, art_id)
        return Artifact(art_id, dest, manifest)

    def set_ref(self, name: str, art_id: str) -> None:
        atomic_write_bytes(self.refs / _ref_file(name), (art_id + "\n").encode())

    # ---- reading ---------------------------------------------------------------------------
    def resolve(self, ref: str) -> str:
        """An id, a unique id prefix (>= 8 chars) or a ref name -> the full id."""
        if (self.objects / ref).is_dir():
            return ref
        rf = self.refs / _ref_file(ref)
        if rf.exists():
            return rf.read_text().strip()
        if len(ref) >= 8:
            hits = [p.name for p in self.objects.iterdir() if p.name.startswith(ref)]
            if len(hits) == 1:
                return hits[0]
        raise ArtifactNotFound(f"no artifact {ref!r} in {self.root}")

    def exists(self, ref: str) -> bool:
        try:
            self.resolve(ref)
            return True
        except ArtifactNotFound:
            return False

    def get(self, ref: str, verify: bool = True) -> Artifact:
        art_id = self.resolve(ref)
        path = self.objects / art_id
        mpath = path / MANIFEST
        if not mpath.exists():
            raise IntegrityError(f"artifact {art_id} has no manifest at {mpath}")
        try:
            manifest = json.loads(mpath.read_text())
        except (ValueError, UnicodeDecodeError) as e:
            raise IntegrityError(f"artifact {art_id}: manifest is not valid JSON ({e})") from None
        if verify:
            self.verify(art_id, path, manifest)
        return Artifact(art_id, path, manifest)

    def verify(self, art_id: str, path: Path, manifest: dict) -> None:
        body = {k: v for k, v in manifest.items() if k != "id"}
        if hashlib.sha256(canonical_json(body)).hexdigest() != art_id or manifest.get("id") != art_id:
            raise IntegrityError(f"artifact {art_id} ({manifest.get('name')}): manifest does not hash to its id")
        for fname, info in manifest["files"].items():
            f = path / fname
            if not f.exists():
                raise IntegrityError(f"artifact {art_id} ({manifest['name']}): file {fname} is missing")
            digest = sha256_file(f)
            if digest != info["sha256"]:
                raise IntegrityError(
                    f"artifact {art_id} ({manifest['name']}): {fname} has sha256 {digest[:16]}..., "
                    f"manifest says {info['sha256'][:16]}... (corrupt or modified)")

    def is_valid(self, ref: str) -> bool:
        try:
            self.get(ref)
            return True
        except (ArtifactNotFound, IntegrityError):
            return False

    def remove(self, art_id: str) -> None:
        """Move a (corrupt) artifact aside so it can be rebuilt; never deletes in place."""
        src = self.objects / art_id
        if src.exists():
            dst = self.tmp / f"removed-{art_id}-{uuid.uuid4().hex[:8]}"
            os.rename(src, dst)
            shutil.rmtree(dst, ignore_errors=True)

    def list(self, kind: str | None = None) -> list[Artifact]:
        out = []
        for p in sorted(self.objects.iterdir()):
            try:
                a = self.get(p.name, verify=False)
            except IntegrityError:
                continue
            if kind is None or a.kind == kind:
                out.append(a)
        return out

    def lineage(self, ref: str) -> list[Artifact]:
        """The artifact and all its ancestors, nearest first."""
        seen, order, queue = set(), [], [self.resolve(ref)]
        while queue:
            i = queue.pop(0)
            if i in seen:
                continue
            seen.add(i)
            a = self.get(i, verify=False)
            order.append(a)
            queue.extend(a.parents)
        return order

    # ---- datasets --------------------------------------------------------------------------
    def write_dataset(self, table: pa.Table, *, name: str, parents: list[str] = (),
                      meta: dict | None = None, extra_files: dict[str, bytes] | None = None) -> Artifact:
        """``extra_files``: small companions stored in the same artifact (e.g. plot.png)."""
        st = self.stage()
        try:
            with pa.OSFile(str(st / DATA_FILE), "wb") as sink:
                with ipc.new_file(sink, table.schema) as writer:
                    writer.write_table(table)
            for fname, data in (extra_files or {}).items():
                (st / fname).write_bytes(data)
            return self.commit(st, kind="dataset", name=name, parents=parents, meta=meta,
                               schema=str(table.schema), num_rows=table.num_rows)
        except BaseException:
            self.discard(st)
            raise

    def read_dataset(self, ref: str) -> pa.Table:
        art = self.get(ref)
        if art.kind != "dataset":
            raise ValueError(f"artifact {art.id[:12]} ({art.name}) is a {art.kind}, not a dataset")
        with pa.memory_map(str(art.file(DATA_FILE)), "r") as src:
            return ipc.open_file(src).read_all()

    # ---- checkpoints -----------------------------------------------------------------------
    def write_checkpoint(self, tensors: dict[str, np.ndarray], *, name: str, parents: list[str] = (),
                         meta: dict | None = None, extra: dict[str, dict[str, np.ndarray]] | None = None
                         ) -> Artifact:
        """Weights go to model.safetensors; ``extra`` maps file stem -> tensors (e.g. optimizer)."""
        from safetensors.numpy import save_file

        st = self.stage()
        try:
            save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(st / "model.safetensors"))
            for stem, ts in (extra or {}).items():
                save_file({k: np.ascontiguousarray(v) for k, v in ts.items()}, str(st / f"{stem}.safetensors"))
            return self.commit(st, kind="checkpoint", name=name, parents=parents, meta=meta)
        except BaseException:
            self.discard(st)
            raise

    def read_checkpoint(self, ref: str, file: str = "model.safetensors") -> dict[str, np.ndarray]:
        from safetensors.numpy import load_file

        art = self.get(ref)
        if art.kind != "checkpoint":
            raise ValueError(f"artifact {art.id[:12]} ({art.name}) is a {art.kind}, not a checkpoint")
        return load_file(str(art.file(file)))


def _ref_file(name: str) -> str:
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in name)
    if not safe or safe.startswith("."):
        raise ValueError(f"bad artifact name {name!r}")
    return safe
