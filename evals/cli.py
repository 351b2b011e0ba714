"""`evals ...` subcommands. Exit codes: 0 gates passed, 1 a gate failed, 2 bad input, 3 the run broke."""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from pathlib import Path

from evals import cli_tools
from evals.api import RunRequest
from evals.gates import EXIT_BAD_INPUT, EXIT_CRASHED
from evals.models.yamlspec import InputError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="evals", description="Quality gate for FP8 Stable Diffusion 3.5 builds.")
    loudness = parser.add_mutually_exclusive_group()
    loudness.add_argument("-v", "--verbose", action="store_true", help="debug messages too")
    loudness.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only, no progress lines")
    sub = parser.add_subparsers(dest="command", required=True)
    device = argparse.ArgumentParser(add_help=False)
    device.add_argument("--device", default="auto", help="auto (cuda if present), cpu, cuda, cuda:N")

    run = sub.add_parser(
        "run", parents=[device], help="run a suite: reference vs FP8 candidates, metrics, gates, MLflow"
    )
    run.set_defaults(func=cmd_run)
    run.add_argument("suite", type=Path, nargs="?", help="suite YAML file, e.g. suites/smoke.yaml")
    run.add_argument("--resume", type=Path, metavar="RUN_DIR", help="finish an interrupted run, keeping its samples")
    run.add_argument(
        "--policy",
        action="append",
        default=[],
        metavar="POLICY",
        help="candidate policy: a shipped name (fp8-e4m3-rowwise) or a YAML path; repeat for several "
        "(default: the suite's `policies`)",
    )
    run.add_argument(
        "--candidate-checkpoint",
        action="append",
        default=[],
        metavar="[NAME=]FILE",
        help="a quantized build (.safetensors written by `evals quantize`, with every component it changed; or "
        "a ComfyUI FP8 file: a transformer, all-in-one with its text encoders, or T5) to evaluate as it is, "
        "named NAME (default: the policy its metadata names); repeatable, combinable "
        "with --policy",
    )
    run.add_argument(
        "--baseline",
        metavar="POLICY",
        help="compare every candidate's baseline gates with POLICY's baseline (default: each candidate its own "
        "policy's; a checkpoint, the policy it was made from)",
    )
    _model_args(run)
    run.add_argument(
        "--reference-dtype",
        choices=("auto", "float32", "bfloat16", "float16"),
        help="reference precision (default: the suite's, else auto)",
    )
    run.add_argument("--runs-dir", type=Path, default=Path("runs"), help="where run directories go (default: runs/)")
    run.add_argument(
        "--cache-dir", type=Path, help="reference cache (default: $EVALS_CACHE_DIR or ~/.cache/sd35-fp8-gate)"
    )
    run.add_argument("--no-cache", action="store_true", help="always generate reference images")
    run.add_argument("--no-mlflow", action="store_true", help="do not log to MLflow")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")
    run.add_argument(
        "--fail-fast",
        action="store_true",
        help="stop generating a candidate once a gate of it has failed for good (a count over its limit, a min "
        "below its floor, a sample past its baseline drop, a step-error gate after screening): the same verdict, "
        "sooner",
    )
    run.add_argument(
        "--no-cuda-graph",
        action="store_true",
        help="on a GPU, launch the transformers' kernels one by one instead of replaying each step from a CUDA graph",
    )
    run.add_argument(
        "--compile",
        choices=("auto", "none", "blocks"),
        help="compile the candidates' transformer blocks for generation; auto: on a GPU "
        "(default: the suite's `compile`, else auto)",
    )
    _weights_arg(run)

    policy = sub.add_parser("policy", help="precision policy tools").add_subparsers(
        dest="policy_command", required=True
    )
    explain = policy.add_parser("explain", help="what a policy does to every linear layer, and the memory it saves")
    explain.set_defaults(func=cmd_policy_explain)
    explain.add_argument("policy", help="shipped policy name or YAML path")
    _model_args(explain, default="tiny")
    explain.add_argument(
        "--dtype",
        default="bfloat16",
        choices=("float32", "bfloat16", "float16"),
        help="reference dtype the sizes are counted in (default bfloat16)",
    )
    explain.add_argument("--device", default="auto", help="device whose FP8 kernels decide the backend")
    explain.add_argument("--json", action="store_true", help="machine-readable output")

    search = policy.add_parser(
        "search", parents=[device], help="find the policy with the most FP8 layers that passes a suite's gates"
    )
    search.set_defaults(func=cmd_policy_search)
    search.add_argument("suite", type=Path, help="suite YAML whose gates the policy must pass")
    search.add_argument("--start", default="fp8-all-linears", help="policy to start from (default fp8-all-linears)")
    search.add_argument("--out", type=Path, required=True, help="where to write the found policy YAML")
    _sweep_args(search)

    sens = sub.add_parser(
        "sensitivity", parents=[device], help="metric change per group of layers, quantized alone and kept alone"
    )
    sens.set_defaults(func=cmd_sensitivity)
    sens.add_argument("suite", type=Path, help="suite YAML")
    sens.add_argument(
        "--policy", default="fp8-all-linears", help="policy whose layers are swept (default fp8-all-linears)"
    )
    _sweep_args(sens)

    quantize = sub.add_parser(
        "quantize", parents=[device], help="apply a policy and save the quantized transformer as safetensors"
    )
    quantize.set_defaults(func=cli_tools.cmd_quantize)
    quantize.add_argument("policy", help="shipped policy name or YAML path")
    quantize.add_argument("--out", type=Path, required=True, help="output .safetensors file")
    quantize.add_argument(
        "--suite", type=Path, help="suite whose generation settings drive calibration (static policies)"
    )
    _model_args(quantize, default="tiny")
    quantize.add_argument("--reference-dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"))

    detect = sub.add_parser("detect", help="run every failure detector on image files")
    detect.set_defaults(func=cli_tools.cmd_detect)
    detect.add_argument("images", nargs="+", type=Path, help="PNG/JPEG files")
    detect.add_argument("--json", action="store_true", help="machine-readable output")

    compare = sub.add_parser("compare-images", help="PSNR and SSIM of a candidate image against a reference")
    compare.set_defaults(func=cli_tools.cmd_compare_images)
    compare.add_argument("reference", type=Path)
    compare.add_argument("candidate", type=Path)
    compare.add_argument("--prompt", help="the prompt, for CLIP score")
    _weights_arg(compare)
    compare.add_argument("--json", action="store_true", help="machine-readable output")

    doctor = sub.add_parser("doctor", help="device, FP8 capability, metric weights present, MLflow store")
    doctor.set_defaults(func=cli_tools.cmd_doctor)
    _weights_arg(doctor)
    doctor.add_argument("--json", action="store_true", help="machine-readable output")
    sub.add_parser(
        "fetch-weights", help="download LPIPS trunks and CLIP weights into the standard caches (needs network)"
    ).set_defaults(func=cli_tools.cmd_fetch_weights)

    bench = sub.add_parser(
        "bench", parents=[device], help="step latency, memory and compile time of the reference and FP8 candidates"
    )
    bench.set_defaults(func=cli_tools.cmd_bench)
    bench.add_argument(
        "--model",
        required=True,
        help="`tiny`, a diffusers folder, or an architecture folder such as models/configs/sd35-large (random weights)",
    )
    bench.add_argument(
        "--policy", action="append", default=[], metavar="POLICY", help="candidate policy (default fp8-e4m3-rowwise)"
    )
    bench.add_argument("--resolution", type=int, default=1024, help="image side in pixels (default 1024)")
    bench.add_argument("--batch", type=int, default=2, help="batch the transformer sees per step (default 2)")
    bench.add_argument("--steps", type=int, default=28, help="denoising steps of the whole-pipeline timing")
    bench.add_argument("--warmup", type=int, default=3, help="untimed calls after the first (default 3)")
    bench.add_argument("--iters", type=int, default=10, help="timed transformer steps (default 10)")
    bench.add_argument("--compile", default="blocks", choices=("blocks", "none"), help="compile each block, or eager")
    bench.add_argument(
        "--cuda-graph", action="store_true", help="time each step as the replay of a CUDA graph (GPU; no launch gaps)"
    )
    bench.add_argument("--reference-dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"))
    bench.add_argument("--runs-dir", type=Path, default=Path("runs"), help="where the bench directory goes")
    bench.add_argument("--json", type=Path, help="also write the results to this JSON file")
    bench.add_argument("--no-mlflow", action="store_true", help="do not log to MLflow")

    log = sub.add_parser(
        "log", help="log a finished run directory to MLflow (when MLflow was unreachable during the run)"
    )
    log.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="e.g. runs/20261125T101500Z-smoke")
    log.add_argument("--force", action="store_true", help="log it even if it is already in MLflow")
    log.set_defaults(func=cmd_log)

    from evals.cli_review import add_review_commands

    add_review_commands(sub)
    from evals.review.cli import add_review_command

    add_review_command(sub)
    from evals.cli_baseline import add_baseline_commands
    from evals.cli_locate import add_locate_command

    add_locate_command(sub)

    add_baseline_commands(sub)
    from evals.cli_gates import add_gates_commands

    add_gates_commands(sub)
    from evals.cli_validate import add_validate_command

    add_validate_command(sub)
    from evals.schemas import add_schema_command

    add_schema_command(sub)
    from evals.cli_monitor import add_monitor_command

    add_monitor_command(sub)
    return parser


