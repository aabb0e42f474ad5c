"""What one ``response_sender.is_cancelled()`` costs inside a Triton Python model.

    python -m benchmarks.cancel_check_cost [--calls 2000] [--rounds 3]

The generation loop asks it of its streams (``BatcherLimits.cancel_check_*``). A probe
model, written into a temporary repository, asks it ``--calls`` times from its own thread
(as the loop does) for one decoupled request and answers the median, p90 and p99 in
microseconds. The real ``tritonserver`` of the ``nvidia-pytriton`` wheel runs it.
"""

from __future__ import annotations

import argparse
import queue
import tempfile
from pathlib import Path

import numpy as np

CONFIG = """name: "gpt2"
backend: "python"
max_batch_size: 0
model_transaction_policy { decoupled: true }
input [ { name: "calls" data_type: TYPE_INT32 dims: [ 1 ] } ]
output [ { name: "microseconds" data_type: TYPE_FP64 dims: [ 3 ] } ]
instance_group [ { kind: KIND_CPU count: 1 } ]
"""

PROBE = """import threading
import time

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        for request in requests:
            calls = int(pb_utils.get_input_tensor_by_name(request, "calls").as_numpy()[0])
            sender = request.get_response_sender()
            threading.Thread(target=self.probe, args=(sender, calls), daemon=True).start()
        return None

    def probe(self, sender, calls):
        seconds = []
        for _ in range(calls):
            started = time.perf_counter()
            sender.is_cancelled()
            seconds.append(time.perf_counter() - started)
        micro = 1e6 * np.array(seconds)
        stats = np.array([np.median(micro), np.percentile(micro, 90), np.percentile(micro, 99)])
        sender.send(
            pb_utils.InferenceResponse([pb_utils.Tensor("microseconds", stats)]),
            flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL,
        )
"""


def main(argv: list[str] | None = None) -> int:
    import tritonclient.grpc as grpcclient

    from gpt2_triton.triton_server import Ports, TritonServer

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--port", type=int, default=18750)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="cancel-check-") as folder:
        # named gpt2: TritonServer refuses a repository without one (a forgotten `make repo`)
        model = Path(folder) / "gpt2"
        (model / "1").mkdir(parents=True)
        (model / "config.pbtxt").write_text(CONFIG)
        (model / "1" / "model.py").write_text(PROBE)
        ports = Ports(args.port, args.port + 1, args.port + 2)
        with TritonServer(Path(folder), ports, log_file=Path(folder) / "triton.log") as server:
            answers: queue.Queue = queue.Queue()
            client = grpcclient.InferenceServerClient(server.grpc_url)
            client.start_stream(callback=lambda result, error: answers.put((result, error)))
            for _ in range(args.rounds):
                calls = grpcclient.InferInput("calls", [1], "INT32")
                calls.set_data_from_numpy(np.array([args.calls], np.int32))
                client.async_stream_infer("gpt2", [calls])
                result, error = answers.get(timeout=120)
                if error is not None:
                    raise SystemExit(f"probe failed: {error}")
                median, p90, p99 = result.as_numpy("microseconds")
                print(
                    f"is_cancelled() x {args.calls}: median {median:.0f} us, "
                    f"p90 {p90:.0f} us, p99 {p99:.0f} us"
                )
            client.stop_stream()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
