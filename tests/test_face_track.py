"""mfer_jax.media.track: stable tracks through size changes and gaps, and person selection."""

import numpy as np
import pytest

from mfer_jax.media import detector, track

from face_scenes import GAP, NUM_FRAMES, draw_crossing_video


@pytest.fixture(scope="module")
def crossing_video():
  return draw_crossing_video()


@pytest.fixture(scope="module")
def face_detector():
  return detector.FaceDetector()


def _run(frames, tracker):
  for number, frame in enumerate(frames, start=1):
    tracker.update(number, frame)
  return tracker.finish()


def _owner(face, truth, i):
  """Which person (0 or 1) a tracked face is, by its landmarks; None if it is neither."""
  dists = [np.inf if truth[p][i] is None else np.linalg.norm(face.landmarks - truth[p][i],
                                                                axis=1).mean()
           for p in (0, 1)]
  p = int(np.argmin(dists))
  eye_distance = np.linalg.norm(truth[p][i][1] - truth[p][i][0])
  return p if dists[p] < 0.5 * eye_distance else None


@pytest.mark.parametrize("detect_every", [1, 4])
def test_two_people_crossing_sizes_keep_one_track_each(crossing_video, face_detector,
                                                       detect_every):
  frames, truth = crossing_video
  tracks = _run(frames, track.FaceTracker(face_detector, detect_every=detect_every))
  assert len(tracks) == 2, [(t.track_id, t.frames) for t in tracks]
  owners = []
  for t in tracks:
    who = {_owner(face, truth, number - 1) for number, face in zip(t.frames, t.faces)}
    assert len(who) == 1 and None not in who, (t.track_id, who)   # never swaps people
    owners.append(who.pop())
  assert sorted(owners) == [0, 1]
  # After the gap the right person is found again on the first detection frame.
  back = GAP[-1] + 2
  found_again = next(n for n in range(back, NUM_FRAMES + 1) if (n - 1) % detect_every == 0)
  for t, p in zip(tracks, owners):
    visible = [i + 1 for i in range(NUM_FRAMES) if truth[p][i] is not None
               and not (p == 1 and back <= i + 1 < found_again)]
    assert t.frames == visible          # a face on every frame the person is visible
    if detect_every > 1:
      assert not all(t.detected)        # frames between detections were followed by O-Net
  # The right person's gap (6 frames) is bridged: still one track, and no face in the gap.
  right = tracks[owners.index(1)]
  assert all(right.face_at(i + 1) is None for i in GAP)
  # Named like Aff-Wild2: left and right by position, whatever their sizes.
  named = dict(track.select_tracks(tracks, "all"))
  assert named["_left"] is tracks[owners.index(0)] and named["_right"] is right
  # largest = present in the most frames: the left person, though smaller at first.
  assert track.select_tracks(tracks, "largest") == [("", tracks[owners.index(0)])]
  assert track.select_tracks(tracks, "right") == [("", right)]


def test_a_gap_longer_than_max_gap_starts_a_new_track(crossing_video, face_detector):
  frames, _ = crossing_video
  tracks = _run(frames, track.FaceTracker(face_detector, max_gap=3))
  assert len(tracks) == 3
  assert [t.frames[0] for t in tracks] == [1, 1, GAP[-1] + 2]
  # Two tracks of one side are not "side by side": numbered in order of appearance.
  assert [s for s, _ in track.select_tracks(tracks, "all")] == ["_person1", "_person2",
                                                                 "_person3"]


def test_unreadable_frames_count_but_have_no_face(crossing_video, face_detector):
  frames, _ = crossing_video
  frames = list(frames[:8])
  frames[3] = None
  tracks = _run(frames, track.FaceTracker(face_detector))
  assert len(tracks) == 2
  for t in tracks:
    assert t.frames == [1, 2, 3, 5, 6, 7, 8]
    has_face, boxes, landmarks = t.arrays(8)
    assert has_face.tolist() == [True] * 3 + [False] + [True] * 4
    assert np.isnan(boxes[3]).all() and not np.isnan(landmarks[4]).any()


def _fake_track(track_id, frames, x, size=50.0):
  t = track.Track(track_id)
  for n in frames:
    box = (x - size / 2, 100 - size / 2, x + size / 2, 100 + size / 2)
    t.frames.append(n)
    t.faces.append(detector.Face(box, np.zeros((5, 2)), 0.9))
    t.detected.append(True)
  return t


def test_select_tracks_rules():
  big_brief = _fake_track(1, range(1, 11), x=300, size=200)    # bigger, but in fewer frames
  subject = _fake_track(2, range(1, 41), x=100)
  blip = _fake_track(3, range(5, 8), x=200)                      # a 3-frame false alarm
  tracks = [big_brief, subject, blip]
  assert track.select_tracks(tracks, "largest") == [("", subject)]
  assert track.select_tracks(tracks, "left") == [("", subject)]
  assert track.select_tracks(tracks, "right") == [("", big_brief)]
  assert track.select_tracks(tracks, "all") == [("_left", subject), ("_right", big_brief)]
  assert track.select_tracks([subject, blip], "all") == [("", subject)]
  assert track.select_tracks([blip], "all") == [("", blip)]     # nothing longer: keep it
  assert track.select_tracks([], "largest") == []
  later = _fake_track(4, range(50, 60), x=300)
  assert track.select_tracks([subject, later], "all") == [("_person1", subject),
                                                          ("_person2", later)]
  with pytest.raises(ValueError):
    track.select_tracks(tracks, "tallest")
  with pytest.raises(ValueError):
    track.FaceTracker(None, detect_every=0)
