"""The order test files start in: longest first, so `make test`'s two workers end together.

`make test` runs two pytest-xdist workers with ``--dist loadfile``: the controller hands out
whole files from a queue, in order, to whichever worker is free. With xdist's default queue
(files with the most tests first) a file with few but slow tests (the two-process resume, the
accelerator dry run) came last and ran alone at the end while the other worker idled. Taking
the longest files first (the classic longest-processing-time rule) leaves only short files
for the end. conftest.py sorts the collected tests by file with this table and turns off
xdist's own reordering.

FILE_SECONDS is each file's seconds (its tests' setup, call and teardown, from junit XML) in
a 2-worker run on the 2-core development machine while other jobs kept the load average at
6-10 (1.2 to 2 times a quiet run's per-test times); a session fixture counts against the file
that built it. Only the order matters, so the numbers need no refresh unless a file's rank
changes a lot; a file missing from the table (a new one) is placed as if it took
DEFAULT_SECONDS. Refresh:

  pytest -n 2 --dist loadfile --junitxml=/tmp/run.xml tests
  python tests/schedule.py /tmp/run.xml        # prints a new table to paste below
"""

import collections
import sys
import xml.etree.ElementTree as ET

DEFAULT_SECONDS = 60.0

FILE_SECONDS = {
    "test_training_resume.py": 773,
    "test_training_step.py": 295,
    "test_faults.py": 284,
    "test_accelerator_check.py": 268,
    "test_temporal_training.py": 173,
    "test_errors.py": 144,
    "test_predict.py": 137,
    "test_features.py": 128,
    "test_training_loop.py": 111,
    "test_swin_import.py": 108,
    "test_tfds_source.py": 107,
    "test_encoder_policy.py": 102,
    "test_layers.py": 93,
    "test_prep_detect.py": 165,
    "test_ablate.py": 87,
    "test_synth.py": 87,
    "test_layer_decay.py": 79,
    "test_swin.py": 55,
    "test_convert_families.py": 54,
    "test_prep_e2e.py": 53,
    "test_prep_bad_inputs.py": 52,
    "test_model.py": 51,
    "test_performance.py": 43,
    "test_prep_resume.py": 42,
    "test_face_track.py": 39,
    "test_pipeline.py": 35,
    "test_planning.py": 33,
    "test_temporal.py": 29,
    "test_report.py": 27,
    "test_vit_import.py": 27,
    "test_wav2vec2.py": 24,
    "test_face_detector.py": 22,
    "test_clips.py": 15,
    "test_prep_release.py": 8,
    "test_prep_features.py": 8,
    "test_layout.py": 6,
    "test_prep_alignment.py": 2,
    "test_prep_media.py": 1,
    "test_prep_tfds.py": 1,
    "test_sampling.py": 1,
    "test_align.py": 1,
    "test_augment.py": 0,
}


def file_seconds(filename: str) -> float:
  """The table's seconds for a test file's base name (``test_x.py``)."""
  return FILE_SECONDS.get(filename, DEFAULT_SECONDS)


def table_from_junit(path: str) -> dict[str, int]:
  """Seconds per test file (base name) summed over a junit XML report's test cases."""
  seconds = collections.Counter()
  for case in ET.parse(path).getroot().iter("testcase"):
    # classname is "tests.test_x" (or "tests.test_x.TestClass"): the file is the test_ part.
    module = next(p for p in case.get("classname", "").split(".") if p.startswith("test_"))
    seconds[module + ".py"] += float(case.get("time", 0))
  return {name: round(s) for name, s in seconds.most_common()}


if __name__ == "__main__":
  for name, s in table_from_junit(sys.argv[1]).items():
    print(f"    {name!r}: {s},")
