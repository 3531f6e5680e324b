"""Read what an offline W&B run recorded (its `run-*.wandb` file), so tests can check what a run logged without a
server. The file is W&B's record log: a 7-byte file header, then 32 KiB blocks of chunks (CRC32 4 bytes, length
2 bytes little-endian, type 1 byte: full, first, middle, last), each record a `wandb_internal_pb2.Record`."""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from pathlib import Path

BLOCK = 32768
HEADER = 7  # chunk header; the file header is 7 bytes too (":W&B", magic 0xBEE1, version)
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def _payloads(data: bytes) -> Iterator[bytes]:
    if data[:4] != b":W&B":
        raise ValueError("not a W&B run file (no :W&B header)")
    pos, parts = HEADER, []
    while pos + HEADER <= len(data):
        left = BLOCK - pos % BLOCK
        if left < HEADER:  # the rest of a block too short for a chunk header is padding
            pos += left
            continue
        length, kind = struct.unpack("<HB", data[pos + 4:pos + 7])
        chunk = data[pos + HEADER:pos + HEADER + length]
        pos += HEADER + length
        if kind == FULL:
            yield chunk
        elif kind == FIRST:
            parts = [chunk]
        elif kind == MIDDLE:
            parts.append(chunk)
        elif kind == LAST:
            yield b"".join(parts + [chunk])
        else:  # zeros: the unused end of the last block
            return


def history(run_file: str | Path) -> list[dict[str, object]]:
    """Every `run.log` row of the run: {key: value} with `_step`, values JSON-decoded (media as their dicts)."""
    from wandb.proto import wandb_internal_pb2 as pb

    rows = []
    for payload in _payloads(Path(run_file).read_bytes()):
        record = pb.Record()
        record.ParseFromString(payload)
        if record.WhichOneof("record_type") != "history":
            continue
        row: dict[str, object] = {}
        for item in record.history.item:
            path = list(item.nested_key) or [item.key]
            node = row
            for part in path[:-1]:  # media are dicts (`_type`, `filenames`, ...) stored one field per item
                node = node.setdefault(part, {})  # type: ignore[assignment]
            node[path[-1]] = json.loads(item.value_json)
        rows.append(row)
    return rows
