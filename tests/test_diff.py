"""`curate diff A B` on real outputs: two runs of one synthetic web that differ in the clip_score threshold."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from report_outputs import THRESHOLDS, build_output
from rich.console import Console
from typer.testing import CliRunner

from curate.cli import app
from curate.manifest.diff import diff_outputs, ks_pvalue, ks_statistic, render_diff
from curate.report.reader import open_output

THRESHOLD_A, THRESHOLD_B = THRESHOLDS["a"], THRESHOLDS["b"]


@pytest.fixture(scope="module")
def outputs(local_ray, _loopback_server, tmp_path_factory) -> tuple[Path, Path]:
    """Outputs A and B of report_outputs: one URL list, clip_score min_score THRESHOLD_A and THRESHOLD_B."""
    return build_output("a", _loopback_server, tmp_path_factory), build_output("b", _loopback_server, tmp_path_factory)


def test_the_changed_threshold_is_the_only_recipe_difference_that_shapes_the_output(outputs):
    a, b = outputs
    result = diff_outputs(a, b)
    shaping = [change for change in result["recipe"]["changes"] if not change["execution_only"]]
    assert shaping == [{"key": "stages.clip_score.min_score", "change": "changed", "a": THRESHOLD_A,
                        "b": THRESHOLD_B, "execution_only": False}]
    assert [change["key"] for change in result["recipe"]["changes"] if change["execution_only"]] == ["output.path"]
    assert result["recipe"]["a"]["sha256"] != result["recipe"]["b"]["sha256"]
    assert result["identical"] is False


def test_stage_and_reason_deltas_are_the_manifests_counts(outputs):
    a, b = outputs
    result = diff_outputs(a, b)
    ma, mb = open_output(a).manifest, open_output(b).manifest
    stages_a = {s["name"]: s for s in ma["stages"]}
    stages_b = {s["name"]: s for s in mb["stages"]}
    assert [row["stage"] for row in result["stages"]] == [s["name"] for s in ma["stages"]]
    for row in result["stages"]:
        for field in ("rows_in", "rows_out"):
            assert row[field]["a"] == stages_a[row["stage"]][field]
            assert row[field]["b"] == stages_b[row["stage"]][field]
            assert row[field]["delta"] == row[field]["b"] - row[field]["a"]
        assert row["dropped"]["a"] == sum(stages_a[row["stage"]]["dropped"].values())
        assert row["dropped"]["b"] == sum(stages_b[row["stage"]]["dropped"].values())
    reasons = {(row["stage"], row["reason"]): row for row in result["drop_reasons"]}
    expected = {(s["name"], r) for m in (ma, mb) for s in m["stages"] for r in s["dropped"]}
    assert set(reasons) == expected
    for (stage, reason), row in reasons.items():
        assert row["a"] == stages_a[stage]["dropped"].get(reason, 0)
        assert row["b"] == stages_b[stage]["dropped"].get(reason, 0)
        assert row["delta"] == row["b"] - row["a"]
    totals = {row["total"]: row for row in result["totals"]}
    assert totals["output_rows"]["delta"] == mb["reconciliation"]["output_rows"] - ma["reconciliation"]["output_rows"]
    # the stricter threshold drops more samples at clip_score and nothing changes before it
    assert reasons[("clip_score", "clip_score_low")]["delta"] > 0
    assert all(row["rows_out"]["delta"] == 0 for row in result["stages"][:3])


def test_score_shift_of_the_kept_samples(outputs):
    a, b = outputs
    clip = diff_outputs(a, b)["scores"]["clip_score"]
    assert clip["a"]["count"] == open_output(a).manifest["statistics"]["clip_score"]["count"]
    assert clip["b"]["count"] == open_output(b).manifest["statistics"]["clip_score"]["count"]
    assert clip["a"]["quantiles"]["p5"] < THRESHOLD_B <= clip["b"]["quantiles"]["p5"]
    assert clip["b"]["mean"] > clip["a"]["mean"]
    assert 0 < clip["ks"] <= 1 and 0 <= clip["ks_pvalue"] <= 1


def test_identical_outputs_show_no_differences(outputs, tmp_path):
    a, _ = outputs
    copy = tmp_path / "copy"
    shutil.copytree(a, copy)
    result = diff_outputs(a, copy)
    assert result["identical"] is True
    assert result["recipe"]["changes"] == []
    assert all(row["delta"] == 0 for row in result["drop_reasons"] + result["totals"] + result["kinds"])
    assert all(row[f]["delta"] == 0 for row in result["stages"] for f in ("rows_in", "rows_out", "dropped"))
    assert all(shift["ks"] == 0 for shift in result["scores"].values())
    console = Console(file=io.StringIO(), width=120)
    render_diff(result, console)
    assert "no differences" in console.file.getvalue()


def test_cli_prints_tables_or_json(outputs, tmp_path):
    a, b = outputs
    runner = CliRunner()
    table = runner.invoke(app, ["diff", str(a), str(b)])
    assert table.exit_code == 0, table.output
    assert "stages.clip_score.min_score" in table.output and "clip_score_low" in table.output
    assert "no differences" not in table.output
    as_json = runner.invoke(app, ["diff", str(a), str(b), "--json"])
    assert as_json.exit_code == 0, as_json.output
    assert json.loads(as_json.output) == json.loads(json.dumps(diff_outputs(a, b)))
    missing = runner.invoke(app, ["diff", str(a), str(tmp_path / "nothing")])
    assert missing.exit_code == 2 and "no manifest" in missing.output


def _ks_by_definition(x: np.ndarray, y: np.ndarray) -> float:
    """sup |F_x - F_y| evaluated at every sample point, one point at a time."""
    return max(abs(np.mean(x <= t) - np.mean(y <= t)) for t in np.concatenate([x, y]))


def test_ks_statistic_matches_its_definition_and_the_known_limits():
    rng = np.random.default_rng(7)
    for shift in (0.0, 0.3, 2.0):
        x, y = rng.normal(size=200), rng.normal(loc=shift, size=150)
        assert ks_statistic(x, y) == pytest.approx(_ks_by_definition(x, y))
    same = rng.normal(size=50)
    assert ks_statistic(same, same.copy()) == 0.0
    assert ks_statistic(np.zeros(5), np.ones(7)) == 1.0
    assert ks_pvalue(1.0, 200, 200) < 1e-10
    assert ks_pvalue(0.0, 200, 200) == 1.0
    # large samples of one distribution: D is small and the p-value is not small
    x, y = rng.normal(size=4000), rng.normal(size=4000)
    assert ks_pvalue(ks_statistic(x, y), x.size, y.size) > 0.01
