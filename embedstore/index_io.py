"""FAISS index files: save (atomic, with a JSON sidecar recording how the index was built and
a digest of its source), read the sidecar, load (memory-mapped where the kind allows) with
integrity checks, and get-or-build against a set's digest. The index itself is in index.py."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import faiss
import numpy as np

from embedstore._fsio import atomic_write_bytes
from embedstore.errors import ConfigError, CorruptStateError, FaissIndexError
from embedstore.index import (
    _IVF_KINDS,
    _RUNTIME_OPTIONS,
    INDEX_SCHEMA_VERSION,
    VERIFY_MODES,
    EmbeddingIndex,
    VectorSource,
    _fsync_dir,
    _resolve_gpu,
    _sha256_ends,
    _sha256_file,
    build_index,
    sidecar_path,
    vectors_checksum,
)
from embedstore.statefile import read_json_state

__all__ = ["get_or_build_index", "load_index", "read_sidecar", "save_index"]

# ----------------------------------------------------------------------------- persistence


def save_index(
    index: EmbeddingIndex,
    path: str | os.PathLike,
    *,
    source_checksum: str,
    meta: Mapping | None = None,
    options: Mapping | None = None,
) -> Path:
    """Write the index file (``faiss.write_index`` to a temp file, fsync, rename), then its
    sidecar JSON (the commit point). ``options``: the build options asked for (a rebuild after
    the source changed reuses them). Returns the index path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    try:
        faiss.write_index(index._cpu_index(), str(tmp))  # streams to disk: no in-RAM copy
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        full, ends, size = _sha256_file(tmp), _sha256_ends(tmp), tmp.stat().st_size
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    _fsync_dir(path.parent)
    side = {
        "schema_version": INDEX_SCHEMA_VERSION,
        "format": "faiss.write_index",
        "faiss_version": faiss.__version__,
        "index_file": path.name,
        "index_bytes": int(size),
        "index_sha256": full,
        "index_ends_sha256": ends,
        "source_checksum": source_checksum,
        "build": index.describe(),
        "options": {k: v for k, v in dict(options or index.options).items()
                    if k not in _RUNTIME_OPTIONS},
        "ids": index.ids,
        "meta": dict(meta or {}),
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    try:
        text = json.dumps(side, indent=1, sort_keys=True, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"Index meta must be JSON-serialisable: {e}", reason="bad_config") from e
    atomic_write_bytes(sidecar_path(path), text.encode())
    index.source_checksum = source_checksum
    return path


def read_sidecar(path: str | os.PathLike) -> dict:
    """The parsed sidecar of the index at ``path``; FaissIndexError (``index_missing`` /
    ``index_corrupt`` / ``index_format``) when it is absent, unreadable or of another schema."""
    side_p = sidecar_path(path)
    if not side_p.is_file():
        raise FaissIndexError(
            f"Index file {side_p} does not exist; build it with build_index/get_or_build_index.",
            reason="index_missing",
        )
    try:
        side = read_json_state(side_p, "Index sidecar", fix="Delete it and rebuild the index.")
    except CorruptStateError as e:
        # callers (get_or_build_index) rebuild on ``index_corrupt``; the state reason stays in
        # the message and on the cause
        raise FaissIndexError(str(e), reason="index_corrupt") from e
    version = side.get("schema_version")
    if version != INDEX_SCHEMA_VERSION:
        raise FaissIndexError(
            f"Index {Path(path)} has schema version {version!r}, this embedstore reads "
            f"{INDEX_SCHEMA_VERSION}; rebuild it.",
            reason="index_format",
        )
    build = side.get("build")
    missing = [k for k in ("index_bytes", "index_sha256", "index_ends_sha256", "source_checksum")
               if k not in side]
    if not isinstance(build, dict) or missing or not {"kind", "metric", "normalize"} <= set(build):
        raise FaissIndexError(
            f"Index sidecar {side_p} lacks {', '.join(missing) or 'its build section'}; delete it "
            "and rebuild.",
            reason="index_corrupt",
        )
    return side


def load_index(
    path: str | os.PathLike,
    *,
    expected_source_checksum: str,
    use_gpu: bool | str = "auto",
    mmap: bool = True,
    verify: str = "quick",
) -> EmbeddingIndex:
    """Open and check an index: sidecar schema, file size, file hash, source checksum, size and
    dim. ``verify="quick"`` hashes the file's first and last MiB (with the size check, this
    catches truncation, appends and a file from another build); ``"full"`` hashes every byte.
    ``mmap`` maps the file instead of reading it (``faiss.IO_FLAG_MMAP_IFC``).

    Raises FaissIndexError with reason ``index_missing``, ``index_corrupt``, ``index_format`` or
    ``index_stale`` (built from other vectors); the fix is always to rebuild from the source."""
    if verify not in VERIFY_MODES:
        raise ConfigError(f"Unknown verify mode {verify!r}. Available: {', '.join(VERIFY_MODES)}.")
    path = Path(path)
    if not path.is_file():
        raise FaissIndexError(
            f"Index file {path} does not exist; build it with build_index/get_or_build_index.",
            reason="index_missing",
        )
    side = read_sidecar(path)
    build = side["build"]
    size = path.stat().st_size
    if size != side["index_bytes"]:
        raise FaissIndexError(
            f"Index file {path} is corrupt: {size} bytes where its sidecar says "
            f"{side['index_bytes']}; rebuild it from the store.",
            reason="index_corrupt",
        )
    if verify == "full":
        got, want, what = _sha256_file(path), side.get("index_sha256"), "sha256"
    else:
        got, want, what = _sha256_ends(path), side["index_ends_sha256"], "sha256 of its ends"
    if got != want:
        raise FaissIndexError(
            f"Index file {path} is corrupt: {what} {got[:12]}... does not match the sidecar's "
            f"{str(want)[:12]}...; rebuild it from the store.",
            reason="index_corrupt",
        )
    if side.get("source_checksum") != expected_source_checksum:
        raise FaissIndexError(
            f"Index {path} was built from other vectors (source checksum "
            f"{str(side.get('source_checksum'))[:12]}... != expected {expected_source_checksum[:12]}...); "
            "rebuild it from the current store.",
            reason="index_stale",
        )
    gpu = _resolve_gpu(use_gpu) and build.get("kind") != "hnsw"
    flags = faiss.IO_FLAG_MMAP_IFC if (mmap and not gpu) else 0
    try:
        raw = faiss.read_index(str(path), flags)
    except RuntimeError as e:
        raise FaissIndexError(
            f"FAISS cannot read {path}: {str(e).splitlines()[0][:200]}; rebuild it.",
            reason="index_corrupt",
        ) from e
    if raw.ntotal != build.get("ntotal") or raw.d != build.get("dim"):
        raise FaissIndexError(
            f"Index {path} holds {raw.ntotal} x {raw.d} vectors but its sidecar says "
            f"{build.get('ntotal')} x {build.get('dim')}; rebuild it.",
            reason="index_corrupt",
        )
    params = build.get("params", {})
    if build.get("kind") in _IVF_KINDS and "nprobe" in params:
        faiss.extract_index_ivf(raw).nprobe = int(params["nprobe"])
    if build.get("kind") == "hnsw" and "ef_search" in params:
        faiss.downcast_index(raw).hnsw.efSearch = int(params["ef_search"])
    resources = None
    if gpu:
        resources = faiss.StandardGpuResources()
        raw = faiss.index_cpu_to_gpu(resources, 0, raw)
    return EmbeddingIndex(
        raw,
        kind=build["kind"],
        metric=build["metric"],
        normalize=bool(build["normalize"]),
        params=params,
        recall_check=build.get("recall_check"),
        ids=side.get("ids"),
        source_checksum=side["source_checksum"],
        gpu_resources=resources,
        options=side.get("options"),
        mmapped=bool(flags),
    )


def _settings_differ(idx: EmbeddingIndex, wanted: Mapping) -> bool:
    for key, value in wanted.items():
        if key in _RUNTIME_OPTIONS:
            continue
        if key == "kind":
            if value != "auto" and idx.kind != value:
                return True
        elif key in ("metric", "normalize"):
            if getattr(idx, key) != value:
                return True
        elif idx.options.get(key) != value:
            return True
    return False


def get_or_build_index(
    path: str | os.PathLike,
    vectors,
    ids: Sequence[str] | None = None,
    meta: Mapping | None = None,
    *,
    source_checksum: str | None = None,
    verify: str = "full",
    mmap: bool = True,
    **build_kwargs,
) -> tuple[EmbeddingIndex, bool]:
    """(index, rebuilt): open ``path`` when it verifies against this source and was built with
    the requested settings; otherwise build, save and return it.

    ``vectors`` is an array (its checksum is computed: ``vectors_checksum(vectors, ids)``) or a
    ``VectorSource`` with its identity in ``source_checksum``. Settings: metric and
    normalisation always, ``kind`` unless 'auto', every other build option when passed.
    ``index.rebuild_reason`` says why a rebuild happened (the FaissIndexError reason or
    ``settings_changed``); it is None when the saved index was used."""
    if source_checksum is None:
        if isinstance(vectors, VectorSource) and not isinstance(vectors, np.ndarray):
            raise ConfigError("A VectorSource needs its source_checksum (an identity of its rows).")
        source_checksum = vectors_checksum(vectors, ids)
    use_gpu = build_kwargs.get("use_gpu", "auto")
    wanted = {"metric": "ip", "normalize": True, **build_kwargs}
    reason: str | None
    try:
        idx = load_index(path, expected_source_checksum=source_checksum, use_gpu=use_gpu,
                         mmap=mmap, verify=verify)
    except FaissIndexError as e:
        if e.reason == "no_gpu":
            raise
        reason = e.reason
    else:
        if not _settings_differ(idx, wanted):
            return idx, False
        reason = "settings_changed"
        del idx
    idx = build_index(vectors, ids=ids, **build_kwargs)
    options = {k: v for k, v in build_kwargs.items() if k not in _RUNTIME_OPTIONS}
    idx.options = options
    save_index(idx, path, source_checksum=source_checksum, meta=meta, options=options)
    idx.source_checksum = source_checksum
    idx.rebuild_reason = reason
    return idx, True
