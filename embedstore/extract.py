"""Extraction: manifest rows -> parallel decode + preprocess -> frozen encoder -> store.

Decoding runs in a pool of worker processes (``_pool.py``) while the main process encodes, with a
bounded number of studies in flight and a memory budget (``max_memory``) over what the workers
decode and what waits for the encoder, so the encoder stays busy and memory stays bounded
whatever the cohort size. A worker that dies (OOM killer, a crashing decoder) quarantines the
study it held (``worker_died``) and is replaced; re-runs skip quarantined studies unless
``retry_failed``. SIGINT/SIGTERM stop at the next study: what is embedded is committed, the
workers are killed, and ``ExtractInterrupted`` is raised. Resume is automatic: a study is skipped
when its (study_id, source signature) or its cache key is already committed. What is hashed
lives in one module, ``embedstore.identity`` (set key, row cache key, the spec stored with a
set; docs/STORE_FORMAT.md); the preprocessing comes from the encoder's card. ``content_hash`` =
raw pixel bytes + the geometry / rescale / photometric attributes (embedstore.dicom).
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import threading
import time
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from embedstore import _decode
from embedstore._pool import DecodePool
from embedstore.dicom import MISSING_RESCALE_POLICIES, MemoryGate
from embedstore.domain import Modality
from embedstore.encoders import resolve_spec
from embedstore.errors import ConfigError, EmbedstoreError
from embedstore.identity import preprocess_for, provenance, set_identity
from embedstore.manifest import Manifest, load_manifest
from embedstore.models.encoders import FrozenEncoder, create_encoder
from embedstore.preprocess import PreprocessSpec
from embedstore.store import Store, open_store
from embedstore.store.lock import Lock

__all__ = [
    "ExtractConfig",
    "ExtractSummary",
    "ExtractInterrupted",
    "default_max_memory",
    "parse_bytes",
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


#: Default ``max_memory``: this fraction of the machine's memory (or of the cgroup's limit).
DEFAULT_MEMORY_FRACTION = 0.5
_UNITS = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12,
          "ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40}


def _physical_memory() -> int:
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            with open(path) as f:
                text = f.read().strip()
        except OSError:
            continue
        if text.isdigit():
            total = min(total, int(text))
    return int(total)


def default_max_memory() -> int:
    """``DEFAULT_MEMORY_FRACTION`` of the machine's (or the container's) memory, in bytes."""
    return int(_physical_memory() * DEFAULT_MEMORY_FRACTION)


def parse_bytes(value: int | str) -> int:
    """``8GB`` (10^9), ``8GiB`` (2^30), ``512M``, ``1e9``, ``50%`` (of RAM) or an int -> bytes."""
    if isinstance(value, bool):
        raise ConfigError(f"--max-memory must be a size such as 8GB, got {value!r}.")
    if isinstance(value, int | float):
        out = int(value)
    else:
        text = str(value).strip()
        m = re.fullmatch(r"(\d+(?:\.\d+)?(?:[eE]\d+)?)\s*(%|[kKmMgGtT]i?)?[bB]?", text)
        if not m:
            raise ConfigError(
                f"--max-memory must be a size such as 8GB, 8GiB, 512MB, 50% (of RAM) or a "
                f"number of bytes, got {value!r}."
            )
        number, unit = float(m.group(1)), (m.group(2) or "")
        if unit == "%":
            out = int(_physical_memory() * number / 100)
        else:
            out = int(number * _UNITS[unit.lower()])
    if out < 16 << 20:
        raise ConfigError(f"--max-memory must be at least 16 MiB, got {value!r} ({out} bytes).")
    return out


class ExtractInterrupted(EmbedstoreError, KeyboardInterrupt):
    """SIGINT or SIGTERM stopped ``extract``; everything embedded before it is committed.

    An EmbedstoreError (the CLI prints one ``Error: Interrupted by ...`` line, exit 1) that is
    also a KeyboardInterrupt, so callers that stop on Ctrl-C keep doing so."""

    reason = "interrupted"

    def __init__(self, message: str, summary: ExtractSummary, signum: int):
        super().__init__(message, reason="interrupted")
        self.summary, self.signum = summary, signum


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
    # decode side's memory: workers' buffers + arrays waiting for the encoder. None -> half RAM
    max_memory: int | str | None = None
    retry_failed: bool = False  # also retry studies quarantined after a worker death
    missing_rescale: str = "refuse"  # CT slices without rescale: refuse | assume-1024 | assume-0

    def __post_init__(self) -> None:
        object.__setattr__(self, "modality", Modality.parse(self.modality))
        mem = default_max_memory() if self.max_memory is None else parse_bytes(self.max_memory)
        object.__setattr__(self, "max_memory", mem)
        if self.missing_rescale not in MISSING_RESCALE_POLICIES:
            raise ConfigError(
                f"--missing-rescale {self.missing_rescale!r} is not a policy. Valid: "
                f"{', '.join(MISSING_RESCALE_POLICIES)}."
            )
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
    quarantined: int = 0  # of ``failed``: skipped because a worker died on them before
    worker_deaths: int = 0

    @property
    def items_per_s(self) -> float:
        return self.done / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["items_per_s"] = round(self.items_per_s, 3)
        return d


class _InlinePool:
    """workers=0: decode in the main process (debugging, tiny cohorts); same interface as
    ``DecodePool`` (no worker to die, no memory to wait for: only the budget is checked)."""

    deaths = 0

    def __init__(self, init: dict[str, Any]):
        _decode.init_worker(**init, threads=max(1, os.cpu_count() or 1))
        self._gate = MemoryGate()
        self._gate.budget = init["budget"]

    def map(self, tasks: list[tuple[str, str, str]], should_stop: Callable[[], bool]
            ) -> Iterator[dict[str, Any]]:
        for t in tasks:
            if should_stop():
                return
            yield _decode.prepare(*t, gate=self._gate)

    def release(self, nbytes: int) -> None:
        pass

    def pids(self) -> list[int]:
        return []

    def close(self, *, kill: bool = False) -> None:
        pass


@dataclass
class _Stop:
    signum: int | None = None


@contextlib.contextmanager
def _stop_on_signals() -> Iterator[_Stop]:
    """SIGINT/SIGTERM -> stop at the next study (a second one interrupts at once). Only in the
    main thread (signal handlers cannot be set elsewhere); restored afterwards."""
    stop = _Stop()
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return

    def handler(signum: int, frame: Any) -> None:
        if stop.signum is not None:
            raise KeyboardInterrupt
        stop.signum = signum

    old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stop
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def _interrupted(summary: ExtractSummary, signum: int) -> ExtractInterrupted:
    summary.interrupted = True
    name = signal.Signals(signum).name if signum else "an interrupt"
    return ExtractInterrupted(
        f"Interrupted by {name} after {summary.done} studies were embedded; they are committed. "
        "Re-run to resume.", summary, signum)


def _quarantined(store: Store, modality: str, key: str) -> set[str]:
    """Studies of this set on which a decode worker died (``worker_died`` failures)."""
    fails = store.failures()
    if fails.num_rows == 0:
        return set()
    cols = {c: fails[c].to_pylist() for c in ("study_id", "modality", "encoder_key", "reason")}
    return {sid for sid, m, k, r in zip(cols["study_id"], cols["modality"], cols["encoder_key"],
                                        cols["reason"], strict=True)
            if r == "worker_died" and m == modality and k == key}


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
    A study whose decode worker died is a ``worker_died`` failure and is skipped by later runs
    unless ``cfg.retry_failed``. SIGINT/SIGTERM raise ``ExtractInterrupted`` once what was
    embedded is committed.
    """
    with _stop_on_signals() as stop:
        return _extract(store_path, manifest_path, cfg, on_progress, stop)