def _sweep_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--groups",
        default="block",
        choices=("block", "type", "module"),
        help="group layers by transformer block, by layer type across blocks, or one by one",
    )
    parser.add_argument("--metric", default="psnr", help="metric output ranked on (default psnr)")
    _model_args(parser)
    parser.add_argument("--runs-dir", type=Path, default=Path("runs"), help="where run directories go")
    parser.add_argument("--cache-dir", type=Path, help="reference cache")
    parser.add_argument("--no-mlflow", action="store_true", help="do not log to MLflow")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def _sweep_request(args: argparse.Namespace) -> RunRequest:
    from evals.api import RunRequest

    return RunRequest(
        suite=args.suite,
        model=args.model,
        model_config=args.model_config,
        no_t5=args.no_t5,
        device=args.device,
        runs_dir=args.runs_dir,
        cache_dir=args.cache_dir,
        mlflow=not args.no_mlflow,
        progress=not args.no_progress,
    )


def cmd_sensitivity(args: argparse.Namespace) -> int:
    from evals.policy_search import run_sensitivity

    return run_sensitivity(_sweep_request(args), args.policy, args.groups, args.metric)


def cmd_policy_search(args: argparse.Namespace) -> int:
    from evals.policy_search import run_search

    return run_search(_sweep_request(args), args.start, args.groups, args.metric, args.out)


