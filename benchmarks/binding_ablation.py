"""The binding ablation table (issue 21) from finished demo runs, one row per run and prior mode.

    python -m benchmarks.binding_ablation runs/demo runs/ablation/negclip ...

Reads each run's `report/shapes_accuracy.json` (`unclip evaluate-shapes`: exact single / two-object
accuracy and the GenEval-style breakdown, with the prior and with z_t fed to the decoder) and the
CLIP stage's last validation binding probes (`val/binding_attribution`, `val/binding_relation`)
from its offline W&B run; prints a markdown table. Every run is step-budgeted, so the table does
not depend on how busy the machine was.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def clip_probes(run: Path) -> dict[str, float | None]:
    from callbacks.loggers import read_offline_run

    found = sorted((run / "clip" / "wandb").glob("offline-run-*"))
    if not found:
        return {}
    scalars = read_offline_run(found[-1], wait_s=0).scalars()
    return {k: (scalars.get(f"val/binding_{k}") or [None])[-1] for k in ("attribution", "relation")}


def rows(run: Path) -> list[dict[str, object]]:
    report = json.loads((run / "report" / "shapes_accuracy.json").read_text())
    probes = clip_probes(run)
    out = []
    for mode in ("prior", "text"):
        if mode not in report:
            continue
        table, geneval = report[mode], report[mode].get("geneval", {})
        out.append({"run": run.name, "z_i from": "prior" if mode == "prior" else "z_t (no prior)",
                    "single": table["single_object_accuracy"], "two-object": table["two_object_accuracy"],
                    "two, objects only": table["two_object_objects_accuracy"], **{f"geneval {k}": v for k, v in geneval.items()},
                    "CLIP attribution probe": probes.get("attribution"), "CLIP relation probe": probes.get("relation"),
                    "prompts": report["num_prompts"]})
    return out


def markdown(table: list[dict[str, object]]) -> str:
    keys = list(dict.fromkeys(k for row in table for k in row))
    fmt = lambda v: "-" if v is None else (f"{v:.3f}" if isinstance(v, float) else str(v))  # noqa: E731
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(fmt(row.get(k)) for k in keys) + " |" for row in table]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="demo output roots (unclip demo --out ...)")
    args = parser.parse_args(argv)
    print(markdown([row for run in args.runs for row in rows(run)]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
