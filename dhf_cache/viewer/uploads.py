"""Two photos of the user's matched on the fly with a checkpoint's backbone, as jobs.

The code path is `dhf-cache match`'s: `api.Hyperfeatures` (the checkpoint's build spec, its
backbone loaded once and checked against the checkpoint's feature space, the same preprocessing,
inversion and aggregation), then `match_points` on a grid of points of A. A job runs on one
worker thread (inversions would only compete for the CPU), and the page polls its stage.

Uploads are untrusted: each is refused above `max_bytes` before it is decoded, written to a
file of the viewer's own temporary folder under a fixed name (the name the browser sends is
only shown, never used as a path) and decoded by the project's safe loader (`load_image`:
regular files only, modes, EXIF orientation, decompression bombs).
"""

from __future__ import annotations

import shutil
import tempfile
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from dhf_cache.api import Hyperfeatures, grid_points
from dhf_cache.config import EVAL_LOAD_SIZE
from dhf_cache.correspondence.matching import PreparedTarget, match_points, prepare_target
from dhf_cache.datasets.images import load_image
from dhf_cache.errors import DhfCacheError, UsageError, first_line
from dhf_cache.viewer.clicks import Click, click_similarity
from dhf_cache.viewer.descriptors import CheckpointDescriptors, UnknownItem
from dhf_cache.viewer.pictures import data_url, photo_jpeg

MAX_UPLOAD_BYTES = 20 << 20  # per photo; the server refuses whole requests above twice that and some
KEEP_JOBS = 8  # finished jobs kept (with both descriptor maps) for clicks on their photos
STAGES = ("reading the photos", "loading the backbone", "extracting features (inversion)", "matching")
MAX_GRID = 10


@dataclass
class UploadJob:
    id: str
    checkpoint: int
    names: tuple[str, str]
    grid: int
    started: float = field(default_factory=time.monotonic)
    state: str = "queued"  # queued, running, done, error
    step: int = 0  # stages finished, of len(STAGES)
    error: str | None = None
    notes: list[str] = field(default_factory=list)
    result: dict[str, Any] | None = None
    seconds: float | None = None
    descriptors: tuple[torch.Tensor, torch.Tensor] | None = None
    sizes: tuple[tuple[int, int], tuple[int, int]] | None = None
    fit: str = "stretch"  # how the checkpoint's backbone input was made square (Preprocessing.fit)
    prepared: dict[int, PreparedTarget] = field(default_factory=dict)

    def status(self) -> dict[str, Any]:
        stage = STAGES[min(self.step, len(STAGES) - 1)] if self.state == "running" else self.state
        elapsed = self.seconds if self.seconds is not None else time.monotonic() - self.started
        return {"id": self.id, "state": self.state, "stage": stage, "step": self.step, "steps": len(STAGES),
                "elapsed": round(elapsed, 1), "error": self.error, "notes": self.notes, "result": self.result}


