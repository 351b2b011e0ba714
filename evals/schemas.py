"""`evals schema suite|policy`: the JSON Schema of suite and policy files, generated from the typed
models that validate them (`evals.suite_schema`, `evals.models.policy_schema`), so that editors with
a YAML language server complete and check keys. The shipped files name the committed copies beside
them (`evals/suites/suite.schema.json`, `evals/models/policies/policy.schema.json`) in their first line:
`# yaml-language-server: $schema=suite.schema.json`."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

DIALECT = "https://json-schema.org/draft/2020-12/schema"
KINDS = ("suite", "policy")


def committed_schema(kind: str) -> Path:
    """Where the shipped suites or policies find their schema: beside them."""
    if kind == "suite":
        from evals.suite import SHIPPED_SUITES

        return SHIPPED_SUITES / "suite.schema.json"
    from evals.models.precision import POLICY_DIR

    return POLICY_DIR / "policy.schema.json"


def json_schema(kind: str) -> dict[str, Any]:
    if kind == "suite":
        from evals.suite_schema import SuiteFile as model
    else:
        from evals.models.policy_schema import PolicyFile as model  # type: ignore[assignment]
    return {"$schema": DIALECT, **model.model_json_schema(), "title": f"evals {kind} file"}


def schema_text(kind: str) -> str:
    return json.dumps(json_schema(kind), indent=2) + "\n"


def cmd_schema(args: argparse.Namespace) -> int:
    from evals.rundir import write_atomic

    text = schema_text(args.kind)
    if args.out is None:
        sys.stdout.write(text)
    else:
        write_atomic(args.out, text)
        print(f"wrote {args.out}")
    return 0


def add_schema_command(sub: Any) -> None:
    schema = sub.add_parser(
        "schema", help="the JSON Schema of suite or policy files, for editors (YAML language server)"
    )
    schema.add_argument("kind", choices=KINDS)
    schema.add_argument("--out", type=Path, help="write it to this file (default: print it)")
    schema.set_defaults(func=cmd_schema)
