"""The one way to save learned state: round trip, and every damage refused with CacheError."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from engine.core import state as state_module
from engine.core import storage
from engine.core.state import (
    MissingStateError,
    StaleStateError,
    load_state,
    manifest_path,
    save_state,
    tensors_path,
)
from engine.errors import CacheError

KIND, VERSION, KEY = "test", 3, "abc123"


def tensors() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return {"weight": torch.randn(4, 3, generator=generator),
            "labels": torch.arange(5, dtype=torch.int64)}


def save(path, **overrides):
    arguments = {"kind": KIND, "version": VERSION, "fingerprint": KEY, "tensors": tensors(),
                 "metadata": {"note": "hello", "sizes": [1, 2]}, **overrides}
    return save_state(path, **arguments)


def load(path, **overrides):
    return load_state(path, **{"kind": KIND, "version": VERSION, "fingerprint": KEY,
                               **overrides})


def test_round_trip(tmp_path):
    path = tmp_path / "states" / "one"
    written = save(path)
    assert written == manifest_path(path) == tmp_path / "states" / "one.json"
    loaded = load(path)
    for name, value in tensors().items():
        torch.testing.assert_close(loaded.tensors[name], value, rtol=0, atol=0)
    assert loaded.manifest["note"] == "hello" and loaded.manifest["sizes"] == [1, 2]
    assert loaded.manifest["format"] == VERSION and loaded.manifest["fingerprint"] == KEY
    assert loaded.manifest["weights_sha256"] == storage.sha256_file(tensors_path(path))
    assert loaded.files == {}


def test_numpy_arrays_are_saved_as_tensors(tmp_path):
    save(tmp_path / "s", tensors={"rows": np.arange(6, dtype=np.float32).reshape(2, 3)})
    loaded = load(tmp_path / "s")
    np.testing.assert_array_equal(loaded.tensors["rows"].numpy(),
                                  np.arange(6, dtype=np.float32).reshape(2, 3))


def test_without_tensors_no_tensors_file_is_written(tmp_path):
    save(tmp_path / "manifest", tensors=None)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["manifest.json"]
    loaded = load(tmp_path / "manifest")
    assert loaded.tensors == {} and "weights_sha256" not in loaded.manifest


def test_extra_files_are_recorded_and_verified(tmp_path):
    (tmp_path / "index.bin").write_bytes(b"an index")
    save(tmp_path / "manifest", tensors=None, files=["index.bin"])
    loaded = load(tmp_path / "manifest", files=["index.bin"])
    assert loaded.files == {"index.bin": tmp_path / "index.bin"}
    assert loaded.manifest["files"]["index.bin"] == {"bytes": 8, "sha256": storage.sha256_file(
        tmp_path / "index.bin")}
    (tmp_path / "index.bin").write_bytes(b"an indeX")
    with pytest.raises(CacheError, match=r"index\.bin does not match"):
        load(tmp_path / "manifest")
    (tmp_path / "index.bin").unlink()
    with pytest.raises(CacheError, match=r"index\.bin is missing"):
        load(tmp_path / "manifest")


def test_files_asked_for_are_read_once_and_checked_from_those_bytes(tmp_path, monkeypatch):
    """`read` returns the very bytes that were checked: the file is read once, not hashed on
    disk and then read again."""
    (tmp_path / "model.bin").write_bytes(b"a model")
    save(tmp_path / "manifest", tensors=None, files=["model.bin"])
    hashed_on_disk: list[object] = []
    original = state_module.sha256_file
    monkeypatch.setattr(state_module, "sha256_file",
                        lambda path: hashed_on_disk.append(path) or original(path))
    loaded = load(tmp_path / "manifest", read=["model.bin"])
    assert loaded.contents == {"model.bin": b"a model"}
    assert loaded.files == {"model.bin": tmp_path / "model.bin"}
    assert hashed_on_disk == []
    (tmp_path / "model.bin").write_bytes(b"a modeL")
    with pytest.raises(CacheError, match=r"model\.bin does not match"):
        load(tmp_path / "manifest", read=["model.bin"])


def test_a_needed_file_that_is_not_recorded_is_refused(tmp_path):
    (tmp_path / "model.bin").write_bytes(b"model")
    save(tmp_path / "manifest", tensors=None)
    with pytest.raises(CacheError, match=r"model\.bin does not match"):
        load(tmp_path / "manifest", files=["model.bin"])


def test_extra_files_outside_the_folder_are_refused(tmp_path):
    (tmp_path / "outside.bin").write_bytes(b"x")
    with pytest.raises(ValueError, match="not in the state's folder"):
        save(tmp_path / "inner" / "manifest", files=[tmp_path / "outside.bin"])


def test_reserved_metadata_is_refused(tmp_path):
    with pytest.raises(ValueError, match="reserved"):
        save(tmp_path / "s", metadata={"fingerprint": "mine"})


def test_missing_state(tmp_path):
    with pytest.raises(MissingStateError):
        load(tmp_path / "nothing")


def test_checksum_mismatch_is_refused(tmp_path):
    save(tmp_path / "s")
    weights = tensors_path(tmp_path / "s")
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0x01  # still parses as safetensors: only the sha256 can tell
    weights.write_bytes(bytes(data))
    with pytest.raises(CacheError, match=r"s\.safetensors does not match its checksum"):
        load(tmp_path / "s")


def test_an_edited_manifest_is_refused(tmp_path):
    save(tmp_path / "s")
    manifest = json.loads(manifest_path(tmp_path / "s").read_text())
    manifest["note"] = "edited"
    manifest_path(tmp_path / "s").write_text(json.dumps(manifest))
    with pytest.raises(CacheError, match="does not match its checksum"):
        load(tmp_path / "s")


def test_fingerprint_mismatch_is_refused(tmp_path):
    save(tmp_path / "s")
    with pytest.raises(StaleStateError, match="made from 'abc123', not 'other'"):
        load(tmp_path / "s", fingerprint="other")
    assert load(tmp_path / "s", fingerprint=None).manifest["fingerprint"] == KEY


def test_kind_mismatch_is_refused(tmp_path):
    save(tmp_path / "s")
    with pytest.raises(CacheError, match="'test' state, not 'other'"):
        load(tmp_path / "s", kind="other")


@pytest.mark.parametrize("which", ["tensors", "manifest"])
def test_truncated_file_is_refused(tmp_path, which):
    save(tmp_path / "s")
    file = tensors_path(tmp_path / "s") if which == "tensors" else manifest_path(tmp_path / "s")
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])
    with pytest.raises(CacheError):
        load(tmp_path / "s")


def test_tensors_file_missing_is_refused(tmp_path):
    save(tmp_path / "s")
    tensors_path(tmp_path / "s").unlink()
    with pytest.raises(CacheError, match=r"s\.safetensors is missing"):
        load(tmp_path / "s")


def test_version_mismatch_is_refused(tmp_path):
    save(tmp_path / "s", version=VERSION - 1)
    with pytest.raises(CacheError, match=f"format {VERSION - 1}, not {VERSION}"):
        load(tmp_path / "s")


def test_a_manifest_that_is_not_an_object_is_refused(tmp_path):
    manifest_path(tmp_path / "s").write_text("[]")
    with pytest.raises(CacheError, match="not a JSON object"):
        load(tmp_path / "s")


def test_a_failed_write_leaves_the_old_state(tmp_path, monkeypatch):
    save(tmp_path / "s")
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}

    def broken(*args, **kwargs):
        raise OSError("disk full")

    import safetensors.torch

    monkeypatch.setattr(safetensors.torch, "save_file", broken)
    changed = {name: value + 1 for name, value in tensors().items()}
    with pytest.raises(OSError, match="disk full"):
        save(tmp_path / "s", tensors=changed, metadata={"note": "new"})
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # no temporaries
    assert load(tmp_path / "s").manifest["note"] == "hello"


def test_a_crash_before_the_manifest_is_refused_not_misread(tmp_path, monkeypatch):
    """New tensors renamed in, then the manifest's write fails: the old manifest no longer
    vouches for the tensors, so the state is refused (rebuilt), never loaded half-old."""
    save(tmp_path / "s")

    def broken(*args, **kwargs):
        raise OSError("killed")

    monkeypatch.setattr(state_module, "atomic_write_json", broken)
    with pytest.raises(OSError, match="killed"):
        save(tmp_path / "s", tensors={name: value + 1 for name, value in tensors().items()})
    with pytest.raises(CacheError, match="does not match its checksum"):
        load(tmp_path / "s")


def test_loading_deletes_nothing(tmp_path):
    save(tmp_path / "s")
    tensors_path(tmp_path / "s").write_bytes(b"damaged")
    with pytest.raises(CacheError):
        load(tmp_path / "s")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.json", "s.safetensors"]


def test_a_dotted_stem_keeps_its_name(tmp_path):
    """The suffixes are appended: `maps/x.umap` -> `maps/x.umap.json`, never `maps/x.json`."""
    save(tmp_path / "x.umap")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.umap.json", "x.umap.safetensors"]
    assert load(tmp_path / "x.umap").manifest["note"] == "hello"


def test_known_file_records_are_written_as_given(tmp_path):
    (tmp_path / "index.bin").write_bytes(b"an index")
    record = state_module.file_record(tmp_path / "index.bin")
    save(tmp_path / "manifest", tensors=None, file_records={"index.bin": record})
    assert load(tmp_path / "manifest", files=["index.bin"]).manifest["files"] == {
        "index.bin": record}
