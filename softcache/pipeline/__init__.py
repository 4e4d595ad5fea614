"""Declarative pipelines: a TOML file names the teacher, the data, the cache and the training
passes (:mod:`softcache.pipeline.config`); ``run_pipeline`` runs its stages, skipping those whose
output is already there (:mod:`softcache.pipeline.run`)."""

from softcache.pipeline.config import PipelineConfig, load_pipeline
from softcache.pipeline.run import digits_teacher, lm_teacher, run_pipeline

__all__ = ["PipelineConfig", "digits_teacher", "lm_teacher", "load_pipeline", "run_pipeline"]
