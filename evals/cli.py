"""`evals ...` subcommands. Exit codes: 0 gates passed, 1 a gate failed, 2 bad input, 3 the run broke."""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from pathlib import Path
from typing import Any

from evals.gates import EXIT_BAD_INPUT
from evals.yamlspec import InputError

EXIT_CRASHED = 3


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="evals", description="Quality gate for FP8 Stable Diffusion 3.5 builds.")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run a suite: reference vs FP8 candidates, metrics, gates, MLflow")
    run.add_argument("suite", type=Path, help="suite YAML file, e.g. suites/smoke.yaml")
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
        type=Path,
        metavar="FILE",
        help="a quantized transformer (.safetensors written by `evals quantize`, or a ComfyUI scaled-FP8 file) "
        "to evaluate as it is; repeatable, combinable with --policy",
    )
    _model_args(run)
    run.add_argument("--device", default="auto", help="auto (cuda if present), cpu, cuda, cuda:N")
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
    _weights_arg(run)

    policy = sub.add_parser("policy", help="precision policy tools").add_subparsers(
        dest="policy_command", required=True
    )
    explain = policy.add_parser("explain", help="what a policy does to every linear layer, and the memory it saves")
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

    search = policy.add_parser("search", help="find the policy with the most FP8 layers that passes a suite's gates")
    search.add_argument("suite", type=Path, help="suite YAML whose gates the policy must pass")
    search.add_argument("--start", default="fp8-all-linears", help="policy to start from (default fp8-all-linears)")
    search.add_argument("--out", type=Path, required=True, help="where to write the found policy YAML")
    _sweep_args(search)

    sens = sub.add_parser("sensitivity", help="metric change per group of layers, quantized alone and kept alone")
    sens.add_argument("suite", type=Path, help="suite YAML")
    sens.add_argument(
        "--policy", default="fp8-all-linears", help="policy whose layers are swept (default fp8-all-linears)"
    )
    _sweep_args(sens)

    quantize = sub.add_parser("quantize", help="apply a policy and save the quantized transformer as safetensors")
    quantize.add_argument("policy", help="shipped policy name or YAML path")
    quantize.add_argument("--out", type=Path, required=True, help="output .safetensors file")
    quantize.add_argument(
        "--suite", type=Path, help="suite whose generation settings drive calibration (static policies)"
    )
    _model_args(quantize, default="tiny")
    quantize.add_argument("--device", default="auto", help="auto (cuda if present), cpu, cuda, cuda:N")
    quantize.add_argument("--reference-dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"))

    detect = sub.add_parser("detect", help="run every failure detector on image files")
    detect.add_argument("images", nargs="+", type=Path, help="PNG/JPEG files")
    detect.add_argument("--json", action="store_true", help="machine-readable output")

    compare = sub.add_parser("compare-images", help="PSNR and SSIM of a candidate image against a reference")
    compare.add_argument("reference", type=Path)
    compare.add_argument("candidate", type=Path)
    compare.add_argument("--prompt", help="the prompt, for CLIP score")
    _weights_arg(compare)
    compare.add_argument("--json", action="store_true", help="machine-readable output")

    doctor = sub.add_parser("doctor", help="device, FP8 capability, metric weights present, MLflow store")
    _weights_arg(doctor)
    doctor.add_argument("--json", action="store_true", help="machine-readable output")
    sub.add_parser(
        "fetch-weights", help="download LPIPS trunks and CLIP weights into the standard caches (needs network)"
    )

    validate = sub.add_parser("validate", help="check suites and policies without running anything")
    validate.add_argument("files", nargs="+", type=Path, help="suite or policy YAML files")
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
    parser.add_argument("--device", default="auto", help="auto (cuda if present), cpu, cuda, cuda:N")
    parser.add_argument("--runs-dir", type=Path, default=Path("runs"), help="where run directories go")
    parser.add_argument("--cache-dir", type=Path, help="reference cache")
    parser.add_argument("--no-mlflow", action="store_true", help="do not log to MLflow")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def _sweep_request(args: argparse.Namespace) -> Any:
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


def cmd_policy(args: argparse.Namespace) -> int:
    if args.policy_command == "search":
        from evals.policy_search import run_search

        return run_search(_sweep_request(args), args.start, args.groups, args.metric, args.out)
    return cmd_policy_explain(args)


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


def _resolve_device(name: str) -> str:
    from evals.api import resolve_device

    return resolve_device(name)


