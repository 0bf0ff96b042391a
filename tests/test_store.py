import numpy as np
import pyarrow as pa
import pytest

from mindrlhf.data.store import ArtifactNotFound, IntegrityError


def test_dataset_roundtrip_and_content_addressing(store):
    t = pa.table({"a": [1, 2, 3], "b": ["x", "y", "z"]})
    a1 = store.write_dataset(t, name="toy")
    a2 = store.write_dataset(t, name="toy")
    assert a1.id == a2.id  # same content, same id
    assert store.read_dataset(a1.id).equals(t)
    assert store.get(a1.id).manifest["num_rows"] == 3
    a3 = store.write_dataset(pa.table({"a": [1, 2, 4], "b": ["x", "y", "z"]}), name="toy")
    assert a3.id != a1.id  # new version, new id
    assert store.resolve("toy") == a3.id  # the ref points at the newest
    assert not list(store.tmp.iterdir())  # no staging left behind


def test_parents_change_the_id_and_lineage(store):
    t = pa.table({"a": [1]})
    base = store.write_dataset(t, name="base")
    child = store.write_dataset(t, name="child", parents=[base.id])
    assert child.id != store.write_dataset(t, name="child").id
    assert [a.id for a in store.lineage(child.id)] == [child.id, base.id]


def test_checkpoint_roundtrip(store):
    w = {"w": np.arange(6, dtype=np.float32).reshape(2, 3)}
    a = store.write_checkpoint(w, name="ck", extra={"optim": {"m": np.ones(3, np.float32)}})
    got = store.read_checkpoint(a.id)
    np.testing.assert_array_equal(got["w"], w["w"])
    assert store.read_checkpoint(a.id, "optim.safetensors")["m"].sum() == 3


def test_flipped_byte_is_detected_and_named(store):
    a = store.write_dataset(pa.table({"a": list(range(100))}), name="victim")
    f = a.path / "data.arrow"
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match=a.id):
        store.read_dataset(a.id)
    assert not store.is_valid(a.id)


def test_edited_manifest_is_detected(store):
    a = store.write_dataset(pa.table({"a": [1]}), name="m")
    m = (a.path / "manifest.json").read_text().replace('"num_rows": 1', '"num_rows": 2')
    (a.path / "manifest.json").write_text(m)
    with pytest.raises(IntegrityError, match="manifest"):
        store.get(a.id)


def test_unknown_ref(store):
    with pytest.raises(ArtifactNotFound):
        store.get("nope")


def test_failed_write_leaves_nothing_visible(store):
    class BadTable:
        schema = pa.schema([("a", pa.int64())])
        num_rows = 1

    with pytest.raises(TypeError):  # what pyarrow raises for a table that is not one, mid-write
        store.write_dataset(BadTable(), name="bad")
    assert not list(store.objects.iterdir()) and not list(store.tmp.iterdir())


def test_disk_full_during_checkpoint_write_leaves_store_consistent(store, monkeypatch):
    import errno

    import safetensors.numpy as stn

    good = store.write_checkpoint({"w": np.ones(3, np.float32)}, name="ck")

    def full_disk(tensors, path):
        with open(path, "wb") as f:
            f.write(b"\0" * 10)  # a partial file, then the device is full
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(stn, "save_file", full_disk)
    with pytest.raises(OSError, match="No space"):
        store.write_checkpoint({"w": np.zeros(3, np.float32)}, name="ck")
    assert [p.name for p in store.objects.iterdir()] == [good.id]
    assert not list(store.tmp.iterdir())
    assert store.resolve("ck") == good.id and store.is_valid(good.id)


def forge(store, name, files: dict, fname_to_target=None):
    """A self-consistent artifact whose manifest lists ``files`` (name -> bytes or a callable that
    creates the entry at a path); its id is the hash of its manifest, as a real one's."""
    import hashlib
    import json

    from mindrlhf.data.store import canonical_json

    listing = {n: {"sha256": hashlib.sha256(b"x").hexdigest(), "bytes": 1} for n in files}
    manifest = {
        "format": 1,
        "kind": "dataset",
        "name": name,
        "files": listing,
        "parents": [],
        "meta": {},
    }
    art_id = hashlib.sha256(canonical_json(manifest)).hexdigest()
    d = store.objects / art_id
    d.mkdir()
    for n, make in files.items():
        if callable(make):
            make(d / n)
    (d / "manifest.json").write_text(json.dumps({**manifest, "id": art_id}))
    return art_id


