"""The tool subcommands of `evals`: policy explain, quantize, detect, compare-images, doctor,
fetch-weights. Parsing and dispatch live in `evals.cli`."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path
from typing import Any

from evals.api import resolve_device as _resolve_device
from evals.gates import EXIT_CRASHED
from evals.models.yamlspec import InputError


def cmd_policy_explain(args: argparse.Namespace) -> int:
    import json

    import torch

    from evals.cli_validate import format_family, linear_layers_text
    from evals.models.attention_policy import attention_summary
    from evals.models.precision import load_policy, plan_totals, resolve_plan
    from evals.models.sources import is_tiny, load_source, load_transformer_skeleton
    from evals.reports.render import text_table

    policy = load_policy(args.policy)
    device = _resolve_device(args.device)
    if policy.factory or policy.diffusers_quantization:
        plan, components = _built_plan(policy, args, device)
    else:
        components = {"transformer": load_transformer_skeleton(args.model, args.dtype, config=args.model_config)}
        others = [c for c, part in policy.components.items() if c != "transformer" and (part.default or part.rules)]
        if others and is_tiny(args.model):  # the whole pipeline is small: its text encoders and VAE too
            pipeline = load_source(args.model, args.dtype, "cpu").pipeline
            components.update({c: pipeline.components[c] for c in others if pipeline.components.get(c) is not None})
        unseen = [c for c in others if c not in components]
        if unseen:
            print(f"not shown: {', '.join(unseen)} (only the transformer's architecture is loaded for {args.model})")
        shown = dataclasses.replace(policy, components={k: v for k, v in policy.components.items() if k in components})
        plan = resolve_plan(shown, components, device=torch.device(device))
    attention = _attention_plan(policy, components["transformer"])
    quantized = sorted({layer.component for layer in plan} | {"transformer"})
    module_bytes = sum(p.numel() * p.element_size() for c in quantized for p in components[c].parameters())
    totals = plan_totals(plan, module_bytes)
    if args.json:
        out = {
            "policy": policy.name,
            "policy_sha256": policy.sha256,
            "model": args.model,
            "dtype": args.dtype,
            "device": device,
            "layers": [layer.to_dict() for layer in plan],
            "attention": [dataclasses.asdict(entry) for entry in attention],
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
        built = spec is None and layer.backend != "keep"  # another tool's quantized weight (a built policy)
        rows.append(
            [
                layer.name if layer.component == "transformer" else f"{layer.component}:{layer.name}",
                f"{layer.shape[0]}x{layer.shape[1]}",
                "built" if built else "keep" if spec is None else format_family(spec.format).lower(),
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
    if attention:
        print(f"\nattention products: {attention_summary(attention)}")
        print(text_table([[a.name, a.precision, a.rule] for a in attention], ["attention", "precision", "decided by"]))
    formats = [layer.spec.format for layer in plan if layer.spec is not None]  # totals' fp8_* count int8 too
    built = [layer.backend for layer in plan if layer.spec is None and layer.backend != "keep"]
    quantized_share = totals["fp8_param_share"]
    if built:  # totals count this project's specs; a built layer is quantized when it is not plain
        changed = sum(a * b for layer in plan if layer.backend != "keep" for a, b in [layer.shape])
        quantized_share = changed / max(1, sum(a * b for a, b in (layer.shape for layer in plan)))
    layers_text = (
        f"{len(built)}/{len(plan)} linear layers hold another tool's quantized weights"
        if built
        else linear_layers_text(formats, int(totals["linear_layers"]))
    )
    print(
        f"\n{policy.name} on {args.model} ({args.dtype}, backends for {device}): "
        f"{layers_text}, "
        f"{quantized_share:.1%} of linear parameters quantized; {' + '.join(quantized)} "
        f"{_human_bytes(totals['bytes_before'])} -> {_human_bytes(totals['bytes_after'])} "
        f"(saves {totals['saved_share']:.1%})"
    )
    return 0


def _built_plan(policy: Any, args: argparse.Namespace, device: str) -> tuple[list[Any], dict[str, Any]]:
    """A factory's or a diffusers backend's build, made on the model: the plan its layers show, with
    each layer's bytes before taken from the reference's layer of that name (where it has one)."""
    from evals.candidates import build_candidate
    from evals.models.precision import tensor_bytes
    from evals.models.sources import load_source
    from evals.suite_types import Generation

    model = load_source(args.model, args.dtype, device)
    candidate = build_candidate(model, policy, Generation(64, 64, 1, 4.5, 1))  # no calibration: gen unused
    reference = model.pipeline.transformer
    names = dict(reference.named_modules())

    def before(layer: Any) -> int:
        original = names.get(layer.name)
        return sum(tensor_bytes(p) for p in original.parameters()) if original is not None else layer.bytes_after

    plan = [dataclasses.replace(layer, bytes_before=before(layer)) for layer in candidate.plan]
    return plan, {"transformer": reference}


def _attention_plan(policy: Any, transformer: Any) -> list[Any]:
    """Each attention module's precision, where the policy sets any (else empty: bf16 throughout)."""
    from evals.models.attention_policy import resolve_attention

    transformer_policy = policy.components.get("transformer")
    if transformer_policy is None or transformer_policy.attention is None:
        return []
    return resolve_attention(transformer_policy.attention, transformer, policy.path)


