"""Drawing the synthetic faces and voices of `data_prep.synth` (one frame, one audio track).

Faces are cartoon faces drawn with OpenCV: a skin-toned head ellipse with hair, eyebrows, eyes
with pupils, a shaded nose and a mouth. The *face code* (0..3) changes the features:

    0 calm      straight mouth, level brows, open eyes
    1 smile     wide upturned mouth, raised level brows
    2 sad       downturned mouth, brows raised at the inner ends, wide eyes
    3 tense     brows lowered at the inner ends (a V), narrowed eyes, small tight mouth

A face code is drawn at an *intensity* between the calm face (0) and the full expression (1),
with the eyes open or partly shut (blinks) and the mouth opened by speech; the geometry is
interpolated, so onsets and offsets look like expressions building up, not cross-fades.

Voices are vowel-like harmonic sounds. The *audio code* (0..3) sets the pitch and the syllable
rate, both visible in a 2 s log-mel window:

    0 low pitch, slow syllables     1 low pitch, fast syllables
    2 high pitch, slow syllables    3 high pitch, fast syllables

Low voices (f0 100-140 Hz) also have a low first formant (400-650 Hz, a dark vowel), high
voices (f0 260-360 Hz) a high one (900-1300 Hz, a bright vowel); slow is 1.2-2.2 and fast
5-7 syllables per second.

Each identity (per person and video) varies the skin tone, face size, hair, pitch (within its
band) and syllable timing, so neither modality is a lookup table.

Degradations of single frames: `motion_blur`, `jpeg_artifacts` and `draw_occluder` (a hand or
an object in front of the face); `data_prep.synth` decides which frames get them.

`face_landmarks` gives the five points a face aligner uses (eye centres, nose tip, mouth
corners) of a drawn face, and `draw_posed_face` draws the same face turned in 3D (yaw, pitch,
roll) and returns where those points land: the ground truth for the detector's recall and
landmark tests and benchmarks.
"""

from __future__ import annotations

import dataclasses

import cv2
import numpy as np

# Skin tones (RGB) from light to dark; identities pick one and jitter it.
_SKIN_TONES = ((241, 205, 180), (224, 172, 138), (198, 134, 96), (172, 114, 80), (140, 94, 66))
# (f0 band in Hz, syllables per second) per audio code.
_VOICE_PITCH = ((100.0, 140.0), (100.0, 140.0), (260.0, 360.0), (260.0, 360.0))
_VOICE_RATE = ((1.2, 2.2), (5.0, 7.0), (1.2, 2.2), (5.0, 7.0))
# First formant band in Hz per audio code: low voices are dark, high voices bright.
_VOICE_FORMANT = ((400.0, 650.0), (400.0, 650.0), (900.0, 1300.0), (900.0, 1300.0))
NUM_FACE_CODES = 4
NUM_AUDIO_CODES = 4


@dataclasses.dataclass(frozen=True)
class FaceIdentity:
  """How one person looks: fixed for a person in a video."""

  skin: tuple[int, int, int]
  hair: tuple[int, int, int]
  size: float          # face (head ellipse) height in pixels
  aspect: float        # head width / height
  eye_gap: float       # eye distance as a fraction of the face width


def random_identity(rng: np.random.Generator, frame_height: int) -> FaceIdentity:
  """Draws a person: skin tone, hair colour and face size (62-75% of the frame height)."""
  base = np.array(_SKIN_TONES[rng.integers(len(_SKIN_TONES))], float)
  skin = tuple(int(v) for v in np.clip(base + rng.normal(0, 8, 3), 0, 255))
  hair = tuple(int(v) for v in rng.integers(10, 90) * np.array([1.0, 0.8, 0.6]))
  return FaceIdentity(skin=skin, hair=hair, size=float(rng.uniform(0.62, 0.75) * frame_height),
                      aspect=float(rng.uniform(0.72, 0.82)), eye_gap=float(rng.uniform(0.36, 0.42)))


