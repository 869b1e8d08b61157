"""The speed comparison: bench."""

import sys

from ldmkit.cli.common import _list, _print_report
from ldmkit.errors import LdmkitError


def cmd_bench(args) -> int:
    from ldmkit.evaluation import bench, bench_report, bench_transformer

    precisions = ("fp32", "bf16") if args.precision == "both" else (args.precision,)
    progress = (lambda m: None) if args.quiet else (lambda m: print(m, file=sys.stderr))
    vs = bench.check_peers(_list(args.vs, str, "vs"), args.model, args.quick)
    if args.model == "sd3.5-medium":  # the transformer alone: one guidance pair
        if vs != ("diffusers",):
            raise LdmkitError(f"--vs {','.join(vs)}: --model sd3.5-medium is measured against diffusers only")
        report = bench_transformer.run(quick=args.quick, precisions=precisions, progress=progress)
        report["machine"].update(bench_report.describe_cpu())  # its peaks stay where that report keeps them
    else:
        report = bench.run(args.quick, vs, precisions, progress, args.model, args.rows)
        progress("\n" + bench_report.format_table(report))  # stdout stays the JSON report alone
    return _print_report(report, args.json, "bench")


def add_parsers(sub) -> None:
    p = sub.add_parser("bench", help="measure ldmkit against its peers on the SD 1.5, SDXL or SD3.5 architecture")
    p.add_argument(
        "--model",
        default="sd15",
        choices=["sd15", "sdxl", "sd3.5-medium"],
        help="the architecture (random weights); sd3.5-medium: its transformer's guidance pair at 1024²",
    )
    p.add_argument(
        "--vs",
        default="diffusers",
        metavar="PEER[,PEER...]",
        help="the peers, comma-separated: diffusers (default), openvino, sdcpp (stable-diffusion.cpp; not "
        "with --quick), ldmkit-openvino (ours with --backend openvino); all but diffusers only with --model sd15",
    )
    p.add_argument("--quick", action="store_true", help="the tiny preset: a smoke test, not a measurement")
    p.add_argument(
        "--rows",
        choices=["all", "unet"],
        default="all",
        help="all (default): UNet calls, VAE decode and a whole image; unet: the UNet calls alone",
    )
    p.add_argument("--precision", default="both", choices=["both", "fp32", "bf16"])
    p.add_argument("--json", help="also write the report here")
    p.add_argument("-q", "--quiet", action="store_true")
    p.set_defaults(func=cmd_bench)
