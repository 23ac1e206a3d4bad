"""The GPU session's plumbing, without a GPU: ``DRY_RUN=1 bash tests/gpu/session.sh OUT`` runs every stage in its
cheapest form (no build, ``tidar env`` and ``tidar selftest``, pytest collecting each selection, the sanitizer's
selection collected, ``benchmarks/run_gpu.sh`` with the kv_append benchmarks in --smoke mode), under 60 s here.

One interpreter for the whole run: ``$PYTHON`` is a wrapper that logs its calls, and ``python``/``python3``/``pip``
on the PATH are stubs that fail, so a script calling a bare interpreter fails the session and is named here."""

from __future__ import annotations

import csv
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
STUBS = ("python", "python3", "pip", "pip3")

pytestmark = pytest.mark.skipif(
    shutil.which("bash") is None or shutil.which("timeout") is None, reason="needs bash and coreutils timeout"
)


def _script(path: Path, body: str) -> Path:
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(0o755)
    return path


@pytest.fixture(scope="module")
def session(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("session")
    stubs = tmp / "stubs"
    stubs.mkdir()
    for name in STUBS:
        _script(stubs / name, f'echo "{name} $*" >> "{tmp}/bare.log"\nexit 127\n')
    wrapper = _script(tmp / "the-python", f'echo "$*" >> "{tmp}/calls.log"\nexec "{sys.executable}" "$@"\n')
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "PYTHON", "SKIP_BUILD")}
    env.update(
        PATH=f"{stubs}{os.pathsep}{env.get('PATH', '')}",
        PYTHON=str(wrapper),
        DRY_RUN="1",
        SESSION_S="240",
        CUDA_VISIBLE_DEVICES="",
        OMP_NUM_THREADS="1",
        PYTHONPATH=f"{REPO}{os.pathsep}{env.get('PYTHONPATH', '')}",
    )
    out = tmp / "out"
    proc = subprocess.run(
        ["bash", str(REPO / "tests/gpu/session.sh"), str(out)],
        cwd=tmp,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    bare = (tmp / "bare.log").read_text() if (tmp / "bare.log").exists() else ""
    calls = (tmp / "calls.log").read_text() if (tmp / "calls.log").exists() else ""
    return proc, out, bare, calls


def test_the_dry_run_passes(session):
    proc, out, _, _ = session
    summary = (out / "summary.txt").read_text()
    assert proc.returncode == 0, summary + proc.stdout[-3000:] + proc.stderr[-3000:]
    assert summary.rstrip().splitlines()[-1].startswith("session: PASS")


def test_no_bare_interpreter_is_called(session):
    _, _, bare, calls = session
    assert bare == "", f"a script called an interpreter other than $PYTHON: {bare}"
    for step in ("-m tidar env", "-m tidar selftest", "-m pytest", "-m benchmarks"):
        assert step in calls, f"{step!r} did not run through $PYTHON"


def test_every_stage_ran_or_said_why_not(session):
    _, out, _, _ = session
    summary = (out / "summary.txt").read_text()
    for line in (
        "build: skipped (DRY_RUN=1)",
        "selftest: rc=0",
        "tests_cuda: rc=0",
        "tests_gpu: rc=0",
        "sanitizer_selection: rc=0",
        "sanitizer: skipped (DRY_RUN=1",
    ):
        assert line in summary, f"{line!r} missing from:\n{summary}"
    assert "(rc 0)" in summary.split("bench: ", 1)[1].splitlines()[0]
    for stage in ("tests_cuda", "tests_gpu", "sanitizer_selection"):
        log = (out / f"{stage}.log").read_text()
        assert " tests collected" in log and "passed" not in log, log[-2000:]  # collected, nothing ran
    assert "no CUDA device" in (out / "versions.txt").read_text()
    assert (out / "env.json").read_text().lstrip().startswith("{")


def test_the_benchmarks_ran_in_smoke_mode(session):
    _, out, _, _ = session
    with open(out / "bench" / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert any(r["suite"] == "kv_append" and r["status"] == "ok" for r in rows)
    assert {r["suite"] for r in rows} <= {"ceilings", "kv_append"}
