"""The PromQL test-script runner: hand-written scripts with known outcomes, the
``flashback promqltest`` command's report, and Prometheus' own conformance files."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from querier.engine import Engine
from querier.promqltest import Runner, engine_evaluator, summarize

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# Prometheus' test files are data beside the project (../shared/conformance/promql), not copied in.
_CANDIDATES = [os.environ.get("FLASHBACK_CONFORMANCE_DIR", ""),
               os.path.join(os.path.dirname(ROOT), "shared", "conformance", "promql", "testdata"),
               "/work/shared/conformance/promql/testdata"]
CONFORMANCE = next((d for d in _CANDIDATES if d and os.path.isdir(d)), _CANDIDATES[1])

# The core set of the conformance README: each file passes completely (skips only for native
# histograms, which the runner decides and the test checks).
PASSING_FILES = ["aggregators", "at_modifier", "collision", "functions", "histograms", "literals",
                 "name_label_dropping", "operators", "range_queries", "selectors", "staleness", "subquery",
                 "trig_functions", "limit"]


def run(text: str):
    return Runner(engine_evaluator(Engine())).run_text(text)


def test_a_correct_expectation_passes_and_a_wrong_one_fails_with_the_reason():
    # 0+10x4 at 1m spacing: samples 0,10,20,30,40 at 0..4m. rate over (2m,4m] sees 30 and 40:
    # an increase of 10 over 60 s; the window start is 60 s before the first sample, under the
    # 1.1 x 60 s threshold, so it extrapolates to the whole 120 s: 20 / 120 s = 1/6.
    outcomes = run("""
load 1m
  metric{job="a"} 0+10x4

eval instant at 4m metric
  metric{job="a"} 40

eval instant at 4m rate(metric[2m])
  {job="a"} 0.16666666667

eval instant at 4m metric
  metric{job="a"} 41
""")
    assert [o.status for o in outcomes] == ["passed", "passed", "failed"]
    assert "got" in outcomes[2].reason and "41" in outcomes[2].reason


def test_expected_failures_and_error_messages():
    outcomes = run("""
load 1m
  metric 1

eval instant at 0m sum(
  expect fail

eval instant at 0m metric
  expect fail

eval instant at 0m sum(
  expect fail regex: ^parse error
""")
    assert [o.status for o in outcomes] == ["passed", "failed", "passed"]
    assert outcomes[1].reason == "expected an error, query succeeded"


def test_range_evaluation_with_missing_steps():
    # The series ends at 2m; with the 5m lookback it is visible up to 7m, not at 8m.
    outcomes = run("""
load 1m
  metric 1 2 3

eval range from 0 to 8m step 2m metric
  metric 1 3 3 3 _
""")
    assert [o.status for o in outcomes] == ["passed"], outcomes


def test_native_histograms_are_skipped_with_a_reason():
    outcomes = run("""
load 1m
  h {{schema:0 count:1 sum:1 buckets:[1]}}
  f 1

eval instant at 0m h
  h {{schema:0 count:1 sum:1 buckets:[1]}}

eval instant at 0m f
  f 1
""")
    assert [o.status for o in outcomes] == ["skipped", "passed"]
    assert "native histogram" in outcomes[0].reason


def test_unknown_command_is_a_script_error():
    outcomes = run("frobnicate now\n")
    assert outcomes[0].status == "failed" and "unknown command" in outcomes[0].reason


def test_command_prints_per_file_and_total_lines(tmp_path):
    good, bad = tmp_path / "good.test", tmp_path / "bad.test"
    good.write_text("load 1m\n  m 1\n\neval instant at 0 m\n  m 1\n")
    bad.write_text("load 1m\n  m 1\n\neval instant at 0 m\n  m 2\n\neval instant at 0 m\n  m 1\n")
    p = subprocess.run([sys.executable, "-m", "flashback", "promqltest", str(good), str(bad)],
                       capture_output=True, text=True, cwd=ROOT)
    assert p.returncode == 1, p.stderr
    lines = p.stdout.splitlines()
    assert f"{good}: 1 passed, 0 failed, 0 skipped" in lines
    assert f"{bad}: 1 passed, 1 failed, 0 skipped" in lines
    assert lines[-1] == "total: 2 passed, 1 failed, 0 skipped"
    assert any(line.startswith(f"  FAILED {bad}:4: m") for line in lines)


@pytest.mark.skipif(not os.path.isdir(CONFORMANCE), reason=f"conformance files not found at {CONFORMANCE}")
@pytest.mark.parametrize("name", PASSING_FILES)
def test_conformance_file_passes(name):
    outcomes = Runner(engine_evaluator(Engine(subquery_step_ms=60_000, delayed_name_removal=True))).run_file(
        os.path.join(CONFORMANCE, f"{name}.test"))
    failed = [f"{o.line}: {o.expr}: {o.reason}" for o in outcomes if o.status == "failed"]
    assert not failed, "\n".join(failed[:10])
    passed, _, skipped = summarize(outcomes)
    assert passed > 0
    for o in outcomes:
        if o.status == "skipped":
            assert re.search("native histogram", o.reason), o.reason
