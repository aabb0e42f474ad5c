"""``make ui``: serve the chat page.

    python -m ui [--host 127.0.0.1] [--port 7860] [--triton-url 127.0.0.1:8001]
                 [--auth user:password] [--share]

Every flag has an environment variable: GPT2_UI_HOST, GPT2_UI_PORT, TRITON_URL,
GPT2_UI_AUTH. No public share link unless --share.
"""

from __future__ import annotations

import argparse
import os
import sys

from gpt2_triton import logs


def main(argv: list[str] | None = None) -> int:
    env = os.environ.get
    parser = argparse.ArgumentParser(prog="python -m ui", description=__doc__.splitlines()[0])
    parser.add_argument("--host", default=env("GPT2_UI_HOST", "127.0.0.1"))
    parser.add_argument("--port", type=int, default=int(env("GPT2_UI_PORT", "7860")))
    parser.add_argument(
        "--triton-url", default=env("TRITON_URL", "127.0.0.1:8001"), help="Triton gRPC address"
    )
    parser.add_argument("--auth", default=env("GPT2_UI_AUTH"), help="user:password")
    parser.add_argument("--share", action="store_true", help="ask Gradio for a public link")
    args = parser.parse_args(argv)
    auth = None
    if args.auth:
        user, sep, password = args.auth.partition(":")
        if not sep or not user or not password:
            parser.error("--auth must be user:password")
        auth = (user, password)
    logs.setup()
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no calls home

    from ui.app import build
    from ui.chat import ChatService

    page = build(ChatService(args.triton_url))
    print(f"Chat page on http://{args.host}:{args.port} (Triton at {args.triton_url})", flush=True)
    page.queue().launch(
        server_name=args.host, server_port=args.port, auth=auth, share=args.share, show_error=False
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
