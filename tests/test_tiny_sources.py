from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from evals.generation import generate
from evals.models.sources import load_source
from evals.models.yamlspec import InputError
from evals.suite_types import Case, Generation, Sample
from tests.conftest import REPO

GEN = Generation(height=64, width=64, steps=2, guidance=4.5, batch_size=2)
BATCH = [Sample(Case("a", "a red cube on a table", (0,)), 0), Sample(Case("b", "a dark forest", (3,)), 3)]


def test_tiny_is_deterministic_and_seed_sensitive(tiny_model) -> None:
    first = generate(tiny_model.pipeline, BATCH, GEN)
    again = generate(load_source("tiny", "float32", "cpu").pipeline, BATCH, GEN)
    assert torch.equal(first, again)
    other_seed = [Sample(BATCH[0].case, 1), BATCH[1]]
    assert not torch.equal(first[0], generate(tiny_model.pipeline, other_seed, GEN)[0])
    assert not torch.equal(first, generate(load_source("tiny-random:1", "float32", "cpu").pipeline, BATCH, GEN))
    assert first.shape == (2, 3, 64, 64) and torch.isfinite(first).all()
    assert first.std() > 0.05  # an image, not a constant


def test_tiny_is_identical_across_processes(tiny_model) -> None:
    code = (
        "import os; os.environ['HF_HUB_OFFLINE']='1'\n"
        "import hashlib, torch\n"
        "from evals.generation import generate\n"
        "from evals.models.sources import load_source\n"
        "from tests.test_tiny_sources import BATCH, GEN\n"
        f"torch.set_num_threads({torch.get_num_threads()})\n"
        "img = generate(load_source('tiny', 'float32', 'cpu').pipeline, BATCH, GEN)\n"
        "print(hashlib.sha256(img.numpy().tobytes()).hexdigest())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    import hashlib

    here = hashlib.sha256(generate(tiny_model.pipeline, BATCH, GEN).numpy().tobytes()).hexdigest()
    assert out.stdout.strip().splitlines()[-1] == here


def test_local_folder_round_trip(tmp_path: Path, tiny_model) -> None:
    folder = tmp_path / "sd3"
    tiny_model.pipeline.save_pretrained(folder, safe_serialization=True)
    loaded = load_source(str(folder), "float32", "cpu")
    assert loaded.fingerprint.startswith("folder:")
    assert torch.equal(generate(loaded.pipeline, BATCH, GEN), generate(tiny_model.pipeline, BATCH, GEN))
    assert load_source(str(folder), "float32", "cpu").fingerprint == loaded.fingerprint


def test_missing_or_broken_folders_name_the_file(tmp_path: Path, tiny_model) -> None:
    with pytest.raises(InputError, match=r"model folder not found: .*huggingface-cli download"):
        load_source(str(tmp_path / "nowhere"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(InputError, match=r"missing .*model_index.json"):
        load_source(str(empty))
    folder = tmp_path / "sd3"
    tiny_model.pipeline.save_pretrained(folder, safe_serialization=True)
    for weights in (folder / "transformer").glob("*.safetensors"):
        weights.rename(weights.with_suffix(".bin"))
    with pytest.raises(InputError, match=r"transformer/\*.safetensors .*never pickle"):
        load_source(str(folder))


def test_bad_tiny_seed() -> None:
    with pytest.raises(InputError, match=r"tiny-random\[:SEED\]"):
        load_source("tiny:x")
    with pytest.raises(InputError, match=r"tiny-random\[:SEED\]"):
        load_source("tiny-random:x")


@pytest.mark.parametrize("source", ["random:sd35-huge", "random:sd35-medium:x"])
def test_a_random_architecture_source_is_checked(source: str) -> None:
    from evals.models.sources import load_source
    from evals.models.yamlspec import InputError

    with pytest.raises(InputError, match="expected random:ARCH"):
        load_source(source)
