"""The speed comparison: bench."""

import sys

from ldmkit.cli.common import _print_report


def cmd_bench(args) -> int:
    from ldmkit.evaluation.bench import run

    precisions = ("fp32", "bf16") if args.precision == "both" else (args.precision,)
    report = run(
        quick=args.quick,
        precisions=precisions,
        progress=(lambda m: None) if args.quiet else (lambda m: print(m, file=sys.stderr)),
        model=args.model,
    )
    return _print_report(report, args.json, "bench")


def add_parsers(sub) -> None:
    p = sub.add_parser("bench", help="measure ldmkit against diffusers on the SD 1.5 or SDXL architecture")
    p.add_argument("--model", default="sd15", choices=["sd15", "sdxl"], help="the architecture (random weights)")
    p.add_argument("--vs", default="diffusers", choices=["diffusers"])
    p.add_argument("--quick", action="store_true", help="the tiny preset: a smoke test, not a measurement")
    p.add_argument("--precision", default="both", choices=["both", "fp32", "bf16"])
    p.add_argument("--json", help="also write the report here")
    p.add_argument("-q", "--quiet", action="store_true")
    p.set_defaults(func=cmd_bench)
