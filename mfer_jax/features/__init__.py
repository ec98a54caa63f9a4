"""Cached encoder features: extract once, train fusion and temporal heads on top (docs/foundation.md).

  extractor.py  the configured encoders, frozen, batched and sharded: faces, mels, waveforms
  extract.py    extraction over a prepared dataset, resumable per video
  cache.py      the cache layout, what made it (spec and weight hashes), the pipeline's reader
"""
