"""The llama.cpp peer of ``make bench-peer``: the same checkpoint served by ``llama-server``.

    python -m benchmarks.peer --model artifacts/models/gpt2-small-random

builds ``llama-server`` and ``llama-quantize`` from the llama-cpp-python sdist on PyPI (the
llama.cpp it vendors: a pinned, released source), once, into
``${XDG_CACHE_HOME:-~/.cache}/gpt2-triton/llama.cpp-<version>/`` (outside the repository:
~10 min on 2 cores, kept across ``make clean``), then writes the checkpoint as GGUF f32
and q8_0 with llama.cpp's own converter and quantizer into ``artifacts/gguf/<model>/``.
A second run reuses both. The harness (``--peer``) runs the server with
:class:`LlamaServer` and reads its stream with :func:`stream_completion`.
"""

from __future__ import annotations

import argparse
import http.client
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from gpt2_triton import checkpoint, logs
from gpt2_triton.cli import run_step
from gpt2_triton.errors import Gpt2TritonError
from gpt2_triton.process import popen_dying_with_parent, stop_group

log = logging.getLogger("benchmarks.peer")

LLAMA_CPP_PYTHON = "0.3.36"  # the sdist whose vendored llama.cpp is built
# NOTES.md's flags: native code for this CPU (what a user building llama.cpp gets), and
# nothing the server does not need (no curl/openssl: no downloads; no tests, no examples).
# Native minus AMX: on a Xeon with AMX (this project's development machines) the q8_0
# AMX kernel of this llama.cpp dies with SIGILL at load (a `tilezero` on a tile its
# config left unset; upstream ggml-org/llama.cpp#26954), although AMX itself works there.
# Without AMX, q8_0 takes ggml's AVX-512 path (with its weight repacking), as on a CPU
# without AMX; f32 does not use AMX either way. Harmless where there is no AMX.
NO_AMX = "-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
CMAKE_FLAGS = (
    "-DCMAKE_BUILD_TYPE=Release",
    "-DGGML_NATIVE=ON",
    f"-DCMAKE_C_FLAGS={NO_AMX}",
    f"-DCMAKE_CXX_FLAGS={NO_AMX}",
    "-DLLAMA_CURL=OFF",
    "-DLLAMA_OPENSSL=OFF",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_BUILD_SERVER=ON",
)
TARGETS = ("llama-server", "llama-quantize")
# The GGUF each Triton engine is set against: the same precision class. The quantized
# pair: int8 weights and int8 dot products on both sides, in blocks of 256 (the service's
# MatMulNBits) against q8_0's 32.
QUANT_FOR_ENGINE = {"onnx": "f32", "onnx-int8": "q8_0"}


class PeerError(Gpt2TritonError):
    """llama.cpp cannot be built, converted to or served as asked."""


def default_cache() -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "gpt2-triton" / f"llama.cpp-{LLAMA_CPP_PYTHON}"


@dataclass(frozen=True)
class PeerFiles:
    server: Path  # the llama-server binary
    models: dict[str, Path]  # quant (f32, q8_0) -> GGUF file


# -- build --------------------------------------------------------------------------------
def _run(command: list, log_file: Path, what: str, **kwargs) -> None:
    """Run a build step with its output in ``log_file`` (a compiler's output is long); on
    failure the error names the step and shows the log's tail."""
    with open(log_file, "ab") as out:
        code = subprocess.run(
            [str(c) for c in command], stdout=out, stderr=subprocess.STDOUT, **kwargs
        ).returncode
    if code != 0:
        tail = "\n".join(log_file.read_text(errors="replace").splitlines()[-25:])
        raise PeerError(f"{what} failed (exit {code}); {log_file} ends with:\n{tail}")


def source_dir(cache: Path) -> Path:
    return cache / "src" / f"llama_cpp_python-{LLAMA_CPP_PYTHON}" / "vendor" / "llama.cpp"


