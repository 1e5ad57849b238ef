"""``python -m simulator`` and the ``canaryd-sim`` command: the simulator's tools.

Commands:
    serve   emulate an Istio mesh for a real Prometheus (see :mod:`simulator.serve`).

Errors a person can fix are one ``canaryd-sim: error: ...`` line on stderr, exit code 2.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import NoReturn

from simulator import serve

EXIT_OK, EXIT_USAGE = 0, 2

DESCRIPTION = """\
The canaryd simulator's tools: synthetic traffic for trying canaryd against a cluster
without real users.

examples:
  canaryd-sim serve --kubeconfig ~/.kube/config --namespace shop
  canaryd-sim serve --kubeconfig kc.yaml --scenario error-spike --speed 10
  canaryd-sim serve --help
"""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\nTry '{self.prog} --help'.\n")


def build_parser() -> argparse.ArgumentParser:
    """The ``canaryd-sim`` argument parser."""
    parser = _Parser(
        prog="canaryd-sim",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    serve.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; the exit code (the console script exits with it)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    if args.command is None:
        parser.print_help()
        return EXIT_OK
    try:
        code: int = args.handler(args)
    except serve.UsageError as exc:
        sys.stderr.write(f"{parser.prog}: error: {exc}\n")
        return EXIT_USAGE
    except KeyboardInterrupt:
        return EXIT_OK
    return code


if __name__ == "__main__":
    sys.exit(main())