def face_box(center: tuple[float, float], ident: FaceIdentity) -> tuple[float, float, float, float]:
  """The ground-truth face box (x0, y0, x1, y1): brows to chin, cheek to cheek.

  This follows the convention of frontal face detectors (the box starts at the eyebrows, not
  at the hair line), so a detector's box and this one overlap well.
  """
  cx, cy = center
  half_w = 0.5 * ident.size * ident.aspect
  return (cx - half_w, cy - 0.28 * ident.size, cx + half_w, cy + 0.5 * ident.size)


def _pt(x: float, y: float) -> tuple[int, int]:
  return (int(round(x)), int(round(y)))


@dataclasses.dataclass(frozen=True)
class _Expression:
  """Geometry of one face code at full intensity, in units of the face height h.

  The mouth is a parabola: its corners sit ``mouth_corner`` below the mouth line and its
  middle ``mouth_sag`` below its corners (positive: a U, a smile; negative: a cap, sadness).
  """

  eye_open: float          # eye half-height
  brow_outer: float        # brow height above the eye at its outer end
  brow_inner: float        # ... and at its inner end
  mouth_width: float       # half-width, as a fraction of 0.22 * face width
  mouth_corner: float
  mouth_sag: float
  lip: float               # lip thickness


# The mouth corners and middle are where the elliptic arcs of earlier versions put them
# (smile: an arc from 10 to 170 degrees of a 1.2 x 0.1 ellipse 0.05 h above the mouth line;
# sad: 195 to 345 degrees of a 1 x 0.08 ellipse 0.06 h below it).
_SMILE_CORNER = (float(1.2 * np.cos(np.radians(10))), float(-0.05 + 0.1 * np.sin(np.radians(10))))
_SAD_CORNER = (float(np.cos(np.radians(15))), float(0.06 - 0.08 * np.sin(np.radians(15))))
_EXPRESSIONS = (
    _Expression(0.05, 0.10, 0.10, 1.0, 0.0, 0.0, 0.03),         # 0 calm (also the neutral pose)
    _Expression(0.05, 0.13, 0.13, _SMILE_CORNER[0], _SMILE_CORNER[1],
                0.05 - _SMILE_CORNER[1], 0.04),                   # 1 smile
    _Expression(0.065, 0.09, 0.15, _SAD_CORNER[0], _SAD_CORNER[1],
                -0.02 - _SAD_CORNER[1], 0.04),                    # 2 sad
    _Expression(0.025, 0.12, 0.04, 0.5, 0.0, 0.0, 0.035),       # 3 tense
)


def _expression(face_code: int, intensity: float) -> _Expression:
  """The code's geometry blended from the calm face: ``intensity`` 0 is calm, 1 the apex."""
  calm, full = _EXPRESSIONS[0], _EXPRESSIONS[face_code]
  return _Expression(*(c + intensity * (f - c) for c, f in
                       zip(dataclasses.astuple(calm), dataclasses.astuple(full))))


