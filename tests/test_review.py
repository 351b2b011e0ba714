"""Review: a regression against an accepted baseline, `evals compare`, the reports (HTML in headless
Chromium, JUnit, step summary, `evals report`), and a real `mlflow server`."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from xml.etree import ElementTree

import pytest

from evals.cli import main
from tests.conftest import REPO, TEST_SUITES, write

FAST = ["--no-progress"]
BASELINE_GATE = "  - {metric: psnr, stat: mean, baseline: {max_drop: 0.5}, optional: true}\n"


def suite_with_baseline_gate(workdir: Path) -> Path:
    """The light smoke with floors low enough for an E5M2 build (27.4 dB mean, SSIM 0.87 on it) and an
    optional baseline gate (shown as not evaluated until a baseline is accepted)."""
    text = (TEST_SUITES / "smoke.yaml").read_text()
    text = text.replace('op: ">=", value: 30}', 'op: ">=", value: 25}').replace("value: 0.93}", "value: 0.8}")
    return write(workdir / "smoke.yaml", text + BASELINE_GATE)


def worse_rowwise(workdir: Path) -> Path:
    """A build that calls itself fp8-e4m3-rowwise but uses E5M2 (about 6 dB worse on tiny)."""
    text = (REPO / "models" / "policies" / "fp8-e4m3-rowwise.yaml").read_text()
    return write(workdir / "worse.yaml", text.replace("format: e4m3fn", "format: e5m2"))


def newest(workdir: Path) -> Path:
    return max((workdir / "runs").iterdir())


def verdict_of(run_dir: Path) -> dict[str, str]:
    results = json.loads((run_dir / "verdict.json").read_text())["results"]
    return {r["gate"]: r["status"] for r in results}


@pytest.mark.slow
def test_a_worse_build_fails_the_baseline_gate_while_passing_the_absolute_ones(
    workdir: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    suite = str(suite_with_baseline_gate(workdir))
    assert main(["run", suite, *FAST]) == 0
    first = newest(workdir)
    assert verdict_of(first)["psnr mean max drop 0.5 vs baseline"] == "not evaluated"  # nothing accepted yet

    assert main(["accept", str(first)]) == 0
    assert "baseline of fp8-e4m3-rowwise" in capsys.readouterr().out

    step_summary = workdir / "step-summary.md"
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(step_summary))
    assert main(["run", suite, *FAST, "--policy", str(worse_rowwise(workdir))]) == 1
    second = newest(workdir)
    statuses = verdict_of(second)
    assert statuses.pop("psnr mean max drop 0.5 vs baseline") == "fail"
    assert set(statuses.values()) == {"pass"}  # every absolute gate still passes
    assert "FAIL" in capsys.readouterr().out
    assert "# smoke: ❌ failed" in step_summary.read_text()

    # JUnit: one test case per gate, the baseline gate the one failure.
    suite_xml = ElementTree.parse(second / "junit.xml").getroot().find("testsuite")
    assert suite_xml is not None and suite_xml.get("tests") == "6" and suite_xml.get("failures") == "1"
    failed = [c.get("name") for c in suite_xml.iter("testcase") if c.find("failure") is not None]
    assert failed == ["psnr mean max drop 0.5 vs baseline"]

    # compare: the two runs' metric differences, by run directory.
    assert main(["compare", str(first), str(second), "--json"]) == 0
    rows = {r["metric"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows["psnr_mean"]["b_minus_a"] < -0.5

    # The reports re-render from the run directory alone, to the same content.
    html_before = (second / "report.html").read_text()
    (second / "report.html").unlink()
    (second / "junit.xml").unlink()
    assert main(["report", str(second)]) == 0
    assert (second / "report.html").read_text() == html_before and (second / "junit.xml").is_file()


def test_report_needs_a_finished_run(workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (workdir / "half").mkdir()
    assert main(["report", str(workdir / "half")]) == 2
    assert "run.json is missing" in capsys.readouterr().err


def chromium_console(page: Path, screenshot: Path | None = None) -> tuple[list[str], subprocess.CompletedProcess]:
    """Open a page in headless Chromium; its console messages, and the process."""
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("headless Chromium is not installed (Debian: apt-get install chromium)")
    command = [browser, "--headless=new", "--no-sandbox", "--disable-gpu", "--enable-logging=stderr", "--v=0"]
    command += ["--window-size=1200,2000", f"--user-data-dir={page.parent / '.chromium'}"]
    command += [f"--screenshot={screenshot}"] if screenshot else ["--dump-dom"]
    done = subprocess.run([*command, page.as_uri()], capture_output=True, text=True, timeout=120, check=False)
    # Chromium logs every console message as `INFO:CONSOLE(...)`, whatever its level; the report has
    # no scripts, so any console message is a problem.
    return [line for line in done.stderr.splitlines() if ":CONSOLE" in line], done


def test_chromium_catches_console_errors(tmp_path: Path) -> None:
    """The check below can fail: a page that logs an error is caught."""
    page = write(tmp_path / "broken.html", "<html><body><script>console.error('boom')</script></body></html>")
    errors, _ = chromium_console(page)
    assert any("boom" in line for line in errors)


@pytest.mark.slow
def test_the_html_report_opens_in_headless_chromium_without_console_errors(workdir: Path) -> None:
    assert main(["run", str(TEST_SUITES / "smoke.yaml"), *FAST, "--no-mlflow"]) == 0
    report = newest(workdir) / "report.html"
    errors, done = chromium_console(report)
    assert done.returncode == 0 and "<h2>Worst samples</h2>" in done.stdout
    assert errors == []
    shot = workdir / "report.png"
    chromium_console(report, screenshot=shot)
    from PIL import Image

    with Image.open(shot) as image:
        assert image.size == (1200, 2000)
        assert len(set(image.convert("L").getdata())) > 20  # rendered content, not a blank page


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.slow
def test_a_run_against_a_real_mlflow_server(workdir: Path) -> None:
    port = free_port()
    store = f"sqlite:///{workdir / 'server.db'}"
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port)]
        + ["--backend-store-uri", store, "--default-artifact-root", str(workdir / "artifacts"), "--workers", "1"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        uri = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    break
            except OSError:
                time.sleep(0.5)
        else:
            pytest.fail("mlflow server did not start within 90 s")
        env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "HF_HUB_OFFLINE": "1"}
        # One seed: the server's side is what this checks.
        suite = write(workdir / "smoke.yaml", (TEST_SUITES / "smoke.yaml").read_text().replace("[0, 1]", "[0]"))
        done = subprocess.run(
            [sys.executable, "-m", "evals", "run", str(suite), *FAST],
            cwd=workdir,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
        )
        assert done.returncode == 0, done.stderr[-2000:]
        assert "warning: MLflow" not in done.stderr

        from mlflow import MlflowClient

        client = MlflowClient(tracking_uri=uri)  # through the server's REST API
        experiment = client.get_experiment_by_name("smoke")
        runs = client.search_runs([experiment.experiment_id])
        parent = next(r for r in runs if "mlflow.parentRunId" not in r.data.tags)
        (child,) = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
        assert parent.data.tags["verdict"] == "pass" and child.data.metrics["psnr_mean"] > 30
        table = json.loads(Path(client.download_artifacts(child.info.run_id, "samples.json")).read_text())
        assert len(table["data"]) == 8
        images = {a.path for a in client.list_artifacts(child.info.run_id, "images")}
        assert any("grid-" in p for p in images) and len(images) >= 16  # candidate images and grids
        parent_files = {a.path for a in client.list_artifacts(parent.info.run_id)}
        assert {"report.html", "junit.xml", "records.jsonl"} <= parent_files
    finally:
        os.killpg(server.pid, signal.SIGTERM)  # the server and its workers
        server.wait(timeout=30)
