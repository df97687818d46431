"""Extraction: manifest rows -> parallel decode + preprocess -> frozen encoder -> store.

Decoding runs in a process pool while the main process encodes, with a bounded number of studies
in flight, so the encoder stays busy and memory stays bounded whatever the cohort size. Resume is
automatic: a study is skipped when its (study_id, source signature) or its cache key is already
committed. What is hashed lives in one module, ``embedstore.identity`` (set key, row cache key,
the spec stored with a set; docs/STORE_FORMAT.md); the preprocessing comes from the encoder's
card. ``content_hash`` = raw pixel bytes + the geometry / rescale / photometric attributes
(embedstore.dicom).
"""

from __future__ import annotations

import multiprocessing as mp
import os
import time
import zlib
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np
import torch

from embedstore import _decode
from embedstore.domain import Modality
from embedstore.encoders import resolve_spec
from embedstore.errors import ConfigError, EmbedstoreError
from embedstore.identity import preprocess_for, provenance, set_identity
from embedstore.manifest import Manifest, load_manifest
from embedstore.models.encoders import FrozenEncoder, create_encoder
from embedstore.preprocess import PreprocessSpec
from embedstore.store import Store, open_store

__all__ = [
    "ExtractConfig",
    "ExtractSummary",
    "extract",
    "extract_each",
    "default_encoder",
    "parse_shard",
]

DEFAULT_ENCODERS: dict[Modality, str] = {Modality.CXR: "demo-cxr", Modality.CTPA: "demo-ctpa"}


def default_encoder(modality: str | Modality) -> str:
    return DEFAULT_ENCODERS[Modality.parse(modality)]


def parse_shard(text: str | None) -> tuple[int, int] | None:
    """``"K/N"`` (1-based) -> (K, N); None -> torchrun's RANK/WORLD_SIZE when set, else None."""
    if text is None:
        if "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1:
            return int(os.environ.get("RANK", "0")) + 1, int(os.environ["WORLD_SIZE"])
        return None
    try:
        k, n = (int(x) for x in text.split("/"))
    except ValueError as e:
        raise ConfigError(f"--shard must look like K/N (e.g. 1/4), got {text!r}.") from e
    if not 1 <= k <= n:
        raise ConfigError(f"--shard {text!r}: K must be between 1 and N.")
    return k, n


def _in_shard(study_id: str, shard: tuple[int, int] | None) -> bool:
    if shard is None:
        return True
    k, n = shard
    return zlib.crc32(study_id.encode()) % n == k - 1


@dataclass(frozen=True)
class ExtractConfig:
    """Everything ``embedstore extract`` accepts."""

    modality: Modality
    encoder: str | None = None  # registry name or hf:PATH; None -> the modality's demo encoder
    weights: str | None = None  # local weights file for the encoder
    card: str | None = None  # card file (TOML/JSON) overriding the encoder's card
    batch_size: int = 16
    workers: int | None = None  # decode processes; None -> one per core (decoding is the slow stage)
    device: str = "auto"
    amp: bool = True  # bf16 autocast on CUDA
    where: str | None = None  # SQL predicate over the studies view
    shard: tuple[int, int] | None = None
    strict: bool = False
    max_in_flight: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "modality", Modality.parse(self.modality))
        if self.batch_size < 1:
            raise ConfigError(f"--batch-size must be >= 1, got {self.batch_size}.")
        if self.workers is not None and self.workers < 0:
            raise ConfigError(f"--workers must be >= 0, got {self.workers}.")


@dataclass
class ExtractSummary:
    modality: str
    encoder_key: str
    selected: int = 0
    done: int = 0
    cached: int = 0
    failed: int = 0
    failures_by_reason: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    interrupted: bool = False

    @property
    def items_per_s(self) -> float:
        return self.done / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["items_per_s"] = round(self.items_per_s, 3)
        return d


class _InlineExecutor:
    """workers=0: decode in the main process (debugging, tiny cohorts)."""

    def __init__(self, initargs: tuple[Any, ...]):
        _decode.init_worker(*initargs, threads=max(1, os.cpu_count() or 1))

    def submit(self, fn: Callable[..., Any], *args: Any) -> Future[Any]:
        f: Future[Any] = Future()
        f.set_result(fn(*args))
        return f

    def shutdown(self, wait: bool = True, cancel_futures: bool = False) -> None:
        pass


def _bounded_map(
    executor: Any, tasks: list[tuple[str, str, str]], max_in_flight: int
) -> Iterator[dict[str, Any]]:
    """Results in submission order with at most ``max_in_flight`` studies decoded ahead."""
    pending: deque[Future[Any]] = deque()
    it = iter(tasks)
    for t in it:
        pending.append(executor.submit(_decode.prepare, *t))
        if len(pending) >= max_in_flight:
            break
    while pending:
        res = pending.popleft().result()
        nxt = next(it, None)
        if nxt is not None:
            pending.append(executor.submit(_decode.prepare, *nxt))
        yield res