def draw_face(img: np.ndarray, center: tuple[float, float], ident: FaceIdentity, face_code: int,
              blink: bool = False, *, intensity: float = 1.0, eye_open: float = 1.0,
              mouth_open: float = 0.0) -> None:
  """Draws a face with the features of ``face_code`` into the RGB image ``img`` (in place).

  Args:
    img: uint8 RGB canvas [H, W, 3].
    center: head centre (x, y) in pixels.
    ident: the person's look.
    face_code: 0 calm, 1 smile, 2 sad, 3 tense (see the module docstring).
    blink: draw the eyes closed for this frame (same as ``eye_open=0``).
    intensity: how far the expression is from the calm face, 0..1: expressions build up
      (onset) and fade (offset) over a fraction of a second, as in real video.
    eye_open: eyelid opening, 1 open .. 0 closed (a blink passes through the values between).
    mouth_open: jaw opening while talking, 0 closed .. 1 widest.
  """
  cx, cy = center
  h = ident.size
  w = h * ident.aspect
  ex_ = _expression(face_code, float(np.clip(intensity, 0.0, 1.0)))
  eye_open = 0.0 if blink else float(np.clip(eye_open, 0.0, 1.0))
  aa = cv2.LINE_AA
  dark = (30, 20, 20)
  # Hair behind and above the head, then the head and the ears.
  cv2.ellipse(img, _pt(cx, cy - 0.12 * h), _pt(0.56 * w, 0.5 * h), 0, 180, 360, ident.hair, -1, aa)
  for side in (-1, 1):
    cv2.ellipse(img, _pt(cx + side * 0.5 * w, cy), _pt(0.08 * w, 0.12 * h), 0, 0, 360,
                tuple(int(0.9 * v) for v in ident.skin), -1, aa)
  # Darker cheeks and jaw around a lighter centre: the shading of a lit, rounded face.
  cv2.ellipse(img, _pt(cx, cy), _pt(0.5 * w, 0.5 * h), 0, 0, 360,
              tuple(int(0.8 * v) for v in ident.skin), -1, aa)
  cv2.ellipse(img, _pt(cx, cy - 0.03 * h), _pt(0.4 * w, 0.45 * h), 0, 0, 360, ident.skin, -1, aa)
  cv2.ellipse(img, _pt(cx, cy - 0.38 * h), _pt(0.48 * w, 0.16 * h), 0, 180, 360, ident.hair, -1, aa)
  # Eyes.
  eye_y = cy - 0.1 * h
  eye_dx = 0.5 * ident.eye_gap * w
  eye_w, eye_h = 0.12 * w, ex_.eye_open * eye_open * h
  shade = tuple(int(0.75 * v) for v in ident.skin)
  for side in (-1, 1):
    ex = cx + side * eye_dx
    # Eye socket shadow, from the brow to below the eye.
    cv2.ellipse(img, _pt(ex, eye_y - 0.03 * h), _pt(1.5 * eye_w, 0.09 * h), 0, 0, 360,
                shade, -1, aa)
    if eye_h < 0.01 * h:  # closed, or nearly: only the lid line shows
      cv2.line(img, _pt(ex - eye_w, eye_y), _pt(ex + eye_w, eye_y), dark, max(1, int(0.012 * h)), aa)
    else:
      cv2.ellipse(img, _pt(ex, eye_y), _pt(eye_w, eye_h), 0, 0, 360, (245, 245, 240), -1, aa)
      cv2.circle(img, _pt(ex, eye_y), int(round(min(eye_h, 0.6 * eye_w))), dark, -1, aa)
    bx_out, bx_in = ex + side * 1.3 * eye_w, ex - side * 1.0 * eye_w
    cv2.line(img, _pt(bx_out, eye_y - ex_.brow_outer * h), _pt(bx_in, eye_y - ex_.brow_inner * h),
             dark, max(2, int(0.03 * h)), aa)
  # Nose: a shaded wedge.
  nose = np.array([_pt(cx, cy - 0.05 * h), _pt(cx - 0.07 * w, cy + 0.12 * h),
                   _pt(cx + 0.07 * w, cy + 0.12 * h)], np.int32)
  cv2.fillConvexPoly(img, nose, shade, aa)
  for side in (-1, 1):  # nostrils
    cv2.circle(img, _pt(cx + side * 0.035 * w, cy + 0.11 * h), max(1, int(0.015 * h)),
               tuple(int(0.5 * v) for v in ident.skin), -1, aa)
  # Shadow of the mouth region, under any mouth shape.
  cv2.ellipse(img, _pt(cx, cy + 0.26 * h), _pt(0.3 * w, 0.07 * h), 0, 0, 360,
              tuple(int(0.9 * v) for v in ident.skin), -1, aa)
  _draw_mouth(img, cx, cy + 0.26 * h, h, ex_.mouth_width * 0.22 * w, ex_, float(mouth_open))


