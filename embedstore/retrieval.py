"""Store-level FAISS use: index files kept under STORE/index/, neighbours for case review."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from embedstore.errors import ConfigError, StoreFormatError
from embedstore.index import EmbeddingIndex, get_or_build_index
from embedstore.sql import literal
from embedstore.store import Store, open_store

__all__ = ["resolve_set", "store_index", "build_store_index", "neighbors"]


def resolve_set(store: Store, *, encoder_key: str | None, modality: str | None) -> tuple[str, str]:
    """(modality, encoder_key) of one embedding set; the only one when a choice is not given."""
    sets = store.sets()
    hits = [s for s in sets
            if (encoder_key is None or s.encoder_key == encoder_key)
            and (modality is None or s.modality.upper() == modality.upper())]
    if len(hits) == 1:
        return hits[0].modality, hits[0].encoder_key
    avail = ", ".join(f"{s.modality}/{s.encoder_key}" for s in sets) or "none (run `embedstore extract`)"
    if not hits:
        raise ConfigError(f"No embedding set matches modality={modality!r} encoder={encoder_key!r}. "
                          f"Available: {avail}.")
    raise ConfigError(f"Several embedding sets match; pass --encoder (and --modality). Available: {avail}.")


def store_index(store: Store, modality: str, encoder_key: str, *, kind: str = "auto"
                ) -> tuple[EmbeddingIndex, bool, Path, list[str]]:
    """The verified (or freshly rebuilt) index of a set: index, rebuilt, path, study ids by row."""
    es = store.load(modality, encoder_key)
    if es.vectors.shape[0] == 0:
        raise StoreFormatError(f"Embedding set {modality}/{encoder_key} has no committed rows.")
    ids = [str(s) for s in es.meta["study_id"].to_pylist()]
    path = store.root / "index" / f"{modality.lower()}-{encoder_key}-{kind}.faiss"
    path.parent.mkdir(parents=True, exist_ok=True)
    index, rebuilt = get_or_build_index(path, es.vectors, ids,
                                        {"modality": modality, "encoder_key": encoder_key}, kind=kind)
    return index, rebuilt, path, ids


def build_store_index(store_path: str | os.PathLike[str], *, encoder_key: str,
                      modality: str | None = None, kind: str = "auto") -> dict[str, Any]:
    store = open_store(store_path)
    mod, key = resolve_set(store, encoder_key=encoder_key, modality=modality)
    index, rebuilt, path, _ = store_index(store, mod, key, kind=kind)
    return {"rebuilt": rebuilt, "kind": index.kind, "ntotal": index.ntotal, "path": str(path)}


def neighbors(store_path: str | os.PathLike[str], study_id: str, *, k: int = 10,
              encoder_key: str | None = None) -> list[dict[str, Any]]:
    """The k nearest stored studies (cosine) to ``study_id``: one dict per neighbour with
    ``rank``, ``study_id``, ``cosine`` and every manifest column but ``path``."""
    store = open_store(store_path)
    found = store.sql(
        "SELECT DISTINCT modality, encoder_key FROM embeddings WHERE study_id = "
        + literal(study_id))
    options = [(m, e) for m, e in zip(found["modality"].to_pylist(), found["encoder_key"].to_pylist(),
                                       strict=True) if encoder_key in (None, e)]
    if not options:
        raise ConfigError(f"Study {study_id!r} has no stored embedding"
                          + (f" for encoder {encoder_key!r}" if encoder_key else "") + ".")
    if len(options) > 1:
        raise ConfigError(f"Study {study_id!r} has embeddings from several encoders "
                          f"({', '.join(e for _, e in options)}); pass --encoder.")
    mod, key = options[0]
    index, _, _, ids = store_index(store, mod, key)
    es = store.load(mod, key, study_ids=[study_id])
    scores, pos = index.search(es.vectors[:1], min(k + 1, index.ntotal))
    hits = [(ids[p], float(s)) for p, s in zip(pos[0], scores[0], strict=True)
            if p >= 0 and ids[p] != study_id][:k]
    meta = {r["study_id"]: r for r in store.sql(
        "SELECT * FROM studies WHERE study_id IN (" + ",".join(literal(h) for h, _ in hits) + ")"
    ).to_pylist()} if hits else {}
    return [{"rank": i + 1, "study_id": h, "cosine": round(s, 4), **{
        c: v for c, v in meta.get(h, {}).items() if c not in ("study_id", "path")}}
        for i, (h, s) in enumerate(hits)]


