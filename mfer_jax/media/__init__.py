"""Reading real video and audio: what prediction needs at run time and data_prep reuses.

  decode.py          PyAV: probe (exact fps, decoded frame count), frames, audio tracks
  audio_features.py  FeatureParams, the log-mel, and the per-frame audio window (alignment)
  detector.py        face boxes and five landmarks (YuNet + MTCNN O-Net, packaged models)
  align.py           the similarity warp onto the 112x112 ArcFace template
  track.py           faces linked across frames into tracks; which person(s) to keep
  faces.py           a video's faces end to end (track, choose, align): prediction and
                     data_prep --detect both use it
"""
