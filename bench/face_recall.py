r"""Face detector recall and landmark accuracy on turned and occluded synthetic faces.

  python -m bench.face_recall                       # the detector mfer-jax uses
  python -m bench.face_recall --detector=yunet_raw  # YuNet's own landmarks, no O-Net
  python -m bench.face_recall --detector=hog        # dlib's HOG detector, if dlib is installed

Each case draws --faces frames of 640x360 with one face (`data_prep.synth_render`
`draw_posed_face`: random identity and expression, face height 80-190 pixels, yaw of the given
magnitude to either side, pitch within +-10 degrees, roll within +-15), and, for the occluded
cases, a block over a third to a half of the face: the lower face, or one lower quarter. A
face counts as found when a detection's box centre lies within half a face width of the true
landmarks' centre and its width is 0.4-1.6 face widths.

Reported per case: recall, the median landmark error (mean over the five points, in units of
the true eye distance of the unturned face), the median error of the eyes after alignment
(where the true eye centres land in the 112x112 crop, in pixels from the template's; the same
figure for the true landmarks shows what the cartoon's own proportions cost), and the median
CPU time of a detection (process time, so other jobs on the machine do not inflate it; run
with OMP_NUM_THREADS=1 for one core). False alarms are counted on --faces empty backgrounds.
"""

from __future__ import annotations

import time

from absl import flags
import numpy as np

from data_prep import synth_render
from mfer_jax import cli
from mfer_jax.media import align, detector as detector_lib

_DETECTOR = flags.DEFINE_enum("detector", "ours", ["ours", "yunet_raw", "hog"],
                              "ours: YuNet + O-Net landmarks (mfer_jax.media.detector); "
                              "yunet_raw: YuNet's landmarks; hog: dlib HOG (boxes only).")
_FACES = flags.DEFINE_integer("faces", 40, "Frames per case.")
_YAWS = flags.DEFINE_list("yaws", ["0", "15", "30", "45", "60"], "Yaw magnitudes (degrees).")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the drawn faces.")
_MAX_SIDE = flags.DEFINE_integer("max_side", 640, "FaceDetector max_side: frames are reduced "
                                 "to this longer side for detection.")

HEIGHT, WIDTH = 360, 640


def _make_detect():
  """name -> callable(frame) returning [(box, landmarks or None)]."""
  if _DETECTOR.value == "hog":
    import dlib  # pylint: disable=g-import-not-at-top
    hog = dlib.get_frontal_face_detector()
    return lambda frame: [((r.left(), r.top(), r.right() + 1, r.bottom() + 1), None)
                          for r in hog(frame, 0)]
  det = detector_lib.FaceDetector(max_side=_MAX_SIDE.value,
                                  refine_landmarks=_DETECTOR.value == "ours")
  return lambda frame: [(f.box, f.landmarks) for f in det.detect(frame)]


def _scene(rng: np.random.Generator, yaw: float, occluded: bool):
  frame = synth_render.random_background(rng, HEIGHT, WIDTH)
  ident = synth_render.random_identity(rng, HEIGHT)
  ident = synth_render.FaceIdentity(ident.skin, ident.hair, ident.size * rng.uniform(0.35, 0.7),
                                    ident.aspect, ident.eye_gap)
  center = (rng.uniform(160, 480), rng.uniform(140, 220))
  truth = synth_render.draw_posed_face(
      frame, center, ident, int(rng.integers(synth_render.NUM_FACE_CODES)),
      yaw=yaw * rng.choice([-1, 1]), pitch=rng.uniform(-10, 10), roll=rng.uniform(-15, 15))
  h, w = ident.size, ident.size * ident.aspect
  if occluded:
    cx, cy = center
    if rng.uniform() < 0.5:    # a hand or an object over one lower quarter of the face
      x0 = cx + rng.choice([-1.0, 0.0]) * 0.5 * w
      frame[int(cy):int(cy + 0.6 * h), max(0, int(x0)):int(x0 + 0.5 * w)] = (90, 60, 50)
    else:                      # a mask or a scarf over the lower face
      frame[int(cy + 0.05 * h):int(cy + 0.6 * h), max(0, int(cx - 0.6 * w)):int(cx + 0.6 * w)] = (
          200, 200, 210)
  eye_distance = ident.eye_gap * w
  return frame, truth, w, eye_distance


def _eye_error(landmarks: np.ndarray, truth: np.ndarray) -> float:
  """Mean distance (crop pixels) of the true eyes from the template's after aligning with
  ``landmarks``."""
  eyes = align.transform_points(align.alignment_matrix(landmarks), truth[:2])
  return float(np.linalg.norm(eyes - align.ARCFACE_112[:2], axis=1).mean())


def main() -> None:
  detect = _make_detect()
  detect(np.zeros((HEIGHT, WIDTH, 3), np.uint8))   # builds the models outside the timing
  print(f"detector={_DETECTOR.value} max_side={_MAX_SIDE.value} faces per case={_FACES.value} "
        f"frame={WIDTH}x{HEIGHT}")
  print("case              recall  landmark err/eye dist  aligned eye err px (truth)  CPU ms")
  for occluded in (False, True):
    for yaw in (float(y) for y in _YAWS.value):
      rng = np.random.default_rng([_SEED.value, int(yaw), int(occluded)])
      found, errors, eye_errors, floor, times = 0, [], [], [], []
      for _ in range(_FACES.value):
        frame, truth, face_w, eye_distance = _scene(rng, yaw, occluded)
        start = time.process_time()
        results = detect(frame)
        times.append(time.process_time() - start)
        centre = truth.mean(0)
        for box, landmarks in results:
          box_centre = np.array([box[0] + box[2], box[1] + box[3]]) / 2
          if (np.linalg.norm(box_centre - centre) < 0.5 * face_w
              and 0.4 * face_w < box[2] - box[0] < 1.6 * face_w):
            found += 1
            floor.append(_eye_error(truth, truth))
            if landmarks is not None:
              errors.append(np.linalg.norm(landmarks - truth, axis=1).mean() / eye_distance)
              eye_errors.append(_eye_error(landmarks, truth))
            break
      med = lambda v: f"{np.median(v):.3f}" if v else "  -  "
      name = f"yaw {yaw:2.0f}{' occluded' if occluded else ''}"
      print(f"{name:17s} {found / _FACES.value:6.2f}  {med(errors):>21s}  "
            f"{med(eye_errors):>8s} ({med(floor)})  {1000 * np.median(times):6.1f}", flush=True)
  rng = np.random.default_rng([_SEED.value, 999])
  false_alarms = sum(len(detect(synth_render.random_background(rng, HEIGHT, WIDTH)))
                     for _ in range(_FACES.value))
  print(f"false alarms on {_FACES.value} empty backgrounds: {false_alarms}")


if __name__ == "__main__":
  cli.run(main)
