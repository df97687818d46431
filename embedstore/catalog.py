"""The store's SQL catalog: an in-memory DuckDB connection with views, in a read-only sandbox.

Nothing is persisted and nothing is copied: the views read the store's Parquet files in place
(the manifest, the commit parts, the failure parts), so DuckDB pushes filters and projections
into the scans, and the catalog is rebuilt (new views, same cost) whenever the files change. A
writer never blocks a reader and there is no catalog file to corrupt. Views:

    studies     every manifest column (empty with the required columns if no manifest is attached)
    embeddings  study_id, patient_id, modality, encoder_key, content_hash, cache_key, row, created_at
    commits     every committed row, superseded ones included (segment, array_row, crc32, ...)
    pairs       pair_id, patient_id, cxr_study_id, ctpa_study_id, gap_hours, split, label_pe
                (the store's PairingRule applied: embedstore.pairing)
    pair_candidates  every (CTPA, candidate CXR) with gap_hours, cxr_first, explicit and the
                drop_reason that kept it out of pairs (NULL = in pairs)
    failures    study_id, modality, encoder_key, stage, reason, message, created_at, segment
    runs        run_id, kind, created_at, encoder_keys, val_auc, metrics, config (JSON strings)
    experiments experiment_id, name, created_at, config (JSON), verdicts (finished experiments)
                (tiny: read from the run folders into a table when the catalog is built)

User SQL passes only if DuckDB parses it as exactly one SELECT statement (WITH/VALUES/DESCRIBE/
SUMMARIZE/SHOW/FROM-first included); file access is limited to the store folder (DuckDB's
``allowed_directories``), extensions can be neither installed nor loaded, and the configuration is
locked. A timer thread interrupts queries that run past their time limit.
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import pyarrow as pa

from embedstore.errors import CorruptStateError, QueryError, QueryRefusedError
from embedstore.pairing import PairingRule, candidates_sql, pairs_sql
from embedstore.sql import literal
from embedstore.statefile import read_json_state
from embedstore.store._arrow import from_np, strings
from embedstore.store.commitlog import FAILURES_SCHEMA
from embedstore.store.format import DEFAULT_PAIR_MAX_GAP_HOURS

__all__ = [
    "Catalog",
    "EMBEDDINGS_SCHEMA",
    "FAILURES_SCHEMA",
    "RUNS_SCHEMA",
    "DEFAULT_PAIR_MAX_GAP_HOURS",
    "read_runs",
]


EMBEDDINGS_SCHEMA = pa.schema(
    [
        ("study_id", pa.string()),
        ("patient_id", pa.string()),
        ("modality", pa.string()),
        ("encoder_key", pa.string()),
        ("content_hash", pa.string()),
        ("cache_key", pa.string()),
        ("row", pa.int64()),
        ("created_at", pa.timestamp("us", tz="UTC")),
    ]
)
RUNS_SCHEMA = pa.schema(
    [
        ("run_id", pa.string()),
        ("kind", pa.string()),
        ("created_at", pa.string()),
        ("encoder_keys", pa.list_(pa.string())),
        ("val_auc", pa.float64()),
        ("metrics", pa.string()),
        ("config", pa.string()),
    ]
)
_EMPTY_STUDIES = pa.schema(
    [
        ("patient_id", pa.string()),
        ("study_id", pa.string()),
        ("modality", pa.string()),
        ("path", pa.string()),
        ("acquired_at", pa.timestamp("us")),
        ("label_pe", pa.int8()),
        ("split", pa.string()),
        ("pair_id", pa.string()),
    ]
)

# Why each refused statement kind is refused (keyed by duckdb.StatementType name).
_REFUSALS = {
    "COPY": "COPY writes files; the query sandbox is read-only (use `embedstore query --out FILE`)",
    "EXPORT": "EXPORT DATABASE writes files; the query sandbox is read-only",
    "COPY_DATABASE": "COPY DATABASE writes files; the query sandbox is read-only",
    "ATTACH": "ATTACH opens another database; only the store's own views may be queried",
    "DETACH": "DETACH changes the attached databases; the query sandbox is read-only",
    "LOAD": "INSTALL/LOAD would install or load a DuckDB extension; extensions are disabled",
    "EXTENSION": "extension statements are disabled in the query sandbox",
    "UPDATE_EXTENSIONS": "extension statements are disabled in the query sandbox",
    "SET": "SET/PRAGMA/USE/RESET change settings; the sandbox's settings are fixed",
    "VARIABLE_SET": "SET VARIABLE changes session state; the sandbox is read-only",
    "PRAGMA": "PRAGMA changes or reads settings; the sandbox's settings are fixed",
    "CREATE": "CREATE modifies the catalog; the query sandbox is read-only",
    "CREATE_FUNC": "CREATE FUNCTION/MACRO modifies the catalog; the sandbox is read-only",
    "INSERT": "INSERT modifies data; the query sandbox is read-only",
    "UPDATE": "UPDATE modifies data; the query sandbox is read-only",
    "DELETE": "DELETE modifies data; the query sandbox is read-only",
    "DROP": "DROP modifies the catalog; the query sandbox is read-only",
    "ALTER": "ALTER modifies the catalog; the query sandbox is read-only",
    "TRANSACTION": "transaction statements are not needed for read-only queries",
    "CALL": "CALL runs procedures (CHECKPOINT, pragma functions); only SELECT is allowed",
    "EXPLAIN": "EXPLAIN [ANALYZE] can execute the statement it wraps; only SELECT is allowed",
    "VACUUM": "VACUUM modifies the database; the sandbox is read-only",
    "ANALYZE": "ANALYZE modifies statistics; the sandbox is read-only",
    "PREPARE": "PREPARE/EXECUTE are not supported in the sandbox; send one SELECT",
    "EXECUTE": "PREPARE/EXECUTE are not supported in the sandbox; send one SELECT",
    "MULTI": "this statement (e.g. PIVOT) expands to several statements; write it as one SELECT",
}




def read_experiments(root: Path) -> pa.Table:
    """One row per finished experiment under ``root`` (the ``experiments`` SQL view; here, not
    in embedstore.experiment, so a first query does not import scipy)."""
    rows: dict[str, list[Any]] = {"experiment_id": [], "name": [], "created_at": [],
                                  "config": [], "verdicts": []}
    if root.is_dir():
        for d in sorted(root.iterdir()):
            try:
                summ = read_json_state(d / "summary.json", "Experiment summary", fix="")
                conf = read_json_state(d / "config.json", "Experiment config", fix="")
            except CorruptStateError:
                continue  # unfinished or being written: not an experiment yet
            rows["experiment_id"].append(d.name)
            rows["name"].append(str(conf.get("name")))
            rows["created_at"].append(time.strftime(
                "%Y-%m-%dT%H:%M:%SZ", time.gmtime((d / "summary.json").stat().st_mtime)))
            rows["config"].append(json.dumps(conf, sort_keys=True))
            rows["verdicts"].append(list(map(str, summ.get("verdicts", []))))
    return pa.table({"experiment_id": pa.array(rows["experiment_id"], pa.string()),
                     "name": pa.array(rows["name"], pa.string()),
                     "created_at": pa.array(rows["created_at"], pa.string()),
                     "config": pa.array(rows["config"], pa.string()),
                     "verdicts": pa.array(rows["verdicts"], pa.list_(pa.string()))})


def read_runs(runs_dir: Path) -> pa.Table:
    """One row per ``runs_dir/*/config.json``; half-written or unreadable runs are skipped.

    Another process may be writing a run while we read, so a missing or partial JSON file is
    normal, never an error.
    """
    rows: list[dict] = []
    if runs_dir.is_dir():
        for d in sorted(runs_dir.iterdir()):
            if d.name.startswith("."):  # a run being written (or a killed one's temp)
                continue
            # the same loader as embedstore.runs; a damaged run is left out of this view (the
            # commands that use it name the file), never an error for every query
            try:
                config = read_json_state(d / "config.json", "Run config", fix="")
            except CorruptStateError:
                continue
            try:
                metrics = read_json_state(d / "metrics.json", "Run metrics", fix="")
            except CorruptStateError:
                metrics = None
            keys = config.get("encoder_keys")
            if not isinstance(keys, list):
                keys = sorted(
                    {str(v) for k, v in config.items() if "encoder" in k and isinstance(v, str)}
                )
            val_auc = None
            if isinstance(metrics, dict):
                v = metrics.get("val_auc")
                if v is None and isinstance(metrics.get("val"), dict):
                    v = metrics["val"].get("auc")
                val_auc = float(v) if isinstance(v, (int, float)) else None
            rows.append(
                {
                    "run_id": d.name,
                    "kind": str(config["kind"]) if "kind" in config else None,
                    "created_at": str(config["created_at"]) if "created_at" in config else None,
                    "encoder_keys": [str(k) for k in keys],
                    "val_auc": val_auc,
                    "metrics": None if metrics is None else json.dumps(metrics, sort_keys=True),
                    "config": json.dumps(config, sort_keys=True),
                }
            )
    # Built column by column: pa.Table.from_pylist would import pandas (~0.4 s) when installed.
    keys = [k for r in rows for k in r["encoder_keys"]]
    offsets = np.cumsum([0] + [len(r["encoder_keys"]) for r in rows]).astype(np.int32)
    cols = {
        "run_id": strings([r["run_id"] for r in rows]),
        "kind": strings([r["kind"] for r in rows]),
        "created_at": strings([r["created_at"] for r in rows]),
        "encoder_keys": pa.ListArray.from_arrays(from_np(offsets), strings(keys)),
        "val_auc": from_np(np.array([r["val_auc"] or 0.0 for r in rows], np.float64),
                           valid=np.array([r["val_auc"] is not None for r in rows], bool)),
        "metrics": strings([r["metrics"] for r in rows]),
        "config": strings([r["config"] for r in rows]),
    }
    return pa.Table.from_arrays(list(cols.values()), schema=RUNS_SCHEMA)


class Catalog:
    """A sandboxed in-memory DuckDB connection over one store's files.

    ``manifest_path`` (Parquet) backs the ``studies`` view; ``views`` maps view names to SQL over
    Parquet files inside ``root`` (built by embedstore.store.views); ``tables`` are small Arrow
    tables copied in (``runs``). Build one per (memory_limit, threads): the settings are locked
    once the views exist.
    """

    def __init__(
        self,
        root: Path,
        *,
        manifest_path: Path | None,
        views: dict[str, str],
        tables: dict[str, pa.Table],
        pairing: PairingRule | None = None,
        memory_limit: str = "2GB",
        threads: int = 2,
    ):
        self.root = Path(root).resolve()
        config = {
            "autoload_known_extensions": False,
            "autoinstall_known_extensions": False,
            "allow_community_extensions": False,
            "threads": int(threads),
            "memory_limit": str(memory_limit),
        }
        try:
            con = duckdb.connect(":memory:", config=config)
        except duckdb.Error as e:
            raise QueryError(
                f"Could not start DuckDB with memory_limit={memory_limit!r}, threads={threads}: {e}"
            ) from e
        self._con = con
        self._lock = threading.Lock()
        for name, table in tables.items():
            # Copied into DuckDB tables: no Python object stays reachable from user SQL.
            con.register("_src", table)
            con.execute(f"CREATE TABLE {name} AS SELECT * FROM _src")
            con.unregister("_src")
        has_pair_id = False
        if manifest_path is not None and manifest_path.exists():
            # A view: each query reads only the manifest columns and row groups it needs.
            con.execute(f"CREATE VIEW studies AS SELECT * FROM read_parquet({literal(manifest_path)})")
            cols = [r[0] for r in con.execute("DESCRIBE studies").fetchall()]
            has_pair_id = "pair_id" in cols
        else:
            con.register("_src", _EMPTY_STUDIES.empty_table())
            con.execute("CREATE TABLE studies AS SELECT * FROM _src")
            con.unregister("_src")
            has_pair_id = True
        for name, sql in views.items():
            con.execute(f"CREATE VIEW {name} AS {sql}")
        rule = PairingRule() if pairing is None else pairing
        con.execute(f"CREATE VIEW pair_candidates AS {candidates_sql(rule, has_pair_id)}")
        con.execute(f"CREATE VIEW pairs AS {pairs_sql()}")
        # Order matters: allowed_directories must be set while external access is still on.
        con.execute(f"SET allowed_directories = [{literal(str(self.root) + os.sep)}]")
        con.execute("SET enable_external_access = false")
        con.execute("SET lock_configuration = true")

    def close(self) -> None:
        self._con.close()

    def check(self, sql: str) -> None:
        """Raise QueryRefusedError unless ``sql`` is exactly one SELECT statement."""
        try:
            statements = self._con.extract_statements(sql)
        except duckdb.Error as e:
            raise QueryError(f"SQL error: {e}") from e
        if len(statements) != 1:
            raise QueryRefusedError(
                f"Refused: the query holds {len(statements)} statements; send exactly one SELECT."
            )
        kind = statements[0].type.name
        if kind != "SELECT":
            why = _REFUSALS.get(kind, f"{kind} statements are not allowed; only SELECT is")
            raise QueryRefusedError(f"Refused {kind} statement: {why}.")

    def sql(self, sql: str, *, timeout_s: float = 30) -> pa.Table:
        """Run one read-only SELECT and return its result as an Arrow table."""
        self.check(sql)
        state = {"running": True, "timed_out": False}
        guard = threading.Lock()

        def _interrupt() -> None:
            with guard:
                if state["running"]:
                    state["timed_out"] = True
                    self._con.interrupt()

        timer = threading.Timer(float(timeout_s), _interrupt)
        timer.daemon = True
        with self._lock:
            timer.start()
            try:
                return self._con.sql(sql).to_arrow_table()
            except duckdb.InterruptException as e:
                if state["timed_out"]:
                    raise QueryError(
                        f"Query stopped after the {timeout_s:g} s time limit; narrow it "
                        "(filter, LIMIT) or raise the limit (timeout_s / --timeout).",
                        reason="query_timeout",
                    ) from e
                raise QueryError(f"Query interrupted: {e}") from e
            except duckdb.PermissionException as e:
                raise QueryRefusedError(
                    f"Refused: the query reads or writes files outside the store {str(self.root)!r} "
                    f"({e}). Query the views studies, embeddings, pairs, pair_candidates, failures, runs, experiments instead."
                ) from e
            except duckdb.IOException as e:
                # A file a view names vanished: gc merged or compacted parts after the catalog
                # was built. The store rebuilds the catalog and retries once.
                raise QueryError(f"SQL error: {e}", reason="files_changed") from e
            except duckdb.OutOfMemoryException as e:
                raise QueryError(
                    f"Query ran out of its memory limit ({e}); narrow it or raise memory_limit.",
                    reason="query_memory",
                ) from e
            except duckdb.Error as e:
                raise QueryError(f"SQL error: {e}") from e
            finally:
                with guard:
                    state["running"] = False
                timer.cancel()
                # Wait for the timer thread to end: a daemon thread still alive at interpreter
                # exit is killed mid-flight, which aborts the process (exit code 134).
                timer.join()