def build(cache: Path, jobs: int | None = None) -> dict[str, Path]:
    """The binaries of TARGETS, built unless already there with these CMAKE_FLAGS (an
    interrupted or re-flagged build resumes: CMake recompiles only what changed)."""
    binaries = {t: cache / "build" / "bin" / t for t in TARGETS}
    stamp = cache / "build" / "gpt2-triton-cmake-flags.json"  # what the binaries were built with
    if all(b.is_file() for b in binaries.values()) and (
        stamp.is_file() and json.loads(stamp.read_text()) == list(CMAKE_FLAGS)
    ):
        return binaries
    cache.mkdir(parents=True, exist_ok=True)
    build_log = cache / "build.log"
    src = source_dir(cache)
    if not (src / "CMakeLists.txt").is_file():
        sdist = cache / "sdist" / f"llama_cpp_python-{LLAMA_CPP_PYTHON}.tar.gz"
        if not sdist.is_file():
            log.info("downloading the llama-cpp-python %s sdist", LLAMA_CPP_PYTHON)
            _run(
                [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:"]
                + [f"llama-cpp-python=={LLAMA_CPP_PYTHON}", "-d", sdist.parent],
                build_log,
                "pip download",
            )
        with tarfile.open(sdist) as tar:
            tar.extractall(cache / "src", filter="data")
    if shutil.which("cmake") is None:
        raise PeerError("building llama.cpp needs cmake and a C++ compiler (cmake, g++)")
    log.info("building llama.cpp (about 10 min on 2 cores); log in %s", build_log)
    _run(["cmake", "-S", src, "-B", cache / "build", *CMAKE_FLAGS], build_log, "cmake configure")
    _run(
        ["cmake", "--build", cache / "build", f"-j{jobs or os.cpu_count()}"]
        + ["--target", *TARGETS],
        build_log,
        "cmake build",
    )
    missing = [str(b) for b in binaries.values() if not b.is_file()]
    if missing:
        raise PeerError(f"the build finished without {', '.join(missing)}")
    stamp.write_text(json.dumps(list(CMAKE_FLAGS)))
    return binaries


# -- convert --------------------------------------------------------------------------------
def converter_input(model_dir: Path, folder: Path) -> Path:
    """A copy of the HF checkpoint folder that llama.cpp's converter takes: its GPT-2 reader
    wants ``n_ctx`` in config.json (transformers 5 writes only ``n_positions``), and it
    loads the tokenizer by class name, which must be the fast one (the slow class needs
    vocab.json/merges.txt, which this checkpoint does not have: tokenizer.json holds them).
    The weights and tokenizer.json are linked, not copied: nothing is written to the
    checkpoint itself."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in os.listdir(model_dir):
        if name in ("config.json", "tokenizer_config.json"):
            continue
        link = folder / name
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to((model_dir / name).resolve())
    config = json.loads((model_dir / "config.json").read_text())
    config.setdefault("n_ctx", config["n_positions"])
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    tokenizer_config = json.loads((model_dir / "tokenizer_config.json").read_text())
    tokenizer_config["tokenizer_class"] = "GPT2TokenizerFast"
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2))
    return folder


def _fresh(target: Path, source: Path) -> bool:
    return target.is_file() and target.stat().st_mtime >= source.stat().st_mtime


def convert(model_dir: Path, out: Path, cache: Path, quantize: Path) -> dict[str, Path]:
    """``model-f32.gguf`` (llama.cpp's converter) and ``model-q8_0.gguf`` (``llama-quantize``
    of the f32 file), each redone only when older than what it is made from."""
    out.mkdir(parents=True, exist_ok=True)
    # the checkpoint's newest file (weights, config or tokenizer): a rebuilt one is newer
    newest = max((model_dir / n for n in os.listdir(model_dir)), key=lambda p: p.stat().st_mtime)
    f32, q8 = out / "model-f32.gguf", out / "model-q8_0.gguf"
    log_file = out / "convert.log"
    if not _fresh(f32, newest):
        log.info("converting %s to GGUF f32", model_dir)
        hf = converter_input(model_dir, out / "hf")
        src = source_dir(cache)
        env = {**os.environ, "PYTHONPATH": str(src / "gguf-py")}
        partial = f32.with_suffix(".partial")
        _run(
            [sys.executable, src / "convert_hf_to_gguf.py", hf, "--outtype", "f32"]
            + ["--outfile", partial],
            log_file,
            "convert_hf_to_gguf.py",
            env=env,
        )
        partial.replace(f32)  # only a whole file carries the final name
    if not _fresh(q8, f32):
        log.info("quantizing to q8_0")
        partial = q8.with_suffix(".partial")
        _run([quantize, f32, partial, "Q8_0"], log_file, "llama-quantize")
        partial.replace(q8)
    return {"f32": f32, "q8_0": q8}


def prepare(model: str, cache: Path | None = None) -> PeerFiles:
    """Build (once) and convert (once per checkpoint): what the harness's ``--peer`` runs."""
    cache = cache or default_cache()
    spec = checkpoint.resolve(model)
    if not spec.is_local:
        raise PeerError(f"the peer converts a checkpoint folder, not a hub id: {model}")
    binaries = build(cache)
    models = convert(
        Path(spec.source),
        checkpoint.artifacts_root() / "gguf" / spec.slug,
        cache,
        binaries["llama-quantize"],
    )
    return PeerFiles(binaries["llama-server"], models)


# -- serve ------------------------------------------------------------------------------------
class LlamaServer:
    """A ``llama-server`` process: start, wait until the model is loaded, stop (terminate,
    then kill), like the tests' Triton fixture."""

    def __init__(
        self,
        binary: Path,
        model: Path,
        port: int,
        threads: int,
        slots: int,
        context: int,
        log_file: Path,
    ) -> None:
        self.binary, self.model, self.port = binary, model, port
        self.threads, self.slots, self.context = threads, slots, context
        self.log_file = log_file
        self.process: subprocess.Popen | None = None
        self._log_handle = None

    @property
    def url(self) -> str:
        return f"127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        return [
            str(self.binary),
            "-m",
            str(self.model),
            "-t",
            str(self.threads),
            "-np",
            str(self.slots),
            "-c",
            str(self.context),
            "-cb",
            # Its host-memory prompt cache (8 GiB by default) keeps finished slots' KV for
            # reuse; every request here sends cache_prompt: false, so it could only add to
            # the memory measured, never save work. The service has no such cache.
            "--cache-ram",
            "0",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--no-webui",
        ]

    def __enter__(self) -> LlamaServer:
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        self._log_handle = open(self.log_file, "ab")  # noqa: SIM115 (closed in __exit__)
        self.process = popen_dying_with_parent(
            self.command(),
            stdout=self._log_handle,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            self._wait_ready()
        except BaseException:
            self.__exit__()
            raise
        return self

    def _wait_ready(self, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise PeerError(
                    f"llama-server exited (code {self.process.returncode}) before it was "
                    f"ready; log: {self.log_file}"
                )
            try:  # 503 while the model loads, 200 once it serves
                with urllib.request.urlopen(f"http://{self.url}/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.25)
        raise PeerError(f"llama-server not ready after {timeout:.0f} s; log: {self.log_file}")

    def __exit__(self, *exc) -> None:
        if self.process is not None:
            stop_group(self.process, signal.SIGTERM, timeout=10)
        if self._log_handle:
            self._log_handle.close()
            self._log_handle = None


def context_size(slots: int, prompt_tokens: int, new_tokens: int) -> int:
    """``-c`` for ``slots`` sequences of a prompt and its new tokens each. llama-server
    splits its context evenly across slots, pads each share up to a multiple of 256 (and
    says so in a warning unless ``-c`` already is one) and stops a slot one token short
    of its share: each share gets room for one more, rounded up to 256."""
    per_slot = -(-(prompt_tokens + new_tokens + 1) // 256) * 256
    return slots * per_slot


# -- the client's side of the stream ---------------------------------------------------------
def completion_request(prompt_ids: list[int], new_tokens: int) -> dict:
    """The harness's workload for ``/completion``: the same token ids the service's prompt
    is made of, exactly ``new_tokens`` new tokens, greedy, no prompt reuse between
    requests (the service has none)."""
    return {
        "prompt": prompt_ids,
        "n_predict": new_tokens,
        "ignore_eos": True,
        "stream": True,
        "cache_prompt": False,
        # greedy the cheapest way llama.cpp has it: top-1 (one pass over the vocabulary,
        # like the service's argmax) instead of its default chain (top-k 40, top-p, min-p,
        # temperature) at temperature 0, which picks the same token with more work
        "temperature": 0,
        "top_k": 1,
        "samplers": ["top_k"],
    }


def parse_event(line: bytes, source: str = "llama-server") -> dict | None:
    """One line of server-sent events (llama-server's, or ``source``'s: the OpenAI shape
    is the same): the JSON of a ``data:`` line; None for the blank lines between events,
    ``:`` keep-alive comments and ``[DONE]``. An error arrives as an event of its own
    (``{"error": {...}}``, the stream's last) and raises."""
    text = line.decode("utf-8").strip()
    if not text.startswith("data:") or text == "data: [DONE]":  # [DONE]: the OpenAI routes
        return None
    event = json.loads(text[5:])
    if "error" in event:
        raise PeerError(f"{source}: {event['error']}")
    return event


def stream_completion(
    connection: http.client.HTTPConnection, prompt_ids: list[int], new_tokens: int
) -> Iterator[dict]:
    """The events of one streamed completion, each as soon as its line arrives: one per
    generated token (``tokens`` holds its id; ``content`` can be empty while a multi-byte
    character is incomplete), the last with ``stop`` true, ``tokens_predicted`` and the
    server's ``timings``."""
    body = json.dumps(completion_request(prompt_ids, new_tokens))
    headers = {"Content-Type": "application/json"}
    # to the body's end, after the stop event (llama-server then closes the connection)
    yield from post_events(connection, "/completion", body, headers, "llama-server")


def post_events(
    connection: http.client.HTTPConnection, path: str, body: str, headers: dict, source: str
) -> Iterator[dict]:
    """POST ``body`` and yield each server-sent event's JSON as its line arrives (an error
    status or an error event raises, naming ``source``), until the body ends."""
    connection.request("POST", path, body, headers)
    response = connection.getresponse()
    if response.status != 200:
        raise PeerError(f"{source} answered {response.status}: {response.read()[:500]!r}")
    while line := response.readline():
        event = parse_event(line, source=source)
        if event is not None:
            yield event


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="artifacts/models/gpt2-small-random")
    parser.add_argument("--cache", type=Path, default=None, help="default: " + str(default_cache()))
    args = parser.parse_args(argv)
    logs.setup()

    def step() -> str:
        files = prepare(args.model, args.cache)
        models = ", ".join(str(p) for p in files.models.values())
        return f"llama-server: {files.server}; GGUF: {models}"

    return run_step(step)


if __name__ == "__main__":
    sys.exit(main())