def cmd_policy_explain(args: argparse.Namespace) -> int:
    return cli_tools.cmd_policy_explain(args)


def _weights_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--weights",
        action="append",
        default=[],
        type=_name_path,
        metavar="METRIC=FILE",
        help="weights file of a metric (lpips: a torchvision trunk .pth/.safetensors; clip_score: "
        "open_clip .safetensors); repeatable",
    )


def _name_path(text: str) -> tuple[str, str]:
    name, sep, path = text.partition("=")
    if not sep or name not in ("lpips", "clip_score") or not path:
        raise argparse.ArgumentTypeError(f"expected lpips=FILE or clip_score=FILE, got {text!r}")
    return name, path


def _model_args(parser: argparse.ArgumentParser, default: str | None = None) -> None:
    parser.add_argument(
        "--model",
        default=default,
        help="model source: `tiny`, a local diffusers SD3/SD3.5 folder, a Hub repo id already in the HF cache, "
        "or a single .safetensors transformer with --model-config" + ("" if default else " (default: the suite's)"),
    )
    parser.add_argument("--model-config", help="local diffusers SD3 folder for a single-file --model")
    parser.add_argument("--no-t5", action="store_true", help="load the model without its T5 text encoder")


def cmd_run(args: argparse.Namespace) -> int:
    from evals.api import CheckpointArg, RunRequest, run_suite_file
    from evals.reports.render import gate_table_text

    if (args.suite is None) == (args.resume is None):
        raise InputError("evals run: give a SUITE, or --resume RUN_DIR (not both)")

    request = RunRequest(
        suite=args.suite,
        model=args.model,
        model_config=args.model_config,
        no_t5=args.no_t5,
        policies=args.policy,
        candidate_checkpoints=[CheckpointArg.parse(text) for text in args.candidate_checkpoint],
        baseline=args.baseline,
        fail_fast=args.fail_fast,
        cuda_graphs=not args.no_cuda_graph,
        device=args.device,
        reference_dtype=args.reference_dtype,
        runs_dir=args.runs_dir,
        cache_dir=args.cache_dir,
        use_cache=not args.no_cache,
        mlflow=not args.no_mlflow,
        progress=not args.no_progress,
        weights=dict(args.weights),
        compile=args.compile,
    )
    if args.resume is not None:
        from evals.resume import resume_run

        outcome, suite, tracking_uri = resume_run(args.resume, request)
    else:
        outcome, suite, tracking_uri = run_suite_file(request)
    from evals.distributed import from_environment

    if not from_environment().main:  # rank 0 reports; under torchrun the others only share its exit code
        return int(outcome.verdict.exit_code)
    print(gate_table_text(outcome.run_dir))
    print(
        f"reference images generated: {outcome.reference_generated} "
        f"({outcome.reference_cached} reused), candidate images: {outcome.candidate_generated}"
    )
    timings = outcome.run_dir / "timings.json"
    if timings.is_file():
        import json

        print(timings_line(json.loads(timings.read_text())))
    if tracking_uri is not None:
        from evals.cli_review import review_command

        print(f"MLflow: experiment {suite.name!r} at {tracking_uri}; review it with `{review_command()}`")
    exit_code: int = outcome.verdict.exit_code
    return exit_code


