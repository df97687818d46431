"""Decode-worker side of extraction. Kept apart from extract.py so that spawned workers import
only the DICOM and preprocessing layers, not the store, the catalog or the encoders."""

from __future__ import annotations

from typing import Any

import torch

from embedstore.errors import DicomError, EmbedstoreError
from embedstore.preprocess import PreprocessSpec, load_study

_SPEC: list[PreprocessSpec] = []


def init_worker(spec: dict[str, Any], threads: int = 1) -> None:
    torch.set_num_threads(threads)  # decode workers must not oversubscribe the cores
    _SPEC[:] = [PreprocessSpec.from_dict(spec)]


def warm_up() -> bool:
    """A no-op task: submitting it early starts the worker processes while the parent loads."""
    return True


def prepare(study_id: str, path: str, modality: str) -> dict[str, Any]:
    """Read, validate, hash and preprocess one study; failures come back as data, not raises."""
    try:
        loaded = load_study(path, modality, _SPEC[0])
        return {"study_id": study_id, "status": "ok", "content_hash": loaded.content_hash,
                "array": loaded.array}
    except (DicomError, EmbedstoreError) as e:
        return {"study_id": study_id, "status": "failed", "reason": e.reason, "message": str(e)}
    except (OSError, ValueError, MemoryError) as e:
        # Anything the reader did not classify: keep going, and say which stage and type.
        return {"study_id": study_id, "status": "failed", "reason": "read_error",
                "message": f"{type(e).__name__} while reading the study"}
