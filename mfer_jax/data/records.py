"""The frame record: one per annotated frame, written by data_prep, read by everything else.

Byte layout, schema version 1 (little-endian; no pickle, so reading a dataset runs no code)::

    offset  size        field
    0       4           magic b"MFR1"
    4       4           uint32 header length H
    8       H           UTF-8 JSON header (see below)
    8+H     face_len    face crop, encoded JPEG bytes (empty when has_face is false)
    ...     n_mels*T    audio window, uint8 log-mel, row-major [n_mels, T]

The JSON header holds::

    {"split": "train", "video": "12-24-1920x1080_left", "frame": 17, "label": 4,
     "has_face": true, "face_len": 3120, "mel_shape": [64, 100]}

``frame`` is 1-based and equals the annotation line number (and the crop file name).
``label`` is -1 only in unlabeled splits (test). The uint8 log-mel maps dB in
[-top_db, 0] (``ref=max`` per video) linearly to [0, 255]; the exact feature parameters are in
the dataset's ``metadata.json`` (see ``mfer_jax.data.store``).

`decode_record` is the one decode function: the input pipeline, the tools and the tests call
it, and it also accepts the ``{"record": bytes, ...}`` dicts that the TFDS builder yields.
"""

from __future__ import annotations

import dataclasses
import json
import struct
from typing import Any, Mapping

import cv2
import numpy as np

from mfer_jax import errors

MAGIC = b"MFR1"
SCHEMA_VERSION = 1
_HEADER_LEN = struct.Struct("<I")


class RecordError(errors.UserError, ValueError):
  """A record that does not follow the layout above (truncated, wrong magic, bad header)."""


@dataclasses.dataclass(frozen=True)
class FrameRecord:
  """One annotated frame, before encoding.

  Attributes:
    split: "train", "validation" or "test".
    video: annotation name, with any ``_left``/``_right`` suffix kept.
    frame: 1-based frame number (annotation line number).
    label: class index 0..7, or -1 in unlabeled splits.
    face_jpeg: encoded JPEG bytes of the face crop, or b"" when no face was found.
    mel: uint8 log-mel window, shape [n_mels, T].
  """

  split: str
  video: str
  frame: int
  label: int
  face_jpeg: bytes
  mel: np.ndarray

  @property
  def has_face(self) -> bool:
    return bool(self.face_jpeg)


def encode_record(rec: FrameRecord) -> bytes:
  """Serialises a `FrameRecord` to the version-1 byte layout."""
  mel = np.ascontiguousarray(rec.mel, dtype=np.uint8)
  if mel.ndim != 2:
    raise RecordError(f"mel must be 2-D [n_mels, T], got shape {mel.shape}")
  header = json.dumps({
      "split": rec.split,
      "video": rec.video,
      "frame": int(rec.frame),
      "label": int(rec.label),
      "has_face": rec.has_face,
      "face_len": len(rec.face_jpeg),
      "mel_shape": list(mel.shape),
  }, separators=(",", ":")).encode("utf-8")
  return b"".join([MAGIC, _HEADER_LEN.pack(len(header)), header, rec.face_jpeg, mel.tobytes()])


def parse_record(raw: bytes) -> tuple[dict[str, Any], bytes, np.ndarray]:
  """Splits raw record bytes into (header, face JPEG bytes, uint8 mel) without decoding JPEG.

  Raises:
    RecordError: if the bytes are truncated or not a version-1 record.
  """
  if len(raw) < 8 or raw[:4] != MAGIC:
    raise RecordError(
        f"not an mfer-jax v{SCHEMA_VERSION} record (magic {bytes(raw[:4])!r}, "
        f"{len(raw)} bytes); rebuild the dataset with `python -m data_prep.build`")
  (hlen,) = _HEADER_LEN.unpack_from(raw, 4)
  try:
    header = json.loads(bytes(raw[8:8 + hlen]).decode("utf-8"))
    face_len = int(header["face_len"])
    n_mels, t = (int(v) for v in header["mel_shape"])
  except (ValueError, KeyError, TypeError) as e:
    raise RecordError(f"record header is malformed: {e}") from e
  start = 8 + hlen
  end = start + face_len + n_mels * t
  if len(raw) != end:
    raise RecordError(f"record is {len(raw)} bytes but its header describes {end}; "
                      "the shard is truncated or corrupt")
  face = bytes(raw[start:start + face_len])
  mel = np.frombuffer(raw, dtype=np.uint8, count=n_mels * t,
                      offset=start + face_len).reshape(n_mels, t)
  return header, face, mel


def decode_face(face_jpeg: bytes, face_size: int) -> np.ndarray:
  """Decodes a JPEG face crop to uint8 RGB [face_size, face_size, 3] (zeros if empty)."""
  if not face_jpeg:
    return np.zeros((face_size, face_size, 3), np.uint8)
  img = cv2.imdecode(np.frombuffer(face_jpeg, np.uint8), cv2.IMREAD_COLOR)
  if img is None:
    raise RecordError(f"face crop of {len(face_jpeg)} bytes is not a decodable JPEG")
  if img.shape[:2] != (face_size, face_size):
    img = cv2.resize(img, (face_size, face_size), interpolation=cv2.INTER_AREA)
  return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


def decode_record(raw: bytes | Mapping[str, Any], face_size: int = 112) -> dict[str, Any]:
  """Turns one record into numpy arrays. The single decode function of the project.

  Args:
    raw: record bytes (ArrayRecord shards), or a TFDS example dict with a ``"record"`` key.
    face_size: side of the returned face image; crops of another size are resized.

  Returns:
    A dict with ``face`` (uint8 [face_size, face_size, 3], RGB, zeros without a face),
    ``has_face`` (bool), ``mel`` (uint8 [n_mels, T]), ``label`` (int32), ``frame`` (int32),
    ``video`` (str) and ``split`` (str).

  Raises:
    RecordError: on a truncated or malformed record.
  """
  if isinstance(raw, Mapping):
    raw = raw["record"]
  header, face_jpeg, mel = parse_record(raw)
  return {
      "face": decode_face(face_jpeg, face_size),
      "has_face": np.bool_(header["has_face"]),
      "mel": mel,
      "label": np.int32(header["label"]),
      "frame": np.int32(header["frame"]),
      "video": header["video"],
      "split": header["split"],
  }
