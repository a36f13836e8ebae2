"""Local paths and storage URIs (`s3://`, `gs://`, `hdfs://`, `file://`) behind pyarrow filesystems.

Every reader and writer of dataset files and stores goes through here, so a path that works locally
works on object storage too. S3 endpoints and credentials come from the usual AWS variables
(`AWS_ENDPOINT_URL`, `AWS_ACCESS_KEY_ID`, ...) or from the URI's query (`?endpoint_override=...`):
pyarrow's S3FileSystem (AWS SDK for C++) reads `AWS_ENDPOINT_URL` itself (checked with pyarrow 25
against a moto server), so nothing here passes `endpoint_override`.
Nothing here turns a URI into a local path.

In a URI, `?` starts the query (as URIs define it), so only `*` and `[...]` are glob characters
there; in a local path `?` matches one character too.
"""

from __future__ import annotations

import os
import posixpath
import re
import uuid
from pathlib import Path
from typing import Any

_GLOB_CHARS = set("*?[")


def is_uri(path: str | Path) -> bool:
    return isinstance(path, str) and "://" in path


def has_glob(path: str | Path) -> bool:
    if is_uri(path):
        # The query (`?endpoint_override=http://...`) is not part of the path.
        return any(c in str(path).partition("?")[0] for c in "*[")
    return any(c in str(path) for c in _GLOB_CHARS)


def strip_query(path: str) -> str:
    """`path` without a URI's query (`?endpoint_override=...`); local paths unchanged."""
    return path.partition("?")[0] if is_uri(path) else path


def parent(path: str | Path) -> str:
    """The folder holding `path`, a URI staying a URI (with its query)."""
    path = str(path)
    if is_uri(path):
        root, _, query = path.partition("?")
        scheme, rest = root.split("://", 1)
        folder = posixpath.dirname(rest.rstrip("/"))
        out = f"{scheme}://{folder}"
        return f"{out}?{query}" if query else out
    return str(Path(path).parent)


def filesystem(path: str | Path) -> tuple[Any, str]:
    """(pyarrow filesystem, path inside it). Local paths are made absolute."""
    import pyarrow.fs as pafs

    if is_uri(path):
        fs, inner = pafs.FileSystem.from_uri(str(path))
        return fs, inner
    return pafs.LocalFileSystem(), str(Path(path).expanduser().absolute())


def join(base: str | Path, *parts: str) -> str:
    """`base / parts` keeping a URI a URI (and its query, if any, at the end)."""
    base = str(base)
    if is_uri(base):
        root, _, query = base.partition("?")
        out = posixpath.join(root, *parts)
        return f"{out}?{query}" if query else out
    return str(Path(base, *parts))


def _with_scheme(original: str, inner: str) -> str:
    """The URI of `inner` (a path inside the filesystem of `original`)."""
    if not is_uri(original):
        return inner
    root, _, query = original.partition("?")
    scheme, rest = root.split("://", 1)
    netloc = rest.split("/", 1)[0]
    if scheme == "file":
        out = f"file://{inner}"
    elif inner.startswith("/"):
        # hdfs://host:port/path: the host is the filesystem's, not part of `inner`.
        out = f"{scheme}://{netloc}{inner}"
    else:
        # s3://bucket/key, gs://bucket/key: `inner` starts with the bucket; keep any user:secret@.
        userinfo = netloc.rpartition("@")[0]
        out = f"{scheme}://{userinfo + '@' if userinfo else ''}{inner}"
    return f"{out}?{query}" if query else out


def exists(path: str | Path) -> bool:
    import pyarrow.fs as pafs

    fs, inner = filesystem(path)
    return fs.get_file_info(inner).type != pafs.FileType.NotFound


def is_dir(path: str | Path) -> bool:
    import pyarrow.fs as pafs

    fs, inner = filesystem(path)
    return fs.get_file_info(inner).type == pafs.FileType.Directory


def is_file(path: str | Path) -> bool:
    import pyarrow.fs as pafs

    fs, inner = filesystem(path)
    return fs.get_file_info(inner).type == pafs.FileType.File


def list_files(folder: str | Path, recursive: bool = False) -> list[str]:
    """Files under `folder` (sorted), as paths or URIs like `folder`."""
    import pyarrow.fs as pafs

    fs, inner = filesystem(folder)
    infos = fs.get_file_info(pafs.FileSelector(inner, recursive=recursive, allow_not_found=True))
    return sorted(_with_scheme(str(folder), i.path) for i in infos if i.type == pafs.FileType.File)


def _glob_regex(pattern: str) -> re.Pattern[str]:
    """`pattern` as a regex: `*`, `?`, `[...]` stay inside one path component, `**/` spans zero or
    more folders, a final `**` anything. As in Python's glob, wildcards skip names starting with
    "." (a Hub snapshot's `.cache/huggingface/` holds partial downloads)."""
    out: list[str] = []
    i, n = 0, len(pattern)
    while i < n:
        component_start = i == 0 or pattern[i - 1] == "/"
        if component_start and pattern.startswith("**/", i):
            out.append(r"(?:[^/.][^/]*/)*")
            i += 3
            continue
        if component_start and pattern.startswith("**", i) and i + 2 == n:
            out.append(".*")
            break
        c = pattern[i]
        if component_start and c in "*?[":
            out.append(r"(?!\.)")
        if c == "*":
            out.append("[^/]*")
        elif c == "?":
            out.append("[^/]")
        elif c == "[":
            j = i + 1
            j += pattern[j : j + 1] == "!"
            j += pattern[j : j + 1] == "]"  # a "]" first in the set is a literal, as in fnmatch
            j = pattern.find("]", j)
            if j < 0:
                out.append(r"\[")
            else:
                body = pattern[i + 1 : j].replace("\\", "\\\\")
                if body.startswith("!"):
                    body = "^" + body[1:]
                elif body.startswith("^"):
                    body = "\\" + body
                out.append(f"[{body}]")
                i = j
        else:
            out.append(re.escape(c))
        i += 1
    return re.compile("".join(out) + r"\Z")


