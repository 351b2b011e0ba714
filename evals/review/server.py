"""The local page of a blind A/B review: two images, one the reference's, the other a candidate's.

Nothing the browser gets says which is which: each trial has an opaque id and two image URLs made of
random tokens that map to files only here, and the JSON carries no name, path or side. A vote is
synced to reviews.jsonl before the next trial is answered, so a server killed mid-review loses none.
Bound to 127.0.0.1; requests naming another host (DNS rebinding) and cross-site form posts (not JSON)
are refused. Imports no torch.
"""

from __future__ import annotations

import json
import os
import secrets
import sys
import threading
import time
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from pathlib import Path
from typing import Any

from evals.gate_suggest import NOISE_FLOOR_NAME
from evals.models.names import check_name
from evals.models.yamlspec import InputError, did_you_mean
from evals.review.trials import Trial, next_index, reviewer_seed, trial_order
from evals.review.votes import ANSWERS, MAX_SECONDS, REVIEWS_FILE, Vote, VotesWriter, read_votes

MAX_BODY = 4096
PAGE_HEADERS = {
    # Offline by construction: the page may load nothing but its own inline code and this server's images.
    "Content-Security-Policy": "default-src 'none'; img-src 'self'; style-src 'unsafe-inline'; "
    "script-src 'unsafe-inline'; connect-src 'self'; base-uri 'none'; form-action 'none'",
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-store",
}

Pair = tuple[str, str]
"""(candidate, sample_id)."""


class HttpError(Exception):
    def __init__(self, status: HTTPStatus, message: str):
        super().__init__(message)
        self.status = status


