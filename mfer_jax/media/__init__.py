"""Reading real video and audio: what prediction needs at run time and data_prep reuses.

  decode.py          PyAV: probe (exact fps, decoded frame count), frames, audio tracks
  audio_features.py  FeatureParams, the log-mel, and the per-frame audio window (alignment)
  faces.py           face detection and Aff-Wild2-like crops for raw video
"""
