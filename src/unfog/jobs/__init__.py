"""Generation jobs, at the edge between the pipelines and the people and programs asking for
images (the CLI, ``unfog eval``, the server): a job's settings and files (``spec``), the adapters
its prompt names (``adapters``), models kept loaded between jobs (``cache``), and drawing and
saving its images (``run``), all around ``pipelines.draw``'s pure drawing of one image."""

from .cache import ModelCache
from .run import Drawn, Interrupted, Skipped, generate, run
from .spec import DEFAULT_STRENGTH, Job, Mode, check, resolve_settings

__all__ = ["DEFAULT_STRENGTH", "Drawn", "Interrupted", "Job", "ModelCache", "Mode", "Skipped", "check", "generate",
           "resolve_settings", "run"]