def _extract(
    store_path: str | os.PathLike[str],
    manifest_path: str | os.PathLike[str],
    cfg: ExtractConfig,
    on_progress: Callable[[ExtractSummary, int], None] | None,
    stop: _Stop,
) -> ExtractSummary:
    t0 = time.perf_counter()
    manifest = load_manifest(manifest_path, check_paths=False)
    store = open_store(store_path, create=True)
    scope = None if cfg.shard is None else f"shard-{cfg.shard[0]}-of-{cfg.shard[1]}"
    # The lock first: a command that is refused (another writer holds the store) or fails
    # before writing must leave the store as it was, its manifest included.
    lock = Lock(store.root, scope).acquire()
    try:
        _attach_manifest(store, manifest, scope)
        return _extract_locked(store, manifest, cfg, on_progress, stop, t0, scope)
    finally:
        lock.release()


def _attach_manifest(store: Store, manifest: Manifest, scope: str | None) -> None:
    """Shards of one extraction share the store lock: none of them may swap the manifest that
    the others are extracting from."""
    if scope is not None and store.manifest_path.exists():
        def canon(t: pa.Table) -> pa.Table:
            return t.replace_schema_metadata(None).sort_by("study_id")

        if not canon(store.read_manifest()).equals(canon(manifest.table)):
            raise ConfigError(
                f"--shard {scope}: the store's manifest differs from the one given. Every shard "
                "of one extraction must use the same manifest; run the shards with that one, or "
                "extract without --shard to replace it.")
        return
    store.attach_manifest(manifest.table)


