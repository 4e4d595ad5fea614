"""softcache: offline and data-free knowledge distillation through cached soft labels.

The Python API mirrors the CLI: ``build`` and ``synthesize`` (stage 1), ``open_cache``,
``train`` (stage 2), ``validate``, ``sign``/``verify``, ``load_pipeline``/``run_pipeline``.
Submodules go bottom to top: manifest -> store/writer -> build/synth, loader/stream/train ->
pipeline -> cli.
"""

__version__ = "0.1.0"

from .build import build  # noqa: E402
from .config import StudentConfig, SynthConfig, TrainConfig  # noqa: E402
from .errors import CacheError, SoftcacheError, UsageError  # noqa: E402
from .loader import SoftLabelDataset  # noqa: E402
from .pipeline import load_pipeline, run_pipeline  # noqa: E402
from .sign import sign, verify  # noqa: E402
from .store import Cache, open_cache  # noqa: E402
from .stream import StreamLoader, open_loader  # noqa: E402
from .synth import synthesize  # noqa: E402
from .train import train  # noqa: E402
from .validate import validate  # noqa: E402

__all__ = [
    "Cache", "CacheError", "SoftLabelDataset", "SoftcacheError", "StreamLoader", "StudentConfig", "SynthConfig",
    "TrainConfig", "UsageError", "build", "load_pipeline", "open_cache", "open_loader", "run_pipeline",
    "sign", "synthesize", "train", "validate", "verify", "__version__",
]