def _draw_mouth(img, cx, my, h, half_width, ex_: _Expression, mouth_open: float) -> None:
  """Lips along the expression's parabola; an open mouth shows a dark gap between them."""
  lips = (150, 40, 50)
  thick = max(2, int(round(ex_.lip * h)))
  u = np.linspace(-1.0, 1.0, 13)
  curve_y = my + (ex_.mouth_corner + ex_.mouth_sag * (1 - u ** 2)) * h
  gap = np.clip(mouth_open, 0.0, 1.0) * 0.12 * h * (1 - u ** 2)  # widest in the middle
  upper = np.stack([cx + u * half_width, curve_y - 0.5 * gap], -1)
  lower = np.stack([cx + u * half_width, curve_y + 0.5 * gap], -1)
  scale = 16  # cv2's fractional-bit coordinates: smooth lips at this small size
  to_int = lambda pts: np.round(pts * scale).astype(np.int32)
  if mouth_open > 0.05:
    cavity = np.concatenate([upper, lower[::-1]])
    cv2.fillPoly(img, [to_int(cavity)], (45, 12, 18), cv2.LINE_AA, shift=4)
    cv2.polylines(img, [to_int(lower)], False, lips, thick, cv2.LINE_AA, shift=4)
  cv2.polylines(img, [to_int(upper)], False, lips, thick, cv2.LINE_AA, shift=4)


def face_landmarks(center: tuple[float, float], ident: FaceIdentity, face_code: int,
                   intensity: float = 1.0) -> np.ndarray:
  """The five landmarks of a face drawn by `draw_face`, in pixels.

  Order (that of `mfer_jax.media.align`): the eye on the image's left, the eye on the image's
  right, the nose tip (the nostrils' level), the mouth corner on the image's left, the one on
  the right. Eyes are the pupil centres; mouth corners are the ends of the lips, which move
  with the expression's ``intensity`` as in `draw_face` (and not with the mouth opening).

  Returns:
    float64 [5, 2] (x, y).
  """
  cx, cy = center
  h = ident.size
  w = h * ident.aspect
  ex_ = _expression(face_code, float(np.clip(intensity, 0.0, 1.0)))
  eye_y, eye_dx = cy - 0.1 * h, 0.5 * ident.eye_gap * w
  dx, my = ex_.mouth_width * 0.22 * w, cy + 0.26 * h + ex_.mouth_corner * h
  return np.array([(cx - eye_dx, eye_y), (cx + eye_dx, eye_y), (cx, cy + 0.11 * h),
                   (cx - dx, my), (cx + dx, my)])


def _rotation(yaw: float, pitch: float, roll: float) -> np.ndarray:
  """Head rotation (degrees): yaw about the vertical axis (positive turns the face towards the
  image's right), then pitch about the horizontal axis, then roll in the image plane."""
  y, p, r = np.radians([yaw, pitch, roll])
  ry = np.array([[np.cos(y), 0, np.sin(y)], [0, 1, 0], [-np.sin(y), 0, np.cos(y)]])
  rx = np.array([[1, 0, 0], [0, np.cos(p), -np.sin(p)], [0, np.sin(p), np.cos(p)]])
  rz = np.array([[np.cos(r), -np.sin(r), 0], [np.sin(r), np.cos(r), 0], [0, 0, 1]])
  return rz @ rx @ ry


