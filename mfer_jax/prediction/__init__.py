"""Prediction with a trained run: the model as a jitted function, video decoding, label files.

  predictor.py  `Predictor`: a workdir's config + checkpoint -> batched, jitted inference
  frames.py     a video -> per-frame face crops and audio windows
  labels.py     per-frame probabilities -> no-face policy, smoothing, ABAW files and CSVs
  videos.py     `predict_video` / `predict_split`: the above end to end

The command line is ``python -m mfer_jax.tools.predict``.
"""