def _extract_locked(store: Store, manifest: Manifest, cfg: ExtractConfig,
                    on_progress: Callable[[ExtractSummary, int], None] | None, stop: _Stop,
                    t0: float, scope: str | None) -> ExtractSummary:
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
    if stop.signum is not None:
        raise _interrupted(summary, stop.signum)
    rows = _select_rows(store, manifest, cfg)
    summary.selected = len(rows)
    spec = ident.spec(provenance(manifest_fingerprint=manifest.fingerprint,
                                 weights=encoder.spec.weights))
    patient_of = {str(r["study_id"]): str(r["patient_id"]) for r in rows}
    quarantined = set() if cfg.retry_failed else _quarantined(store, cfg.modality, key)
    with store.writer(cfg.modality, key, dim=encoder.embed_dim, spec=spec, capacity=len(rows),
                      lock_scope=scope) as w:
        from embedstore.dicom import source_signature

        done_sources = w.committed_sources(patient_of)  # those studies only, read on disk
        todo: list[tuple[str, str, str]] = []
        sigs: dict[str, str | None] = {}
        for r in rows:
            if stop.signum is not None:
                raise _interrupted(summary, stop.signum)
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
            if sid in quarantined:  # already recorded: counted, not recorded again
                summary.failed += 1
                summary.quarantined += 1
                summary.failures_by_reason["worker_died"] = (
                    summary.failures_by_reason.get("worker_died", 0) + 1)
                continue
            todo.append((sid, str(path), cfg.modality))
        if on_progress:
            on_progress(summary, len(rows))
        if todo and not (cfg.strict and summary.failed):
            _run_pipeline(w, encoder, device, cfg, todo, sigs, patient_of, summary, on_progress,
                          len(rows), stop)
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
    stop: _Stop,
) -> None:
    n_workers = cfg.workers if cfg.workers is not None else max(1, os.cpu_count() or 1)
    pp = _preprocess_for(encoder, cfg.modality)
    budget = int(cfg.max_memory)  # type: ignore[arg-type]  # parsed in __post_init__
    init = {"spec": pp.to_dict(), "missing_rescale": cfg.missing_rescale, "budget": budget}
    in_flight = cfg.max_in_flight or max(2 * n_workers, cfg.batch_size + n_workers)
    if n_workers == 0:
        pool: Any = _InlinePool(init)
    else:
        # started now, so the workers' imports overlap the rest of the set-up
        pool = DecodePool(min(n_workers, len(todo)), init, budget=budget,
                          max_in_flight=in_flight)
    committed = w.committed_keys(t[0] for t in todo)  # keys of these studies, read on disk
    ident = set_identity(encoder, pp)
    threads = torch.get_num_threads()
    if n_workers and device.type == "cpu":
        # The decode workers hold the other cores: more encoder threads than the cores left
        # over only make OpenMP spin against them (measured: several times slower).
        torch.set_num_threads(max(1, (os.cpu_count() or 1) - n_workers))
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
        del x
        for it, vec in zip(items, emb, strict=True):
            sid = it["study_id"]
            w.add(study_id=sid, patient_id=patient_of[sid], cache_key=it["cache_key"],
                  content_hash=it["content_hash"], source_sig=sigs.get(sid), vector=vec)
            pool.release(it["array"].nbytes)
        summary.done += len(items)

    drained = commit = False
    try:
        for res in pool.map(todo, lambda: stop.signum is not None):
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
                pool.release(res["array"].nbytes)
            else:
                summary.failed += 1
                reason = res["reason"]
                summary.failures_by_reason[reason] = summary.failures_by_reason.get(reason, 0) + 1
                w.record_failure(study_id=res["study_id"], modality=cfg.modality,
                                 stage=res.get("stage", "decode"), reason=reason,
                                 message=res["message"])
                if cfg.strict:
                    break
            if on_progress:
                on_progress(summary, total)
        else:
            drained = stop.signum is None  # map() also ends early when a stop is asked
        commit = True
    except (KeyboardInterrupt, EmbedstoreError):
        commit = True  # a second Ctrl-C, or the pool gave up: keep what was decoded
        raise
    finally:
        summary.worker_deaths = pool.deaths
        pool.close(kill=not drained)  # studies still in flight are not waited for
        try:
            if batch and commit:
                encode(batch)  # commit what was decoded before the stop
                if on_progress:
                    on_progress(summary, total)
        finally:
            torch.set_num_threads(threads)
            w.flush()
    if stop.signum is not None:
        raise _interrupted(summary, stop.signum)



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