def draw_posed_face(img: np.ndarray, center: tuple[float, float], ident: FaceIdentity,
                    face_code: int, yaw: float = 0.0, pitch: float = 0.0, roll: float = 0.0,
                    blink: bool = False) -> np.ndarray:
  """Draws the `draw_face` face turned in 3D into ``img`` (in place); returns its landmarks.

  The flat face is painted onto the front of an ellipsoid head (half-axes 0.6 w, 0.64 h and a
  depth of 0.6 w, for a face of width w and height h), which is rotated and projected
  orthographically: features on the far side are foreshortened and the near cheek widens, as
  on a turned head; the back of the head shows hair. With no rotation the result is
  `draw_face`'s drawing (resampled at the sub-pixel centre).

  Args:
    img: uint8 RGB canvas [H, W, 3].
    center: the head centre (x, y) in pixels; the rotation is about it.
    ident, face_code, blink: as in `draw_face`.
    yaw, pitch, roll: degrees (see `_rotation`); |yaw| up to about 70 keeps the face visible.

  Returns:
    float64 [5, 2]: `face_landmarks` of the face, carried through the same rotation.
  """
  h = ident.size
  w = h * ident.aspect
  ax, ay, az = 0.6 * w, 0.64 * h, 0.6 * w
  rot = _rotation(yaw, pitch, roll)
  # Landmarks lie on the ellipsoid's front surface; rotate and project them like the pixels.
  flat = face_landmarks((0.0, 0.0), ident, face_code)
  depth = az * np.sqrt(np.clip(1.0 - (flat[:, 0] / ax) ** 2 - (flat[:, 1] / ay) ** 2, 0.0, None))
  landmarks = (np.column_stack([flat, depth]) @ rot.T)[:, :2] + np.asarray(center)
  # The flat face, drawn twice (on black and on white) so its coverage (alpha) is exact, even
  # at antialiased edges: alpha = 1 - (white - black) / 255.
  side = int(np.ceil(2.2 * max(ax, ay))) | 1
  mid = side / 2.0 - 0.5
  on_black, on_white = np.zeros((side, side, 3), np.uint8), np.full((side, side, 3), 255, np.uint8)
  for canvas in (on_black, on_white):
    draw_face(canvas, (mid, mid), ident, face_code, blink)
  alpha = 1.0 - (on_white.astype(np.float32) - on_black).mean(-1) / 255.0
  colour = on_black.astype(np.float32) / np.maximum(alpha, 1e-3)[..., None]
  texture = np.dstack([np.clip(colour, 0, 255), 255.0 * alpha]).astype(np.float32)
  height, width = img.shape[:2]
  reach = int(np.ceil(max(ax, ay, az))) + 2
  x0, x1 = max(0, int(center[0]) - reach), min(width, int(center[0]) + reach + 1)
  y0, y1 = max(0, int(center[1]) - reach), min(height, int(center[1]) + reach + 1)
  if x0 >= x1 or y0 >= y1:
    return landmarks
  xs, ys = np.meshgrid(np.arange(x0, x1) - center[0], np.arange(y0, y1) - center[1])
  # A viewing ray per pixel, towards -z, in head coordinates (row vectors: v @ rot = rot^T v).
  origin = np.stack([xs, ys, np.full_like(xs, 4.0 * reach)], -1) @ rot
  direction = np.array([0.0, 0.0, -1.0]) @ rot
  inv = np.array([ax, ay, az]) ** -2.0
  qa = (direction * direction * inv).sum()
  qb = 2.0 * (origin * direction * inv).sum(-1)
  qc = (origin * origin * inv).sum(-1) - 1.0
  disc = qb * qb - 4.0 * qa * qc
  hit = disc > 0
  t = (-qb - np.sqrt(np.maximum(disc, 0.0))) / (2.0 * qa)   # the nearer intersection
  surface = origin + t[..., None] * direction
  front = hit & (surface[..., 2] > 0)
  sampled = cv2.remap(texture, (surface[..., 0] + mid).astype(np.float32),
                      (surface[..., 1] + mid).astype(np.float32), cv2.INTER_LINEAR,
                      borderMode=cv2.BORDER_CONSTANT, borderValue=0)
  cover = np.where(front, sampled[..., 3] / 255.0, 0.0)[..., None]
  region = img[y0:y1, x0:x1].astype(np.float32)
  out = region * (1.0 - cover) + sampled[..., :3] * cover
  out[hit & ~front] = ident.hair
  img[y0:y1, x0:x1] = np.clip(out + 0.5, 0, 255).astype(np.uint8)
  return landmarks


