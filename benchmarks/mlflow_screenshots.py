"""Screenshots of the MLflow review for the docs, taken in headless Chromium through `evals ui`.

    python benchmarks/mlflow_screenshots.py --store sqlite:///mlflow.db --out docs/images

Needs Playwright's Python package (`pip install playwright`, no browser download) and Chromium
(Debian: `apt-get install chromium`). Writes mlflow-runs.png (the suite's runs table in the saved
review view, the newest run expanded) and mlflow-candidate.png (a failing candidate's run page).
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

CHROMIUM_FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(url: str, seconds: float = 90) -> None:
    deadline = time.monotonic() + seconds
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise SystemExit(f"{url} did not answer within {seconds:.0f} s") from None
            time.sleep(0.5)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", default="sqlite:///mlflow.db", help="MLflow tracking URI")
    parser.add_argument("--suite", default="smoke", help="experiment (suite) to show")
    parser.add_argument("--out", type=Path, default=Path("docs/images"))
    parser.add_argument("--chromium", default="/usr/bin/chromium")
    args = parser.parse_args()
    from mlflow import MlflowClient
    from playwright.sync_api import sync_playwright

    from evals.mlflow_review import experiment_url

    client = MlflowClient(args.store)
    experiment = client.get_experiment_by_name(args.suite)
    if experiment is None:
        raise SystemExit(f"no experiment {args.suite!r} in {args.store}")
    runs = client.search_runs([experiment.experiment_id], order_by=["attributes.start_time DESC"])
    failing = next((r for r in runs if r.data.tags.get("verdict") == "fail" and "policy" in r.data.tags), None)
    port = free_port()
    server = f"http://127.0.0.1:{port}"
    ui = subprocess.Popen(
        [sys.executable, "-m", "evals", "ui", "--port", str(port)],
        env={**os.environ, "MLFLOW_TRACKING_URI": args.store},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    args.out.mkdir(parents=True, exist_ok=True)
    try:
        wait_for(f"{server}/health")
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=args.chromium, args=CHROMIUM_FLAGS)
            page = browser.new_page(viewport={"width": 1800, "height": 900})
            page.goto(experiment_url(server, experiment.experiment_id))
            page.wait_for_selector("text=Run Name", timeout=60_000)
            close = page.locator("[aria-label='Close']").first  # MLflow's assistant side panel
            if close.count():
                close.click()
            # The newest run's expand button: its candidates' rows below it.
            expand = page.locator("[col-id='attributes.`Run Name`'] button[data-component-id*='runnamecell']").first
            if expand.count():
                expand.click()
            page.wait_for_timeout(2000)
            page.screenshot(path=str(args.out / "mlflow-runs.png"))
            print(f"written: {args.out / 'mlflow-runs.png'}")
            if failing is not None:
                run_page = f"/#/experiments/{experiment.experiment_id}/runs/{failing.info.run_id}"
                page.goto(f"{server}{run_page}?workflowType=machine_learning")
                page.wait_for_selector("text=Metrics", timeout=60_000)
                page.wait_for_timeout(2000)
                page.screenshot(path=str(args.out / "mlflow-candidate.png"))
                print(f"written: {args.out / 'mlflow-candidate.png'}")
            browser.close()
    finally:
        ui.send_signal(signal.SIGTERM)  # `evals ui` stops its server with itself
        ui.wait(timeout=30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
