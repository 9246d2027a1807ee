"""A `.zst` file as a binary stream: every frame in turn, and an error for a file cut short.

zstandard's own readers end quietly at a truncated frame (and some stop after the first frame), which would drop
the rest of a corpus file without a word; this reader feeds the file through one decompression object per frame
and raises zstandard.ZstdError when the data ends inside one.
"""

from __future__ import annotations

import io
from pathlib import Path

import zstandard

INPUT_CHUNK = 1 << 16  # compressed bytes read at a time


class ZstFile(io.RawIOBase):
    def __init__(self, path: str | Path):
        super().__init__()
        self._path = Path(path)
        self._raw = open(self._path, "rb")
        self._context = zstandard.ZstdDecompressor()
        self._frame = self._context.decompressobj()
        self._in_frame = False  # some of the current frame was fed and it has not ended
        self._out, self._pos = b"", 0  # decompressed bytes and how many of them were handed out

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        while self._pos == len(self._out):
            chunk = self._raw.read(INPUT_CHUNK)
            if not chunk:
                if self._in_frame:
                    raise zstandard.ZstdError(f"{self._path} ends inside a zstd frame (truncated file)")
                return 0
            self._out, self._pos = self._decompress(chunk), 0
        n = min(len(buffer), len(self._out) - self._pos)
        memoryview(buffer)[:n] = memoryview(self._out)[self._pos : self._pos + n]
        self._pos += n
        return n

    def _decompress(self, data: bytes) -> bytes:
        parts = []
        while data:
            parts.append(self._frame.decompress(data))
            self._in_frame = True
            data = b""
            if self._frame.eof:  # the next frame starts in what this one left over
                data = self._frame.unused_data
                self._frame, self._in_frame = self._context.decompressobj(), False
        return b"".join(parts)

    def close(self) -> None:
        self._raw.close()
        super().close()