# ---------------------------------------------------------------------------------------------
# Main side
# ---------------------------------------------------------------------------------------------


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device {name!r} asked for CUDA but no GPU is available. Use --device cpu.")
    return torch.device(name)


def _preprocess_for(encoder: FrozenEncoder, modality: Modality) -> PreprocessSpec:
    return preprocess_for(encoder, modality)  # from the encoder's card (embedstore.identity)


def _select_rows(
    store: Store, manifest: Manifest, cfg: ExtractConfig
) -> list[dict[str, Any]]:
    rows = manifest.rows(cfg.modality)
    if cfg.where:
        keep = set(store.sql(f"SELECT study_id FROM studies WHERE {cfg.where}")["study_id"].to_pylist())
        rows = [r for r in rows if r["study_id"] in keep]
    return [r for r in rows if _in_shard(str(r["study_id"]), cfg.shard)]


def extract(
    store_path: str | os.PathLike[str],
    manifest_path: str | os.PathLike[str],
    cfg: ExtractConfig,
    *,
    on_progress: Callable[[ExtractSummary, int], None] | None = None,
) -> ExtractSummary:
    """Embed every selected study of ``cfg.modality`` into the store; return what happened.

    ``on_progress(summary, total)`` is called after each study (the CLI draws a progress bar
    from it); ``summary`` is the live ``ExtractSummary``, ``total`` the number selected.
    A failure of one study is recorded in the store's failures table and extraction goes on,
    unless ``cfg.strict``, which stops at the first failure (after committing what is done).
    """
    t0 = time.perf_counter()
    manifest = load_manifest(manifest_path, check_paths=False)
    store = open_store(store_path, create=True)
    store.attach_manifest(manifest.table)
    device = _device(cfg.device)
    spec_ = resolve_spec(cfg.encoder or default_encoder(cfg.modality), weights=cfg.weights,
                         card_file=cfg.card)
    encoder = create_encoder(spec_, device=str(device))
    if encoder.input_kind != cfg.modality.input_kind:
        raise ConfigError(
            f"Encoder {encoder.spec.name!r} takes {encoder.input_kind} input, which does not fit "
            f"modality {cfg.modality}. Use a {cfg.modality.input_kind} encoder."
        )
    pp = _preprocess_for(encoder, cfg.modality)
    ident = set_identity(encoder, pp)
    key = ident.set_key
    summary = ExtractSummary(modality=cfg.modality, encoder_key=key)
    rows = _select_rows(store, manifest, cfg)
    summary.selected = len(rows)
    spec = ident.spec(provenance(manifest_fingerprint=manifest.fingerprint,
                                 weights=encoder.spec.weights))
    scope = None if cfg.shard is None else f"shard-{cfg.shard[0]}-of-{cfg.shard[1]}"
    patient_of = {str(r["study_id"]): str(r["patient_id"]) for r in rows}
    with store.writer(cfg.modality, key, dim=encoder.embed_dim, spec=spec, capacity=len(rows),
                      lock_scope=scope) as w:
        from embedstore.dicom import source_signature

        done_sources = w.committed_sources()
        todo: list[tuple[str, str, str]] = []
        sigs: dict[str, str | None] = {}
        for r in rows:
            sid = str(r["study_id"])
            path = manifest.resolve(str(r["path"]))
            if not path.exists():
                w.record_failure(study_id=sid, modality=cfg.modality, stage="locate",
                                 reason="path_not_found",
                                 message=f"study {sid}: its manifest path does not exist")
                summary.failed += 1
                summary.failures_by_reason["path_not_found"] = (
                    summary.failures_by_reason.get("path_not_found", 0) + 1)
                if cfg.strict:
                    break
                continue
            try:
                sig = source_signature(path)
            except OSError:
                sig = None
            sigs[sid] = sig
            if sig is not None and (sid, sig) in done_sources:
                summary.cached += 1
                continue
            todo.append((sid, str(path), cfg.modality))
        if on_progress:
            on_progress(summary, len(rows))
        if todo and not (cfg.strict and summary.failed):
            _run_pipeline(w, encoder, device, cfg, todo, sigs, patient_of, summary, on_progress,
                          len(rows))
    summary.seconds = time.perf_counter() - t0
    return summary


