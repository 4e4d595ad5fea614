"""softcache: offline and data-free knowledge distillation through cached soft labels."""

__version__ = "0.1.0"