def glob(pattern: str | Path) -> list[str]:
    """Files matching `pattern` (`*`, `?`, `[...]`; `**` spans folders), sorted, local or URI.

    A pattern without glob characters gives itself if it is a file, else nothing.
    """
    import pyarrow.fs as pafs

    pattern = str(pattern)
    if not has_glob(pattern):
        return [pattern] if is_file(pattern) else []
    fs, inner = filesystem(pattern)
    parts = inner.split("/")
    first = next(i for i, p in enumerate(parts) if any(c in p for c in _GLOB_CHARS))
    if is_uri(pattern) and first == 0:
        raise ValueError(f"{pattern}: a glob in the bucket name is not supported")
    root = "/".join(parts[:first]) or "/"
    recursive = len(parts) - first > 1
    infos = fs.get_file_info(pafs.FileSelector(root, recursive=recursive, allow_not_found=True))
    rx = _glob_regex(inner)
    hits = [i.path for i in infos if i.type == pafs.FileType.File and rx.match(i.path)]
    return sorted(_with_scheme(pattern, h) for h in hits)


def open_input(path: str | Path) -> Any:
    """A random-access pyarrow file (`read_at(nbytes, offset)`, `size()`), local or remote."""
    fs, inner = filesystem(path)
    return fs.open_input_file(inner)


def read_bytes(path: str | Path) -> bytes:
    with open_input(path) as f:
        return f.read()


def write_bytes_atomic(path: str | Path, data: bytes) -> None:
    """Write `data` to `path` so that readers see the old file or the whole new one, never a part:
    a temporary sibling then a move (a rename locally; S3 writes an object whole on close)."""
    fs, inner = filesystem(path)
    parent = posixpath.dirname(inner)
    if parent:
        fs.create_dir(parent, recursive=True)
    if is_uri(path) and not str(path).startswith("file://"):
        with fs.open_output_stream(inner) as f:
            f.write(data)
        return
    # A unique name, so two writers of the same file never write into one temporary.
    tmp = f"{inner}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    with fs.open_output_stream(tmp) as f:
        f.write(data)
    fs.move(tmp, inner)


def delete_file(path: str | Path) -> None:
    fs, inner = filesystem(path)
    fs.delete_file(inner)


def make_dir(path: str, wait_s: float = 0.0) -> None:
    """Creates folder `path` (for `s3://bucket`, the bucket), retrying for up to `wait_s` seconds while
    the storage does not answer yet (a server that was just started)."""
    import time

    target = path
    if target.startswith("s3://") and "?" not in target:
        target += "?allow_bucket_creation=true"  # pyarrow refuses to create buckets otherwise
    deadline = time.monotonic() + wait_s
    while True:
        try:
            fs, inner = filesystem(target)
            fs.create_dir(inner, recursive=True)
            return
        except OSError as exc:
            if time.monotonic() >= deadline:
                where = os.environ.get("AWS_ENDPOINT_URL", "the default endpoint")
                raise OSError(f"could not create {path} within {wait_s:g} s (S3 endpoint: {where}): "
                              f"{exc}") from exc
            time.sleep(0.5)


def copy(src: str | Path, dest: str | Path) -> None:
    """Copies a file or folder from `src` to `dest`, either side local or a URI, streaming each file."""
    import pyarrow.fs as pafs

    src_fs, src_inner = filesystem(src)
    dest_fs, dest_inner = filesystem(dest)
    if src_fs.get_file_info(src_inner).type == pafs.FileType.Directory:
        dest_fs.create_dir(dest_inner, recursive=True)
    elif posixpath.dirname(dest_inner):
        dest_fs.create_dir(posixpath.dirname(dest_inner), recursive=True)
    pafs.copy_files(src_inner, dest_inner, source_filesystem=src_fs, destination_filesystem=dest_fs)


def main() -> None:
    import argparse

    p = argparse.ArgumentParser(description="Storage URIs: make a folder or bucket (`mkdir PATH`), copy a "
                                "file or folder between local paths and URIs (`copy SRC DEST`).")
    p.add_argument("command", choices=["mkdir", "copy"])
    p.add_argument("paths", nargs="+", help="local paths or URIs (s3://bucket/prefix)")
    p.add_argument("--wait", type=float, default=0.0, help="mkdir: seconds to wait for the storage to answer")
    args = p.parse_args()
    want = 1 if args.command == "mkdir" else 2
    if len(args.paths) != want:
        p.error(f"{args.command} takes {want} path(s), got {len(args.paths)}")
    try:
        if args.command == "mkdir":
            make_dir(args.paths[0], args.wait)
            print(f"made {args.paths[0]}")
        else:
            copy(*args.paths)
            print(f"copied {args.paths[0]} -> {args.paths[1]}")
    except OSError as exc:
        raise SystemExit(f"error: {exc}") from None


if __name__ == "__main__":
    main()
