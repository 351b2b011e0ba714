"""What a run asks of its tracker (`Tracker`), and the tracker of a run without MLflow."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol


class Tracker(Protocol):
    def start_run(
        self,
        experiment: str,
        run_name: str,
        params: dict[str, Any],
        tags: dict[str, str],
        state_file: Path | None = None,
    ) -> None: ...
    def start_candidate(self, policy: str, params: dict[str, Any]) -> None: ...
    def log_earlier_images(self, images: list[tuple[str, str, Path, Path]]) -> None: ...
    def log_reference_image(self, sample_id: str, path: Path) -> None: ...
    def log_candidate_image(self, policy: str, sample_id: str, path: Path, reference: Path) -> None: ...
    def finish_candidate(
        self,
        policy: str,
        metrics: dict[str, float],
        table: dict[str, list[Any]],
        artifacts: list[Path],
        tags: dict[str, str],
    ) -> None: ...
    def finish_run(
        self,
        artifacts: list[Path],
        tags: dict[str, str],
        failed: bool,
        metrics: dict[str, float] | None = None,
        name: str | None = None,
    ) -> None: ...
    def interrupted(self) -> None: ...
    def baselines(self, experiment: str, policies: list[str]) -> dict[str, dict[str, float]] | None: ...


class NullTracker:
    """Tracks nothing (`--no-mlflow`)."""

    def start_run(
        self,
        experiment: str,
        run_name: str,
        params: dict[str, Any],
        tags: dict[str, str],
        state_file: Path | None = None,
    ) -> None:
        pass

    def start_candidate(self, policy: str, params: dict[str, Any]) -> None:
        pass

    def log_earlier_images(self, images: list[tuple[str, str, Path, Path]]) -> None:
        pass

    def log_reference_image(self, sample_id: str, path: Path) -> None:
        pass

    def log_candidate_image(self, policy: str, sample_id: str, path: Path, reference: Path) -> None:
        pass

    def finish_candidate(
        self,
        policy: str,
        metrics: dict[str, float],
        table: dict[str, list[Any]],
        artifacts: list[Path],
        tags: dict[str, str],
    ) -> None:
        pass

    def finish_run(
        self,
        artifacts: list[Path],
        tags: dict[str, str],
        failed: bool,
        metrics: dict[str, float] | None = None,
        name: str | None = None,
    ) -> None:
        pass

    def interrupted(self) -> None:
        pass

    def baselines(self, experiment: str, policies: list[str]) -> dict[str, dict[str, float]] | None:
        return None