def _human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    raise AssertionError("unreachable")


def cmd_quantize(args: argparse.Namespace) -> int:
    from evals.candidates import build_candidate
    from evals.models.checkpoints import save_policy_build
    from evals.models.fp8_spec import TORCHAO
    from evals.models.precision import load_policy
    from evals.models.sources import load_source, resolved_dtype_name
    from evals.suite import load_suite
    from evals.suite_types import Generation

    policy = load_policy(args.policy)
    check_writable_file(args.out, "--out")
    if policy.factory or policy.diffusers_quantization:
        how = "factory:" if policy.factory else "diffusers_quantization:"
        raise InputError(
            f"{policy.path}: {how} builds the candidate with another tool, which `evals quantize` does not "
            "save; evaluate the policy itself (`evals run --policy ...`)"
        )
    attention = [c for c, part in policy.components.items() if part.attention and part.attention.changes_anything]
    if attention:  # the file would hold the weights but not the attention processors that run them
        raise InputError(
            f"{policy.path}: components.{attention[0]}.attention: `evals quantize` saves weights and does not "
            "save the attention product's precision; evaluate the policy itself (`evals run --policy ...`)"
        )
    if any(spec.backend == TORCHAO for spec in policy.specs()):
        raise InputError(
            f"{policy.path}: backend: torchao layers are torchao's own tensors, which `evals quantize` does not "
            "save; evaluate the policy itself (`evals run --policy ...`)"
        )
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
    foreign = sorted({layer.backend for layer in candidate.plan} - {"keep", "scaled_mm", "emulated", "weight_only"})
    if foreign:  # another tool's tensors (a build not made by this project's engine)
        raise InputError(
            f"{policy.path}: layers run by {', '.join(foreign)}, which `evals quantize` does not save; "
            "evaluate the policy itself (`evals run --policy ...`)"
        )
    try:
        saved = save_policy_build(policy, candidate.pipeline.components, model.pipeline.components, args.out)
    except OSError as exc:  # the disk filled up, the folder went away: nothing is left behind
        raise InputError(f"--out {args.out}: cannot write it ({exc})") from exc
    print(f"wrote {args.out} ({args.out.stat().st_size:,} bytes; {' + '.join(saved)}; layers {candidate.backends})")
    return 0


def check_writable_file(path: Path, option: str, suffix: str | None = ".safetensors") -> None:
    """InputError unless a file can be written at `path` (named `*suffix`): not a folder, and its
    folder one this process may write to or create. Checked before any work, and nothing is created."""
    from evals.rundir import check_writable_dir

    if suffix and path.suffix != suffix:
        raise InputError(f"{option} {path}: expected a {suffix} file name")
    if path.is_dir():
        raise InputError(f"{option} {path}: is a directory, expected a file name")
    check_writable_dir(path.absolute().parent, f"{option} {path}")


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
        print(json.dumps(results, indent=2))
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
    for name in (n for n, info in METRICS.items() if info.scores_images):
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

    from evals.models.fp8 import FORMATS, scaled_mm_runs
    from evals.weights import LPIPS_TRUNKS, MissingWeights, clip_weights, lpips_trunk

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


def cmd_bench(args: argparse.Namespace) -> int:
    import dataclasses
    import json

    from evals.api import resolve_device
    from evals.bench import BenchSetup, ratios, run_bench
    from evals.reports.render import bench_markdown
    from evals.rundir import new_run_dir, write_atomic, write_json

    for key in ("resolution", "batch", "steps", "warmup", "iters"):
        if getattr(args, key) < (0 if key == "warmup" else 1):
            raise InputError(f"--{key} {getattr(args, key)}: expected a positive integer")
    if args.resolution % 16:
        raise InputError(f"--resolution {args.resolution}: expected a multiple of 16 (latents are 1/8, patches 2)")
    setup = BenchSetup(args.resolution, args.batch, args.warmup, args.iters, args.steps, args.compile, args.cuda_graph)
    device = resolve_device(args.device)
    if setup.cuda_graph and not device.startswith("cuda"):
        raise InputError(f"--cuda-graph: CUDA graphs need a CUDA device, not {device}")
    from evals.rundir import check_writable_dir

    check_writable_dir(args.runs_dir, f"--runs-dir {args.runs_dir}")  # before minutes of timing, not after
    if args.json:
        check_writable_file(args.json, "--json", suffix=None)
    results = run_bench(args.model, args.policy or ["fp8-e4m3-rowwise"], setup, device, args.reference_dtype)
    from evals.environment import environment

    report = {
        "model": args.model,
        "setup": dataclasses.asdict(setup),
        "environment": environment(device),
        "results": [dataclasses.asdict(r) for r in results],
        "ratios": ratios(results),
    }
    out_dir = new_run_dir(args.runs_dir, "bench")
    write_json(out_dir / "bench.json", report)
    write_atomic(out_dir / "bench.md", bench_markdown(report))
    if args.json:
        write_atomic(args.json, json.dumps(report, indent=2) + "\n")
    print(bench_markdown(report))
    print(f"written: {out_dir}/bench.json, bench.md")
    if not args.no_mlflow:
        from evals.tracking import log_bench

        uri = log_bench(report, out_dir)
        if uri:
            print(f"MLflow: experiment 'bench' at {uri}")
    return 0
