"""The view as a link: encoding and decoding, and the store of uploaded queries."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import parse_qsl

from app.share import QueryUploads, SharedView, changed_params, decode, encode

METHODS = ["k_reciprocal", "gnn"]


def test_a_view_survives_its_link() -> None:
    view = SharedView(gallery="tiny-1a2b", file="daisy/001.jpg", tab="gnn",
                      params={"gnn": {"k1": "30", "gamma": "0.5"}})
    text = encode(view)
    assert "file=daisy%2F001.jpg" in text and "gnn.k1=30" in text
    assert decode(dict(parse_qsl(text)), METHODS) == view


def test_a_query_set_pick_survives_its_link() -> None:
    view = SharedView(gallery="db-1a2b", query="all_souls_000013", tab="compare",
                      params={"gnn": {"k1": "30"}})
    text = encode(view)
    assert "query=all_souls_000013" in text and "file=" not in text
    assert decode(dict(parse_qsl(text)), METHODS) == view


def test_decoding_ignores_what_it_does_not_know() -> None:
    decoded = decode({"gallery": "g", "upload": "../../etc/passwd", "ssr.k": "3",
                      "gnn.k1": "20", "utm_source": "x"}, METHODS)
    assert decoded.upload is None  # not a hash: never looked up
    assert decoded.params == {"gnn": {"k1": "20"}}  # ssr is not a method of this page
    assert encode(SharedView()) == ""


def test_a_link_carries_only_the_parameters_that_differ() -> None:
    assert changed_params({"k1": 20.0, "k2": 6, "flag": True},
                          {"k1": 20, "k2": 5, "flag": True}) == {"k2": 6}


def test_uploads_are_kept_by_content(tmp_path: Path) -> None:
    store = QueryUploads(tmp_path / "store")
    first = tmp_path / "photo.JPG"
    first.write_bytes(b"same bytes")
    copy = tmp_path / "other-name.jpg"
    copy.write_bytes(b"same bytes")
    kept_first = store.keep(first)
    digest = kept_first.stem
    assert store.keep(copy) == kept_first and len(digest) == 16
    kept = store.find(digest)
    assert kept == kept_first
    assert kept is not None and kept.read_bytes() == b"same bytes" and kept.suffix == ".jpg"
    assert [path.name for path in (tmp_path / "store").iterdir()] == [kept.name]
    assert store.find("0" * 16) is None
    assert store.find("../" + digest) is None
