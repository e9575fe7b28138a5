"""`vllm-restkv`: project commands that are not `vllm serve` itself.

    vllm-restkv model prepare [--name smollm2|tiny|moderator|moderator-threads]   build an offline model once, print its directory
    vllm-restkv version                                plugin and supported vLLM versions
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vllm-restkv", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    model = sub.add_parser("model", help="offline models").add_subparsers(dest="action", required=True)
    prep = model.add_parser("prepare", help="build the model if needed and print its directory")
    from vllm_restkv.models import MODEL_NAMES

    prep.add_argument("--name", choices=MODEL_NAMES, default="smollm2")
    prep.add_argument("--cache-dir", default=None, help="default: $VLLM_RESTKV_MODEL_DIR or ~/.cache/vllm-restkv/models")
    sub.add_parser("version", help="print versions")
    args = parser.parse_args(argv)

    if args.command == "model":
        from pathlib import Path

        from vllm_restkv.models import prepare

        path = prepare(args.name, Path(args.cache_dir) if args.cache_dir else None,
                       log=lambda m: print(m, file=sys.stderr))
        print(path)
        return 0
    if args.command == "version":
        from vllm_restkv import __version__
        from vllm_restkv.version import SUPPORTED_VLLM_VERSION, installed_vllm_version

        print(f"vllm-restkv {__version__}; supports vLLM {SUPPORTED_VLLM_VERSION}; installed vLLM {installed_vllm_version()}")
        return 0
    return 2


if __name__ == "__main__":
    sys.exit(main())
