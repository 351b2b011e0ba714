"""Time to the verdict on a build with one broken layer: `evals run SUITE --fail-fast` on a checkpoint
mutant of the mutation suite (benchmarks/mutants.py) made on the model's own architecture.

`evals quantize fp8-e4m3-rowwise` writes the sound checkpoint, the mutant edits one layer of it, and
the suite runs twice in fresh processes: the first fills the reference cache (and inductor's), the
second is the one a developer waits for after a change, timed from outside, from the command's start
to its exit. Screening scores step error before any image, so the stop comes at the first batch
whose step error settles a gate.

    python benchmarks/broken_build_verdict.py --model random:sd35-large --mutant b0-to-v-scale-x2
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.mutants import CHECKPOINT_MUTANTS, _write_checkpoint, read_checkpoint

CORE = Path(__file__).resolve().parents[1] / "suites" / "sd35-core.yaml"


def evals(args: list[str], work: Path) -> tuple[float, subprocess.CompletedProcess[str]]:
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "evals", *args], cwd=work, capture_output=True, text=True)
    return time.perf_counter() - start, done


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="random:sd35-large")
    parser.add_argument("--suite", type=Path, default=CORE)
    parser.add_argument(
        "--mutant", default="b0-to-v-scale-x2", help="a checkpoint mutant's name (benchmarks/mutants.py)"
    )
    parser.add_argument(
        "--work", type=Path, help="keep the checkpoints, cache and runs here (default: a temporary folder)"
    )
    args, extra = parser.parse_known_args()
    found = {m[0]: m for m in CHECKPOINT_MUTANTS}
    if args.mutant not in found:
        sys.exit(f"--mutant {args.mutant}: not a checkpoint mutant; one of {', '.join(found)}")
    with tempfile.TemporaryDirectory() as tmp:
        work = (args.work or Path(tmp)).resolve()
        work.mkdir(parents=True, exist_ok=True)
        sound, mutant = work / "fp8-e4m3-rowwise.safetensors", work / f"{args.mutant}.safetensors"
        if not sound.is_file():
            seconds, done = evals(["quantize", "fp8-e4m3-rowwise", "--model", args.model, "--out", str(sound)], work)
            if done.returncode:
                sys.exit(f"evals quantize failed:\n{done.stderr[-3000:]}")
            print(f"quantized in {seconds:.1f} s")
        name, layer, kind, _, _ = found[args.mutant]
        tensors, metadata = read_checkpoint(sound)
        _write_checkpoint(tensors, metadata, name, layer, kind, mutant)
        del tensors
        run = ["run", str(args.suite.resolve()), "--model", args.model, "--fail-fast", "--no-progress"]
        run += ["--candidate-checkpoint", f"{name}={mutant}", "--cache-dir", str(work / "cache")]
        run += ["--runs-dir", str(work / "runs"), *extra]
        rows = []
        for which in ("first (empty cache)", "second (reference cached)"):
            seconds, done = evals(run, work)
            if done.returncode not in (0, 1):
                sys.exit(f"evals run failed ({done.returncode}):\n{done.stderr[-3000:]}")
            run_dir = max((work / "runs").iterdir(), key=lambda p: p.stat().st_mtime)
            notes = json.loads((run_dir / "notes.json").read_text()) if (run_dir / "notes.json").is_file() else []
            timings = json.loads((run_dir / "timings.json").read_text())
            rows.append((which, seconds, done.returncode, notes, timings))
    print(f"{args.suite.name}, mutant {name} ({kind} in {layer}), model {args.model}, evals run {' '.join(extra)}")
    print("| run | wall s | exit | startup s | stopped |")
    print("|---|---|---|---|---|")
    for which, seconds, code, notes, timings in rows:
        stop = next((n for n in notes if "stopped" in n), "not stopped")
        print(f"| {which} | {seconds:.1f} | {code} | {timings.get('startup', 0):.1f} | {stop} |")
    print("timings of the second run:", json.dumps(rows[-1][4]))


if __name__ == "__main__":
    main()
