"""Export image or caption embeddings of a dataset for neural search, and answer text or image queries against them.

`export_embeddings` writes `<out>.safetensors` (an `embeddings` matrix, float32, unit rows) next to
`<out>.parquet` (one row per embedding: `id`, plus `path` for images, `text`/`lang` for captions), or one
Parquet file holding the vectors too. An id means something: an image's file path, a caption's text, or the
value of a column the user names; each id is embedded once, and `append=True` adds only ids not yet there.
`search_index` embeds queries with the same model and keeps a running top-k over chunks of the index, so
memory stays bounded however many rows it holds (faiss's exact inner-product index takes over for large
indexes when it is installed).
"""

from __future__ import annotations

import hashlib
import json
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Literal, Sequence

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file

from ._io import atomic_path
from .errors import ConfigError, DataError
from .eval.retrieval import embed_images, embed_texts, image_keys

CHUNK_ROWS = 65_536  # rows scored at a time: queries x 64k floats, whatever the index's size
FAISS_MIN_ROWS = 100_000  # above this, faiss (when installed) beats chunked matmuls


@dataclass
class Index:
    """An exported index: its table (one row per vector), its metadata, and its vectors in memory or on disk."""

    path: Path  # the .safetensors holding the vectors, or the single .parquet
    table: pa.Table
    meta: dict[str, str]
    vectors: torch.Tensor | None = None  # None: read a chunk at a time from `path`

    @property
    def rows(self) -> int:
        return self.table.num_rows

    @property
    def what(self) -> str:
        return self.meta.get("what", "image")

    @property
    def dim(self) -> int:
        return int(self.meta["dim"])

    def chunks(self, size: int = CHUNK_ROWS) -> Iterator[torch.Tensor]:
        """The index's vectors, `size` rows at a time (from memory, or read lazily from disk)."""
        if self.vectors is not None:
            yield from self.vectors[:self.rows].split(size)
        elif self.path.suffix == ".parquet":
            for batch in pq.ParquetFile(self.path).iter_batches(batch_size=size, columns=["embedding"]):
                flat = batch.column(0).flatten().to_numpy(zero_copy_only=False)
                yield torch.from_numpy(np.array(flat, dtype=np.float32).reshape(-1, self.dim))  # a writable copy
        else:
            with safe_open(str(self.path), "pt") as f:
                tensor = f.get_slice("embeddings")
                for start in range(0, self.rows, size):
                    yield tensor[start:min(start + size, self.rows)]


def open_index(path: str | Path, load: bool = False) -> Index:
    """Open an exported index (FILE, FILE.safetensors or FILE.parquet); `load=True` reads all vectors into memory."""
    path = Path(path)
    if path.suffix == ".parquet" and path.is_file() and "embedding" in pq.read_schema(path).names:
        table = pq.read_table(path)
        meta = {k.decode(): v.decode() for k, v in (table.schema.metadata or {}).items()}
        meta.setdefault("dim", str(len(table.column("embedding")[0]) if table.num_rows else 0))
        index = Index(path, table.drop(["embedding"]).replace_schema_metadata(None), meta)
    else:
        vectors_file, ids_file = _index_files(path)
        if not vectors_file.is_file() or not ids_file.is_file():
            raise FileNotFoundError(f"{vectors_file} and {ids_file} are needed; make them with "
                                    "`lilt embed --model DIR --data SPEC --what image --out FILE`.")
        with safe_open(str(vectors_file), "pt") as f:
            meta = dict(f.metadata() or {})
            count, dim = f.get_slice("embeddings").get_shape()
        meta["dim"] = str(dim)
        table = pq.read_table(ids_file)
        token = (table.schema.metadata or {}).get(b"token", b"").decode()
        previous = json.loads(meta.get("previous", "{}"))
        # An append renames the vectors first: cut off before the ids followed, the old index is still whole.
        if token == previous.get("token") and table.num_rows == previous.get("count"):
            meta = {**meta, "token": token, "count": str(table.num_rows)}
        elif token != meta.get("token", "") or table.num_rows != count:
            raise DataError(f"{vectors_file} ({count} vectors) and {ids_file} ({table.num_rows} ids) come from "
                            "different exports (an export was interrupted?); run `lilt embed` again.")
        index = Index(vectors_file, table.replace_schema_metadata(None), meta)
    if load:
        index.vectors = torch.cat(list(index.chunks())) if index.rows else torch.zeros(0, index.dim)
    return index


def load_index(path: str | Path) -> tuple[torch.Tensor, pa.Table]:
    """Read an exported index: (unit embeddings [N, D], the table of ids)."""
    index = open_index(path, load=True)
    return index.vectors, index.table


