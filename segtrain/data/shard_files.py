"""Tar shards on the byte level: URL patterns, opening a URL, reading samples in order, writing shards.

The format is WebDataset's: a sample is the consecutive tar members that share a key (the member name up to
the first dot of its base name), each member one field (``000012.png``, ``000012.mask.png``,
``000012.json``). segtrain reads the bytes itself and decodes images and masks with its own readers:
palette and 16-bit masks stay what they are.

A URL is a local path, ``file://<path>``, ``pipe:<shell command>`` (the command writes the tar to its
standard output: ``pipe:aws s3 cp s3://bucket/train-000000.tar -``) or any other ``<scheme>://`` URL,
opened with fsspec (a torch dependency; an object store needs its fsspec backend, such as s3fs). Patterns
expand braces: ``train-{000000..000009}.tar`` (zero padding kept) and ``{a,b}``.
"""

from __future__ import annotations

import io
import os
import re
import subprocess
import tarfile
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

_BRACES = re.compile(r"\{([^{}]*)\}")
_RANGE = re.compile(r"^(-?\d+)\.\.(-?\d+)$")


class ShardError(OSError):
    """A shard that cannot be opened or read; the message names it."""


def expand_urls(pattern: str | list[str]) -> list[str]:
    """Every URL a pattern (or list of patterns) names, in order."""
    if not isinstance(pattern, str):
        return [url for item in pattern for url in expand_urls(str(item))]
    found = _BRACES.search(pattern)
    if found is None:
        return [pattern]
    head, tail, body = pattern[: found.start()], pattern[found.end():], found.group(1)
    numbers = _RANGE.match(body)
    if numbers:
        lo, hi = int(numbers.group(1)), int(numbers.group(2))
        width = len(numbers.group(1)) if numbers.group(1).startswith("0") else 0
        if hi < lo:
            raise ValueError(f"{pattern}: the range {{{body}}} runs backwards")
        choices = [str(n).zfill(width) for n in range(lo, hi + 1)]
    elif "," in body:
        choices = body.split(",")
    else:
        raise ValueError(f"{pattern}: {{{body}}} is neither a range {{000..009}} nor a list {{a,b}}")
    return [url for choice in choices for url in expand_urls(head + choice + tail)]


def is_local(url: str) -> bool:
    return url.startswith("file://") or not (url.startswith("pipe:") or "://" in url)


def local_path(url: str) -> Path:
    return Path(url[len("file://"):] if url.startswith("file://") else url).expanduser()


class _PipeStream(io.RawIOBase):
    """The standard output of ``pipe:`` command; closing it checks how the command ended."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.proc = subprocess.Popen(url[len("pipe:"):], shell=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        return self.proc.stdout.readinto(buffer)

    def close(self) -> None:
        if self.closed:
            return
        super().close()
        self.proc.stdout.close()
        # A reader that stopped early (enough samples) leaves the command writing: end it, that is no failure.
        if self.proc.poll() is None:
            self.proc.kill()
        status = self.proc.wait()
        message = self.proc.stderr.read().decode(errors="replace").strip()
        self.proc.stderr.close()
        if status > 0:
            raise ShardError(f"{self.url}: the command exited with status {status}"
                             + (f": {message[-500:]}" if message else ""))


@contextmanager
def open_url(url: str) -> Iterator[IO[bytes]]:
    """A binary stream of ``url``'s bytes; a failure to open it is a ``ShardError`` naming the URL."""
    if url.startswith("pipe:"):
        stream = io.BufferedReader(_PipeStream(url), buffer_size=1 << 20)
    elif is_local(url):
        try:
            stream = open(local_path(url), "rb")
        except OSError as err:
            raise ShardError(f"{url}: cannot open the shard ({err.strerror or err})") from None
    else:
        import fsspec  # a torch dependency; an object store needs its backend too (s3fs, gcsfs, adlfs)

        try:
            stream = fsspec.open(url, "rb").open()
        except Exception as err:  # fsspec and its backends raise their own types (HTTP, cloud clients, ImportError)
            raise ShardError(f"{url}: cannot open the shard ({type(err).__name__}: {err})") from None
    try:
        yield stream
    finally:
        stream.close()


def split_name(name: str) -> tuple[str, str]:
    """(key, field) of a member name: ``a/000012.mask.png`` -> (``a/000012``, ``mask.png``)."""
    directory, _, base = name.rpartition("/")
    stem, _, field = base.partition(".")
    return (f"{directory}/{stem}" if directory else stem), field


def read_samples(url: str, keep=None) -> Iterator[tuple[int, str, dict[str, bytes]]]:
    """(index in the shard, key, {field: bytes}) of every sample of the shard at ``url``, in order.

    ``keep``: the indices whose bytes are wanted (a set); the others are read past and given with no fields.
    A corrupt or truncated tar is a ``ShardError`` naming the URL and the last good sample.
    """
    index, key, fields = -1, None, {}
    with open_url(url) as stream:
        try:
            with tarfile.open(fileobj=stream, mode="r|*") as tar:
                for member in tar:
                    if not member.isfile():
                        continue
                    name_key, field = split_name(member.name)
                    if name_key != key:
                        if key is not None:
                            yield index, key, fields
                        index, key, fields = index + 1, name_key, {}
                    if keep is None or index in keep:
                        fields[field] = tar.extractfile(member).read()
        except (tarfile.TarError, EOFError, zlib.error, OSError) as err:
            if isinstance(err, ShardError):
                raise
            after = f"after sample {index} ({key})" if key is not None else "before its first sample"
            raise ShardError(f"{url}: corrupt or truncated tar, {after}: {err}") from None
    if key is not None:
        yield index, key, fields


class ShardWriter:
    """Samples into ``<directory>/<prefix>-000000.tar``, ``-000001.tar``, ...: a new shard after ``max_count``
    samples or ``max_bytes`` bytes. Headers carry no time, owner or host, so the same samples give the same bytes.
    Each shard is written under a temporary name and renamed when complete."""

    def __init__(self, directory: Path, prefix: str, max_count: int, max_bytes: int) -> None:
        self.directory, self.prefix, self.max_count, self.max_bytes = Path(directory), prefix, max_count, max_bytes
        self.shards: list[dict] = []  # {"url", "samples", "bytes"} of each finished shard
        self._tar = self._path = None
        self._count = self._bytes = 0

    def _open(self) -> None:
        self._path = self.directory / f"{self.prefix}-{len(self.shards):06d}.tar"
        self._tar = tarfile.open(self._path.with_name(self._path.name + ".part"), "w", format=tarfile.USTAR_FORMAT)
        self._count = self._bytes = 0

    def _close(self) -> None:
        self._tar.close()
        os.replace(self._path.with_name(self._path.name + ".part"), self._path)
        self.shards.append({"url": self._path.name, "samples": self._count, "bytes": self._path.stat().st_size})
        self._tar = None

    def write(self, key: str, fields: dict[str, bytes]) -> None:
        size = sum(len(data) for data in fields.values())
        if self._tar is not None and (self._count >= self.max_count or self._bytes + size > self.max_bytes):
            self._close()
        if self._tar is None:
            self._open()
        for field, data in fields.items():
            info = tarfile.TarInfo(f"{key}.{field}")
            info.size, info.mode, info.mtime = len(data), 0o644, 0
            self._tar.addfile(info, io.BytesIO(data))
        self._count += 1
        self._bytes += size

    def finish(self) -> list[dict]:
        if self._tar is not None:
            self._close()
        return self.shards
