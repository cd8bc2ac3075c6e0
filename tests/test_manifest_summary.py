"""Bounded-memory manifest statistics: exact while small, a seeded reservoir beyond, same result however chunked."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from curate.manifest.summary import QUANTILES, ValueSummary, reason_counts
from curate.schema import DROP_SCHEMA


def test_quantiles_are_exact_up_to_the_limit_and_nulls_are_skipped():
    values = np.random.default_rng(1).gamma(2.0, 3.0, size=5000)
    summary = ValueSummary(limit=5000)
    summary.add(pa.array([*values[:2500], None]))
    summary.add(list(values[2500:]) + [None, float("nan")])
    result = summary.to_json()
    assert summary.exact and result["count"] == 5000
    assert result["mean"] == round(float(values.mean()), 4)
    for q in QUANTILES:
        assert result["quantiles"][f"p{int(q * 100)}"] == round(float(np.quantile(values, q)), 4)


def test_beyond_the_limit_memory_stays_bounded_and_quantiles_stay_close():
    values = np.random.default_rng(2).normal(50.0, 10.0, size=200_000)
    summary = ValueSummary(limit=20_000)
    for chunk in np.array_split(values, 37):
        summary.add(chunk)
    result = summary.to_json()
    assert not summary.exact and summary._kept.size == 20_000
    assert result["count"] == values.size and result["mean"] == round(float(values.mean()), 4)
    assert result["quantiles"]["p0"] == round(float(values.min()), 4)
    assert result["quantiles"]["p100"] == round(float(values.max()), 4)
    for q in (0.05, 0.25, 0.5, 0.75, 0.95):
        estimate = result["quantiles"][f"p{int(q * 100)}"]
        rank = float(np.mean(values <= estimate))
        assert abs(rank - q) < 0.015, (q, rank)


def test_the_same_stream_gives_the_same_summary_however_it_is_chunked():
    values = np.random.default_rng(3).uniform(0, 1, size=50_000)
    one = ValueSummary(limit=1000)
    one.add(values)
    many = ValueSummary(limit=1000)
    for chunk in np.array_split(values, 123):
        many.add(chunk)
    assert one.to_json() == many.to_json()
    assert np.array_equal(one._kept, many._kept)


def summarize(values) -> dict:
    summary = ValueSummary()
    summary.add(values)
    return summary.to_json()


def test_empty_and_small():
    assert ValueSummary().to_json() == {"count": 0}
    assert summarize([None, None]) == {"count": 0}
    assert summarize([1, 2, 3])["quantiles"]["p50"] == 2.0


def test_reason_counts_reads_the_drop_log_batch_by_batch(tmp_path):
    reasons = ["http_404"] * 700 + ["timeout"] * 250 + ["connection_error"] * 1050
    rows = [{"key": f"{n:016d}", "url": None, "stage": "fetch", "reason": reason, "detail": None}
            for n, reason in enumerate(reasons)]
    path = tmp_path / "drops.parquet"
    pq.write_table(pa.Table.from_pylist(rows, schema=DROP_SCHEMA), path, row_group_size=300)
    assert pq.ParquetFile(path).metadata.num_row_groups == 7
    assert reason_counts(path) == dict(sorted(Counter(reasons).items()))
