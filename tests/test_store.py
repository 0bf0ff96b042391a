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

    with pytest.raises(Exception):
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
