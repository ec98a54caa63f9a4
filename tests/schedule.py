"""The order test files start in: longest first, so `make test`'s two workers end together.

`make test` runs two pytest-xdist workers with ``--dist loadfile``: the controller hands out
whole files from a queue, in order, to whichever worker is free. With xdist's default queue
(files with the most tests first) a file with few but slow tests (the two-process resume, the
accelerator dry run) came last and ran alone at the end while the other worker idled. Taking
the longest files first (the classic longest-processing-time rule) leaves only short files
for the end. conftest.py sorts the collected tests by file with this table and turns off
xdist's own reordering.

FILE_SECONDS is each file's wall time in a 2-worker run on the 2-core development machine
(setup included, so a session fixture counts against the file that builds it first). They
were measured with the machine loaded (load average ~8, about 2.5 times a quiet machine's
times); the last files of that run, marked "est.", are the quiet fresh-clone durations of
their slowest tests times 2.5. Only the order matters, so the numbers need no refresh unless
a file's rank changes a lot; a file missing from the table (a new one) is placed as if it
took DEFAULT_SECONDS. Refresh:

  pytest -n 2 --dist loadfile --junitxml=/tmp/run.xml tests
  python tests/schedule.py /tmp/run.xml        # prints a new table to paste below
"""

import collections
import sys
import xml.etree.ElementTree as ET

DEFAULT_SECONDS = 60.0

FILE_SECONDS = {
    "test_training_resume.py": 1200,     # est.: two-process 237 s, EMA 143 s, SIGKILL 85 s
    "test_training_step.py": 1074,
    "test_layers.py": 551,
    "test_accelerator_check.py": 510,    # est.: 205 s
    "test_faults.py": 476,
    "test_training_loop.py": 368,
    "test_model.py": 366,
    "test_tfds_source.py": 332,
    "test_features.py": 275,
    "test_predict.py": 266,
    "test_swin.py": 262,
    "test_prep_tfds.py": 230,            # est.: 93 s
    "test_performance.py": 214,
    "test_ablate.py": 205,
    "test_temporal.py": 184,
    "test_swin_import.py": 153,
    "test_prep_detect.py": 138,
    "test_planning.py": 100,
    "test_synth.py": 90,
    "test_convert_families.py": 72,
    "test_encoder_policy.py": 71,
    "test_clips.py": 70,
    "test_prep_bad_inputs.py": 65,
    "test_face_track.py": 54,
    "test_pipeline.py": 53,
    "test_wav2vec2.py": 52,
    "test_vit_import.py": 31,
    "test_face_detector.py": 22,
    "test_prep_features.py": 16,
    "test_prep_release.py": 14,
    "test_prep_alignment.py": 4,
    "test_align.py": 2,
    "test_sampling.py": 2,
    "test_prep_media.py": 2,
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
