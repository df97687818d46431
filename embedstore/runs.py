"""Run directories: everything needed to reproduce, reload and compare a trained head or prior.

    STORE/runs/<run_id>/
        config.json          kind, options, seed, store + encoder keys, manifest fingerprint,
                             package versions, git sha, created_at
        weights.safetensors  tensors only (never pickle)
        metrics.json         validation metrics from training (eval adds eval.json)
        train_log.jsonl      one JSON object per epoch

A run is written into ``runs/.tmp-<run_id>.<pid>-<hex>`` and renamed into place when complete, so a run that
is visible is whole; an interrupted training leaves nothing that looks like a run.
"""

from __future__ import annotations

import json
import os
import platform
import secrets
import shutil
import subprocess
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from embedstore._fsio import atomic_write_bytes
from embedstore.errors import CheckpointError, IncompatibleRunError, RunNotFoundError
from embedstore.statefile import read_json_state

__all__ = ["RUN_KINDS", "Run", "RunWriter", "list_runs", "load_run", "provenance"]

RUN_KINDS = ("teacher", "cxr", "prior", "paper_prior", "ridge_logit", "ridge_embed",
             "softlabel_kd")
_PACKAGES = ("embedstore", "torch", "open_clip_torch", "diffusers", "zarr", "duckdb", "faiss-cpu",
             "numpy", "pydicom")


def _git_sha() -> str | None:
    here = Path(__file__).resolve().parents[1]
    try:
        out = subprocess.run(["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True,
                             text=True, timeout=5, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def provenance() -> dict[str, Any]:
    """Package versions, git sha, python and platform: written into every run's config."""
    versions = {}
    for p in _PACKAGES:
        try:
            versions[p] = importlib_metadata.version(p)
        except importlib_metadata.PackageNotFoundError:
            versions[p] = None
    return {
        "git_sha": _git_sha(),
        "versions": versions,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
    }


@dataclass(frozen=True)
class Run:
    run_id: str
    kind: str
    path: Path
    config: Mapping[str, Any]
    metrics: Mapping[str, Any]

    def weights(self) -> dict[str, torch.Tensor]:
        f = self.path / "weights.safetensors"
        try:
            return load_file(str(f))
        except (SafetensorError, OSError) as e:
            raise CheckpointError(
                f"Run {self.run_id}: cannot read {f.name} ({e}). Re-train the run."
            ) from e

    def require(self, **expected: Any) -> None:
        """Refuse to use this run where its store/encoder keys do not match the caller's."""
        for k, v in expected.items():
            have = self.config.get(k)
            if v is not None and have != v:
                raise IncompatibleRunError(
                    f"Run {self.run_id} was trained with {k}={have!r}, not {v!r}. "
                    f"Pick a run trained on the same {k} (see `embedstore query STORE "
                    f"\"SELECT run_id, kind, config FROM runs\"`)."
                )


def _sweep_dead_temps(runs_dir: Path, run_id: str) -> None:
    """Remove the temp folders of ``run_id`` whose writing process is gone (killed runs)."""
    for p in runs_dir.glob(f".tmp-{run_id}.*"):
        try:
            pid = int(p.name[len(f".tmp-{run_id}."):].split("-", 1)[0])
        except ValueError:
            continue
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            shutil.rmtree(p, ignore_errors=True)
        except PermissionError:
            pass


class RunWriter:
    """Collects a run's files in a temp folder; ``commit()`` renames it into place."""

    def __init__(self, runs_dir: Path, kind: str, name: str | None = None):
        if kind not in RUN_KINDS:
            raise ValueError(f"unknown run kind {kind!r}")
        stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
        self.run_id = name or f"{kind}-{stamp}-{secrets.token_hex(2)}"
        self.kind = kind
        self.runs_dir = runs_dir
        self.final = runs_dir / self.run_id
        if self.final.exists():
            raise IncompatibleRunError(f"Run {self.run_id!r} exists already; choose another --name.")
        runs_dir.mkdir(parents=True, exist_ok=True)
        _sweep_dead_temps(runs_dir, self.run_id)
        # one temp folder per writing process: a killed run's leftover never blocks a re-run
        self.tmp = runs_dir / f".tmp-{self.run_id}.{os.getpid()}-{secrets.token_hex(3)}"
        self.tmp.mkdir(exist_ok=False)
        self._log = (self.tmp / "train_log.jsonl").open("a")

    def log(self, row: Mapping[str, Any]) -> None:
        self._log.write(json.dumps(dict(row), default=float) + "\n")
        self._log.flush()

    def commit(self, *, config: Mapping[str, Any], tensors: Mapping[str, torch.Tensor],
               metrics: Mapping[str, Any]) -> Run:
        self._log.close()
        cfg = {"run_id": self.run_id, "kind": self.kind,
               "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
               **dict(config), "provenance": provenance()}
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()},
                  str(self.tmp / "weights.safetensors"))
        _write_json(self.tmp / "config.json", cfg)
        _write_json(self.tmp / "metrics.json", dict(metrics))
        os.replace(self.tmp, self.final)
        return Run(self.run_id, self.kind, self.final, cfg, dict(metrics))

    def abort(self) -> None:
        self._log.close()
        shutil.rmtree(self.tmp, ignore_errors=True)

    def __enter__(self) -> RunWriter:
        return self

    def __exit__(self, exc_type: object, *_: object) -> None:
        if exc_type is not None or self.tmp.exists():
            self.abort()


