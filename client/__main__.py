"""Command line: one prompt, or an interactive chat loop.

python -m client "Hello" --max-tokens 32 --stream
python -m client "Hello" --protocol http --temperature 0
python -m client --chat --wait 120

Ctrl-C cancels the generation on the server and exits 130 (the notice on stderr: stdout
holds the text alone); a reader gone from stdout (`| head`) cancels it and exits 141.
"""

from __future__ import annotations

import argparse
import os
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
    parser.add_argument("--min-tokens", type=int, help="no end-of-text before this many tokens")
    parser.add_argument("--stop", action="append", default=[], help="stop word (repeatable)")
    parser.add_argument("--wait", type=float, default=0, help="wait up to N s for the server")
    args = parser.parse_args(argv)
    if not args.chat and args.prompt is None:
        parser.error("give a prompt, or --chat")
    if args.chat and args.prompt is not None:
        parser.error(
            f"--chat reads its prompts from the terminal: give a prompt ({args.prompt!r}) "
            "or --chat, not both"
        )
    return args


# Exit statuses of a process ended by SIGINT (Ctrl-C) and by SIGPIPE (its reader gone,
# as `| head` does): 128 + the signal's number, what a shell reports for them.
EXIT_INTERRUPTED = 130
EXIT_BROKEN_PIPE = 141


def run_one(client: Gpt2Client, prompt: str, params: GenerationParams, stream: bool) -> None:
    """Print one generation. Ctrl-C or a closed stdout cancels it on the server: the
    exception then goes on to the caller, which says how the process ends."""
    if stream:
        text_stream = client.stream(prompt, params)
        try:
            for piece in text_stream:
                print(piece, end="", flush=True)
        except (KeyboardInterrupt, BrokenPipeError):
            text_stream.cancel()
            raise
        result = text_stream.result
        print(flush=True)  # here, not at exit: a closed stdout is then this call's error
    else:
        # Ctrl-C while waiting closes the request's connection or stream: that cancels it
        result = client.generate(prompt, params)
        print(result.text, flush=True)
    if result:
        print(
            f"[{result.finish_reason}: {result.num_output_tokens} tokens, "
            f"{result.tokens_per_s:.1f} tokens/s]",
            file=sys.stderr,
        )


def interrupted() -> None:
    """The notice for Ctrl-C, on stderr: stdout holds the generated text alone."""
    print("\n[cancelled]", file=sys.stderr)


def quiet_stdout() -> None:
    """Point stdout at /dev/null once its reader is gone, so that Python's flush at exit
    does not fail (and print a second error) on the same broken pipe."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


def chat_loop(client: Gpt2Client, params: GenerationParams) -> int:
    print("Type a prompt and press Enter (Ctrl-D or 'exit' quits). GPT-2 continues your text.")
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
            except KeyboardInterrupt:  # Ctrl-C stops the reply, not the session
                interrupted()
            except ClientError as exc:
                print(f"error: {exc}", file=sys.stderr)


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
        min_length=args.min_tokens,
    )
    try:
        client = Gpt2Client(args.url, args.protocol, args.model)
    except ClientError as exc:  # the address or $API_KEY: a usage error, as argparse's
        print(f"error: {exc}", file=sys.stderr)
        return 2
    with client:
        try:
            if args.wait:
                client.wait_until_ready(args.wait)
            if args.chat:
                return chat_loop(client, params)
            run_one(client, args.prompt, params, args.stream)
            return 0
        except ClientError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            interrupted()
            return EXIT_INTERRUPTED
        except BrokenPipeError:
            quiet_stdout()
            return EXIT_BROKEN_PIPE


if __name__ == "__main__":
    sys.exit(main())
