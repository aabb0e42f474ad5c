"""Command line: one prompt, or an interactive chat loop.

python -m client "Hello" --max-tokens 32 --stream
python -m client "Hello" --protocol http --temperature 0
python -m client --chat --wait 120
"""

from __future__ import annotations

import argparse
import sys

from client.core import ClientError, GenerationParams, Gpt2Client


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m client", description=__doc__.splitlines()[0])
    parser.add_argument("prompt", nargs="?", help="the prompt (omit with --chat)")
    parser.add_argument("--chat", action="store_true", help="read prompts from the terminal")
    parser.add_argument("--protocol", choices=["grpc", "http"], default="grpc")
    parser.add_argument("--url", help="host:port (default 127.0.0.1:8001 gRPC, :8000 HTTP)")
    parser.add_argument("--model", default="gpt2")
    parser.add_argument("--stream", action="store_true", help="print text as it is generated")
    parser.add_argument("--max-tokens", type=int)
    parser.add_argument("--temperature", type=float)
    parser.add_argument("--top-k", type=int)
    parser.add_argument("--top-p", type=float)
    parser.add_argument("--repetition-penalty", type=float)
    parser.add_argument("--seed", type=int)
    parser.add_argument("--stop", action="append", default=[], help="stop word (repeatable)")
    parser.add_argument("--wait", type=float, default=0, help="wait up to N s for the server")
    args = parser.parse_args(argv)
    if not args.chat and args.prompt is None:
        parser.error("give a prompt, or --chat")
    return args


def run_one(client: Gpt2Client, prompt: str, params: GenerationParams, stream: bool) -> None:
    if stream:
        text_stream = client.stream(prompt, params)
        try:
            for piece in text_stream:
                print(piece, end="", flush=True)
        except KeyboardInterrupt:
            text_stream.cancel()
            print("\n[cancelled]")
            return
        result = text_stream.result
        print()
    else:
        result = client.generate(prompt, params)
        print(result.text)
    if result:
        print(
            f"[{result.finish_reason}: {result.num_output_tokens} tokens, "
            f"{result.tokens_per_s:.1f} tokens/s]",
            file=sys.stderr,
        )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    params = GenerationParams(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        repetition_penalty=args.repetition_penalty,
        seed=args.seed,
        stop_words=tuple(args.stop),
    )
    with Gpt2Client(args.url, args.protocol, args.model) as client:
        try:
            if args.wait:
                client.wait_until_ready(args.wait)
            if not args.chat:
                run_one(client, args.prompt, params, args.stream)
                return 0
            print(
                "Type a prompt and press Enter (Ctrl-D or 'exit' quits). GPT-2 continues your text."
            )
            while True:
                try:
                    prompt = input("> ")
                except (EOFError, KeyboardInterrupt):
                    print()
                    return 0
                if prompt.strip() in {"exit", "quit"}:
                    return 0
                if prompt.strip():
                    try:
                        run_one(client, prompt, params, stream=True)
                    except ClientError as exc:
                        print(f"error: {exc}", file=sys.stderr)
        except ClientError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1


if __name__ == "__main__":
    sys.exit(main())
