"""A thin Python client for the ``gpt2`` text-generation model on Triton.

from client import Gpt2Client, GenerationParams

with Gpt2Client() as c:                       # gRPC, 127.0.0.1:8001
    print(c.generate("Hello", GenerationParams(max_tokens=32)).text)
    for piece in c.stream("Hello"):
        print(piece, end="", flush=True)
"""

from client.core import (
    ClientError,
    GenerationParams,
    GenerationResult,
    Gpt2Client,
    TextStream,
)

__all__ = ["ClientError", "GenerationParams", "GenerationResult", "Gpt2Client", "TextStream"]