class Uploads:
    """Upload jobs of the viewer's checkpoints (one Hyperfeatures, so one backbone, each)."""

    def __init__(self, checkpoints: list[CheckpointDescriptors], device: str | torch.device,
                 log: Callable[[str], None], max_bytes: int = MAX_UPLOAD_BYTES):
        self.checkpoints = checkpoints
        self.device = device
        self.log = log
        self.max_bytes = int(max_bytes)
        self._jobs: OrderedDict[str, UploadJob] = OrderedDict()
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="dhf-view-upload")
        self._models: dict[int, Hyperfeatures] = {}
        self._folder: Path | None = None
        self._current: UploadJob | None = None

    def submit(self, checkpoint: int, photo_a: tuple[str, bytes], photo_b: tuple[str, bytes], grid: int = 5) -> UploadJob:
        if not 0 <= checkpoint < len(self.checkpoints):
            raise UnknownItem(f"checkpoint {checkpoint}: the viewer was given {len(self.checkpoints)} "
                              "(--checkpoint RUN, one per run)")
        if not 1 <= grid <= MAX_GRID:
            raise UsageError(f"grid {grid}: expected 1 to {MAX_GRID} points per side")
        for which, (name, data) in zip("AB", (photo_a, photo_b)):
            if not data:
                raise UsageError(f"photo {which}: none uploaded; choose an image file")
            if len(data) > self.max_bytes:
                raise UsageError(f"photo {which} ({name}): {len(data) / 2**20:.1f} MiB exceeds the upload limit of "
                                 f"{self.max_bytes / 2**20:.1f} MiB; use a smaller file")
        job = UploadJob(id=uuid.uuid4().hex[:16], checkpoint=checkpoint, names=(photo_a[0], photo_b[0]), grid=grid)
        with self._lock:
            self._jobs[job.id] = job
            while len(self._jobs) > KEEP_JOBS:
                self._jobs.popitem(last=False)
        self._pool.submit(self._run, job, photo_a[1], photo_b[1])
        return job

    def job(self, job_id: str) -> UploadJob:
        with self._lock:
            found = self._jobs.get(job_id)
        if found is None:
            raise UnknownItem(f"upload job {job_id!r}: unknown or expired (the viewer keeps the last {KEEP_JOBS})")
        return found

    def _note(self, message: str) -> None:
        if self._current is not None:
            self._current.notes.append(message)
        self.log(message)

    def _run(self, job: UploadJob, data_a: bytes, data_b: bytes) -> None:
        self._current = job
        job.state = "running"
        try:
            images = [self._decode(job, which, data) for which, data in zip("ab", (data_a, data_b))]
            job.step = 1
            hf = self._models.get(job.checkpoint)
            if hf is None:
                entry = self.checkpoints[job.checkpoint]
                hf = Hyperfeatures(entry.checkpoint, self.device, log=self._note)
                self._models[job.checkpoint] = hf
            _ = hf.extractor  # loads and checks the backbone on first use: a stage of its own
            job.step = 2
            desc_a, desc_b = hf.extractor.descriptors(images)  # what Hyperfeatures.match computes
            job.step = 3
            load = EVAL_LOAD_SIZE  # as `dhf-cache match` by default; clicks choose theirs
            points = grid_points(images[0].size, job.grid)
            target = prepare_target(desc_b, load)
            job.fit = hf.extractor.preprocessing.fit  # how the backbone's input was made square
            found = match_points(desc_a, target, points, images[0].size, images[1].size, load, fit=job.fit)
            job.descriptors = (desc_a, desc_b)
            job.sizes = (images[0].size, images[1].size)
            job.prepared[load] = target
            job.result = {"size_a": list(images[0].size), "size_b": list(images[1].size), "load_size": load,
                          "points_a": points.tolist(), "points_b": found.tolist(),
                          "photo_a": data_url(photo_jpeg(images[0]), "image/jpeg"),
                          "photo_b": data_url(photo_jpeg(images[1]), "image/jpeg")}
            job.step = len(STAGES)
            job.state = "done"
        except DhfCacheError as exc:
            job.state, job.error = "error", str(exc).splitlines()[0]
            self.log(f"upload job {job.id}: {job.error}")
        except Exception as exc:  # noqa: BLE001 - a job never takes the server down; the log has the line
            job.state, job.error = "error", f"{type(exc).__name__}: {first_line(exc)}"
            self.log(f"upload job {job.id} failed: {job.error}")
        finally:
            job.seconds = time.monotonic() - job.started
            self._current = None

    def _decode(self, job: UploadJob, which: str, data: bytes):
        """One upload through the safe loader, from a file named by the viewer (removed after)."""
        if self._folder is None:
            self._folder = Path(tempfile.mkdtemp(prefix="dhf-cache-view-"))
        path = self._folder / f"{job.id}-{which}.upload"
        path.write_bytes(data)
        try:
            return load_image(path)
        except DhfCacheError as exc:  # the message names our temporary file: name the upload instead
            reason = str(exc).splitlines()[0].replace(f"{path}: ", "")
            raise UsageError(f"photo {which.upper()} ({job.names['ab'.index(which)]}): {reason}") from None
        finally:
            path.unlink(missing_ok=True)

    def click(self, job_id: str, point: tuple[float, float], load_size: int) -> tuple[Click, UploadJob]:
        job = self.job(job_id)
        if job.state != "done" or job.descriptors is None or job.sizes is None:
            raise UsageError(f"upload job {job_id}: not finished ({job.state}); wait for its matches")
        if load_size not in job.prepared:
            job.prepared[load_size] = prepare_target(job.descriptors[1], load_size)
        return click_similarity(job.descriptors[0], job.prepared[load_size], point, *job.sizes, job.fit), job

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        if self._folder is not None:
            shutil.rmtree(self._folder, ignore_errors=True)
