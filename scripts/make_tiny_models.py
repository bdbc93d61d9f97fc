"""Write random-weight GGUF models (see localmoa.tinymodels) for tests, the demo and benchmarks.

    python scripts/make_tiny_models.py OUTDIR                       # tiny-a, tiny-b, tiny-c
    python scripts/make_tiny_models.py OUTDIR --preset large-100m   # named presets only

Each file is OUTDIR/<preset>.gguf; existing files are overwritten.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

# Run from a checkout without installing: the repository's package wins over an installed one.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

try:
    from localmoa.tinymodels import PRESETS, write_tiny_model
except ModuleNotFoundError as exc:  # gguf or numpy: the llamacpp extra is not installed
    print(f"error: {exc}", file=sys.stderr)
    sys.exit(2)

DEFAULT_PRESETS = ("tiny-a", "tiny-b", "tiny-c")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Write random-weight GGUF test models.")
    parser.add_argument("outdir", type=Path, help="directory for the .gguf files (created)")
    parser.add_argument(
        "--preset",
        action="append",
        metavar="NAME",
        help=f"preset to write, repeatable (default: {', '.join(DEFAULT_PRESETS)}; "
        f"known: {', '.join(PRESETS)})",
    )
    args = parser.parse_args(argv)
    names: list[str] = args.preset or list(DEFAULT_PRESETS)

    unknown = [n for n in names if n not in PRESETS]
    if unknown:
        print(
            f"error: unknown preset {', '.join(map(repr, unknown))}; "
            f"choose from {', '.join(PRESETS)}",
            file=sys.stderr,
        )
        return 2
    if args.outdir.exists() and not args.outdir.is_dir():
        print(f"error: {args.outdir} exists and is not a directory", file=sys.stderr)
        return 2
    try:
        args.outdir.mkdir(parents=True, exist_ok=True)
        for name in names:
            path = write_tiny_model(args.outdir / f"{name}.gguf", PRESETS[name])
            print(f"{path}  {path.stat().st_size / 1e6:.2f} MB")
    except OSError as exc:
        print(f"error: cannot write to {args.outdir}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
