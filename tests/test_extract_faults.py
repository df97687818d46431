"""Extraction under faults (issue 10 items 4 and 5): a decode worker that dies quarantines only
its study; a runaway decoder meets the memory backstop; SIGKILL or SIGTERM of `embedstore
extract` leaves no worker and no resource tracker behind; SIGTERM commits what was embedded.

The faults come from the test-only hook in ``embedstore/_faults.py`` (EMBEDSTORE_TEST_FAULT).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from embedstore import _faults
from embedstore._pool import DecodePool, _State, _Worker
from embedstore.extract import (
    ExtractConfig,
    ExtractInterrupted,
    default_max_memory,
    extract,
    parse_bytes,
)
from embedstore.manifest import load_manifest
from embedstore.phantom import PhantomSpec
from embedstore.store import open_store
from embedstore.synth import synthesize_cohort

CT_ENC = "test-tiny-ctpa"
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("fault-cohort")
    spec = PhantomSpec.with_shape((8, 32, 32), prevalence=0.5)
    synthesize_cohort(out, n_patients=6, seed=5, spec=spec, workers=1)
    return out


def _ct_ids(cohort: Path) -> list[str]:
    return [str(r["study_id"]) for r in load_manifest(cohort / "manifest.parquet").rows("CTPA")]


def _cfg(**kw: object) -> ExtractConfig:
    base: dict[str, object] = dict(modality="ctpa", encoder=CT_ENC, workers=1)
    return ExtractConfig(**{**base, **kw})  # type: ignore[arg-type]


def _failures(store: Path) -> list[dict]:
    return open_store(store).failures().to_pylist()


# ------------------------------------------------------------------ a poison study


@pytest.mark.parametrize("kind", ["exit", "segv"])
def test_a_worker_death_quarantines_only_its_study(
        kind: str, cohort: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ids = _ct_ids(cohort)
    poison = ids[2]
    monkeypatch.setenv(_faults.ENV, f"{kind}:{poison}")
    store = tmp_path / "s"
    s = extract(store, cohort / "manifest.parquet", _cfg())
    assert (s.done, s.failed, s.failures_by_reason) == (len(ids) - 1, 1, {"worker_died": 1})
    assert s.worker_deaths == 1
    fails = _failures(store)
    assert [(f["study_id"], f["stage"], f["reason"]) for f in fails] == [
        (poison, "decode", "worker_died")]
    loaded = open_store(store).load("CTPA", s.encoder_key)
    assert sorted(loaded.study_ids) == sorted(set(ids) - {poison})

    # a rerun skips the quarantined study: nothing new, no new failure row, no hang
    t0 = time.perf_counter()
    again = extract(store, cohort / "manifest.parquet", _cfg())
    assert (again.done, again.cached, again.failed, again.quarantined) == (0, len(ids) - 1, 1, 1)
    assert again.worker_deaths == 0 and len(_failures(store)) == 1
    assert time.perf_counter() - t0 < 60

    # asked to, it retries; with the fault gone the study embeds
    monkeypatch.delenv(_faults.ENV)
    retry = extract(store, cohort / "manifest.parquet", _cfg(retry_failed=True))
    assert (retry.done, retry.failed) == (1, 0)
    assert sorted(open_store(store).load("CTPA", s.encoder_key).study_ids) == sorted(ids)


def test_a_runaway_decoder_meets_the_memory_backstop(
        cohort: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # "hog" maps 8 GiB without touching it: only the worker's RLIMIT_DATA can refuse it
    ids = _ct_ids(cohort)
    monkeypatch.setenv(_faults.ENV, f"hog:{ids[0]}")
    s = extract(tmp_path / "s", cohort / "manifest.parquet", _cfg())
    assert (s.done, s.failures_by_reason, s.worker_deaths) == (
        len(ids) - 1, {"out_of_memory": 1}, 0)


def test_memory_grants_stay_within_the_budget_and_always_progress() -> None:
    pool = DecodePool.__new__(DecodePool)  # the grant logic alone, without processes

    class Conn:
        def __init__(self) -> None:
            self.sent: list[object] = []

        def send(self, msg: object) -> None:
            self.sent.append(msg)

    a, b = _Worker(None, Conn(), True, 0, 60), _Worker(None, Conn(), True, 1, 60)  # type: ignore[arg-type]
    pool._workers, pool.budget, pool._state = [a, b], 100, _State()
    pool._grant()
    assert (a.granted, b.granted, b.need) == (60, 0, 60)  # 120 > 100: b waits
    a.task, a.granted = None, 0  # a's result arrived and is held by the consumer
    pool._state.held = 60
    pool._grant()
    assert b.granted == 60  # nothing else granted: always progress, held or not
    c = _Worker(None, Conn(), True, 2, 30)  # type: ignore[arg-type]
    pool._workers.append(c)
    pool._grant()
    assert c.granted == 0  # 60 granted + 60 held + 30 > 100
    pool.release(60)
    pool._grant()
    assert c.granted == 30 and c.conn.sent == [("grant", 2)]


# ------------------------------------------------------------------ the process tree


def _children_map() -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        out.setdefault(ppid, []).append(int(d.name))
    return out


def _descendants(pid: int) -> set[int]:
    kids, seen, todo = _children_map(), set(), [pid]
    while todo:
        for c in kids.get(todo.pop(), []):
            if c not in seen:
                seen.add(c)
                todo.append(c)
    return seen


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")  # a zombie has ended; only its parent's wait is missing


def _start_cli(cohort: Path, store: Path, fault: str, mark: Path) -> subprocess.Popen[str]:
    env = {**os.environ, _faults.ENV: fault, _faults.MARK_ENV: str(mark)}
    cmd = [sys.executable, "-m", "embedstore.cli.app", "extract", str(store), "-m",
           str(cohort / "manifest.parquet"), "--modality", "ctpa", "--encoder", CT_ENC,
           "--workers", "1", "--batch-size", "16"]
    return subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _wait_for(mark: Path, proc: subprocess.Popen[str], timeout: float = 90) -> set[int]:
    deadline = time.monotonic() + timeout
    while not mark.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            out = proc.communicate()
            raise AssertionError(f"the worker never reached the study: {out}")
        time.sleep(0.05)
    kids = _descendants(proc.pid)
    assert int(mark.read_text()) in kids  # the worker, plus spawn's resource tracker
    assert len(kids) >= 2, kids
    return kids


def _assert_all_gone(pids: set[int], within: float = 5.0) -> None:
    deadline = time.monotonic() + within
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    left = {p for p in pids if _alive(p)}
    for p in left:  # do not leave them to the next test
        os.kill(p, signal.SIGKILL)
    assert not left, f"processes outlived their parent: {left}"


def test_sigkill_of_extract_leaves_no_process_behind(cohort: Path, tmp_path: Path) -> None:
    mark = tmp_path / "hang.mark"
    proc = _start_cli(cohort, tmp_path / "s", f"hang:{_ct_ids(cohort)[0]}", mark)
    kids = _wait_for(mark, proc)
    proc.kill()
    proc.wait(timeout=10)
    try:
        _assert_all_gone(kids)
    finally:  # orphans would hold its pipes open: read them once they are gone
        proc.communicate(timeout=10)


@pytest.mark.slow
def test_sigterm_commits_what_was_embedded_and_leaves_no_process(cohort: Path,
                                                                 tmp_path: Path) -> None:
    ids = _ct_ids(cohort)
    mark = tmp_path / "hang.mark"
    store = tmp_path / "s"
    proc = _start_cli(cohort, store, f"hang:{ids[-1]}", mark)  # the others decode first
    kids = _wait_for(mark, proc)
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=30)
    try:
        _assert_all_gone(kids)
    finally:
        out, err = proc.communicate(timeout=10)
    assert proc.returncode == 1, (out, err)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert lines[-1] == (f"Error: Interrupted by SIGTERM after {len(ids) - 1} studies were "
                         "embedded; they are committed. Re-run to resume."), err
    assert "Traceback" not in err
    st = open_store(store)
    (info,) = st.sets()
    assert sorted(st.load("CTPA", info.encoder_key).study_ids) == sorted(ids[:-1])
    assert st.failures().num_rows == 0  # the killed worker's study is not quarantined


def test_sigterm_in_process_raises_after_committing(cohort: Path, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    ids = _ct_ids(cohort)
    mark = tmp_path / "hang.mark"
    monkeypatch.setenv(_faults.ENV, f"hang:{ids[-1]}")
    monkeypatch.setenv(_faults.MARK_ENV, str(mark))
    import threading

    def terminate_when_hung() -> None:
        while not mark.exists():
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=terminate_when_hung, daemon=True).start()
    with pytest.raises(ExtractInterrupted) as info:
        extract(tmp_path / "s", cohort / "manifest.parquet", _cfg())
    assert info.value.signum == signal.SIGTERM and info.value.summary.done == len(ids) - 1
    assert "Interrupted by SIGTERM" in str(info.value)
    hung = int(mark.read_text())
    _assert_all_gone({hung})
    st = open_store(tmp_path / "s")
    assert sorted(st.load("CTPA", info.value.summary.encoder_key).study_ids) == sorted(ids[:-1])
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler is restored


# ------------------------------------------------------------------ options


@pytest.mark.parametrize("text, expected", [("8GB", 8 * 10**9), ("8GiB", 8 * 2**30),
                                            ("512MB", 512 * 10**6), ("1e9", 10**9),
                                            (2**30, 2**30)])
def test_max_memory_sizes(text: str | int, expected: int) -> None:
    assert parse_bytes(text) == expected
    assert ExtractConfig(modality="ctpa", max_memory=text).max_memory == expected


def test_default_max_memory_is_half_the_machine() -> None:
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    assert ExtractConfig(modality="ctpa").max_memory == default_max_memory() <= total // 2 + 1
    assert parse_bytes("50%") == default_max_memory()


@pytest.mark.parametrize("args, line", [
    (["--max-memory", "lots"], "Error: --max-memory must be a size such as 8GB, 8GiB, 512MB, "
                               "50% (of RAM) or a number of bytes, got 'lots'."),
    (["--max-memory", "1MB"], "Error: --max-memory must be at least 16 MiB, got '1MB' "
                              "(1000000 bytes)."),
    (["--missing-rescale", "guess"], "Error: --missing-rescale 'guess' is not a policy. Valid: "
                                     "refuse, assume-1024, assume-0."),
])
def test_bad_extract_options_are_one_error_line(cohort: Path, tmp_path: Path, args: list[str],
                                                line: str) -> None:
    from embedstore.cli.app import app
    from typer.testing import CliRunner

    r = CliRunner().invoke(app, ["extract", str(tmp_path / "s"), "-m",
                                 str(cohort / "manifest.parquet"), "--modality", "ctpa", *args])
    assert r.exit_code == 1 and r.output.strip().splitlines()[-1] == line, r.output
    assert "Traceback" not in r.output
