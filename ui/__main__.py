"""``make ui``: serve the chat page.

    python -m ui [--host 127.0.0.1] [--port 7860] [--triton-url 127.0.0.1:8001]
                 [--auth user:password] [--share] [--concurrency 16]
                 [--request-timeout 5] [--stream-timeout 30]

Every flag has an environment variable: GPT2_UI_HOST, GPT2_UI_PORT, TRITON_URL,
GPT2_UI_AUTH, GPT2_UI_CONCURRENCY, GPT2_UI_REQUEST_TIMEOUT, GPT2_UI_STREAM_TIMEOUT.
No public share link unless --share.
"""

from __future__ import annotations

import argparse
import os
import sys

from client.core import ClientError
from gpt2_triton import logs
from ui.chat import ChatService, PageLimits


def main(argv: list[str] | None = None) -> int:
    env = os.environ.get
    parser = argparse.ArgumentParser(prog="python -m ui", description=__doc__.splitlines()[0])
    parser.add_argument("--host", default=env("GPT2_UI_HOST", "127.0.0.1"))
    # the defaults are strings: argparse converts them as it does a flag's value, so a bad
    # environment variable is a usage error that names the flag, not a traceback
    parser.add_argument("--port", type=int, default=env("GPT2_UI_PORT", "7860"))
    parser.add_argument(
        "--triton-url", default=env("TRITON_URL", "127.0.0.1:8001"), help="Triton gRPC address"
    )
    parser.add_argument("--auth", default=env("GPT2_UI_AUTH"), help="user:password")
    parser.add_argument("--share", action="store_true", help="ask Gradio for a public link")
    defaults = PageLimits()
    parser.add_argument(
        "--concurrency",
        type=int,
        default=env("GPT2_UI_CONCURRENCY", str(defaults.concurrency)),
        help="replies streaming at once, all users together",
    )
    parser.add_argument(
        "--request-timeout",
        type=float,
        default=env("GPT2_UI_REQUEST_TIMEOUT", str(defaults.request_timeout_s)),
        help="seconds to wait for readiness, model configuration and token counts",
    )
    parser.add_argument(
        "--stream-timeout",
        type=float,
        default=env("GPT2_UI_STREAM_TIMEOUT", str(defaults.stream_timeout_s)),
        help="seconds to wait for the first or the next piece of a reply",
    )
    args = parser.parse_args(argv)
    try:
        limits = PageLimits(args.concurrency, args.request_timeout, args.stream_timeout)
        ChatService(args.triton_url, limits=limits).client()  # the address, $API_KEY
    except (ValueError, ClientError) as exc:
        parser.error(str(exc))
    auth = None
    if args.auth:
        user, sep, password = args.auth.partition(":")
        if not sep or not user or not password:
            parser.error("--auth must be user:password")
        auth = (user, password)
    logs.setup()
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no calls home

    from ui.app import build, worker_threads

    page = build(ChatService(args.triton_url, limits=limits))
    print(f"Chat page on http://{args.host}:{args.port} (Triton at {args.triton_url})", flush=True)
    page.launch(
        server_name=args.host,
        server_port=args.port,
        auth=auth,
        share=args.share,
        show_error=False,
        max_threads=worker_threads(limits),
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