@pytest.mark.parametrize("case", ["parent_path", "absolute", "symlink", "fifo", "device_link"])
def test_manifests_may_only_name_plain_files_inside_the_artifact(store, tmp_path, case):
    """A manifest that hashes to its id may still list a path out of the store, or a symlink /
    FIFO / device whose read leaves the store or never returns: every read refuses it, fast."""
    import os
    import time

    outside = tmp_path / "outside.txt"
    outside.write_bytes(b"x")
    files = {
        "parent_path": {"../../../outside.txt": None},
        "absolute": {str(outside): None},
        "symlink": {"data.arrow": lambda p: os.symlink(outside, p)},
        "fifo": {"data.arrow": lambda p: os.mkfifo(p)},
        "device_link": {"data.arrow": lambda p: os.symlink("/dev/zero", p)},
    }[case]
    art_id = forge(store, "forged", files)
    t = time.time()
    with pytest.raises(IntegrityError):
        store.get(art_id)
    assert not store.is_valid(art_id) and time.time() - t < 5
    assert any(art_id in p for p in store.verify_all())


def test_lookups_stay_inside_the_store(store, tmp_path):
    """An absolute path, a path with '/', or a name with NUL is never looked up (the CLI's
    `lineage /abs/path` used to read an unverified manifest from outside the store)."""
    import json

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "manifest.json").write_text(json.dumps({"id": "x", "files": {}, "parents": []}))
    for ref in (str(elsewhere), "../store/objects", "a/b", "bad\0name", ""):
        with pytest.raises(ArtifactNotFound):
            store.resolve(ref)
        with pytest.raises(ArtifactNotFound):
            store.lineage(ref)


@pytest.mark.parametrize(
    "name", ["team/a", "../evil", ".hidden", "-x", "a\0b", "x" * 201, "sp ace"]
)
def test_bad_ref_names_are_refused_not_mangled(store, name):
    """Names are refused, not rewritten: 'team/a' once became the ref file of 'team_a', so writing
    one repointed the other. Nothing is written for a refused name."""
    keep = store.write_dataset(pa.table({"a": [1]}), name="team_a")
    with pytest.raises(ValueError, match="bad artifact name"):
        store.write_dataset(pa.table({"a": [2]}), name=name)
    assert store.resolve("team_a") == keep.id
    assert [p.name for p in store.objects.iterdir()] == [keep.id] and not list(store.tmp.iterdir())


def test_non_finite_meta_is_refused_naming_the_key(store):
    with pytest.raises(ValueError, match=r"meta\.metrics\.loss.*finite"):
        store.write_dataset(
            pa.table({"a": [1]}), name="n", meta={"metrics": {"loss": float("nan")}}
        )
    assert not list(store.objects.iterdir()) and not list(store.tmp.iterdir())


def test_stray_files_are_ignored_and_reported(store):
    a = store.write_dataset(pa.table({"a": [1]}), name="ok")
    (store.objects / ".DS_Store").write_bytes(b"\0\0")
    assert [x.id for x in store.list()] == [a.id]
    assert store.verify_all() == ["objects/.DS_Store: not an artifact id (ignored by the store)"]


def test_dead_writers_staging_is_swept_live_ones_kept(store):
    """A kill -9 during a commit leaves tmp/stage-<pid>-*: removed once that pid is gone; a live
    writer's staging directory is never touched."""
    import os
    import subprocess

    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = store.tmp / f"stage-{dead.pid}-deadbeef"
    stale.mkdir()
    (stale / "data.arrow").write_bytes(b"half")
    live = store.stage()
    assert f"stage-{os.getpid()}-" in live.path.name
    assert store.sweep_tmp() == [stale.name]
    assert live.path.exists() and not stale.exists()


def test_verify_command_walks_every_object(tmp_path, capsys):
    from mindrlhf.cli import main
    from mindrlhf.data.store import ArtifactStore

    store = ArtifactStore(tmp_path / "s")
    good = store.write_dataset(pa.table({"a": [1]}), name="good")
    bad = store.write_dataset(pa.table({"a": [2]}), name="bad")
    assert main(["verify", "--store", str(tmp_path / "s")]) == 0
    assert "2 artifacts" in capsys.readouterr().out
    f = bad.path / "data.arrow"
    f.write_bytes(f.read_bytes()[:-1] + b"\0")
    assert main(["verify", "--store", str(tmp_path / "s")]) == 1
    out = capsys.readouterr().out
    assert bad.id in out and good.id not in out and "1 problem" in out
