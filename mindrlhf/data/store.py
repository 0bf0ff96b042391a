"""Content-addressed, immutable artifact store for Arrow datasets and checkpoints.

Layout under ``root``::

    objects/<id>/manifest.json   kind, name, files (sha256, bytes), schema, num_rows, parents, meta
    objects/<id>/<files...>      data.arrow (datasets), model.safetensors (+ optim) (checkpoints)
    refs/<name>                  text file holding the id most recently written under that name
    tmp/                         staging; everything is written here, fsynced, then renamed

An artifact's id is the sha256 of its canonical manifest (which holds every file's sha256), so
the same content always gets the same id and a new version is a new id. Every read verifies the
files against the manifest; a mismatch raises :class:`IntegrityError` naming the artifact.

What the store reads is confined to it: an id is 64 hex digits, a name (ref) is letters, digits,
``.``, ``_`` and ``-`` (validated, never rewritten, so two names never share a ref file), and a
manifest may only list plain regular files directly inside its artifact's directory -- no
paths, no symlinks, FIFOs or devices (a read of those could leave the store or never return).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import stat
import tempfile
import time
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


def drop_dir(path: Path) -> None:
    """Delete a directory so that no half of it is ever seen under its name: rename it to a
    hidden ``.trash-*`` sibling first (atomic), then delete. A kill during the delete leaves the
    hidden remnant, which the owner's next sweep removes."""
    path = Path(path)
    trash = path.parent / f".trash-{path.name}-{uuid.uuid4().hex[:8]}"
    os.rename(path, trash)
    fsync_dir(path.parent)
    shutil.rmtree(trash, ignore_errors=True)


def canonical_json(obj) -> bytes:
    return json.dumps(
        obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    ).encode()


ID_RE = re.compile(r"[0-9a-f]{64}")
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,199}")


def check_name(name: str) -> str:
    """An artifact (ref) name: letters, digits, '.', '_', '-', not starting with '.' or '-', at most
    200 characters. Refused, not rewritten: ``team/a`` and ``team_a`` must never share a ref."""
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise ValueError(
            f"bad artifact name {name!r}: use letters, digits, '.', '_' and '-' (at most 200, "
            "starting with a letter or digit)"
        )
    return name


