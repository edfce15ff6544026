"""Loaded pipelines kept between jobs, so a server (or a script drawing many jobs) loads a model
once: keyed by the file and how it is loaded, reloaded when the file changes."""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

from ..pipelines.outputs import ModelId
from ..pipelines.precision import resolve_device, resolve_dtype
from ..pipelines.stable_diffusion import StableDiffusion
from .spec import Job


@dataclass(frozen=True)
class _Key:
    path: str  # resolved
    stamp: tuple[int, int]  # the file's (mtime_ns, size): an edited or replaced file is loaded again
    family: str | None
    prediction: str | None
    dtype: str
    device: str


def _stamp(path: Path) -> tuple[int, int]:
    st = path.stat()
    return st.st_mtime_ns, st.st_size


class ModelCache:
    """Up to ``size`` loaded pipelines (base models and refiners alike; the least recently used is
    dropped first) and the hashes of the files they came from. Not thread-safe: one job at a time
    uses it, as the server's queue does. A cached pipeline is handed out as it was loaded, apart
    from its VAE, which follows each job's ``vae`` (``jobs.adapters.applied`` takes the other
    adapters off after each job)."""

    def __init__(self, size: int = 2):
        if size < 1:
            raise ValueError(f"the model cache holds at least 1 model, got {size}")
        self.size = size
        self._pipes: OrderedDict[_Key, StableDiffusion] = OrderedDict()
        self._ids: dict[tuple[str, tuple[int, int]], ModelId] = {}
        self.last: StableDiffusion | None = None  # the base pipeline ``pipelines`` handed out last

    def load_options(self, job: Job) -> dict:
        """How the job's models are loaded: ``dtype`` (torch), ``device`` and ``prediction``."""
        device = resolve_device(job.device)
        return dict(dtype=resolve_dtype(job.dtype, device), device=device, prediction=job.prediction)

    def pipeline(self, path: Path, job: Job, family: str | None = None) -> StableDiffusion:
        """The pipeline of the model file or folder ``path``, loaded as ``job`` asks, from the cache
        when it holds it."""
        load = self.load_options(job)
        path = Path(path)
        key = _Key(str(path.resolve()), _stamp(path), family, job.prediction, str(load["dtype"]), str(load["device"]))
        if key in self._pipes:
            self._pipes.move_to_end(key)
            return self._pipes[key]
        for old in [k for k in self._pipes if k.path == key.path and k.stamp != key.stamp]:
            del self._pipes[old]  # the file changed: its old weights are of no use
        while len(self._pipes) >= self.size:
            self._pipes.popitem(last=False)  # before loading, so two models are never held beyond size
        pipe = StableDiffusion.load(path, family=family, **load)
        self._pipes[key] = pipe
        return pipe

    def pipelines(self, job: Job) -> tuple[StableDiffusion, StableDiffusion | None]:
        """The job's base pipeline (with the job's VAE) and its SDXL refiner, if any, checked to fit."""
        pipe = self.pipeline(job.model, job, job.family)
        if pipe.inpainting_unet and job.mode != "inpaint":
            raise ValueError(f"{job.model} is an inpainting model (9 input channels): use unfog inpaint --init IMAGE "
                             "--mask MASK")
        if job.vae is None or pipe.vae_file is None or Path(job.vae).resolve() != pipe.vae_file.resolve():
            pipe.load_vae(job.vae)
        self.last = pipe
        if job.refiner is None:
            return pipe, None
        if pipe.family != "sdxl":
            raise ValueError(f"--refiner needs an SDXL base model, but --model is {pipe.family}")
        refiner = self.pipeline(job.refiner, job)
        if refiner.family != "sdxl_refiner":
            raise ValueError(f"--refiner {job.refiner} is {refiner.family}, not an SDXL refiner")
        if refiner.vae.config.latent_channels != pipe.vae.config.latent_channels:
            raise ValueError(f"--refiner {job.refiner} works on {refiner.vae.config.latent_channels}-channel latents, "
                             f"the base on {pipe.vae.config.latent_channels}")
        return pipe, refiner

    def model_id(self, path: Path) -> ModelId:
        """``ModelId.of(path)``, hashed once per version of the file."""
        key = (str(Path(path).resolve()), _stamp(Path(path)))
        if key not in self._ids:
            self._ids[key] = ModelId.of(path)  # named as given (a link keeps its own name)
        return self._ids[key]

    def known_id(self, path: Path) -> ModelId | None:
        """``model_id(path)`` if it has been computed for this version of the file, else None."""
        try:
            return self._ids.get((str(Path(path).resolve()), _stamp(Path(path))))
        except OSError:
            return None