def export_embeddings(model: Any, data: datasets.Dataset, what: Literal["image", "text"], out: str | Path, *,
                      id_column: str | None = None, append: bool = False, batch_size: int = 256,
                      num_workers: int = 0, progress: bool = True) -> list[Path]:
    """Embed each distinct image (or caption) of a dataset once; write safetensors + Parquet ids (or Parquet only).

    Ids: `data[id_column]` when given, else an image's file path (`sha1:...` of its bytes when it has none)
    or a caption's text. `append=True` adds the ids not yet in an existing index at `out` (same model).
    Returns the files written (none when an append finds nothing new).
    """
    if what not in ("image", "text"):
        raise ConfigError(f"what={what!r}: choose 'image' or 'text'.")
    if id_column is not None and id_column not in data.column_names:
        raise ConfigError(f"id_column={id_column!r} is not a column of the data (columns: {data.column_names}).")
    out = Path(out)
    meta = {"what": what, "backbones": json.dumps({"vision": model.vision.source, "text": model.text.source}),
            "model": model_fingerprint(model)}
    old = _existing(out, meta) if append else None
    row_ids = _row_ids(data, what, id_column)
    first: dict[str, int] = {}
    for row, item in enumerate(row_ids):
        first.setdefault(item, row)
    if old is not None:
        present = set(old.table.column("id").to_pylist())
        first = {item: row for item, row in first.items() if item not in present}
        if not first:
            return []  # nothing new: the index stays as it is
    vectors, columns = _embed_rows(model, data, what, list(first.values()), batch_size=batch_size,
                                   num_workers=num_workers, progress=progress)
    new = pa.table({"id": list(first), **columns})
    if old is not None:
        if vectors.shape[1] != old.dim:
            raise ConfigError(f"{old.path} holds {old.dim}-d embeddings, this model makes {vectors.shape[1]}-d "
                              "ones: append with the model that made the index, or export a new one.")
        meta["previous"] = json.dumps({"token": old.meta.get("token", ""), "count": old.rows})
        vectors = torch.cat([old.vectors, vectors])
        new = pa.concat_tables([old.table, new], promote_options="default")
    # A token shared by the vectors and the ids: a crash between the two writes cannot pair new with old.
    meta.update(dim=str(vectors.shape[1]), count=str(len(vectors)), token=uuid.uuid4().hex)
    return _write(out, vectors, new.replace_schema_metadata(meta), meta)


def _embed_rows(model: Any, data: datasets.Dataset, what: str, rows: list[int], **options: Any
                ) -> tuple[torch.Tensor, dict[str, Any]]:
    """Embed the images (or captions) of these rows; their table columns besides the id."""
    was_training = model.training
    model.eval()
    if what == "image":
        subset = data.select(rows)
        vectors, kept, skipped = embed_images(model, subset, **options)
        if len(kept) != len(rows):
            raise DataError(f"{len(rows) - len(kept)} images could not be read ({skipped[:3]}); fix or drop them "
                            "before exporting, so ids and vectors stay aligned.")
        columns = {"path": pa.array([k if isinstance(k, str) else None for k in image_keys(subset)], pa.string())}
    else:
        options.pop("num_workers")
        texts = data["text"]
        columns = {"text": [texts[r] for r in rows]}
        if "lang" in data.column_names:
            langs = data["lang"]
            columns["lang"] = [langs[r] for r in rows]
        vectors = embed_texts(model, columns["text"], **options)
    model.train(was_training)
    return vectors, columns