def nonfinite_path(obj, path: str = "") -> str | None:
    """The dotted path of the first NaN/inf number inside ``obj`` (JSON has no such numbers)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return path or "<value>"
    if isinstance(obj, dict):
        items = obj.items()
    elif isinstance(obj, (list, tuple)):
        items = ((f"[{i}]", v) for i, v in enumerate(obj))
    else:
        return None
    for k, v in items:
        sub = f"{path}{k}" if str(k).startswith("[") else (f"{path}.{k}" if path else str(k))
        found = nonfinite_path(v, sub)
        if found:
            return found
    return None


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


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


def _plain_file_name(fname) -> bool:
    return (
        isinstance(fname, str)
        and fname not in ("", ".", "..", MANIFEST)
        and "/" not in fname
        and "\\" not in fname
        and "\0" not in fname
    )


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
        """A staging directory named after this process, so a sweep can tell a dead writer's
        leftovers from a live writer's work."""
        p = self.tmp / f"stage-{os.getpid()}-{uuid.uuid4().hex}"
        p.mkdir()
        return Staging(p)

    def sweep_tmp(self, min_age_s: float = 0.0) -> list[str]:
        """Remove staging directories whose writing process is gone (killed mid-commit) and the
        remnants of removals; returns what was removed. A live process's staging is left alone."""
        removed = []
        for p in self.tmp.iterdir():
            parts = p.name.split("-")
            if parts[0] == "stage" and len(parts) == 3 and parts[1].isdigit():
                stale = not pid_alive(int(parts[1]))
            elif parts[0] in ("stage", "removed"):  # no owner recorded: stale once old
                stale = time.time() - p.lstat().st_mtime > 3600
            else:
                continue
            if stale and time.time() - p.lstat().st_mtime >= min_age_s:
                shutil.rmtree(p, ignore_errors=True)
                removed.append(p.name)
        return removed

    def discard(self, staging: Staging) -> None:
        shutil.rmtree(staging.path, ignore_errors=True)

    def commit(
        self,
        staging: Staging,
        *,
        kind: str,
        name: str,
        parents: list[str] = (),
        meta: dict | None = None,
        schema: str | None = None,
        num_rows: int | None = None,
    ) -> Artifact:
        """Hash the staged files, write the manifest and move the directory into place. The name
        and the manifest are checked first: nothing becomes visible unless all of it is valid."""
        check_name(name)
        bad = nonfinite_path(meta or {}, "meta")
        if bad:
            raise ValueError(
                f"artifact {name}: {bad} is not a finite number; a manifest is JSON and holds "
                "no NaN or infinity"
            )
        files = {}
        for f in sorted(staging.path.iterdir()):
            if f.name == MANIFEST:
                raise ValueError("staged files may not include manifest.json")
            if not _plain_file_name(f.name) or not f.is_file() or f.is_symlink():
                raise ValueError(f"staged {f.name!r} is not a plain regular file")
            with open(f, "rb+") as fh:
                os.fsync(fh.fileno())
            files[f.name] = {"sha256": sha256_file(f), "bytes": f.stat().st_size}
        manifest = {
            "format": 1,
            "kind": kind,
            "name": name,
            "files": files,
            "parents": list(parents),
            "meta": meta or {},
        }
        if schema is not None:
            manifest["schema"] = schema
        if num_rows is not None:
            manifest["num_rows"] = int(num_rows)
        art_id = hashlib.sha256(canonical_json(manifest)).hexdigest()
        manifest["id"] = art_id
        atomic_write_bytes(
            staging.path / MANIFEST,
            json.dumps(manifest, indent=1, sort_keys=True, allow_nan=False).encode(),
        )
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
        atomic_write_bytes(self.refs / check_name(name), (art_id + "\n").encode())

    # ---- reading ---------------------------------------------------------------------------
    def resolve(self, ref: str) -> str:
        """An id, a unique id prefix (>= 8 hex digits) or a ref name -> the full id. Nothing else
        (a path, a name with '/') is looked up: what the store reads stays inside it."""
        if not isinstance(ref, str):
            raise ArtifactNotFound(f"no artifact {ref!r} in {self.root}")
        if ID_RE.fullmatch(ref) and (self.objects / ref).is_dir():
            return ref
        if NAME_RE.fullmatch(ref):
            rf = self.refs / ref
            if rf.is_file():
                target = rf.read_text().strip()
                if not ID_RE.fullmatch(target):
                    raise IntegrityError(
                        f"ref {ref!r} in {self.root} holds {target[:80]!r}, not an artifact id"
                    )
                return target
            if len(ref) >= 8 and re.fullmatch(r"[0-9a-f]+", ref):
                hits = [i for i in self.ids() if i.startswith(ref)]
                if len(hits) == 1:
                    return hits[0]
        raise ArtifactNotFound(f"no artifact {ref!r} in {self.root}")

    def ids(self) -> list[str]:
        """Ids of the stored objects (entries of objects/ that are not artifact ids are ignored)."""
        return sorted(
            p.name for p in self.objects.iterdir() if ID_RE.fullmatch(p.name) and p.is_dir()
        )

    def exists(self, ref: str) -> bool:
        try:
            self.resolve(ref)
            return True
        except ArtifactNotFound:
            return False

    def get(self, ref: str, verify: bool = True) -> Artifact:
        """The artifact, its manifest checked against its id; ``verify`` also re-hashes its
        files."""
        art_id = self.resolve(ref)
        path = self.objects / art_id
        mpath = path / MANIFEST
        try:
            st = mpath.lstat()
        except FileNotFoundError:
            raise IntegrityError(f"artifact {art_id} has no manifest at {mpath}") from None
        if not stat.S_ISREG(st.st_mode):
            raise IntegrityError(f"artifact {art_id}: {mpath} is not a regular file")
        try:
            manifest = json.loads(mpath.read_text())
        except (ValueError, UnicodeDecodeError) as e:
            raise IntegrityError(f"artifact {art_id}: manifest is not valid JSON ({e})") from None
        self._check_manifest(art_id, manifest)
        if verify:
            self.verify(art_id, path, manifest)
        return Artifact(art_id, path, manifest)

    @staticmethod
    def _check_manifest(art_id: str, manifest) -> None:
        if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
            raise IntegrityError(f"artifact {art_id}: manifest is not an artifact manifest")
        body = {k: v for k, v in manifest.items() if k != "id"}
        try:
            digest = hashlib.sha256(canonical_json(body)).hexdigest()
        except ValueError:
            digest = None
        if digest != art_id or manifest.get("id") != art_id:
            raise IntegrityError(
                f"artifact {art_id} ({manifest.get('name')}): manifest does not hash to its id"
            )
        for fname in manifest["files"]:
            if not _plain_file_name(fname):
                raise IntegrityError(
                    f"artifact {art_id} ({manifest.get('name')}): manifest lists {fname!r}, "
                    "which is not a plain file name inside the artifact"
                )

    def verify(self, art_id: str, path: Path, manifest: dict) -> None:
        self._check_manifest(art_id, manifest)
        for fname, info in manifest["files"].items():
            f = path / fname
            try:
                st = f.lstat()
            except FileNotFoundError:
                raise IntegrityError(
                    f"artifact {art_id} ({manifest['name']}): file {fname} is missing"
                ) from None
            if not stat.S_ISREG(st.st_mode):
                raise IntegrityError(
                    f"artifact {art_id} ({manifest['name']}): {fname} is not a regular file "
                    "(a symlink, FIFO or device is never read)"
                )
            if st.st_size != info.get("bytes", st.st_size):
                raise IntegrityError(
                    f"artifact {art_id} ({manifest['name']}): {fname} has {st.st_size} bytes, "
                    f"manifest says {info['bytes']} (truncated or modified)"
                )
            digest = sha256_file(f)
            if digest != info["sha256"]:
                raise IntegrityError(
                    f"artifact {art_id} ({manifest['name']}): {fname} has sha256 {digest[:16]}..., "
                    f"manifest says {info['sha256'][:16]}... (corrupt or modified)"
                )

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
        for i in self.ids():
            try:
                a = self.get(i, verify=False)
            except IntegrityError:
                continue
            if kind is None or a.kind == kind:
                out.append(a)
        return out

    def verify_all(self) -> list[str]:
        """Walk every object (files re-hashed), every ref and the staging area; the problems
        found."""
        problems = []
        for p in sorted(self.objects.iterdir()):
            if not ID_RE.fullmatch(p.name):
                problems.append(f"objects/{p.name}: not an artifact id (ignored by the store)")
                continue
            try:
                self.get(p.name)
            except IntegrityError as e:
                problems.append(str(e))
        for r in sorted(self.refs.iterdir()):
            try:
                target = self.resolve(r.name) if NAME_RE.fullmatch(r.name) else None
            except (ArtifactNotFound, IntegrityError) as e:
                problems.append(f"refs/{r.name}: {e}")
                continue
            if target is None:
                problems.append(f"refs/{r.name}: not a valid ref name")
            elif not (self.objects / target).is_dir():
                problems.append(
                    f"refs/{r.name}: points at {target[:16]}, which is not in the store"
                )
        for t in sorted(self.tmp.iterdir()):
            problems.append(f"tmp/{t.name}: staging left behind")
        return problems

    def lineage(self, ref: str, skip_missing: bool = False) -> list[Artifact]:
        """The artifact and all its ancestors, nearest first. ``skip_missing``: an ancestor no
        longer in the store (removed, or from another store) is left out with its own
        ancestors, instead of raising."""
        seen, order, queue = set(), [], [self.resolve(ref)]
        while queue:
            i = queue.pop(0)
            if i in seen:
                continue
            seen.add(i)
            if skip_missing and not (self.objects / i / MANIFEST).is_file():
                continue
            a = self.get(i, verify=False)
            order.append(a)
            queue.extend(a.parents)
        return order

    # ---- datasets --------------------------------------------------------------------------
    def write_dataset(
        self,
        table: pa.Table,
        *,
        name: str,
        parents: list[str] = (),
        meta: dict | None = None,
        extra_files: dict[str, bytes] | None = None,
    ) -> Artifact:
        """``extra_files``: small companions stored in the same artifact (e.g. plot.png)."""
        check_name(name)
        st = self.stage()
        try:
            with pa.OSFile(str(st / DATA_FILE), "wb") as sink:
                with ipc.new_file(sink, table.schema) as writer:
                    writer.write_table(table)
            for fname, data in (extra_files or {}).items():
                (st / fname).write_bytes(data)
            return self.commit(
                st,
                kind="dataset",
                name=name,
                parents=parents,
                meta=meta,
                schema=str(table.schema),
                num_rows=table.num_rows,
            )
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
    def write_checkpoint(
        self,
        tensors: dict[str, np.ndarray],
        *,
        name: str,
        parents: list[str] = (),
        meta: dict | None = None,
        extra: dict[str, dict[str, np.ndarray]] | None = None,
        extra_files: dict[str, bytes] | None = None,
    ) -> Artifact:
        """Weights go to model.safetensors; ``extra`` maps file stem -> tensors (e.g. optimizer);
        ``extra_files`` are companions stored as they are (a tokenizer's files)."""
        from safetensors.numpy import save_file

        check_name(name)
        st = self.stage()
        try:
            save_file(
                {k: np.ascontiguousarray(v) for k, v in tensors.items()},
                str(st / "model.safetensors"),
            )
            for stem, ts in (extra or {}).items():
                save_file(
                    {k: np.ascontiguousarray(v) for k, v in ts.items()},
                    str(st / f"{stem}.safetensors"),
                )
            for fname, data in (extra_files or {}).items():
                (st / fname).write_bytes(data)
            return self.commit(st, kind="checkpoint", name=name, parents=parents, meta=meta)
        except BaseException:
            self.discard(st)
            raise

    def read_checkpoint(self, ref: str, file: str = "model.safetensors") -> dict[str, np.ndarray]:
        from safetensors.numpy import load_file

        art = self.get(ref)
        if art.kind != "checkpoint":
            raise ValueError(
                f"artifact {art.id[:12]} ({art.name}) is a {art.kind}, not a checkpoint"
            )
        return load_file(str(art.file(file)))
