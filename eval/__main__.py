"""``python -m eval ...``: the same options as ``audiollm eval``."""

import argparse
import logging
import sys

from eval.cli import add_eval_arguments, run_eval


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m eval", description=__doc__)
    add_eval_arguments(parser)
    parser.set_defaults(parser=parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    return run_eval(args)


if __name__ == "__main__":
    sys.exit(main())