OVERLAPPED = ("metrics", "detectors", "writing")  # the scoring worker's parts, run beside generation


def timings_line(parts: dict[str, float]) -> str:
    """Where the run's time went, the scoring worker's parts apart: they overlap generation, and
    only `waiting` (generation done, the worker not yet) adds to the wall time."""
    first = ("startup", "generation", "waiting", "finishing")
    order = [k for k in first if k in parts] + [k for k in parts if k not in first and k not in OVERLAPPED]

    def part(key: str) -> str:  # a part with its steps (`startup.model`, ...) in brackets
        steps = [f"{k.split('.', 1)[1]} {parts[k]:.1f}" for k in parts if k.startswith(key + ".")]
        return f"{key} {parts[key]:.1f} s" + (f" ({', '.join(steps)})" if steps else "")

    main = ", ".join(part(k) for k in order if "." not in k)
    worker = ", ".join(f"{k} {parts[k]:.1f} s" for k in OVERLAPPED if k in parts)
    return f"time: {main}" + (f"; beside generation: {worker}" if worker else "")


def cmd_log(args: argparse.Namespace) -> int:
    from evals.publish import log_run_dir

    uri, run_id = log_run_dir(args.run_dir, force=args.force)
    print(f"logged {args.run_dir} to {uri} as run {run_id}")
    return 0


def _exit_on_sigterm() -> None:
    """SIGTERM (a CI job cancelled, `kill`) unwinds like Ctrl-C: finished samples stay written, the
    MLflow runs end KILLED, child processes are stopped."""
    import signal
    import threading

    def terminate(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, terminate)


def main(argv: list[str] | None = None) -> int:
    # Weights are local: no Hugging Face call may wait on a network that is not there.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args = _parser().parse_args(argv)
    from evals.logs import setup_cli_logging

    setup_cli_logging(1 if args.verbose else -1 if args.quiet else 0)
    _exit_on_sigterm()
    try:
        code: int = args.func(args)
        return code
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception:  # noqa: BLE001 - report, keep the distinct exit code
        traceback.print_exc()
        return EXIT_CRASHED


def command() -> int:
    """The `evals` command: `main`, then a quick exit. Freezing the heap skips the interpreter's last
    garbage collection over every object torch, diffusers and MLflow created (2 s on a small CPU);
    files are flushed and atexit handlers run as usual."""
    import gc

    code = main()
    gc.freeze()
    return code


if __name__ == "__main__":
    sys.exit(command())
