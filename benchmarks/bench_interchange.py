"""Export and import of an embedding set against bare pyarrow in the same run.

    python -m benchmarks.bench_interchange            # 10^5 x 512 float32 (200 MB)
    python -m benchmarks.bench_interchange --quick    # 10^4 x 64

Baselines: for export, ``pq.write_table`` of the same (study_id, fixed_size_list vector) table
built from an in-RAM array; for import, ``pq.read_table`` + ``to_numpy`` of the exported file.
embedstore's export also reads the set from the store and joins the manifest; its import also
validates and attaches the manifest, checks ids/dims/NaN and commits the rows durably (fsync).
Prints the Markdown section (``run()`` is what ``benchmarks.run_all`` calls).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from embedstore.models.encoders import EncoderCard

from embedstore.interchange import export_embeddings, import_embeddings, imported_set_spec
from embedstore.store import open_store


def _setup(root: Path, n: int, d: int) -> tuple[np.ndarray, list[str]]:
    vec = np.random.default_rng(0).standard_normal((n, d), dtype=np.float32)  # (N, D)
    sids = [f"S{i:07d}" for i in range(n)]
    pids = [f"P{i // 2:07d}" for i in range(n)]
    man = pa.table({"patient_id": pids, "study_id": sids, "modality": ["CXR"] * n,
                    "path": ["none"] * n, "acquired_at": pa.nulls(n, pa.timestamp("us")),
                    "label_pe": pa.nulls(n, pa.int8()), "split": ["train"] * n})
    pq.write_table(man, root / "manifest.parquet")
    card = EncoderCard(modality="CXR", input_size=(224, 224), embed_dim=d, resize="pad",
                       licence="n/a", source="benchmark")
    key, spec = imported_set_spec(card, "bench")
    st = open_store(root / "A", create=True)
    st.attach_manifest(man)
    with st.writer("CXR", key, dim=d, spec=spec) as w:
        w.add_many(study_ids=sids, patient_ids=pids, cache_keys=[f"k{i}" for i in range(n)],
                   content_hashes=[f"h{i}" for i in range(n)], vectors=vec)
    return vec, sids


def run(quick: bool = False) -> str:
    n, d = (10_000, 64) if quick else (100_000, 512)
    with tempfile.TemporaryDirectory(prefix="bench-interchange-") as tmp:
        root = Path(tmp)
        vec, sids = _setup(root, n, d)
        t = time.perf_counter()
        flat = pa.array(vec.reshape(-1))
        pq.write_table(pa.table({"study_id": sids,
                                 "vector": pa.FixedSizeListArray.from_arrays(flat, d)}),
                       root / "bare.parquet")
        bare_write = time.perf_counter() - t
        t = time.perf_counter()
        exp = export_embeddings(root / "A", root / "x.parquet")
        export_s = time.perf_counter() - t
        t = time.perf_counter()
        tb = pq.read_table(root / "x.parquet")
        _ = tb["vector"].combine_chunks().flatten().to_numpy().reshape(n, d)
        bare_read = time.perf_counter() - t
        t = time.perf_counter()
        res = import_embeddings(root / "B", root / "x.parquet", modality="cxr",
                                manifest=root / "manifest.parquet")
        import_s = time.perf_counter() - t
        t = time.perf_counter()
        again = import_embeddings(root / "B", root / "x.parquet", modality="cxr")
        reimport_s = time.perf_counter() - t
        same = open_store(root / "B").load("CXR", res.encoder_key).vectors.tobytes() == vec.tobytes()
    mb = exp.bytes / 2**20
    return "\n".join([
        "## Interchange: export / import-embeddings",
        "",
        f"{n:,} x {d} float32 vectors ({mb:,.0f} MiB Parquet); one run each. Reproduce: "
        f"`python -m benchmarks.bench_interchange{' --quick' if quick else ''}`.",
        "",
        "| step | embedstore | bare pyarrow | ratio |",
        "|---|---|---|---|",
        f"| export (store -> Parquet) | {export_s:.2f} s | {bare_write:.2f} s (write_table) | "
        f"{bare_write / export_s:.2f} |",
        f"| import (Parquet -> new store, checked, fsync'ed) | {import_s:.2f} s | {bare_read:.2f} s "
        f"(read_table + to_numpy) | {bare_read / import_s:.2f} |",
        f"| re-import (every row unchanged) | {reimport_s:.2f} s | | |",
        "",
        f"Round trip bytes equal: {same}; rows written {res.written}, then unchanged "
        f"{again.unchanged}.",
    ])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="10^4 x 64 instead of 10^5 x 512")
    print(run(quick=ap.parse_args().quick))


if __name__ == "__main__":
    main()
