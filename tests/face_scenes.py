"""Synthetic face scenes shared by the tracking and prediction tests."""

from __future__ import annotations

import numpy as np

from data_prep import synth_render

HEIGHT, WIDTH = 240, 400
NUM_FRAMES = 36
GAP = range(20, 26)        # 0-based frames on which the right person is hidden


def draw_crossing_video():
  """Two people side by side whose sizes cross (left grows 70 -> 150 px, right shrinks
  150 -> 70) while both drift a little; the right one is hidden on the frames of GAP.

  Returns:
    (frames, truth): truth[p][i] is person p's landmarks on frame i, or None when hidden.
  """
  rng = np.random.default_rng(0)
  background = synth_render.random_background(rng, HEIGHT, WIDTH)
  people = [synth_render.FaceIdentity((232, 190, 160), (50, 40, 30), 1.0, 0.77, 0.39),
            synth_render.FaceIdentity((172, 114, 80), (20, 16, 12), 1.0, 0.74, 0.37)]
  t = np.linspace(0.0, 1.0, NUM_FRAMES)
  sizes = [70 + 80 * t, 150 - 80 * t]
  xs = [110 + 15 * t, 290 - 15 * t]
  frames, truth = [], [[], []]
  for i in range(NUM_FRAMES):
    frame = background.copy()
    for p, ident in enumerate(people):
      if p == 1 and i in GAP:
        truth[p].append(None)
        continue
      sized = synth_render.FaceIdentity(ident.skin, ident.hair, float(sizes[p][i]), ident.aspect,
                                        ident.eye_gap)
      truth[p].append(synth_render.draw_posed_face(frame, (xs[p][i], 125.0 + 3 * np.sin(i / 4)),
                                                   sized, (i // 9 + p) % 4, yaw=10 * np.sin(i / 6)))
    frames.append(frame)
  return frames, truth
