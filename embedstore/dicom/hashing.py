"""What identifies a study's content: the content-hash primitives and the source signature.

``content_hash`` itself (in ``study.py``) runs the CT or radiograph reader without decoding;
each reader feeds the attributes that change the decoded image into ``_hash_init``'s hash
(``series._slice_record``, ``radiograph._read_dicom_radiograph``). Never the path, UIDs or
patient tags. What is covered is listed in docs/DICOM.md.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

from pydicom.dataset import Dataset

from embedstore.dicom.reasons import _err
from embedstore.dicom.validation import _list_files, _PixelInfo

#: Version of what content_hash covers; bump it when the hashed attributes change.
CONTENT_HASH_VERSION = 1


def _r(v: float, nd: int = 4) -> float:
    out = round(float(v), nd)
    return 0.0 if out == 0 else out  # no "-0.0" in the hash


def _pixel_format(ds: Dataset, info: _PixelInfo) -> dict[str, Any]:
    out = {
        "ts": str(info.ts),
        "bits_allocated": info.bits,
        "bits_stored": int(ds.BitsStored),
        "high_bit": int(ds.get("HighBit", int(ds.BitsStored) - 1)),
        "pixel_representation": int(ds.PixelRepresentation),
        "photometric": str(ds.PhotometricInterpretation),
        "frames": info.frames,
    }
    if info.ts.is_compressed:
        # the decoder and its version make the pixels: an upgrade recomputes compressed studies
        out["decoder"] = f"{info.plugin}: {info.decoder}"
    return out


def _hash_init(modality: str) -> Any:
    h = hashlib.sha256()
    h.update(f"embedstore-content-v{CONTENT_HASH_VERSION}\0{modality}\0".encode())
    return h


def source_signature(path: str | os.PathLike[str]) -> str:
    """Cheap change detector: names inside the folder + sizes + mtime_ns (no file contents).

    Moving or renaming the study folder keeps it; touching, adding, removing or renaming a file
    inside changes it. For a single file: its size and mtime_ns only.
    """
    root = Path(path)
    if not root.exists():
        raise _err("not_found", "The study path does not exist; check the manifest path.")
    h = hashlib.sha256(b"embedstore-source-sig-v1\0")
    if root.is_file():
        st = root.stat()
        h.update(f"{st.st_size}\0{st.st_mtime_ns}\n".encode())
        return h.hexdigest()
    for p, name in _list_files(root):
        st = p.stat()
        h.update(f"{name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()