def model_fingerprint(model: Any) -> str:
    """A short hash of a model's trained tensors and backbone names: an index remembers which model made it."""
    digest = hashlib.sha256(f"{model.vision.source}|{model.text.source}".encode())
    for name, param in sorted(model.named_parameters()):
        if param.requires_grad:
            digest.update(name.encode())
            digest.update(param.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def _row_ids(data: datasets.Dataset, what: str, id_column: str | None) -> list[str]:
    if id_column is not None:
        return [str(v) for v in data[id_column]]
    if what == "text":
        return list(data["text"])
    return [key if isinstance(key, str) else (f"sha1:{key[1][:16]}" if key[0] == "bytes" else f"row:{key[1]}")
            for key in image_keys(data)]


def _existing(out: Path, meta: dict[str, str]) -> Index | None:
    """The index to append to (None when there is none yet), checked to come from the same model."""
    vectors_file, ids_file = _index_files(out)
    if not (out.suffix == ".parquet" and out.is_file()) and not vectors_file.is_file():
        return None
    old = open_index(out if out.suffix == ".parquet" else vectors_file, load=True)
    for key, label in (("what", "kind"), ("backbones", "backbones"), ("model", "model")):
        if key in old.meta and old.meta[key] != meta[key]:
            raise ConfigError(f"--append: {old.path} was made with another {label} ({old.meta[key]} vs "
                              f"{meta[key]}); append with the same model and --what, or write a new index.")
    return old


def _write(out: Path, vectors: torch.Tensor, table: pa.Table, meta: dict[str, str]) -> list[Path]:
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix == ".parquet":
        column = pa.FixedSizeListArray.from_arrays(pa.array(vectors.numpy().ravel()), vectors.shape[1])
        return [_atomic(out, lambda p: pq.write_table(table.append_column("embedding", column), p))]
    vectors_file, ids_file = _index_files(out)
    # Vectors first: a crash between the two renames leaves the old ids, which open_index pairs with the
    # first `previous.count` vectors (an append only adds rows at the end).
    return [_atomic(vectors_file, lambda p: save_file({"embeddings": vectors.contiguous()}, p, metadata=meta)),
            _atomic(ids_file, lambda p: pq.write_table(table, p))]


def _index_files(path: Path) -> tuple[Path, Path]:
    """FILE(.safetensors|.parquet) -> (FILE.safetensors, FILE.parquet); other dots in the name are kept."""
    base = str(path)[:-len(path.suffix)] if path.suffix in (".safetensors", ".parquet") else str(path)
    return Path(base + ".safetensors"), Path(base + ".parquet")


def top_k(queries: torch.Tensor, chunks: Iterable[torch.Tensor], k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Best k (scores, row numbers) per query over an index given in chunks: a running top-k, bounded memory."""
    best = torch.full((len(queries), 0), float("-inf"))
    rows = torch.zeros((len(queries), 0), dtype=torch.long)
    start = 0
    for chunk in chunks:
        scores = torch.cat([best, queries @ chunk.float().t()], dim=1)
        places = torch.cat([rows, torch.arange(start, start + len(chunk)).expand(len(queries), -1)], dim=1)
        best, pick = scores.topk(min(k, scores.shape[1]), dim=1)
        rows = places.gather(1, pick)
        start += len(chunk)
    return best, rows


@torch.inference_mode()
def embed_queries(model: Any, texts: Sequence[str] = (), images: Sequence[Any] = ()) -> torch.Tensor:
    """Unit embeddings of text queries, then image queries (file paths or PIL images), in that order."""
    model.eval()
    parts = []
    if texts:
        tokens = {name: t.to(model.device) for name, t in model.tokenize(list(texts)).items()}
        parts.append(model.encode_text(tokens).float().cpu())
    if images:
        transform = model.image_transform(train=False)
        pixels = torch.stack([transform(_open_image(image)) for image in images]).to(model.device)
        parts.append(model.encode_image(pixels).float().cpu())
    if not parts:
        raise ConfigError("no query: give text (--query) or an image (--image).")
    return torch.cat(parts)


def search_index(model: Any, index: str | Path | Index, texts: Sequence[str] = (), images: Sequence[Any] = (),
                 k: int = 5, chunk_rows: int = CHUNK_ROWS) -> list[dict[str, Any]]:
    """Top-k hits per query: [{query, hits: [{rank, id, score, path|text, ...}]}], text queries first."""
    index = index if isinstance(index, Index) else open_index(index)
    query = embed_queries(model, texts, images)
    if query.shape[1] != index.dim:
        raise ConfigError(f"{index.path} holds {index.dim}-d embeddings but this model makes {query.shape[1]}-d "
                          "ones: search with the model that exported the index.")
    scores, rows = _rank(query, index, k, chunk_rows)
    labels = list(texts) + [str(image) if isinstance(image, (str, Path)) else "<image>" for image in images]
    columns = index.table.column_names
    results = []
    for label, row_scores, row_ids in zip(labels, scores.tolist(), rows.tolist()):
        found = index.table.take(row_ids).to_pylist() if row_ids else []
        hits = [{"rank": rank, "id": item["id"], "score": round(score, 6),
                 **{c: item[c] for c in columns if c != "id"}}
                for rank, (score, item) in enumerate(zip(row_scores, found), 1)]
        results.append({"query": label, "hits": hits})
    return results


def search(model: Any, index: str | Path | Index, queries: Sequence[str] = (), k: int = 5, *,
           images: Sequence[Any] = ()) -> list[list[tuple[str, float]]]:
    """Top-k (id, cosine) of the index for each text query, then each image query (paths or PIL images)."""
    return [[(hit["id"], hit["score"]) for hit in result["hits"]]
            for result in search_index(model, index, queries, images, k)]


def _rank(query: torch.Tensor, index: Index, k: int, chunk_rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    if index.rows > FAISS_MIN_ROWS:
        try:
            import faiss
        except ImportError:  # optional: the chunked scan gives the same answer, only slower
            faiss = None
        if faiss is not None:
            flat = faiss.IndexFlatIP(index.dim)
            for chunk in index.chunks(chunk_rows):
                flat.add(chunk.float().numpy())
            scores, rows = flat.search(query.numpy(), min(k, index.rows))
            return torch.from_numpy(scores), torch.from_numpy(rows).long()
    return top_k(query, index.chunks(chunk_rows), k)


def _open_image(image: Any) -> Image.Image:
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    try:
        with Image.open(image) as opened:
            return opened.convert("RGB")
    except (OSError, ValueError) as err:
        raise DataError(f"cannot read the query image {str(image)!r}: {err}") from None


def _atomic(path: Path, write: Any) -> Path:
    with atomic_path(path) as tmp:
        write(str(tmp))
    return path