def _run_pipeline(
    w: Any,
    encoder: FrozenEncoder,
    device: torch.device,
    cfg: ExtractConfig,
    todo: list[tuple[str, str, str]],
    sigs: dict[str, str | None],
    patient_of: dict[str, str],
    summary: ExtractSummary,
    on_progress: Callable[[ExtractSummary, int], None] | None,
    total: int,
) -> None:
    n_workers = cfg.workers if cfg.workers is not None else max(1, os.cpu_count() or 1)
    pp = _preprocess_for(encoder, cfg.modality)
    initargs = (pp.to_dict(),)
    if n_workers == 0:
        executor: Any = _InlineExecutor(initargs)
    else:
        executor = ProcessPoolExecutor(
            max_workers=min(n_workers, len(todo)),
            mp_context=mp.get_context("spawn"),  # torch is imported: never fork it
            initializer=_decode.init_worker,
            initargs=initargs,
        )
        executor.submit(_decode.warm_up)  # start the processes now (imports take seconds)
    committed = w.committed_keys()
    ident = set_identity(encoder, pp)
    threads = torch.get_num_threads()
    if n_workers and device.type == "cpu":
        # The decode workers hold the other cores: more encoder threads than the cores left
        # over only make OpenMP spin against them (measured: several times slower).
        torch.set_num_threads(max(1, (os.cpu_count() or 1) - n_workers))
    in_flight = cfg.max_in_flight or max(2 * n_workers, cfg.batch_size + n_workers)
    batch: list[dict[str, Any]] = []
    autocast = device.type == "cuda" and cfg.amp

    def encode(items: list[dict[str, Any]]) -> None:
        x = torch.from_numpy(np.stack([it["array"] for it in items]))
        if encoder.input_kind == "image":
            x = x.unsqueeze(1)  # (B, 1, H, W)
        x = x.to(device, non_blocking=True)
        with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16,
                                                    enabled=autocast):
            emb = encoder(x).float().cpu().numpy()  # (B, D)
        for it, vec in zip(items, emb, strict=True):
            sid = it["study_id"]
            w.add(study_id=sid, patient_id=patient_of[sid], cache_key=it["cache_key"],
                  content_hash=it["content_hash"], source_sig=sigs.get(sid), vector=vec)
        summary.done += len(items)

    try:
        for res in _bounded_map(executor, todo, in_flight):
            status = res["status"]
            if status == "ok":
                res["cache_key"] = ident.row_key(res["content_hash"])
                if res["cache_key"] in committed:  # moved or renamed, same content: reuse
                    status = "cached"
            if status == "ok":
                batch.append(res)
                if len(batch) >= cfg.batch_size:
                    encode(batch)
                    batch = []
            elif status == "cached":
                summary.cached += 1
            else:
                summary.failed += 1
                reason = res["reason"]
                summary.failures_by_reason[reason] = summary.failures_by_reason.get(reason, 0) + 1
                w.record_failure(study_id=res["study_id"], modality=cfg.modality, stage="decode",
                                 reason=reason, message=res["message"])
                if cfg.strict:
                    break
            if on_progress:
                on_progress(summary, total)
        if batch:
            encode(batch)
            if on_progress:
                on_progress(summary, total)
    except KeyboardInterrupt:
        summary.interrupted = True
        if batch:
            encode(batch)
    except BrokenProcessPool as e:
        if batch:
            encode(batch)
        raise EmbedstoreError(
            f"A decode worker died abruptly (killed, or out of memory?) after {summary.done} "
            "studies were embedded; those are committed. Re-run to resume, with fewer --workers "
            "or --workers 0 to decode in this process.", reason="worker_died") from e
    finally:
        executor.shutdown(wait=True, cancel_futures=True)
        torch.set_num_threads(threads)
        w.flush()


def extract_each(
    store_path: str | os.PathLike[str],
    manifest_path: str | os.PathLike[str],
    cfg: ExtractConfig,
    encoders: Sequence[str | None],
    *,
    on_start: Callable[[int, str], None] | None = None,
    on_progress: Callable[[ExtractSummary, int], None] | None = None,
) -> list[ExtractSummary]:
    """``extract`` once per encoder, in turn, into the same store: one summary per encoder.

    Each encoder makes its own pass over the manifest (the decode is not shared: each encoder's
    card may ask for other preprocessing). ``on_start(i, name)`` is called before encoder ``i``.
    A failure to set up one encoder (unknown name, bad card) stops before any other runs.
    """
    if len(encoders) > 1 and (cfg.weights or cfg.card):
        raise ConfigError("--weights and --card apply to one encoder; give a single --encoder "
                          "with them (run extract once per encoder that needs its own).")
    for name in encoders:  # fail early: every name resolves before anything is embedded
        resolve_spec(name or default_encoder(cfg.modality), weights=cfg.weights,
                     card_file=cfg.card)
    out = []
    for i, name in enumerate(encoders):
        if on_start:
            on_start(i, name or default_encoder(cfg.modality))
        out.append(extract(store_path, manifest_path, replace(cfg, encoder=name),
                           on_progress=on_progress))
    return out
