"""Plots and a markdown summary of one trained run (`mfer_jax.reporting`).

  python -m mfer_jax.tools.report --workdir=runs/demo             # best eval, into runs/demo/report/
  python -m mfer_jax.tools.report --workdir=runs/demo --step=600 --out=/tmp/demo_report

Needs only the workdir's JSON files (eval/<step>.json, metrics.jsonl, config.json).
"""

from __future__ import annotations

from absl import flags

from mfer_jax import cli, reporting

_WORKDIR = flags.DEFINE_string("workdir", None, "Training run directory (with eval/).",
                               required=True)
_OUT = flags.DEFINE_string("out", None, "Output directory; default <workdir>/report.")
_STEP = flags.DEFINE_integer("step", None, "Eval step to report; default the best by macro-F1.")


def main() -> None:
  path = reporting.write_report(_WORKDIR.value, _OUT.value, _STEP.value)
  print(f"Wrote {path} and its plots in {path.parent}/")
  print("\n".join(l for l in path.read_text().splitlines() if l.startswith("- Evaluation")))


if __name__ == "__main__":
  cli.run(main)
