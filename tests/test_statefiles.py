"""Corrupt state files: one loader (embedstore/statefile.py), typed reason-coded errors, and the
CLI commands that read each file answering with one ``Error:`` line that names the file and the
reason, never a traceback, and changing nothing in the store (issue 10, item 6).

The CLI matrix is state file x corruption x command: the fast run takes one command per file and
corruption; ``-m slow`` runs every command that reads the file.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from embedstore.cli.app import app
from test_train import FAST_CLS, _manifest, _write_set  # the same tiny store as test_train
from typer.testing import CliRunner

from embedstore.errors import (
    CorruptStateError,
    FaissIndexError,
    ManifestCorruptError,
    ManifestError,
    StoreCorruptError,
    StoreDocCorruptError,
    StoreFormatError,
)
from embedstore.statefile import (
    REASONS,
    parquet_state_schema,
    read_json_state,
    read_parquet_state,
)
from embedstore.store import open_store

DOC = {"run_id": "r1", "kind": "teacher", "nested": {"k": [1, 2.5, None, True]},
       "text": "a \"quoted\" string", "schema_version": 3}
GOOD = json.dumps(DOC, indent=2).encode()

# ------------------------------------------------------------------------------ the loader


def _json_err(tmp_path: Path, data: bytes | None, **kw) -> CorruptStateError:
    p = tmp_path / "state.json"
    if data is not None:
        p.write_bytes(data)
    with pytest.raises(CorruptStateError) as e:
        read_json_state(p, "Test state", fix="Do the fix.", **kw)
    return e.value


@pytest.mark.parametrize("data,kw,reason", [
    (None, {}, "missing"),
    (b"", {}, "empty"),
    (b" \n\t", {}, "empty"),
    (GOOD[: len(GOOD) // 2], {}, "truncated"),
    (b"\x89PNG\r\n\x1a\n\xff\xfe", {}, "not_json"),
    (b"\x00" * 64, {}, "not_json"),
    (b"run_id = 'r1'", {}, "not_json"),
    (b"{\"a\": 1} trailing", {}, "not_json"),
    (b"[1, 2, 3]", {}, "wrong_type"),
    (b"true", {}, "wrong_type"),
    (b"{\"kind\": \"teacher\"}", {"required": ("run_id", "kind")}, "missing_key"),
    (GOOD, {"version_key": "schema_version", "versions": (1, 2)}, "bad_version"),
])
def test_json_corruptions_get_their_reason(tmp_path: Path, data, kw, reason) -> None:
    e = _json_err(tmp_path, data, **kw)
    assert e.reason == reason and reason in REASONS
    msg = str(e)
    assert msg.startswith(f"Test state {tmp_path / 'state.json'} ")
    assert msg.endswith(f"; reason: {reason}. Do the fix.")
    assert e.path == str(tmp_path / "state.json") and e.fix == "Do the fix."


def test_every_prefix_of_a_json_document_is_truncated(tmp_path: Path) -> None:
    # a torn write can stop at any byte: none of them may read as "not JSON" or, worse, parse
    for n in range(1, len(GOOD) - 1):
        assert _json_err(tmp_path, GOOD[:n]).reason == "truncated", GOOD[:n]


def test_a_good_json_state_file_reads_back(tmp_path: Path) -> None:
    p = tmp_path / "s.json"
    p.write_bytes(GOOD)
    got = read_json_state(p, "S", fix="f", required=("run_id",), version_key="schema_version",
                          versions=(3,))
    assert got == DOC
    assert read_json_state(p, "S", fix="f", read=lambda: b"[1]", expect=list) == [1]


def _parquet(tmp_path: Path) -> tuple[Path, bytes]:
    p = tmp_path / "t.parquet"
    pq.write_table(pa.table({"study_id": [f"S{i}" for i in range(200)], "x": list(range(200))}), p)
    return p, p.read_bytes()


@pytest.mark.parametrize("how,reason", [
    ("missing", "missing"), ("empty", "empty"), ("half", "truncated"), ("random", "not_parquet"),
    ("json", "not_parquet"), ("no_column", "missing_column"), ("bad_pages", "not_parquet"),
])
def test_parquet_corruptions_get_their_reason(tmp_path: Path, how: str, reason: str) -> None:
    p, good = _parquet(tmp_path)
    if how == "missing":
        p.unlink()
    elif how == "empty":
        p.write_bytes(b"")
    elif how == "half":
        p.write_bytes(good[: len(good) // 2])
    elif how == "random":
        p.write_bytes(os.urandom(len(good)))
    elif how == "json":
        p.write_bytes(GOOD)
    elif how == "no_column":
        pq.write_table(pa.table({"other": [1]}), p)
    elif how == "bad_pages":  # footer intact, the data pages overwritten
        p.write_bytes(good[:4] + b"\xff" * (len(good) // 3) + good[4 + len(good) // 3:])
    with pytest.raises(CorruptStateError) as e:
        read_parquet_state(p, "Test table", fix="Fix it.", required=("study_id",))
    assert e.value.reason == reason
    assert str(e.value).startswith(f"Test table {p} ") and str(e.value).endswith(
        f"; reason: {reason}. Fix it.")
    if how != "bad_pages":  # the footer-only check sees everything but the pages
        with pytest.raises(CorruptStateError) as e2:
            parquet_state_schema(p, "Test table", fix="Fix it.", required=("study_id",))
        assert e2.value.reason == reason


def test_the_callers_error_types_still_catch(tmp_path: Path) -> None:
    # callers that caught StoreFormatError / StoreCorruptError / ManifestError keep working
    assert issubclass(StoreDocCorruptError, StoreFormatError)
    assert issubclass(StoreDocCorruptError, StoreCorruptError)
    assert issubclass(ManifestCorruptError, ManifestError)
    assert issubclass(StoreCorruptError, CorruptStateError) and issubclass(CorruptStateError,
                                                                          ValueError)
    store = open_store(tmp_path / "s", create=True)
    (store.root / "store.json").write_bytes(b"{\"format\": \"embed")
    with pytest.raises(StoreFormatError) as e:
        open_store(store.root)
    assert e.value.reason == "truncated" and isinstance(e.value, CorruptStateError)
    (store.root / "store.json").write_text(json.dumps({"format": "embedstore",
                                                       "schema_version": 99}))
    with pytest.raises(StoreFormatError, match="schema_version 99.*Upgrade") as e:
        open_store(store.root)
    assert e.value.reason == "bad_version"


def test_a_damaged_index_sidecar_is_index_corrupt_with_the_state_reason(tmp_path: Path) -> None:
    import numpy as np

    from embedstore.index import vectors_checksum
    from embedstore.index_io import get_or_build_index, load_index, sidecar_path

    x = np.random.default_rng(0).standard_normal((40, 4)).astype(np.float32)
    path = tmp_path / "idx.faiss"
    get_or_build_index(path, x, use_gpu=False)
    side = sidecar_path(path)
    side.write_bytes(side.read_bytes()[:20])
    with pytest.raises(FaissIndexError, match="reason: truncated") as e:
        load_index(path, expected_source_checksum=vectors_checksum(x))
    assert e.value.reason == "index_corrupt"  # what get_or_build_index rebuilds on
    assert isinstance(e.value.__cause__, CorruptStateError)
    _, rebuilt = get_or_build_index(path, x, use_gpu=False)
    assert rebuilt


def test_the_runs_view_leaves_a_damaged_run_out_and_still_answers(tmp_path: Path) -> None:
    from embedstore.catalog import read_runs

    for name, cfg in (("good", GOOD), ("bad", GOOD[:30]), ("list", b"[1]")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_bytes(cfg)
    assert read_runs(tmp_path)["run_id"].to_pylist() == ["good"]


def test_a_damaged_experiment_cell_is_named_before_any_training(tmp_path: Path,
                                                                monkeypatch) -> None:
    from embedstore import experiment as exp

    store = open_store(tmp_path / "s", create=True)
    cfg = exp.ExperimentConfig(name="t", arms=("ctpa_only", "cxr_only"), label_fractions=(1.0,),
                               seeds=(0,), compare=(("ctpa_only", "cxr_only"),))
    cell = store.root / "experiments" / cfg.experiment_id / "cells" / "f1-s0.parquet"
    cell.parent.mkdir(parents=True)
    cell.write_bytes(b"PAR1 torn")
    monkeypatch.setattr(exp, "_run_cells", lambda *a, **k: pytest.fail("trained"))
    with pytest.raises(CorruptStateError) as e:
        exp.run_experiment(store.root, cfg, workers=0)
    assert e.value.reason == "truncated" and e.value.path == str(cell)
    assert f"Delete {cell}" in str(e.value)


# ------------------------------------------------------------------------------ through the CLI


@pytest.fixture(scope="module")
def base_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from embedstore.train import train_classifier

    root = tmp_path_factory.mktemp("statefiles") / "store"
    store = open_store(root, create=True)
    m = _manifest()
    store.attach_manifest(m)
    ids = m["study_id"].to_pylist()
    _write_set(store, "CTPA", "ct-a", [s for s in ids if s.endswith("-ct")], 1)
    _write_set(store, "CXR", "cx", [s for s in ids if s.endswith("-cx")], 3)
    train_classifier(root, "teacher", encoder="ct-a", trainer=FAST_CLS, name="teacher-1")
    return root


def _tree(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


RUN_CMDS = {"eval": ["eval", "{S}", "--run", "latest:teacher", "--bootstrap", "200", "--out",
                     "{OUT}"],
            "train prior": ["train", "prior", "{S}", "--epochs", "1", "--name", "p1"]}
STORE_CMDS = {"query": ["query", "{S}", "SELECT count(*) AS n FROM studies"], "info": ["info", "{S}"],
              "gc": ["gc", "{S}"], "verify": ["verify", "{S}", "--json"],
              "gc --yes": ["gc", "{S}", "--yes"]}
# file -> (its path in the store, the missing key corruption's key, the commands that read it)
FILES = {
    "run config": ("runs/teacher-1/config.json", "kind", RUN_CMDS),
    "run metrics": ("runs/teacher-1/metrics.json", None, RUN_CMDS),
    "store.json": ("store.json", "schema_version", STORE_CMDS),
    "spec.json": ("sets/CTPA/ct-a/spec.json", "dim",
                  {"info": STORE_CMDS["info"], "verify": STORE_CMDS["verify"]}),
    # gc --yes deletes: with a damaged manifest it must refuse, before taking the lock
    "manifest": ("manifest.parquet", None, STORE_CMDS),
}
CORRUPTIONS = ("empty", "truncated", "random", "wrong_type", "missing_key")
REASON_OF = {"empty": "empty", "truncated": "truncated", "wrong_type": "wrong_type",
             "missing_key": "missing_key"}


def _corrupt(p: Path, how: str, key: str | None) -> str:
    """Damage ``p``; returns the reason the loader must give."""
    good = p.read_bytes()
    parquet = p.suffix == ".parquet"
    if how == "empty":
        p.write_bytes(b"")
    elif how == "truncated":
        p.write_bytes(good[: len(good) // 2])
    elif how == "random":
        p.write_bytes(os.urandom(len(good)))
        return "not_parquet" if parquet else "not_json"
    elif how == "wrong_type":
        if parquet:  # valid JSON where Parquet belongs
            p.write_bytes(b"[1, 2, 3]")
            return "not_parquet"
        p.write_bytes(b"[1, 2, 3]")
    elif how == "missing_key":
        if parquet:  # a valid Parquet file without the manifest's columns
            pq.write_table(pa.table({"other": [1, 2]}), p)
            return "missing_column"
        doc = json.loads(good)
        del doc[key]
        p.write_text(json.dumps(doc))
    return REASON_OF[how]


def _cases(all_commands: bool):
    for fname, (_, key, cmds) in FILES.items():
        for i, how in enumerate(CORRUPTIONS):
            if how == "missing_key" and key is None and not fname == "manifest":
                continue  # nothing in metrics.json is required
            names = list(cmds)
            # the fast run rotates through the commands; the slow one takes them all
            for c in (names if all_commands else [names[i % len(names)]]):
                yield fname, how, c


def _ids(case: tuple[str, str, str]) -> str:
    return "-".join(case).replace(" ", "_")


def _check(base: Path, tmp_path: Path, fname: str, how: str, command: str) -> None:
    rel, key, cmds = FILES[fname]
    store = tmp_path / "store"
    shutil.copytree(base, store)
    target = store / rel
    reason = _corrupt(target, how, key)
    before = _tree(store)
    args = [a.format(S=store, OUT=tmp_path / "report") for a in cmds[command]]
    r = CliRunner().invoke(app, args)
    assert r.exception is None or isinstance(r.exception, SystemExit), r.exception
    assert "Traceback" not in r.stdout + r.stderr
    assert r.exit_code == 1, (r.exit_code, r.stdout, r.stderr)
    assert _tree(store) == before, "a failing command changed the store"
    if command == "verify" and fname in ("manifest", "spec.json"):
        # verify reports damaged files as problems (its job) instead of stopping at the first
        problems = json.loads(r.stdout)["problems"]
        assert len(problems) == 1 and problems[0]["severity"] == "error", problems
        detail = problems[0]["detail"]
        assert str(target) in detail and f"; reason: {reason}. " in detail, detail
        return
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("Error:")]
    assert len(errors) == 1, r.stderr
    line = errors[0]
    assert str(target) in line and f"; reason: {reason}. " in line, line
    assert not r.stdout.strip() or command == "eval", r.stdout


@pytest.mark.parametrize("fname,how,command", list(_cases(all_commands=False)),
                         ids=list(map(_ids, _cases(all_commands=False))))
def test_a_corrupt_state_file_is_one_error_line_and_changes_nothing(
        base_store: Path, tmp_path: Path, fname: str, how: str, command: str) -> None:
    _check(base_store, tmp_path, fname, how, command)


SLOW_CASES = [c for c in _cases(all_commands=True) if c not in set(_cases(all_commands=False))]


@pytest.mark.slow
@pytest.mark.parametrize("fname,how,command", SLOW_CASES, ids=list(map(_ids, SLOW_CASES)))
def test_every_command_reading_a_corrupt_state_file_says_so(
        base_store: Path, tmp_path: Path, fname: str, how: str, command: str) -> None:
    _check(base_store, tmp_path, fname, how, command)


def test_reattaching_the_manifest_is_the_fix(base_store: Path, tmp_path: Path) -> None:
    # the fix the manifest error names: attaching the manifest again restores every command
    store = tmp_path / "store"
    shutil.copytree(base_store, store)
    (store / "manifest.parquet").write_bytes(b"")
    with pytest.raises(ManifestCorruptError):
        open_store(store).info()
    s = open_store(store)
    s.attach_manifest(_manifest())
    assert s.info()["manifest_rows"] == _manifest().num_rows
    assert s.sql("SELECT count(*) AS n FROM studies")["n"][0].as_py() == _manifest().num_rows


def test_a_damaged_run_blocks_latest_but_not_another_run_by_id(tmp_path: Path) -> None:
    from embedstore.runs import load_run

    for name, created in (("teacher-a", "2024-01-01"), ("teacher-b", "2024-01-02")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(json.dumps(
            {"run_id": name, "kind": "teacher", "created_at": created}))
    assert load_run(tmp_path, "latest:teacher").run_id == "teacher-b"
    (tmp_path / "teacher-b" / "config.json").write_bytes(b'{"run_id": "teacher-b", "ki')
    # the damaged run may be the latest teacher: never silently fall back to an older one
    with pytest.raises(CorruptStateError) as e:
        load_run(tmp_path, "latest:teacher")
    assert e.value.reason == "truncated"
    assert f"delete the run folder {tmp_path / 'teacher-b'}" in str(e.value)
    assert load_run(tmp_path, "teacher-a").run_id == "teacher-a"  # read alone, by its id


def test_writing_store_json_as_the_message_says_is_the_fix(base_store: Path, tmp_path: Path) -> None:
    store = tmp_path / "store"
    shutil.copytree(base_store, store)
    (store / "store.json").write_bytes(b"\x00" * 40)  # a zero-filled block from a torn write
    with pytest.raises(StoreDocCorruptError) as e:
        open_store(store)
    msg = str(e.value)
    assert e.value.reason == "not_json" and str(store / "store.json") in msg
    (store / "store.json").write_text(msg[msg.index("{"):msg.rindex("}") + 1])
    s = open_store(store)
    assert s.verify().ok
    assert s.sql("SELECT count(*) AS n FROM embeddings")["n"][0].as_py() == 120


@pytest.mark.parametrize("how,reason", [("empty", "empty"), ("truncated", "truncated"),
                                        ("random", "not_parquet")])
def test_a_damaged_input_manifest_is_one_error_line(tmp_path: Path, how: str, reason: str) -> None:
    from embedstore.manifest import write_manifest

    p = write_manifest(_manifest(), tmp_path, check_paths=False)
    _corrupt(p, how, None)
    r = CliRunner().invoke(app, ["manifest", "validate", str(p), "--no-check-paths"])
    assert r.exception is None or isinstance(r.exception, SystemExit), r.exception
    assert r.exit_code == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"Error: Manifest {p} "), r.stderr
    assert f"; reason: {reason}. " in lines[0]
