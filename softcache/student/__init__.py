"""Stage 2: students train against a cache, the teacher never loaded: the loss, the loaders,
stacked students and the training pass."""
