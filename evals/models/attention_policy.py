"""A policy's `components.transformer.attention`: which precision each block's attention product runs
in (`evals.models.attention`), decided by ordered fnmatch rules on the attention modules' names like
the linear layers' rules. Imports no torch, so `evals validate` can parse policies without it."""

from __future__ import annotations

from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Any

from evals.models import policy_schema as schema
from evals.models.yamlspec import Errors, InputError, YamlDoc


@dataclass(frozen=True)
class AttentionRule:
    match: str
    precision: str
    line: int | None


@dataclass(frozen=True)
class AttentionPolicy:
    default: str = "bf16"
    rules: tuple[AttentionRule, ...] = ()

    @property
    def changes_anything(self) -> bool:
        return self.default != "bf16" or any(rule.precision != "bf16" for rule in self.rules)


@dataclass(frozen=True)
class AttentionPlan:
    name: str
    """The attention module's qualified name in the transformer (`transformer_blocks.3.attn`)."""
    precision: str
    """bf16, fp8 or int8."""
    rule: str
    """What decided: `rule N (pattern)` or `default`."""


def parse_attention(doc: YamlDoc, given: schema.Attention, path: tuple[Any, ...]) -> AttentionPolicy:
    rules = tuple(
        AttentionRule(rule.match, rule.precision, doc.line(path + ("rules", i))) for i, rule in enumerate(given.rules)
    )
    return AttentionPolicy(given.default, rules)


def resolve_attention(policy: AttentionPolicy, transformer: Any, source: str) -> list[AttentionPlan]:
    """Decide every attention module of `transformer`; a rule that matches none is an error (a typo)."""
    from evals.models.attention import attention_modules

    names = [name for name, _ in attention_modules(transformer)]
    errors = Errors()
    for i, rule in enumerate(policy.rules):
        if not any(fnmatchcase(name, rule.match) for name in names):
            example = f" (they look like {names[0]!r})" if names else ""
            errors.found.append(
                InputError(
                    f"components.transformer.attention.rules[{i}]: pattern {rule.match!r} matches no attention "
                    f"module{example}",
                    source=source,
                    line=rule.line,
                )
            )
    errors.raise_any()
    plan = []
    for name in names:
        decided = AttentionPlan(name, policy.default, "default")
        for i, rule in enumerate(policy.rules):
            if fnmatchcase(name, rule.match):
                decided = AttentionPlan(name, rule.precision, f"rule {i} ({rule.match})")
                break
        plan.append(decided)
    return plan


def attention_summary(plan: list[AttentionPlan]) -> str:
    """e.g. `int8:24` or `bf16:2,int8:22`."""
    counts: dict[str, int] = {}
    for entry in plan:
        counts[entry.precision] = counts.get(entry.precision, 0) + 1
    return ",".join(f"{p}:{n}" for p, n in sorted(counts.items())) or "none"
