"""The cache format and its I/O: the manifest, the array layout, the guarded store, the chunk
writer, shards and finalization, integrity checks and signatures. No model code: a cache can be
opened, checked and read with this package alone."""
