"""Exit 0 if Triton at URL answers its statistics API, else say why (for bench-pa/genai).

perf_analyzer reads that API and cannot send the admin key over gRPC: the server must be
started with ``make serve OPEN_TRITON_STATISTICS=1``. ``python -m benchmarks.statistics_check
HOST:PORT [MODEL]``.
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    args = sys.argv[1:] if argv is None else argv
    url, model = args[0], (args[1] if len(args) > 1 else "gpt2")
    client = grpcclient.InferenceServerClient(url)
    try:
        client.get_inference_statistics(model)
    except InferenceServerException as exc:
        message = exc.message() or ""
        if "restricted" in message:
            print(
                f"error: Triton's statistics API at {url} is closed ({message}): serve with "
                "`make serve OPEN_TRITON_STATISTICS=1`",
                file=sys.stderr,
            )
        else:
            print(f"error: Triton's statistics API at {url}: {message}", file=sys.stderr)
        return 2
    finally:
        client.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
