"""softcache: offline and data-free knowledge distillation through cached soft labels.

The Python API mirrors the CLI: ``build`` (stage 1), ``open_cache``, ``train`` (stage 2),
``validate``. Submodules go bottom to top: manifest -> store/writer -> build/train -> cli.
"""

__version__ = "0.1.0"

from .build import build  # noqa: E402
from .config import StudentConfig, TrainConfig  # noqa: E402
from .errors import CacheError, SoftcacheError, UsageError  # noqa: E402
from .store import Cache, open_cache  # noqa: E402
from .train import train  # noqa: E402
from .validate import validate  # noqa: E402

__all__ = [
    "Cache", "CacheError", "SoftcacheError", "StudentConfig", "TrainConfig", "UsageError",
    "build", "open_cache", "train", "validate", "__version__",
]
