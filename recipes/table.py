"""README tables from `ldmkit eval` reports: one Markdown row per setting of each report given.

python recipes/table.py reports/shapes-cfg-val.json [more.json ...]
"""

import json
import sys

KINDS = ("single", "relation", "pair", "count")


def pct(x) -> str:
    return "–" if x is None else f"{100 * x:.0f}"


def main() -> None:
    print(
        "| report | split | cfg | steps | sampler | colour | shape | fully correct | "
        + " | ".join(f"{k} (n)" for k in KINDS)
        + " | diversity | s / image |"
    )
    print("|" + "---|" * (10 + len(KINDS)))
    for path in sys.argv[1:]:
        report = json.loads(open(path).read())
        for s in report["settings"]:
            kinds = [
                f"{pct(s['by_kind'][k]['fully_correct'])} ({s['by_kind'][k]['images']})" if k in s["by_kind"] else "–"
                for k in KINDS
            ]
            print(
                f"| {path.rsplit('/', 1)[-1]} | {report['split']} | {s['cfg']:g} | {s['steps']} | {s['sampler']} | "
                f"{pct(s['colour'])} | {pct(s['shape'])} | {pct(s['fully_correct'])} | "
                + " | ".join(kinds)
                + f" | {s['diversity']} | {s['seconds_per_image']:.3f} |"
            )


if __name__ == "__main__":
    main()
