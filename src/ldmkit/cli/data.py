"""Datasets: shapes (the synthetic shapes world) and emoji-data (the open emoji sets)."""

import json
from pathlib import Path

from ldmkit.errors import LdmkitError


def cmd_emoji_data(args) -> int:
    from ldmkit.data.emoji import fetch, prepare

    if args.size <= 0 or not 0 <= args.heldout_fraction < 1:
        raise LdmkitError("--size: allowed 1 or more; --heldout-fraction: allowed 0 <= f < 1")
    out = Path(args.out).expanduser()
    if out.exists():
        raise LdmkitError(f"{out}: already exists; choose a new --out (or remove it)")
    archives = fetch(Path(args.cache).expanduser())
    manifest = prepare(archives, out, args.size, heldout_fraction=args.heldout_fraction)
    print(json.dumps({"written": str(out), **manifest}))
    return 0


def cmd_shapes(args) -> int:
    import time

    from ldmkit.data.shapes_export import export

    t = time.perf_counter()
    info = export(args.out, args.split, args.n, args.seed, args.size, args.format, args.shard_size, args.extras)
    info["seconds"] = round(time.perf_counter() - t, 2)
    print(json.dumps(info))
    return 0


def add_emoji_data(sub) -> None:
    p = sub.add_parser("emoji-data", help="fetch and prepare the open emoji image sets (Noto, Twemoji) with captions")
    p.add_argument("--out", required=True, help="new dataset folder (train/, heldout/, NOTICE.txt)")
    p.add_argument("--cache", default="~/.cache/ldmkit-emoji", help="where the npm archives are kept")
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--heldout-fraction", type=float, default=0.05, help="emoji held out, each in one style")
    p.set_defaults(func=cmd_emoji_data)


def add_shapes(sub) -> None:
    p = sub.add_parser("shapes", help="write shapes-world images with captions (folder or tar shards)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--split", default="train", choices=["train", "val", "heldout"])
    p.add_argument("--n", type=int, default=10000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", type=int, default=64, help="image side in pixels (default 64)")
    p.add_argument("--format", default="folder", choices=["folder", "shards"])
    p.add_argument("--shard-size", type=int, default=1000)
    p.add_argument("--extras", action="store_true", help="also write each image's edge map and mask")
    p.set_defaults(func=cmd_shapes)
