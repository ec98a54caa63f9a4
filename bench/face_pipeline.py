r"""Face pipeline speed: decode + detection + landmarks + tracking + alignment on 640x360 video.

  python -m bench.face_pipeline                            # detect_every 1 and 5, 1 process
  python -m bench.face_pipeline --processes=2              # two videos at once (2 cores)
  python -m bench.face_pipeline --people=2 --frames=300

Writes a synthetic 640x360 H.264 video (not timed) of --people drawn faces (120-200 pixels
tall, moving, turning up to 35 degrees), then runs exactly what prediction and
``data_prep.build --detect`` run on it: `mfer_jax.media.faces.track_video` (decode, detect,
O-Net landmarks, track) and `aligned_faces` (decode again, align every tracked face to
112x112). Each --detect_every value runs --rounds times, alternating, in fresh worker
processes so a round starts cold like a real run.

Reported per value (medians over rounds): frames/s of the whole video (wall clock, all
processes together), CPU ms per frame (process time, which other jobs on a shared machine
do not inflate), and the tracking pass's share of it. With --processes=N, N copies of the
video run in parallel, one per process: the throughput of a machine with N cores working
through a dataset (how data_prep.build's --workers uses them).
"""

from __future__ import annotations

import concurrent.futures
import multiprocessing
import os
import pathlib
import tempfile
import time

from absl import flags
import numpy as np

from data_prep import media_write, synth_render
from mfer_jax import cli

_FRAMES = flags.DEFINE_integer("frames", 150, "Frames of the test video.")
_PEOPLE = flags.DEFINE_integer("people", 1, "Faces in the video (1 or 2).")
_DETECT_EVERY = flags.DEFINE_list("detect_every", ["1", "5"], "Values to compare.")
_ROUNDS = flags.DEFINE_integer("rounds", 3, "Rounds (each runs every value once).")
_PROCESSES = flags.DEFINE_integer("processes", 1, "Videos processed at once, one per process.")
_MAX_SIDE = flags.DEFINE_integer("max_side", 640, "FaceDetector max_side (detection "
                                 "resolution; 640 = full size here).")

HEIGHT, WIDTH = 360, 640


def _write_video(path: pathlib.Path, num_frames: int, people: int) -> None:
  rng = np.random.default_rng(0)
  background = synth_render.random_background(rng, HEIGHT, WIDTH)
  idents = [synth_render.random_identity(rng, HEIGHT) for _ in range(people)]
  slots = [WIDTH / 2] if people == 1 else [WIDTH / 3, 2 * WIDTH / 3]
  frames = []
  for i in range(num_frames):
    frame = background.copy()
    for p, (ident, x) in enumerate(zip(idents, slots)):
      size = 160 + 40 * np.sin(i / 40 + p)
      sized = synth_render.FaceIdentity(ident.skin, ident.hair, float(size), ident.aspect,
                                        ident.eye_gap)
      synth_render.draw_posed_face(frame, (x + 30 * np.sin(i / 25 + p), 180 + 10 * np.sin(i / 17)),
                                   sized, (i // 30) % 4, yaw=35 * np.sin(i / 30 + p),
                                   roll=10 * np.sin(i / 45))
    frames.append(frame)
  media_write.write_video(path, np.stack(frames), 30)


def _run_once(path: str, detect_every: int, max_side: int) -> tuple[float, float, int]:
  """One video through the face pipeline: (track CPU s, align CPU s, frames)."""
  from mfer_jax.media import faces  # pylint: disable=g-import-not-at-top
  from mfer_jax.media import detector  # pylint: disable=g-import-not-at-top
  face_detector = detector.FaceDetector(max_side=max_side)
  face_detector.detect(np.zeros((HEIGHT, WIDTH, 3), np.uint8))   # models built, not timed
  start = time.process_time()
  tracked = faces.track_video(path, detect_every=detect_every, face_detector=face_detector)
  mid = time.process_time()
  chosen = [t for _, t in tracked.select("all")]
  for _ in faces.aligned_faces(path, chosen):
    pass
  return mid - start, time.process_time() - mid, tracked.num_frames


def _round(path: str, detect_every: int, processes: int, pool) -> tuple[float, float, float]:
  """(wall fps over all processes, CPU ms per frame, tracking share)."""
  start = time.perf_counter()
  futures = [pool.submit(_run_once, path, detect_every, _MAX_SIDE.value)
             for _ in range(processes)]
  results = [f.result() for f in futures]
  wall = time.perf_counter() - start
  frames = sum(r[2] for r in results)
  cpu = sum(r[0] + r[1] for r in results)
  return frames / wall, 1000 * cpu / frames, sum(r[0] for r in results) / cpu


def main() -> None:
  values = [int(v) for v in _DETECT_EVERY.value]
  with tempfile.TemporaryDirectory() as tmp:
    path = pathlib.Path(tmp) / "faces.mp4"
    _write_video(path, _FRAMES.value, _PEOPLE.value)
    print(f"{_FRAMES.value} frames of {WIDTH}x{HEIGHT}, {_PEOPLE.value} face(s), "
          f"{_PROCESSES.value} process(es), max_side {_MAX_SIDE.value}, "
          f"{os.cpu_count()} CPUs visible")
    stats = {v: [] for v in values}
    ctx = multiprocessing.get_context("spawn")
    for r in range(_ROUNDS.value):
      for v in (values if r % 2 == 0 else values[::-1]):
        with concurrent.futures.ProcessPoolExecutor(_PROCESSES.value, mp_context=ctx) as pool:
          # Warm-up: imports and models, in each worker.
          for f in [pool.submit(_run_once, str(path), 1_000_000, _MAX_SIDE.value)
                    for _ in range(_PROCESSES.value)]:
            f.result()
          stats[v].append(_round(str(path), v, _PROCESSES.value, pool))
        print(f"  round {r + 1} detect_every={v}: {stats[v][-1][0]:.1f} frames/s, "
              f"{stats[v][-1][1]:.1f} CPU ms/frame", flush=True)
    print("detect_every  frames/s (wall)  CPU ms/frame  tracking share")
    for v in values:
      fps, cpu, share = np.median(np.array(stats[v]), axis=0)
      print(f"{v:12d}  {fps:15.1f}  {cpu:12.1f}  {share:14.0%}")


if __name__ == "__main__":
  cli.run(main)
