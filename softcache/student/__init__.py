"""Stage 2: students train against a cache, the teacher never loaded.

``train`` (the call: checks, loader, the pass, results), ``run`` (one student, the shared
training pass ``fit``, ``predict``), ``loss`` (the distillation loss, plain and stacked),
``stacked`` (students of one architecture as one vectorized model), ``loaders`` (in-memory
loading, ``SoftLabelDataset`` and the choice of loader), ``stream`` (the loader for caches larger
than RAM). Modules with a leading ``_`` are internal.
"""
