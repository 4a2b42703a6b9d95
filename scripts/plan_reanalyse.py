"""Recompute a saved plan's collectives and roofline from its HLO text, without compiling again.

    python scripts/plan_reanalyse.py docs/plan/PLAN.json PROGRAM.hlo   # the HLO from `jaxalign plan --hlo`

The plan file is rewritten in place and printed.
"""

import json
import sys
from pathlib import Path

from jaxalign.jobs import plan


def main(plan_path: str, hlo_path: str) -> None:
    p = plan.reanalyse(json.loads(Path(plan_path).read_text()), Path(hlo_path).read_text())
    plan.write_json(p, plan_path)
    print(plan.format_plan(p))


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    main(*sys.argv[1:])
