"""Logging set-up shared by the command-line entry points."""

import logging

PROJECT_LOGGERS = ("gpt2_triton", "training", "build_scripts", "client", "ui", "benchmarks")


def setup(verbose: bool = False) -> None:
    # Libraries (ONNX Runtime's quantizer among them) log chatter at INFO on the root
    # logger; keep the root at WARNING and let only the project's own loggers speak.
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    for name in PROJECT_LOGGERS:
        logging.getLogger(name).setLevel(logging.DEBUG if verbose else logging.INFO)
