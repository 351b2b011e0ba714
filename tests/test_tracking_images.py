"""Images reach MLflow as `MlflowClient.log_image(key=...)` would store them (the layout its UI reads),
though written by the tracker's faster path: same names, same tag, the run directory's PNG bytes."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
from PIL import Image

from evals.tracking import MlflowTracker


def layout(path: str, key: str) -> str:
    """An artifact path with its key, timestamp and uuid replaced by placeholders."""
    path = path.replace(key, "KEY", 1)
    path = re.sub(r"\+timestamp\+\d+\+", "+timestamp+MS+", path)
    return re.sub(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}", "UUID", path)


def test_images_are_stored_as_log_image_stores_them(workdir: Path) -> None:
    rng = np.random.default_rng(0)
    reference, candidate = (rng.integers(0, 256, (64, 48, 3), dtype=np.uint8) for _ in range(2))
    Image.fromarray(reference).save(workdir / "ref.png")
    Image.fromarray(candidate).save(workdir / "cand.png")
    tracker = MlflowTracker(f"sqlite:///{workdir / 'mlflow.db'}")
    tracker.start_run("images", "run", {}, {})
    tracker.start_candidate("fp8", {})
    tracker.log_reference_image("cube-s0", workdir / "ref.png")
    tracker.log_candidate_image("fp8", "cube-s0", workdir / "cand.png", workdir / "ref.png")
    client, parent, child = tracker.client, tracker.parent_id, tracker.candidate_ids["fp8"]
    assert parent is not None

    mlflow_run = client.create_run(tracker.experiment_id).info.run_id  # MLflow's own way, for comparison
    client.log_image(mlflow_run, reference, key="cube-s0", step=0)
    want = sorted(layout(a.path, "cube-s0") for a in client.list_artifacts(mlflow_run, "images"))
    assert len(want) == 2  # the PNG and its compressed thumbnail

    assert sorted(layout(a.path, "cube-s0") for a in client.list_artifacts(parent, "images")) == want
    child_images = [a.path for a in client.list_artifacts(child, "images")]
    assert sorted(layout(p, "cube-s0") for p in child_images if "grid-" not in p) == want
    assert sorted(layout(p, "grid-cube-s0") for p in child_images if "grid-" in p) == want
    for run in (parent, child):
        assert (
            client.get_run(run).data.tags["mlflow.loggedImages"]
            == client.get_run(mlflow_run).data.tags["mlflow.loggedImages"]
        )
    (stored,) = [p for p in child_images if p.endswith(".png") and "grid-" not in p]
    assert Path(client.download_artifacts(child, stored)).read_bytes() == (workdir / "cand.png").read_bytes()
    (grid,) = [p for p in child_images if p.endswith(".png") and "grid-" in p]
    with Image.open(client.download_artifacts(child, grid)) as im:
        pixels = np.asarray(im.convert("RGB"))
    assert np.array_equal(pixels[:, :48], reference) and np.array_equal(pixels[:, 52:100], candidate)
