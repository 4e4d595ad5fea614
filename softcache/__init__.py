"""softcache: offline and data-free knowledge distillation through cached soft labels.

The Python API mirrors the CLI: ``build`` and ``synthesize`` (stage 1), ``open_cache``,
``train`` (stage 2), ``validate``, ``sign``/``verify``, ``load_pipeline``/``run_pipeline``, and
``save_model``/``load_model`` for weights files that name their architecture. The package is laid
out by stage: ``cache`` (the format and its I/O) <- ``teacher`` (stage 1), ``student`` (stage 2)
<- ``pipeline`` <- ``_cli``.
"""

from softcache._version import __version__
from softcache.cache.check import validate
from softcache.cache.shards import finalize
from softcache.cache.sign import sign, verify
from softcache.cache.store import Cache, open_cache
from softcache.config import BuildConfig, StudentConfig, SynthConfig, TrainConfig
from softcache.errors import CacheError, SoftcacheError, UsageError
from softcache.pipeline import load_pipeline, run_pipeline
from softcache.student.loaders import SoftLabelDataset, open_loader
from softcache.student.stream import StreamLoader
from softcache.student.train import TrainResult, train
from softcache.teacher.build import build
from softcache.teacher.synth import synthesize
from softcache.weights import load_model, save_model

__all__ = [
    "BuildConfig", "Cache", "CacheError", "SoftLabelDataset", "SoftcacheError", "StreamLoader", "StudentConfig",
    "SynthConfig", "TrainConfig", "TrainResult", "UsageError", "__version__", "build", "finalize", "load_model",
    "load_pipeline", "open_cache", "open_loader", "run_pipeline", "save_model", "sign", "synthesize", "train",
    "validate", "verify",
]