def cmd_run(args: argparse.Namespace) -> int:
    from evals.api import RunRequest, run_suite_file
    from reports.render import gate_table_text

    request = RunRequest(
        suite=args.suite,
        model=args.model,
        model_config=args.model_config,
        no_t5=args.no_t5,
        policies=args.policy,
        candidate_checkpoints=args.candidate_checkpoint,
        device=args.device,
        reference_dtype=args.reference_dtype,
        runs_dir=args.runs_dir,
        cache_dir=args.cache_dir,
        use_cache=not args.no_cache,
        mlflow=not args.no_mlflow,
        progress=not args.no_progress,
        weights=dict(args.weights),
    )
    outcome, suite, tracking_uri = run_suite_file(request)
    print(gate_table_text(outcome.run_dir))
    total = len(suite.samples())
    print(
        f"reference images generated: {outcome.reference_generated} "
        f"({total - outcome.reference_generated} from the cache), candidate images: {outcome.candidate_generated}"
    )
    if tracking_uri is not None:
        print(f"MLflow: experiment {suite.name!r} at {tracking_uri} (`mlflow ui` to browse)")
    exit_code: int = outcome.verdict.exit_code
    return exit_code


def cmd_policy_explain(args: argparse.Namespace) -> int:
    import json

    import torch

    from models.precision import load_policy, plan_totals, resolve_plan
    from models.sources import load_transformer_skeleton
    from reports.render import text_table

    policy = load_policy(args.policy)
    device = _resolve_device(args.device)
    transformer = load_transformer_skeleton(args.model, args.dtype, config=args.model_config)
    plan = resolve_plan(policy, {"transformer": transformer}, device=torch.device(device))
    module_bytes = sum(p.numel() * p.element_size() for p in transformer.parameters())
    totals = plan_totals(plan, module_bytes)
    if args.json:
        out = {
            "policy": policy.name,
            "policy_sha256": policy.sha256,
            "model": args.model,
            "dtype": args.dtype,
            "device": device,
            "layers": [layer.to_dict() for layer in plan],
            "totals": totals,
        }
        print(json.dumps(out, indent=2))
        return 0
    rows = []
    for layer in plan:
        spec = layer.spec
        weights = (
            "-" if spec is None else spec.weights + (f"({spec.block_size})" if spec.weights == "per_block" else "")
        )
        rows.append(
            [
                layer.name,
                f"{layer.shape[0]}x{layer.shape[1]}",
                "keep" if spec is None else "fp8",
                "-" if spec is None else spec.format,
                weights,
                "-" if spec is None else spec.activations,
                layer.backend,
                f"{layer.bytes_before:,}",
                f"{layer.bytes_after:,}",
            ]
        )
    header = [
        "layer",
        "shape",
        "precision",
        "format",
        "weights",
        "activations",
        "backend",
        "bytes before",
        "bytes after",
    ]
    print(text_table(rows, header))
    print(
        f"\n{policy.name} on {args.model} ({args.dtype}, backends for {device}): "
        f"{totals['fp8_layers']}/{totals['linear_layers']} linear layers in FP8, "
        f"{totals['fp8_param_share']:.1%} of linear parameters; transformer "
        f"{_human_bytes(totals['bytes_before'])} -> {_human_bytes(totals['bytes_after'])} "
        f"(saves {totals['saved_share']:.1%})"
    )
    return 0


def _human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    raise AssertionError("unreachable")


def cmd_quantize(args: argparse.Namespace) -> int:
    from evals.runner import build_candidate
    from evals.suite import Generation, load_suite
    from models.checkpoints import save_quantized_transformer
    from models.precision import load_policy
    from models.sources import load_source, resolved_dtype_name

    policy = load_policy(args.policy)
    if args.out.suffix != ".safetensors":
        raise InputError(f"--out {args.out}: expected a .safetensors file name")
    if policy.needs_calibration and args.suite is None:
        raise InputError(
            f"{policy.path}: static activations are calibrated at a suite's generation settings; pass --suite"
        )
    # Without static layers the generation settings are never used.
    generation = load_suite(args.suite).generation if args.suite else Generation(64, 64, 1, 0.0, 1)
    device = _resolve_device(args.device)
    dtype = resolved_dtype_name(args.reference_dtype, device)
    model = load_source(args.model, dtype, device, config=args.model_config, drop_t5=args.no_t5)
    candidate = build_candidate(model, policy, generation)
    save_quantized_transformer(
        candidate.pipeline.transformer, args.out, policy_name=policy.name, policy_sha256=policy.sha256
    )
    print(f"wrote {args.out} ({args.out.stat().st_size:,} bytes; layers {candidate.backends})")
    return 0


def _read_image(path: Path) -> Any:
    import numpy as np
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            return np.asarray(image.convert("RGB"), dtype=np.float64) / 255
    except (OSError, UnidentifiedImageError) as exc:
        raise InputError(f"{path}: not a readable image ({exc})") from exc


def cmd_detect(args: argparse.Namespace) -> int:
    import json

    from evals.detectors import DETECTORS, run_detectors

    images = {path: _read_image(path) for path in args.images}  # every file is checked before any work
    results = {
        str(p): {n: f.to_dict() for n, f in run_detectors(img, list(DETECTORS)).items()} for p, img in images.items()
    }
    if args.json:
        print(json.dumps(results, indent=2, default=bool))
        return 0
    for path, findings in results.items():
        flagged = [n for n, f in findings.items() if f["flagged"]]
        print(f"{path}: {'FLAGGED ' + ', '.join(flagged) if flagged else 'clean'}")
        for name, finding in findings.items():
            print(f"  {'!' if finding['flagged'] else ' '} {name:13} {finding['reason']}")
    return 0


