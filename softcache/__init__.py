"""softcache: offline and data-free knowledge distillation through cached soft labels.

The Python API mirrors the CLI: ``build`` and ``synthesize`` (stage 1), ``open_cache``,
``train`` (stage 2), ``validate``, ``sign``/``verify``, ``load_pipeline``/``run_pipeline``.
The package is laid out by stage: ``cache`` (the format and its I/O) <- ``teacher`` (stage 1),
``student`` (stage 2) <- ``pipeline`` <- ``_cli``.
"""

from softcache._version import __version__

from softcache.teacher.build import build  # noqa: E402
from softcache.config import StudentConfig, SynthConfig, TrainConfig  # noqa: E402
from softcache.errors import CacheError, SoftcacheError, UsageError  # noqa: E402
from softcache.student.loaders import SoftLabelDataset  # noqa: E402
from softcache.pipeline.run import load_pipeline, run_pipeline  # noqa: E402
from softcache.cache.sign import sign, verify  # noqa: E402
from softcache.cache.store import Cache, open_cache  # noqa: E402
from softcache.student.stream import StreamLoader, open_loader  # noqa: E402
from softcache.teacher.synth import synthesize  # noqa: E402
from softcache.student.train import train  # noqa: E402
from softcache.cache.check import validate  # noqa: E402

__all__ = [
    "Cache", "CacheError", "SoftLabelDataset", "SoftcacheError", "StreamLoader", "StudentConfig", "SynthConfig",
    "TrainConfig", "UsageError", "build", "load_pipeline", "open_cache", "open_loader", "run_pipeline",
    "sign", "synthesize", "train", "validate", "verify", "__version__",
]
