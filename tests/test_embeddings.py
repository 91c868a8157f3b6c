"""`lilt embed` / `lilt search`: exported embeddings match the model, ids line up, queries find the right image."""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from lilt.config import ConfigError, DataError
from lilt.data import load_pairs
from lilt.embeddings import export_embeddings, load_index, search
from lilt.eval.retrieval import embed_pairs


def test_image_export_matches_the_model_and_search_ranks_by_cosine(make_model, tmp_path: Path) -> None:
    model = make_model("vit").eval()
    data = load_pairs("builtin:tiny-random", split="test", n=12)
    files = export_embeddings(model, data, "image", tmp_path / "index", progress=False)
    assert [f.suffix for f in files] == [".safetensors", ".parquet"]
    vectors, table = load_index(tmp_path / "index.safetensors")
    expected = embed_pairs(model, data)
    torch.testing.assert_close(vectors, expected.images)
    assert table.num_rows == 12 and table.column("id").to_pylist() == [str(i) for i in range(12)]
    queries = data["text"][:3]
    hits = search(model, tmp_path / "index.parquet", queries, k=4)
    direct = expected.texts[:3] @ expected.images.t()
    for row, scores in zip(hits, direct):
        assert len(row) == 4
        assert [int(i) for i, _ in row] == scores.topk(4).indices.tolist()
        assert row[0][1] == pytest.approx(float(scores.max()), abs=1e-5)


def test_caption_export_to_one_parquet_keeps_text_and_language(make_model, tmp_path: Path) -> None:
    model = make_model("vit").eval()
    data = load_pairs("builtin:tiny-random", split="test", n=6)
    export_embeddings(model, data, "text", tmp_path / "captions.parquet", progress=False)
    table = pq.read_table(tmp_path / "captions.parquet")
    assert table.column("text").to_pylist() == data["text"] and table.column("lang").to_pylist() == data["lang"]
    vectors, ids = load_index(tmp_path / "captions.parquet")
    torch.testing.assert_close(vectors, embed_pairs(model, data).texts)
    assert "embedding" not in ids.column_names
    with pytest.raises(ConfigError, match="'image' or 'text'"):
        export_embeddings(model, data, "audio", tmp_path / "x")
    with pytest.raises(FileNotFoundError, match="lilt embed"):
        load_index(tmp_path / "missing.safetensors")


def test_dotted_names_do_not_collide_and_mismatched_halves_are_refused(make_model, tmp_path: Path) -> None:
    model = make_model("vit").eval()
    small, large = (load_pairs("builtin:tiny-random", split="test", n=n) for n in (4, 6))
    export_embeddings(model, small, "image", tmp_path / "idx.v1", progress=False)
    export_embeddings(model, large, "image", tmp_path / "idx.v2", progress=False)
    assert len(load_index(tmp_path / "idx.v1.safetensors")[0]) == 4 and len(load_index(tmp_path / "idx.v2")[0]) == 6
    (tmp_path / "idx.v1.parquet").write_bytes((tmp_path / "idx.v2.parquet").read_bytes())  # a half-finished export
    with pytest.raises(DataError, match="different exports"):
        load_index(tmp_path / "idx.v1.safetensors")


def test_embedding_a_filtered_shuffled_dataset_follows_its_rows(make_model) -> None:
    model = make_model("vit").eval()
    data = load_pairs("builtin:tiny-random", split="test", n=12).shuffle(seed=1)
    subset = data.filter(lambda b: [x != "sw" for x in b["lang"]], batched=True)  # an indices mapping, not a copy
    assert len(subset) == 8
    got, expected = embed_pairs(model, subset), embed_pairs(model, subset.flatten_indices())
    torch.testing.assert_close(got.images, expected.images)
    torch.testing.assert_close(got.texts, expected.texts)
    assert got.langs == subset["lang"]