def cmd_compare_images(args: argparse.Namespace) -> int:
    import json

    import torch

    from evals.metrics import METRICS, load_metric
    from evals.weights import MissingWeights

    ref, cand = _read_image(args.reference), _read_image(args.candidate)
    if ref.shape != cand.shape:
        raise InputError(
            f"{args.candidate}: size {cand.shape[1]}x{cand.shape[0]} differs from the reference's "
            f"{ref.shape[1]}x{ref.shape[0]}"
        )
    as_batch = lambda a: torch.from_numpy(a).permute(2, 0, 1)[None].float()  # noqa: E731
    scores: dict[str, Any] = {}
    for name in METRICS:
        try:
            values = load_metric(name, weights=dict(args.weights))(as_batch(cand), as_batch(ref), [args.prompt or ""])
        except MissingWeights as exc:
            scores[name] = f"unavailable: {exc}"
            continue
        scores.update({k: float(v[0]) for k, v in values.items() if args.prompt or not k.startswith("clip")})
    if args.json:
        print(json.dumps({"reference": str(args.reference), "candidate": str(args.candidate), **scores}))
    else:
        for name, value in scores.items():
            print(f"{name:16} {value:.4f}" if isinstance(value, float) else f"{name:16} {value}")
    return 0


def cmd_doctor(args: argparse.Namespace) -> int:
    import json

    import torch

    from evals.weights import LPIPS_TRUNKS, MissingWeights, clip_weights, lpips_trunk
    from models.fp8 import FORMATS, scaled_mm_runs

    report: dict[str, Any] = {"torch": torch.__version__, "cuda": torch.cuda.is_available()}
    devices = ["cpu"]
    if torch.cuda.is_available():
        index = torch.cuda.current_device()
        major, minor = torch.cuda.get_device_capability(index)
        report["gpu"] = f"{torch.cuda.get_device_name(index)} (compute capability {major}.{minor})"
        devices.append("cuda")
    report["fp8_gemm"] = {
        f"{device}:{fmt}": scaled_mm_runs(device, 0 if device == "cuda" else None, fmt, torch.bfloat16)
        for device in devices
        for fmt in FORMATS
    }
    weights: dict[str, str] = {}
    overrides = dict(args.weights)
    for net in LPIPS_TRUNKS:
        try:
            weights[f"lpips ({net})"] = f"present: {lpips_trunk(net, overrides)}"
        except MissingWeights as exc:
            weights[f"lpips ({net})"] = f"missing: {exc}"
    try:
        weights["clip_score"] = f"present: {clip_weights(overrides)}"
    except MissingWeights as exc:
        weights["clip_score"] = f"missing: {exc}"
    report["weights"] = weights
    import mlflow

    report["mlflow_tracking_uri"] = mlflow.get_tracking_uri()
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"torch {report['torch']}; GPU: {report.get('gpu', 'none')}")
    for key, runs in report["fp8_gemm"].items():
        print(f"  FP8 GEMM (torch._scaled_mm) {key}: {'yes' if runs else 'no (emulated instead)'}")
    for name, state in weights.items():
        print(f"  {name}: {state}")
    print(f"MLflow store: {report['mlflow_tracking_uri']}")
    return 0


def cmd_fetch_weights(args: argparse.Namespace) -> int:
    from evals.weights import fetch_all

    try:
        for path in fetch_all():
            print(f"fetched {path}")
    except OSError as exc:
        print(
            f"error: download failed ({exc}); this needs network access to download.pytorch.org and the Hub",
            file=sys.stderr,
        )
        return EXIT_CRASHED
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    from evals.suite import load_suite
    from evals.yamlspec import load_yaml
    from models.precision import load_policy

    for path in args.files:
        kind = "policy" if "components" in load_yaml(path, "suite or policy").data else "suite"
        if kind == "suite":
            suite = load_suite(path)
            print(
                f"{path}: suite {suite.name!r} ok: {len(suite.cases)} cases, {len(suite.samples())} samples, "
                f"{len(suite.gates)} gates"
            )
        else:
            policy = load_policy(str(path))
            print(f"{path}: policy {policy.name!r} ok: components {', '.join(policy.components)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    # Weights are local: no Hugging Face call may wait on a network that is not there.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args = _parser().parse_args(argv)
    handlers = {
        "run": cmd_run,
        "validate": cmd_validate,
        "quantize": cmd_quantize,
        "policy": cmd_policy,
        "sensitivity": cmd_sensitivity,
        "detect": cmd_detect,
        "doctor": cmd_doctor,
        "fetch-weights": cmd_fetch_weights,
        "compare-images": cmd_compare_images,
    }
    try:
        return handlers[args.command](args)
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception:  # noqa: BLE001 - report, keep the distinct exit code
        traceback.print_exc()
        return EXIT_CRASHED


if __name__ == "__main__":
    sys.exit(main())
