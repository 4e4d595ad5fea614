"""Declarative pipelines: a TOML file names the teacher, the data, the cache and the training
passes; ``run_pipeline`` runs its stages, skipping those whose output is already there."""

from softcache.pipeline.run import PipelineConfig, digits_teacher, load_pipeline, run_pipeline

__all__ = ["PipelineConfig", "digits_teacher", "load_pipeline", "run_pipeline"]