def random_background(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
  """A static per-video background: a colour gradient with a few soft rectangles (a room)."""
  c0, c1 = rng.integers(30, 220, 3), rng.integers(30, 220, 3)
  t = np.linspace(0.0, 1.0, height)[:, None, None]
  img = (c0 * (1 - t) + c1 * t) * np.ones((1, width, 1))
  img = img.astype(np.uint8)
  for _ in range(rng.integers(2, 5)):
    x0, y0 = int(rng.integers(0, width)), int(rng.integers(0, height))
    x1, y1 = x0 + int(rng.integers(20, width // 2)), y0 + int(rng.integers(20, height // 2))
    cv2.rectangle(img, (x0, y0), (x1, y1), tuple(int(v) for v in rng.integers(30, 220, 3)), -1)
  return cv2.GaussianBlur(img, (0, 0), 3)


@dataclasses.dataclass(frozen=True)
class Voice:
  """How one person sounds: a pitch and syllable timing within each audio code's band."""

  pitch_u: float       # position in the code's pitch band, 0..1
  rate_u: float        # position in the code's syllable-rate band, 0..1
  formant_u: float     # position in the code's first-formant band, 0..1 (vowel colour)


def random_voice(rng: np.random.Generator) -> Voice:
  """Draws a person's voice: where in each code's pitch, rate and formant band it sits."""
  return Voice(pitch_u=float(rng.uniform()), rate_u=float(rng.uniform()),
               formant_u=float(rng.uniform()))


def syllable_rate(voice: Voice, audio_code: int) -> float:
  """Syllables per second of ``voice`` speaking with ``audio_code``."""
  rlo, rhi = _VOICE_RATE[audio_code]
  return rlo + (rhi - rlo) * voice.rate_u


def syllable_envelope(t: np.ndarray, rate: float, phase: float) -> np.ndarray:
  """Loudness of the syllables at times ``t`` (s): a raised sine, 0 between syllables, peak 1.

  The same curve opens the speaker's mouth in the video, so lips move with the voice.
  """
  return np.clip(np.sin(2 * np.pi * rate * np.asarray(t) + phase), 0, None) ** 1.5


def voice_segment(rng: np.random.Generator, voice: Voice, audio_code: int, num_samples: int,
                  sample_rate: int, syllable_phase: float | None = None) -> np.ndarray:
  """A vowel-like sound of ``audio_code``: harmonics of f0 under a formant, syllable-modulated.

  Args:
    syllable_phase: start phase of the syllable rhythm (radians); None draws it from ``rng``.

  Returns:
    float32 [num_samples], peak amplitude about 1.
  """
  lo, hi = _VOICE_PITCH[audio_code]
  f0 = lo + (hi - lo) * voice.pitch_u
  rate = syllable_rate(voice, audio_code)
  flo, fhi = _VOICE_FORMANT[audio_code]
  formant = flo + (fhi - flo) * voice.formant_u
  t = np.arange(num_samples) / sample_rate
  # Slow pitch drift (intonation) keeps the harmonics from being pure lines.
  phase = 2 * np.pi * np.cumsum(f0 * (1 + 0.04 * np.sin(2 * np.pi * 0.7 * t + rng.uniform(0, 6))))
  # Wrapped, then float32: sin of k * phase stays accurate and costs half as much.
  phase = np.mod(phase / sample_rate, 2 * np.pi).astype(np.float32)
  out = np.zeros(num_samples, np.float32)
  nyquist = 0.45 * sample_rate
  for k in range(1, 16):
    fk = k * f0
    if fk > min(nyquist, 7000):
      break
    # Two formant bumps shape the harmonic amplitudes: a vowel.
    amp = (np.exp(-((fk - formant) / 300) ** 2) + 0.5 * np.exp(-((fk - 2300) / 600) ** 2)
           + 0.3 / k)
    out += np.float32(amp) * np.sin(np.float32(k) * phase)
  if syllable_phase is None:
    syllable_phase = rng.uniform(0, 2 * np.pi)
  out *= syllable_envelope(t, rate, syllable_phase).astype(np.float32)
  peak = np.max(np.abs(out)) or 1.0
  return (out / peak).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# Degradations of single frames: what a real video's worst frames look like.


@dataclasses.dataclass(frozen=True)
class Occluder:
  """A hand or an object in front of a face, placed relative to the head (units: face height)."""

  dx: float
  dy: float
  rx: float
  ry: float
  angle: float                   # degrees
  colour: tuple[int, int, int]
  hand: bool                     # a hand (skin, finger gaps) or an object (flat colour)


def random_occluder(rng: np.random.Generator) -> Occluder:
  """A hand over the mouth or cheek, or an object (microphone, cup) in front of the face.

  It covers roughly a fifth to a half of the face: the mouth, or one eye and cheek, so the
  expression is partly hidden but rarely all of it.
  """
  hand = bool(rng.random() < 0.6)
  if rng.random() < 0.6:   # in front of the mouth and chin
    dx, dy = rng.uniform(-0.12, 0.12), rng.uniform(0.2, 0.35)
  else:                    # on one side: an eye and the cheek
    dx, dy = rng.choice([-1, 1]) * rng.uniform(0.2, 0.3), rng.uniform(-0.1, 0.15)
  if hand:
    base = np.array(_SKIN_TONES[rng.integers(len(_SKIN_TONES))], float)
    colour = tuple(int(v) for v in np.clip(base + rng.normal(0, 10, 3), 0, 255))
  else:
    colour = tuple(int(v) for v in rng.integers(20, 200, 3))
  return Occluder(dx=float(dx), dy=float(dy), rx=float(rng.uniform(0.16, 0.26)),
                  ry=float(rng.uniform(0.12, 0.2)), angle=float(rng.uniform(-40, 40)),
                  colour=colour, hand=hand)


def draw_occluder(img: np.ndarray, center: tuple[float, float], ident: FaceIdentity,
                  occ: Occluder) -> None:
  """Draws ``occ`` over the face at ``center`` (in place)."""
  h = ident.size
  c = (center[0] + occ.dx * h, center[1] + occ.dy * h)
  cv2.ellipse(img, _pt(*c), _pt(occ.rx * h, occ.ry * h), occ.angle, 0, 360, occ.colour, -1,
              cv2.LINE_AA)
  if occ.hand:  # three finger gaps across the back of the hand
    gap = tuple(int(0.7 * v) for v in occ.colour)
    rad = np.deg2rad(occ.angle)
    along, across = np.array([np.cos(rad), np.sin(rad)]), np.array([-np.sin(rad), np.cos(rad)])
    for k in (-0.5, 0.0, 0.5):
      mid = np.array(c) + k * occ.ry * h * across
      a, b = mid - 0.7 * occ.rx * h * along, mid + 0.7 * occ.rx * h * along
      cv2.line(img, _pt(*a), _pt(*b), gap, max(1, int(0.01 * h)), cv2.LINE_AA)


def motion_blur(img: np.ndarray, length: float, angle: float) -> np.ndarray:
  """Blur along a line of ``length`` pixels at ``angle`` degrees: a fast head or camera move."""
  size = int(np.ceil(length)) | 1
  kernel = np.zeros((size, size), np.float32)
  mid = size // 2
  rad = np.deg2rad(angle)
  dx, dy = 0.5 * length * np.cos(rad), 0.5 * length * np.sin(rad)
  cv2.line(kernel, _pt(mid - dx, mid - dy), _pt(mid + dx, mid + dy), 1.0, 1, cv2.LINE_AA)
  kernel /= kernel.sum()
  return cv2.filter2D(img, -1, kernel, borderType=cv2.BORDER_REFLECT)


def jpeg_artifacts(img: np.ndarray, quality: int) -> np.ndarray:
  """The frame through a JPEG encoder at a low ``quality``: blocks and ringing."""
  ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
  assert ok
  return cv2.imdecode(buf, cv2.IMREAD_UNCHANGED)