def _write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, json.dumps(obj, indent=2, sort_keys=True,
                                        default=_json_default).encode())


def _json_default(o: Any) -> Any:
    if hasattr(o, "item"):
        return o.item()
    if isinstance(o, (set, frozenset, tuple)):
        return list(o)
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def _read(path: Path) -> Run:
    """A run folder's config and metrics (CorruptStateError naming the file when damaged: runs
    are renamed into place whole, so a damaged one was broken after it was written)."""
    fix = (f"Move or delete the run folder {path} and train that run again; nothing else in "
           "the store depends on it.")
    cfg = read_json_state(path / "config.json", "Run config", fix=fix, required=("run_id", "kind"))
    mf = path / "metrics.json"
    metrics = read_json_state(mf, "Run metrics", fix=fix) if mf.exists() else {}
    return Run(str(cfg["run_id"]), str(cfg["kind"]), path, cfg, metrics)


def list_runs(runs_dir: Path, kinds: Iterable[str] | None = None) -> list[Run]:
    if not runs_dir.is_dir():
        return []
    want = set(kinds) if kinds else None
    out = []
    for p in sorted(runs_dir.iterdir()):
        if p.name.startswith(".") or not (p / "config.json").exists():
            continue
        r = _read(p)
        if want is None or r.kind in want:
            out.append(r)
    return sorted(out, key=lambda r: (r.config.get("created_at", ""), r.run_id))


def load_run(runs_dir: Path, ref: str) -> Run:
    """A run by id, unique id prefix, or ``latest:<kind>``.

    A run asked for by its exact id is read alone; any other lookup reads every run, so one
    damaged run folder is an error then (it could be the latest of its kind)."""
    if ref and not ref.startswith((".", "latest:")) and "/" not in ref \
            and (runs_dir / ref / "config.json").exists():
        return _read(runs_dir / ref)
    runs = list_runs(runs_dir)
    if ref.startswith("latest:"):
        kind = ref.split(":", 1)[1]
        hits = [r for r in runs if r.kind == kind]
        if hits:
            return hits[-1]
        raise RunNotFoundError(f"No {kind!r} run in {str(runs_dir)!r}. Train one first "
                               f"(`embedstore train {kind} ...`).")
    exact = [r for r in runs if r.run_id == ref]
    if exact:
        return exact[0]
    pref = [r for r in runs if r.run_id.startswith(ref)]
    if len(pref) == 1:
        return pref[0]
    avail = ", ".join(r.run_id for r in runs[-8:]) or "none"
    what = "is ambiguous" if pref else "was not found"
    raise RunNotFoundError(f"Run {ref!r} {what} in {str(runs_dir)!r}. Recent runs: {avail}.")
