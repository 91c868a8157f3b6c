"""`lilt embed` / `lilt search`: exported embeddings match the model, ids line up, queries find the right image."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from helpers import ANIMALS, COLOURS, searchable_fake_model, write_colour_table
from safetensors.torch import save_file

from lilt.cli import main
from lilt.config import ConfigError, DataError
from lilt.data import load_pairs
from lilt.embeddings import export_embeddings, load_index, open_index, search, search_index, top_k
from lilt.eval.retrieval import embed_pairs


def test_image_export_matches_the_model_and_search_ranks_by_cosine(make_model, tmp_path: Path) -> None:
    model = make_model("vit").eval()
    data = load_pairs("builtin:tiny-random", split="test", n=12)
    files = export_embeddings(model, data, "image", tmp_path / "index", progress=False)
    assert [f.suffix for f in files] == [".safetensors", ".parquet"]
    vectors, table = load_index(tmp_path / "index.safetensors")
    expected = embed_pairs(model, data)
    torch.testing.assert_close(vectors, expected.images)
    ids = table.column("id").to_pylist()
    # Images stored as bytes have no path: their id is a hash of the bytes, stable across exports.
    assert table.num_rows == 12 and len(set(ids)) == 12 and all(i.startswith("sha1:") for i in ids)
    queries = data["text"][:3]
    hits = search(model, tmp_path / "index.parquet", queries, k=4)
    direct = expected.texts[:3] @ expected.images.t()
    for row, scores in zip(hits, direct):
        assert len(row) == 4
        assert [ids.index(i) for i, _ in row] == scores.topk(4).indices.tolist()
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


@pytest.mark.parametrize("chunk", [1, 3, 7, 64])
@pytest.mark.parametrize("k", [1, 5, 40])
def test_running_top_k_over_chunks_equals_a_full_top_k(chunk: int, k: int) -> None:
    generator = torch.Generator().manual_seed(chunk * 100 + k)
    index, queries = torch.randn(29, 6, generator=generator), torch.randn(4, 6, generator=generator)
    scores, rows = top_k(queries, index.split(chunk), k)
    full = (queries @ index.t()).topk(min(k, 29), dim=1)
    torch.testing.assert_close(scores, full.values)
    assert rows.tolist() == full.indices.tolist()


def test_ids_are_paths_each_image_once_and_text_and_image_queries_find_them(tmp_path: Path) -> None:
    model = searchable_fake_model()
    table = write_colour_table(tmp_path / "data", captions_per_image=2)
    data = load_pairs(table)
    assert len(data) == 6
    export_embeddings(model, data, "image", tmp_path / "index", progress=False)
    assert model.images_seen == 3  # two captions per image, each image embedded once
    index = open_index(tmp_path / "index")
    paths = [str((tmp_path / "data" / f"{c}.png").resolve()) for c in COLOURS]
    assert index.table.column("id").to_pylist() == paths == index.table.column("path").to_pylist()
    found = search_index(model, index, ["cat", "ndege"], [tmp_path / "data" / "green.png"], k=2, chunk_rows=1)
    assert [r["hits"][0]["path"] for r in found] == [paths[0], paths[2], paths[1]]
    assert found[2]["query"].endswith("green.png") and found[0]["hits"][0]["score"] > 0.9
    assert [h["rank"] for h in found[0]["hits"]] == [1, 2]
    [[(best, score)]] = search(model, tmp_path / "index.safetensors", ["dog"], k=1)
    assert best == paths[1] and 0.99 < score < 1.0  # "dog" is the green axis; green.png is (10, 230, 10)
    with pytest.raises(DataError, match="cannot read the query image"):
        search(model, index, images=[tmp_path / "nope.jpg"])

    keyed = data.add_column("key", [f"item-{c}" for c in COLOURS for _ in range(2)])
    export_embeddings(model, keyed, "text", tmp_path / "captions.parquet", id_column="key", progress=False)
    captions = open_index(tmp_path / "captions.parquet")
    # One caption per id: the first row of each key.
    assert captions.table.column("id").to_pylist() == [f"item-{c}" for c in COLOURS]
    assert captions.table.column("text").to_pylist() == [f"a {ANIMALS[c]} number 0" for c in COLOURS]


def test_append_adds_only_new_ids_and_an_interrupted_append_keeps_the_old_index(tmp_path: Path) -> None:
    model = searchable_fake_model()
    data = load_pairs(write_colour_table(tmp_path / "data"))
    export_embeddings(model, data.select([0, 1]), "image", tmp_path / "index", progress=False)
    old_vectors, old_table = load_index(tmp_path / "index")
    seen = model.images_seen
    export_embeddings(model, data, "image", tmp_path / "index", append=True, progress=False)
    assert model.images_seen - seen == 1  # only blue.png was new
    assert export_embeddings(model, data, "image", tmp_path / "index", append=True, progress=False) == []
    assert model.images_seen - seen == 1
    vectors, table = load_index(tmp_path / "index")
    export_embeddings(model, data, "image", tmp_path / "fresh", progress=False)
    fresh_vectors, fresh_table = load_index(tmp_path / "fresh")
    torch.testing.assert_close(vectors, fresh_vectors)
    assert table.column("id").to_pylist() == fresh_table.column("id").to_pylist()
    # A crash between the vectors' rename and the ids': new vectors beside the old ids is the old index.
    new_meta = open_index(tmp_path / "index").meta
    (tmp_path / "index.parquet").unlink()
    export_embeddings(model, data.select([0, 1]), "image", tmp_path / "old", progress=False)
    old = open_index(tmp_path / "old")
    save_file({"embeddings": vectors}, str(tmp_path / "old.safetensors"),
              metadata={**new_meta, "previous": json.dumps({"token": old.meta["token"], "count": 2})})
    recovered = open_index(tmp_path / "old", load=True)
    torch.testing.assert_close(recovered.vectors, old_vectors)
    assert recovered.table.column("id").to_pylist() == old_table.column("id").to_pylist()
    other = searchable_fake_model()
    other.anchor.data.fill_(1.0)  # another trained state: its vectors would not be comparable
    with pytest.raises(ConfigError, match="another model"):
        export_embeddings(other, data, "image", tmp_path / "fresh", append=True, progress=False)
    with pytest.raises(ConfigError, match="another kind"):
        export_embeddings(model, data, "text", tmp_path / "fresh", append=True, progress=False)


def test_search_command_prints_paths_json_and_image_queries(make_model, tmp_path: Path, capsys) -> None:
    model = make_model("vit")
    model.save_pretrained(tmp_path / "m")
    table = write_colour_table(tmp_path / "data")
    m, index = str(tmp_path / "m"), str(tmp_path / "index")
    assert main(["embed", "--model", m, "--data", str(table), "--out", index]) == 0
    assert main(["embed", "--model", m, "--data", str(table), "--what", "text", "--id-column", "key",
                 "--out", str(tmp_path / "captions")]) == 0
    assert main(["embed", "--model", m, "--data", str(table), "--out", index, "--append"]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == f"nothing to add: every id is already in {index}"
    assert main(["search", "--model", m, "--index", index, "a red boat", "-k", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "'a red boat':" and len(lines) == 3
    rank, score, path = lines[1].split()
    assert rank == "1." and -1 <= float(score) <= 1 and path.endswith(".png") and Path(path).is_file()
    image = str(tmp_path / "data" / "blue.png")
    assert main(["search", "--model", m, "--index", index, "--query", "mbwa", "--image", image, "--json"]) == 0
    results = json.loads(capsys.readouterr().out)
    assert [r["query"] for r in results] == ["mbwa", image] and len(results[0]["hits"]) == 3
    assert {"rank", "id", "score", "path"} <= set(results[1]["hits"][0])
    assert results[1]["hits"][0]["path"] == str(Path(image).resolve())  # an image finds itself first
    assert main(["search", "--model", m, "--index", str(tmp_path / "captions"), "--query", "number", "-k", "1"]) == 0
    hit = capsys.readouterr().out.splitlines()[1]
    assert "number" in hit and "[item-" in hit
    assert main(["search", "--model", m, "--index", index]) == 2
    assert "needs a query" in capsys.readouterr().err