def _run_policies(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "run.json"
    try:
        policies = json.loads(path.read_text(encoding="utf-8"))["policies"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise InputError(f"{path}: not a run's run.json ({exc})") from exc
    if not isinstance(policies, list) or not all(isinstance(p, dict) and "name" in p for p in policies):
        raise InputError(f"{path}: 'policies' is not a list of policies with a name")
    return policies


def _chosen(policies: list[dict[str, Any]], candidates: list[str] | None, run_dir: Path) -> list[str]:
    """The candidates asked for, else every one but the noise floor (the reference under a harmless
    change: its votes say nothing about a candidate)."""
    names = [str(p["name"]) for p in policies]
    if candidates is None:
        return [p["name"] for p in policies if not p.get("noise_floor") and p["name"] != NOISE_FLOOR_NAME]
    for name in candidates:
        if name not in names:
            raise InputError(f"{run_dir}: no candidate {name!r}{did_you_mean(name, names)}")
    return list(dict.fromkeys(candidates))


def _inside(run_dir: Path, relative: str) -> Path | None:
    """The file a record names, if it is a plain file inside the run directory."""
    path = run_dir / relative
    if path.is_symlink() or not path.is_file() or not path.resolve().is_relative_to(run_dir.resolve()):
        return None
    return path


def load_pairs(run_dir: Path, candidates: list[str] | None = None) -> dict[Pair, tuple[Path, Path]]:
    """(candidate, sample_id) -> (candidate's image, reference's image), for the samples that have both."""
    from evals.records import read_records

    if not run_dir.is_dir() or not (run_dir / "records.jsonl").is_file():
        raise InputError(f"{run_dir}: not a run directory (no records.jsonl)")
    chosen = _chosen(_run_policies(run_dir), candidates, run_dir)
    if not chosen:
        raise InputError(f"{run_dir}: no candidate to review but the noise floor (name the candidates to review)")
    pairs: dict[Pair, tuple[Path, Path]] = {}
    for record in read_records(run_dir / "records.jsonl"):
        if record.policy in chosen:
            image, reference = _inside(run_dir, record.image), _inside(run_dir, record.reference_image)
            if image and reference:
                pairs[(record.policy, record.sample_id)] = (image, reference)
    missing = [c for c in chosen if not any(pair[0] == c for pair in pairs)]
    if missing:
        raise InputError(f"{run_dir}: no sample with both images for {', '.join(missing)}")
    return pairs


@dataclass
class _Shown:
    """A trial on a reviewer's screen; only its id and image tokens left this process."""

    reviewer: str
    trial: Trial
    tokens: tuple[str, str]
    served_at: float = field(default_factory=time.monotonic)


@dataclass
class _Progress:
    order: list[Trial]
    next: int
    shown: str | None = None
    """The id of the trial on the reviewer's screen: one at a time, so votes come in trial order."""


class Review:
    """The review's state behind the HTTP layer: reviewers' orders, trials shown, image tokens."""

    def __init__(self, run_dir: Path, pairs: dict[Pair, tuple[Path, Path]], writer: VotesWriter, seed: int | None):
        self.run_dir, self.pairs, self.writer, self.seed = run_dir, pairs, writer, seed
        self._lock = threading.Lock()
        self._reviewers: dict[str, _Progress] = {}
        self._shown: dict[str, _Shown] = {}
        self._images: dict[str, Path] = {}

    def start(self, reviewer: object) -> dict[str, Any]:
        try:
            name = check_name(reviewer, "reviewer name")
            with self._lock:
                if name not in self._reviewers:
                    self._reviewers[name] = self._progress(name)
                return self._show(name)
        except InputError as exc:
            raise HttpError(HTTPStatus.BAD_REQUEST, str(exc)) from exc

    def _progress(self, name: str) -> _Progress:
        """A reviewer's order, continued after the votes they already gave (checked to be this order's)."""
        order = trial_order(list(self.pairs), name, reviewer_seed(self.run_dir, name, self.seed))
        given = [v for v in read_votes(self.run_dir) if v.reviewer == name]
        for vote, trial in zip(given, order, strict=False):
            if (vote.trial, vote.candidate, vote.sample_id) != (trial.index, trial.candidate, trial.sample_id):
                # Names no candidate or sample: the answer goes to the page, which must not tell them.
                raise InputError(
                    f"{name!r} voted over other candidates or samples of this run before (their trial "
                    f"{vote.trial} differs); review those again, or go on under another name"
                )
        return _Progress(order, next_index(given, name))

    def _show(self, name: str) -> dict[str, Any]:
        """The reviewer's next trial under fresh tokens (a trial shown before is withdrawn)."""
        progress = self._reviewers[name]
        self._withdraw(progress.shown)
        total = len(progress.order)
        if progress.next >= total:
            progress.shown = None
            return {"done": True, "trial": total, "total": total}
        trial = progress.order[progress.next]
        image, reference = self.pairs[(trial.candidate, trial.sample_id)]
        left, right = (reference, image) if trial.reference_side == "left" else (image, reference)
        # Hex tokens: they can never spell a word such as "ref", "left" or "right" by chance.
        tokens = (secrets.token_hex(16), secrets.token_hex(16))
        self._images.update({tokens[0]: left, tokens[1]: right})
        trial_id = secrets.token_hex(16)
        self._shown[trial_id] = _Shown(name, trial, tokens)
        progress.shown = trial_id
        urls = [f"/img/{token}" for token in tokens]
        return {
            "done": False,
            "trial_id": trial_id,
            "left": urls[0],
            "right": urls[1],
            "trial": trial.index,
            "total": total,
        }

    def _withdraw(self, trial_id: str | None) -> _Shown | None:
        shown = self._shown.pop(trial_id, None) if trial_id else None
        for token in shown.tokens if shown else ():
            self._images.pop(token, None)
        return shown

    def vote(self, trial_id: object, answer: object) -> dict[str, Any]:
        if answer not in ANSWERS:
            raise HttpError(HTTPStatus.BAD_REQUEST, f"answer {answer!r}: expected one of {', '.join(ANSWERS)}")
        with self._lock:
            shown = self._shown.get(trial_id) if isinstance(trial_id, str) else None
            if shown is None:
                raise HttpError(HTTPStatus.CONFLICT, "this trial was answered or replaced; reload the page")
            seconds = min(max(time.monotonic() - shown.served_at, 0.0), MAX_SECONDS)
            trial = shown.trial
            vote = Vote(
                shown.reviewer,
                trial.candidate,
                trial.sample_id,
                trial.reference_side,
                str(answer),
                seconds,
                trial.index,
            )
            self.writer.write(vote)  # synced before the reviewer sees the next trial
            self._reviewers[shown.reviewer].next += 1
            return self._show(shown.reviewer)

    def image(self, token: str) -> bytes | None:
        with self._lock:
            path = self._images.get(token)
        if path is None:
            return None
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
        except OSError:
            return None
        with os.fdopen(fd, "rb") as f:
            return f.read()


class _Handler(BaseHTTPRequestHandler):
    server: _HttpServer

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet: a line per image would bury the URL the reviewer needs."""

    def _host_ok(self) -> bool:
        port = self.server.server_address[1]
        return self.headers.get("Host") in (f"127.0.0.1:{port}", f"localhost:{port}")

    def _send(self, status: HTTPStatus, body: bytes, content_type: str, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(body)

    def _json(self, status: HTTPStatus, data: dict[str, Any]) -> None:
        self._send(status, json.dumps(data).encode(), "application/json")

    def do_GET(self) -> None:
        if not self._host_ok():
            return self._json(HTTPStatus.FORBIDDEN, {"error": "open the review at 127.0.0.1"})
        if self.path == "/":
            return self._send(HTTPStatus.OK, self.server.page, "text/html; charset=utf-8", PAGE_HEADERS)
        if self.path.startswith("/img/"):
            data = self.server.review.image(self.path.removeprefix("/img/"))
            if data is not None:
                return self._send(HTTPStatus.OK, data, "image/png", {"X-Content-Type-Options": "nosniff"})
        self._json(HTTPStatus.NOT_FOUND, {"error": "not found"})

    def do_POST(self) -> None:
        try:
            body = self._body()
            if self.path == "/api/start":
                return self._json(HTTPStatus.OK, self.server.review.start(body.get("reviewer")))
            if self.path == "/api/vote":
                return self._json(HTTPStatus.OK, self.server.review.vote(body.get("trial_id"), body.get("answer")))
            raise HttpError(HTTPStatus.NOT_FOUND, "not found")
        except HttpError as exc:
            self._json(exc.status, {"error": str(exc)})

    def _body(self) -> dict[str, Any]:
        """The request's JSON object. Only JSON is taken: a cross-site page cannot post it without the
        browser asking this server first, and it never answers such a question."""
        if not self._host_ok():
            raise HttpError(HTTPStatus.FORBIDDEN, "open the review at 127.0.0.1")
        if not self.headers.get("Content-Type", "").startswith("application/json"):
            raise HttpError(HTTPStatus.UNSUPPORTED_MEDIA_TYPE, "expected application/json")
        length = int(self.headers.get("Content-Length") or 0)
        if not 0 < length <= MAX_BODY:
            raise HttpError(HTTPStatus.BAD_REQUEST, f"expected a JSON body of at most {MAX_BODY} bytes")
        try:
            data = json.loads(self.rfile.read(length))
        except ValueError as exc:
            raise HttpError(HTTPStatus.BAD_REQUEST, f"not JSON: {exc}") from exc
        if not isinstance(data, dict):
            raise HttpError(HTTPStatus.BAD_REQUEST, "expected a JSON object")
        return data


class _HttpServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, port: int, review: Review, page: bytes):
        self.review, self.page = review, page
        super().__init__(("127.0.0.1", port), _Handler)


class ReviewServer:
    """The review of one run directory, served from a background thread until `stop`."""

    def __init__(self, run_dir: Path, candidates: list[str] | None = None, port: int = 0, seed: int | None = None):
        from evals.rundir import check_no_links

        self.run_dir = Path(run_dir)
        self.pairs = load_pairs(self.run_dir, candidates)
        check_no_links(self.run_dir)  # votes and seeds are written into it
        read_votes(self.run_dir)  # a bad reviews.jsonl is found now, not at the first reviewer's start
        self.page = resources.files("evals.review").joinpath("page.html").read_bytes()
        self.port, self.seed = port, seed
        self._http: _HttpServer | None = None
        self._thread: threading.Thread | None = None
        self._writer: VotesWriter | None = None

    @property
    def url(self) -> str:
        if self._http is None:
            raise RuntimeError("the review server is not started")
        return f"http://127.0.0.1:{self._http.server_address[1]}/"

    def start(self) -> ReviewServer:
        self._writer = VotesWriter(self.run_dir / REVIEWS_FILE)
        try:
            self._http = _HttpServer(self.port, Review(self.run_dir, self.pairs, self._writer, self.seed), self.page)
        except OSError as exc:
            self._writer.close()
            raise InputError(f"cannot serve the review on 127.0.0.1:{self.port}: {exc}") from exc
        self._thread = threading.Thread(target=self._http.serve_forever, name="review-server", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
        if self._thread is not None:
            self._thread.join()
        if self._writer is not None:
            self._writer.close()
        self._http = self._thread = self._writer = None

    def wait(self) -> None:
        """Until the server thread ends; Ctrl-C interrupts it."""
        while self._thread is not None and self._thread.is_alive():
            self._thread.join(0.5)


def serve(run_dir: Path, candidates: list[str] | None = None, port: int = 0) -> int:
    """`evals review`: serve until Ctrl-C (or SIGTERM through evals.cli's handler), then stop cleanly."""
    server = ReviewServer(run_dir, candidates, port).start()
    try:
        print(
            f"blind review of {run_dir} at {server.url} (Ctrl-C stops it; votes go to {REVIEWS_FILE})", file=sys.stderr
        )
        server.wait()
        return 0
    except (KeyboardInterrupt, SystemExit):
        return 0
    finally:
        server.stop()
