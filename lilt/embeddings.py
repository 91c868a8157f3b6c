"""Export image or caption embeddings of a dataset for neural search, and answer text queries against them.

`export_embeddings` writes `<out>.safetensors` (an `embeddings` matrix, float32, unit rows) next to
`<out>.parquet` (one row per embedding: `id`, and `text`/`lang` for captions), or one Parquet file
holding the vectors too. Images are embedded once each, however many captions they have.
`search` embeds a query with the same model and returns the top matches by cosine.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any, Literal, Sequence

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ._io import atomic_path
from .errors import ConfigError, DataError
from .eval.retrieval import embed_pairs, image_keys


def export_embeddings(model: Any, data: datasets.Dataset, what: Literal["image", "text"], out: str | Path, *,
                      batch_size: int = 256, num_workers: int = 0, progress: bool = True) -> list[Path]:
    """Embed a dataset's distinct images or all its captions; write safetensors + Parquet ids (or Parquet only)."""
    if what not in ("image", "text"):
        raise ConfigError(f"what={what!r}: choose 'image' or 'text'.")
    out = Path(out)
    embedded = embed_pairs(model, data, batch_size=batch_size, num_workers=num_workers, progress=progress)
    if what == "image":
        keys = image_keys(data)
        first: dict[Any, int] = {}
        for row, key in enumerate(keys):
            first.setdefault(key, row)  # embed_pairs keeps distinct images in first-appearance order
        if len(first) != len(embedded.images):
            raise DataError(f"{len(first) - len(embedded.images)} images could not be read ({embedded.skipped[:3]}); "
                            "fix or drop them before exporting, so ids and vectors stay aligned.")
        # An image's id: its file path, or its first row when it has none (bytes stored in the dataset).
        table = {"id": [key if isinstance(key, str) else str(row) for key, row in first.items()]}
        vectors = embedded.images
    else:
        table = {"id": [str(i) for i in range(len(embedded.texts))],
                 "text": [t for t, ok in zip(data["text"], _caption_kept(data, embedded)) if ok]}
        if embedded.langs is not None:
            table["lang"] = list(embedded.langs)
        vectors = embedded.texts
    out.parent.mkdir(parents=True, exist_ok=True)
    # A token shared by the vectors and the ids: a crash between the two writes cannot pair new with old.
    meta = {"what": what, "dim": str(vectors.shape[1]), "count": str(len(vectors)), "token": uuid.uuid4().hex,
            "backbones": json.dumps({"vision": model.vision.source, "text": model.text.source})}
    if out.suffix == ".parquet":
        table["embedding"] = vectors.tolist()
        return [_atomic(out, lambda p: pq.write_table(pa.table(table).replace_schema_metadata(meta), p))]
    vectors_file, ids_file = _index_files(out)
    return [_atomic(vectors_file, lambda p: save_file({"embeddings": vectors.contiguous()}, p, metadata=meta)),
            _atomic(ids_file, lambda p: pq.write_table(pa.table(table).replace_schema_metadata(meta), p))]


def _index_files(path: Path) -> tuple[Path, Path]:
    """FILE(.safetensors|.parquet) -> (FILE.safetensors, FILE.parquet); other dots in the name are kept."""
    base = str(path)[:-len(path.suffix)] if path.suffix in (".safetensors", ".parquet") else str(path)
    return Path(base + ".safetensors"), Path(base + ".parquet")


def load_index(path: str | Path) -> tuple[torch.Tensor, pa.Table]:
    """Read an exported index: (unit embeddings [N, D], the table of ids)."""
    path = Path(path)
    if path.suffix == ".parquet" and path.is_file() and "embedding" in pq.read_schema(path).names:
        table = pq.read_table(path)
        return torch.tensor(table.column("embedding").to_pylist(), dtype=torch.float32), table.drop(["embedding"])
    vectors_file, ids_file = _index_files(path)
    if not vectors_file.is_file() or not ids_file.is_file():
        raise FileNotFoundError(f"{vectors_file} and {ids_file} are needed; make them with "
                                "`lilt embed --model DIR --data SPEC --what image --out FILE`.")
    with safe_open(str(vectors_file), "pt") as f:
        meta = f.metadata() or {}
        vectors = f.get_tensor("embeddings")
    table = pq.read_table(ids_file)
    token = (table.schema.metadata or {}).get(b"token", b"").decode()
    if token != meta.get("token", "") or table.num_rows != len(vectors):
        raise DataError(f"{vectors_file} ({len(vectors)} vectors) and {ids_file} ({table.num_rows} ids) come from "
                        "different exports (an export was interrupted?); run `lilt embed` again.")
    return vectors, table


@torch.inference_mode()
def search(model: Any, index: str | Path, queries: Sequence[str], k: int = 5) -> list[list[tuple[str, float]]]:
    """Top-k (id, cosine) of the index for each text query (the index holds image embeddings of the same model)."""
    vectors, table = load_index(index)
    model.eval()
    tokens = {name: t.to(model.device) for name, t in model.tokenize(list(queries)).items()}
    query = model.encode_text(tokens).float().cpu()
    if query.shape[1] != vectors.shape[1]:
        raise ConfigError(f"{index} holds {vectors.shape[1]}-d embeddings but this model makes {query.shape[1]}-d "
                          "ones: search with the model that exported the index.")
    scores = query @ vectors.t()
    top = scores.topk(min(k, vectors.shape[0]), dim=1)
    ids = table.column("id").to_pylist()
    return [[(ids[j], float(s)) for s, j in zip(row_s.tolist(), row_j.tolist())]
            for row_s, row_j in zip(top.values, top.indices)]


def _caption_kept(data: datasets.Dataset, embedded: Any) -> list[bool]:
    if len(embedded.texts) == len(data):
        return [True] * len(data)
    raise DataError(f"{len(data) - len(embedded.texts)} captions belong to unreadable images "
                    f"({embedded.skipped[:3]}); fix or drop them before exporting.")


def _atomic(path: Path, write: Any) -> Path:
    with atomic_path(path) as tmp:
        write(str(tmp))
    return path
