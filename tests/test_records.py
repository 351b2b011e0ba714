from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from evals.models.yamlspec import InputError
from evals.records import (
    RecordsWriter,
    SampleRecord,
    metric_stats,
    percentile,
    read_records,
    summarize,
)


def record(policy: str, sample: str, psnr: float, black: bool = False) -> SampleRecord:
    finding = {"flagged": black, "score": 0.0, "reason": ""}
    return SampleRecord(
        policy=policy,
        sample_id=sample,
        case_id=sample.split("-s")[0],
        prompt="p",
        seed=0,
        tags=("t",),
        metrics={"psnr": psnr},
        detectors={"black_frame": finding},
        reference_detectors={"black_frame": {"flagged": False, "score": 0.0, "reason": ""}},
        image=f"images/{policy}/{sample}.png",
        reference_image=f"images/ref/{sample}.png",
        seconds_per_image=0.5,
    )


@pytest.mark.parametrize("q", [0.0, 0.05, 0.5, 0.95, 1.0])
def test_percentile_matches_numpy(q: float) -> None:
    values = sorted(np.random.default_rng(1).normal(30, 5, 37).tolist())
    assert percentile(values, q) == pytest.approx(np.percentile(values, q * 100), abs=1e-12)


def test_stats_with_infinite_psnr() -> None:
    stats = metric_stats([30.0, math.inf, math.inf, 40.0])
    assert stats["min"] == 30.0 and stats["max"] == math.inf and stats["mean"] == math.inf
    assert stats["median"] == math.inf and stats["p05"] == pytest.approx(31.5)


def test_one_nan_poisons_every_stat() -> None:
    assert all(math.isnan(v) for v in metric_stats([30.0, math.nan, 40.0]).values())


def test_summarize_per_policy() -> None:
    recs = [record("a", "x-s0", 30), record("a", "y-s0", 40, black=True), record("b", "x-s0", 20)]
    s = summarize(recs)
    assert s["a"].n == 2 and s["a"].metrics["psnr"]["mean"] == 35
    assert s["a"].detectors["black_frame"] == {"count": 1.0, "rate": 0.5, "new_count": 1.0}
    assert s["b"].metrics["psnr"]["min"] == 20
    assert s["a"].flat()["psnr_mean"] == 35 and s["a"].flat()["black_frame_count"] == 1


def test_new_count_ignores_failures_the_reference_shares() -> None:
    both = record("a", "x-s0", 30, black=True)
    both = SampleRecord(
        **{**both.__dict__, "reference_detectors": {"black_frame": {"flagged": True, "score": 0.0, "reason": ""}}}
    )
    only_candidate = record("a", "y-s0", 30, black=True)
    stats = summarize([both, only_candidate])["a"].detectors["black_frame"]
    assert stats["count"] == 2 and stats["new_count"] == 1


def test_records_round_trip_and_append(tmp_path: Path) -> None:
    path = tmp_path / "records.jsonl"
    with RecordsWriter(path) as w:
        w.write(record("a", "x-s0", math.inf))
    with RecordsWriter(path) as w:  # a second writer appends, never truncates
        w.write(record("a", "y-s0", 31.5))
    back = list(read_records(path))
    assert back == [record("a", "x-s0", math.inf), record("a", "y-s0", 31.5)]


def test_records_reject_other_schema_versions(tmp_path: Path) -> None:
    data = json.loads(record("a", "x-s0", 1).to_json())
    data["schema_version"] = 99
    path = tmp_path / "records.jsonl"
    path.write_text(json.dumps(data) + "\n")
    with pytest.raises(InputError, match=r"records.jsonl:1: bad record: records schema 99"):
        list(read_records(path))
