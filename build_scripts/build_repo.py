"""``make repo``: render ``model_repository/`` for one model and engine, and copy artifacts in.

    python -m build_scripts.build_repo --model tiny --engine onnx

Each ``<model>/config.pbtxt`` is rendered from the committed ``config.pbtxt.in`` by the
strict renderer (a missing or unused key fails); engine and tokenizer files go into the
version folders (``<model>/1/``); the resolved settings are saved as
``model_repository/build_settings.json``, with the sha256 fingerprint of the checkpoint
the served weights came from. An export (or TensorRT plan) made from other weights than the
checkpoint holds now is refused. Rendered files and artifacts are git-ignored.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shutil
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from build_scripts.build_engine import ONNX_FINGERPRINT, check_plan
from build_scripts.export_onnx import SOURCE_FINGERPRINT, check_current, onnx_dir, trt_dir
from gpt2_triton import checkpoint, fingerprint, logs
from gpt2_triton.atomic import write_json
from gpt2_triton.batcher import (
    MAX_BURST_WINDOW_MS,
    default_burst_window_ms,
    default_prefill_tokens,
)
from gpt2_triton.cli import run_step
from gpt2_triton.engines.factory import ENGINE_KINDS, SETTINGS_FILE
from gpt2_triton.engines.shape import ModelShape
from gpt2_triton.engines.trt_forward import ENGINE_SETTINGS
from gpt2_triton.errors import Gpt2TritonError
from gpt2_triton.render import render
from gpt2_triton.sending import MAX_LANES, default_response_lanes

log = logging.getLogger("build_scripts.build_repo")

REPOSITORY = Path(__file__).resolve().parent.parent / "model_repository"
MODELS = ("tokenizer", "engine", "sampler", "next_token", "gpt2")
KEEP = {"model.py"}  # committed files inside version folders
PLACEMENTS = ("in_process", "bls")


@dataclass(frozen=True)
class RepoSettings:
    model: str
    engine: str = "onnx"
    max_sequences: int = 16  # live sequences per engine step (engine and gpt2 agree)
    max_queue: int = 1024  # requests waiting to join the running batch
    # prompt tokens per step while streams decode (chunked); 0: by where the engine runs
    # (batcher.default_prefill_tokens: 64 on the CPU, 512 on a GPU)
    max_prefill_tokens: int = 0
    # with no stream running, after an idle start that brought a burst, the first step waits
    # until requests stop arriving for this long, then takes the burst whole; 0: never;
    # None: by where the engine runs (batcher.default_burst_window_ms: 6 on the CPU, off on
    # a GPU, where it was not measured)
    burst_window_ms: int | None = None
    engine_threads: int = 0  # ONNX Runtime / torch intra-op threads (0: all cores)
    # gpt2's sending threads (each streamed response is a round trip to the server); 0: by
    # where the engine runs (sending.default_response_lanes: 4 on the CPU, 1 on a GPU)
    response_lanes: int = 0
    device: str = "cpu"  # torch engine only: cpu or cuda
    cuda_graphs: bool = True  # torch engine on cuda: decode steps replayed as CUDA graphs
    # torch engine on cuda with graphs: the decode steps' layer code through torch.compile
    # (fewer, fused kernels; compiled at load, for every batch bucket)
    torch_compile: bool = False
    # torch engine in gpt2's process (CUDA graphs on cuda): a step whose rows all decode
    # queues the next one on the device before the host reads its tokens (batcher.py's
    # decode_ahead; on the CPU it runs the graphs' static decode steps, for the tests)
    decode_ahead: bool = False
    # gpt2 runs its engine in process (a step is a call) or calls the engine model by BLS
    engine_placement: str = "in_process"

    def __post_init__(self) -> None:
        if self.engine not in ENGINE_KINDS:
            raise Gpt2TritonError(
                f"unknown ENGINE={self.engine}; choose one of {', '.join(ENGINE_KINDS)}"
            )
        if not re.fullmatch(r"cpu|cuda(:\d+)?", self.device):  # before its defaults below
            raise Gpt2TritonError(f"unknown DEVICE={self.device}; choose cpu, cuda or cuda:<index>")
        if self.max_prefill_tokens == 0:  # frozen: set once, here
            budget = default_prefill_tokens(self.engine, self.device)
            object.__setattr__(self, "max_prefill_tokens", budget)
        if self.burst_window_ms is None:
            window = default_burst_window_ms(self.engine, self.device)
            object.__setattr__(self, "burst_window_ms", window)
        if self.response_lanes == 0:
            lanes = default_response_lanes(self.engine, self.device)
            object.__setattr__(self, "response_lanes", lanes)
        if min(self.max_sequences, self.max_queue, self.max_prefill_tokens) < 1:
            raise Gpt2TritonError("max-sequences, max-queue and max-prefill-tokens must be >= 1")
        if not 0 <= self.burst_window_ms <= MAX_BURST_WINDOW_MS:
            raise Gpt2TritonError(
                f"burst-window-ms must be in [0, {MAX_BURST_WINDOW_MS}], got {self.burst_window_ms}"
            )
        if not 1 <= self.response_lanes <= MAX_LANES:
            raise Gpt2TritonError(
                f"response-lanes must be in [1, {MAX_LANES}], got {self.response_lanes}"
            )
        if self.engine_threads < 0:
            raise Gpt2TritonError("engine-threads must be >= 0")
        if self.engine_placement not in PLACEMENTS:
            raise Gpt2TritonError(
                f"unknown engine placement {self.engine_placement!r}; choose one of "
                f"{', '.join(PLACEMENTS)}"
            )
        if self.torch_compile and not (
            self.engine == "torch" and self.device.startswith("cuda") and self.cuda_graphs
        ):
            raise Gpt2TritonError(
                "torch-compile is for ENGINE=torch DEVICE=cuda with CUDA graphs (it compiles "
                "the captured decode steps)"
            )
        if self.decode_ahead and not (
            self.engine == "torch"
            and self.engine_placement == "in_process"
            and (self.device == "cpu" or self.cuda_graphs)
        ):
            raise Gpt2TritonError(
                "decode-ahead is for ENGINE=torch in gpt2's process (PLACEMENT=in_process), "
                "with CUDA graphs on cuda"
            )
        if self.device != "cpu" and self.engine.startswith("onnx"):
            raise Gpt2TritonError(
                f"--device {self.device} is for ENGINE=torch (ONNX Runtime's engines run on "
                "the CPU; ENGINE=trt on the GPU, whatever DEVICE says)"
            )

    @property
    def engine_holder(self) -> str:
        """Which model loads the engine: the server holds the weights once. In process,
        gpt2 holds it and the ``engine`` model passes its stateless steps (next_token's) to
        gpt2's loop; with BLS, the ``engine`` model holds it and gpt2 steps through it."""
        return "gpt2" if self.engine_placement == "in_process" else "self"


def template_values(
    settings: RepoSettings, shape: ModelShape, model_name: str
) -> dict[str, dict[str, object]]:
    """The one place that says which setting goes into which config.pbtxt."""
    engine = {  # read by every model that holds an engine (factory.build_engine_from_params)
        "engine_kind": settings.engine,
        "engine_threads": settings.engine_threads,
        "device": "cuda" if settings.engine == "trt" else settings.device,
        "cuda_graphs": int(settings.cuda_graphs),
        "torch_compile": int(settings.torch_compile),
    }
    return {
        "tokenizer": {},
        "engine": {
            **engine,
            "max_sequences": settings.max_sequences,
            "engine_holder": settings.engine_holder,
            "context_window": shape.max_positions,
            "vocab_size": shape.vocab_size,
        },
        "sampler": {},
        "next_token": {},
        "gpt2": {
            "model_name": model_name,
            "context_window": shape.max_positions,
            "vocab_size": shape.vocab_size,  # a forward's token ids are checked on the way in
            "max_sequences": settings.max_sequences,
            "max_queue": settings.max_queue,
            "max_prefill_tokens": settings.max_prefill_tokens,
            "burst_window_ms": settings.burst_window_ms,
            "response_lanes": settings.response_lanes,
            "decode_ahead": int(settings.decode_ahead),
            "engine_placement": settings.engine_placement,
            **engine,
        },
    }


def _link_or_copy(src: Path, dst: Path) -> None:
    """Hard-link big artifacts when on the same file system; copy otherwise."""
    if src.is_dir():
        shutil.copytree(src, dst, copy_function=_link_or_copy_file)
    else:
        _link_or_copy_file(src, dst)


def _link_or_copy_file(src, dst) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _clean_version_dir(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for item in folder.iterdir():
        if item.name in KEEP:
            continue
        shutil.rmtree(item) if item.is_dir() and not item.is_symlink() else item.unlink()


def build(
    settings: RepoSettings, export_dir: Path | None = None, repository: Path = REPOSITORY
) -> Path:
    """Render into ``repository``: the committed one, or another folder (tests, deployments),
    which then receives copies of the committed ``model.py`` files too."""
    spec = checkpoint.resolve(settings.model)
    engine_files: dict[str, Path] = {}
    fingerprints: dict[str, dict | None] = {}  # what the served files were built from
    # What an engine reads beside its files (the shape; for ONNX the opset too: an opset-23
    # export takes the in-place KV cache, factory._takes_in_place_cache) is the export's
    # own settings file, copied (not linked: an int8 export rewrites it in place); a torch
    # checkpoint has none, so its shape is written.
    exported_settings: Path | None = None
    if settings.engine == "torch":
        tokenizer = checkpoint.load_tokenizer(spec)
        model = checkpoint.load_model(spec)
        fingerprints[SOURCE_FINGERPRINT] = checkpoint.fingerprint(spec)  # a hub id: cached now
        shape = ModelShape.from_hf_config(model.config)
        staging = checkpoint.artifacts_root() / "torch" / spec.slug
        shutil.rmtree(staging, ignore_errors=True)
        model.save_pretrained(staging / "checkpoint")
        tokenizer.save_pretrained(staging / "tokenizer")
        engine_files["checkpoint"] = staging / "checkpoint"
        tokenizer_dir = staging / "tokenizer"
    else:
        trt = settings.engine == "trt"
        export_dir = export_dir or (trt_dir if trt else onnx_dir)(spec.slug)
        refresh = (
            f"run 'make engine MODEL={settings.model}'"
            if trt
            else f"run 'make export MODEL={settings.model}' (make repo does)"
        )
        settings_file = export_dir / SETTINGS_FILE
        if not settings_file.is_file():
            raise Gpt2TritonError(f"no ONNX export in {export_dir}: {refresh}")
        exported = check_current(export_dir, refresh, spec)
        exported_settings = settings_file
        fingerprints[SOURCE_FINGERPRINT] = exported.get(SOURCE_FINGERPRINT)
        shape = ModelShape.from_dict(exported["shape"])
        needed = {
            "onnx": {"model.onnx": "make export", "model.onnx.data": "make export"},
            "onnx-int8": {
                "model.int8.onnx": "make export INT8=1",
                "model.int8.onnx.data": "make export INT8=1",
            },
            "trt": {"model.plan": "make engine", "engine_settings.json": "make engine"},
        }[settings.engine]
        for name, how in needed.items():
            if not (export_dir / name).is_file():
                moved = onnx_dir(spec.slug) / name
                since = (
                    f" (plans are built in {export_dir.parent}/ now: {moved} is from before)"
                    if trt and moved.is_file()
                    else ""
                )
                raise Gpt2TritonError(f"{export_dir / name} not found: run '{how}'{since}")
            engine_files[name] = export_dir / name
        if trt:
            check_plan(export_dir)
            plan = json.loads((export_dir / ENGINE_SETTINGS).read_text())
            fingerprints[ONNX_FINGERPRINT] = plan.get(ONNX_FINGERPRINT)
            built_for = plan.get("max_batch")
            if built_for is not None and settings.max_sequences > built_for:
                # the engine refuses it at load; say so here, before a server is started
                raise Gpt2TritonError(
                    f"the plan in {export_dir} was built for batches of at most {built_for}, "
                    f"MAX_SEQUENCES is {settings.max_sequences}: rebuild it (make engine "
                    f"MAX_SEQUENCES={settings.max_sequences}) or serve at most {built_for} "
                    f"(MAX_SEQUENCES={built_for})"
                )
        tokenizer_dir = export_dir / "tokenizer"
        if not (tokenizer_dir / "tokenizer_config.json").is_file():
            raise Gpt2TritonError(f"{tokenizer_dir} is missing or incomplete: {refresh}")

    # Render every template first: a template error leaves the repository untouched.
    values = template_values(settings, shape, spec.name)
    rendered = {}
    for model_name in MODELS:
        template = REPOSITORY / model_name / "config.pbtxt.in"
        rendered[model_name] = render(template.read_text(), values[model_name], str(template))

    # gpt2's config.pbtxt goes first and comes back last: a build stopped halfway leaves a
    # repository that make serve refuses ("not rendered"), not one that serves half of it.
    (repository / "gpt2" / "config.pbtxt").unlink(missing_ok=True)
    for model_name in MODELS:
        version_dir = repository / model_name / "1"
        _clean_version_dir(version_dir)
        source = REPOSITORY / model_name / "1" / "model.py"
        if source.is_file() and repository.resolve() != REPOSITORY:
            shutil.copy2(source, version_dir / "model.py")
    engine_dirs = [repository / "engine" / "1"] if settings.engine_holder == "self" else []
    if settings.engine_placement == "in_process":
        engine_dirs.append(repository / "gpt2" / "1" / "engine")
    # The version folders were emptied above, so these are fresh links to (or copies of)
    # today's files: a re-export (new files, new inodes) is never served through old links.
    for folder in engine_dirs:  # hard links: the weights take disk space once
        folder.mkdir(parents=True, exist_ok=True)
        for name, src in engine_files.items():
            _link_or_copy(src, folder / name)
        if exported_settings is not None:
            shutil.copy2(exported_settings, folder / SETTINGS_FILE)
        else:
            write_json(folder / SETTINGS_FILE, {"shape": shape.to_dict()})
    for model_name in ("tokenizer", "gpt2"):
        _link_or_copy(tokenizer_dir, repository / model_name / "1" / "tokenizer")
    for model_name, text in rendered.items():
        if model_name != "gpt2":
            (repository / model_name / "config.pbtxt").write_text(text)
    write_json(
        repository / "build_settings.json",
        {
            **asdict(settings),
            "model_source": spec.recorded,
            "shape": shape.to_dict(),
            **fingerprints,
        },
    )
    (repository / "gpt2" / "config.pbtxt").write_text(rendered["gpt2"])
    log.info(
        "model repository ready in %s (model %s, weights sha256 %s, engine %s)",
        repository,
        spec.source,
        fingerprint.short(fingerprints[SOURCE_FINGERPRINT]),
        settings.engine,
    )
    return repository


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="gpt2", help="hub id, 'tiny' or checkpoint folder")
    parser.add_argument("--engine", default="onnx", help=f"one of {', '.join(ENGINE_KINDS)}")
    parser.add_argument(
        "--export-dir",
        type=Path,
        help="default: artifacts/onnx/<model> (ENGINE trt: artifacts/trt/<model>, make engine)",
    )
    parser.add_argument("--repository", type=Path, default=REPOSITORY)
    parser.add_argument(
        "--max-sequences",
        type=int,
        default=RepoSettings.max_sequences,
        help="live sequences sharing one engine step",
    )
    parser.add_argument("--max-queue", type=int, default=RepoSettings.max_queue)
    parser.add_argument(
        "--max-prefill-tokens",
        type=int,
        default=RepoSettings.max_prefill_tokens,
        help="prompt tokens a step takes while streams decode (chunked prefill; one budget "
        "per starting stream per decoding one, up to 8x, 8x with none decoding); default 0: "
        "64 on the CPU, 512 on a GPU (ENGINE=trt or DEVICE=cuda)",
    )
    parser.add_argument(
        "--burst-window-ms",
        type=int,
        default=RepoSettings.burst_window_ms,
        help="with no stream running, when the last idle start brought a burst, the first "
        "step waits until requests stop arriving for this long, then takes the burst whole "
        "(three times that while fewer have come than the last burst brought, if six or "
        "more; its streams "
        "decode together; a lone request after a burst gets its first token up to three "
        "times that much later); 0: never; default: 6 on the CPU, 0 on a GPU (ENGINE=trt or "
        "DEVICE=cuda), where it was not measured",
    )
    parser.add_argument("--engine-threads", type=int, default=RepoSettings.engine_threads)
    parser.add_argument(
        "--response-lanes",
        type=int,
        default=RepoSettings.response_lanes,
        help="threads sending gpt2's streamed responses (a request keeps one); default 0: "
        "4 on the CPU, 1 on a GPU (ENGINE=trt or DEVICE=cuda)",
    )
    parser.add_argument("--device", default="cpu", help="torch engine: cpu or cuda")
    parser.add_argument(
        "--no-cuda-graphs",
        dest="cuda_graphs",
        action="store_false",
        help="torch engine on cuda: run decode steps eagerly (the baseline graphs are "
        "measured against)",
    )
    parser.add_argument(
        "--torch-compile",
        action="store_true",
        help="torch engine on cuda with graphs: the decode steps' layer code through "
        "torch.compile (fused kernels; compiled at load)",
    )
    parser.add_argument(
        "--decode-ahead",
        action="store_true",
        help="torch engine in process: a step whose rows all decode queues the next one on "
        "the device before the host reads its tokens (with CUDA graphs on cuda)",
    )
    parser.add_argument(
        "--engine-placement",
        default=RepoSettings.engine_placement,
        choices=PLACEMENTS,
        help="gpt2 runs its own engine (in_process) or calls the engine model (bls)",
    )
    args = parser.parse_args(argv)
    logs.setup()

    def step() -> str:
        settings = RepoSettings(
            args.model,
            args.engine,
            max_sequences=args.max_sequences,
            max_queue=args.max_queue,
            max_prefill_tokens=args.max_prefill_tokens,
            burst_window_ms=args.burst_window_ms,
            engine_threads=args.engine_threads,
            response_lanes=args.response_lanes,
            device=args.device,
            cuda_graphs=args.cuda_graphs,
            torch_compile=args.torch_compile,
            decode_ahead=args.decode_ahead,
            engine_placement=args.engine_placement,
        )
        return f"model repository ready in {build(settings, args.export_dir, args.repository)}"

    return run_step(step)


if __name__ == "__main__":
    sys.exit(main())
