"""In-house builds as candidates: a policy file whose `factory: module:function` names a Python
function that builds the candidate from the reference pipeline.

    def build(reference: StableDiffusion3Pipeline) -> StableDiffusion3Pipeline | torch.nn.Module

It returns a whole pipeline, or a transformer that replaces the reference's (the other components are
then shared with the reference). It must not change the reference: build on a copy. The module is
looked up beside the policy file first, then on the usual import path. Its source file's hash joins
the policy's, so a resume notices a changed build.
"""

from __future__ import annotations

import hashlib
import importlib
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from evals.models.yamlspec import InputError


def load_factory(factory: str, policy_path: str) -> tuple[Callable[[Any], Any], str]:
    """The function `factory` names, and the sha256 of its module's source (empty when it has none)."""
    module_name, _, function_name = factory.partition(":")
    folder = str(Path(policy_path).resolve().parent)
    added = folder not in sys.path
    if added:
        sys.path.insert(0, folder)
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise InputError(
            f"factory: {factory}: cannot import {module_name!r} ({exc}); it is looked up beside the policy file "
            "and on PYTHONPATH",
            source=policy_path,
        ) from exc
    finally:
        if added:
            sys.path.remove(folder)
    function = getattr(module, function_name, None)
    if not callable(function):
        raise InputError(f"factory: {factory}: {module_name} has no function {function_name!r}", source=policy_path)
    source = getattr(module, "__file__", None)
    digest = hashlib.sha256(Path(source).read_bytes()).hexdigest() if source else ""
    return function, digest


def build_with_factory(factory: str, policy_path: str, reference: Any) -> tuple[dict[str, Any], str]:
    """The candidate's pipeline components built by the factory, and its module's source hash."""
    import torch

    function, digest = load_factory(factory, policy_path)
    built = function(reference)
    transformer: Any
    if isinstance(built, torch.nn.Module):
        transformer = built
        components = dict(reference.components, transformer=built)
    elif hasattr(built, "components") and callable(built):
        components = dict(built.components)
        transformer = components.get("transformer")
    else:
        raise InputError(
            f"factory: {factory} returned {type(built).__name__}; expected a pipeline or a transformer (torch module)",
            source=policy_path,
        )
    if transformer is reference.transformer:
        raise InputError(
            f"factory: {factory} returned the reference's own transformer; build the candidate on a copy "
            "(copy.deepcopy(reference.transformer)), or the reference changes with it",
            source=policy_path,
        )
    return components, digest
