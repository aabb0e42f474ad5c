"""The KV-cache gauges of an engine, for whichever Triton model holds one.

The ``engine`` model always does; ``gpt2`` does too when it runs its engine in process.
Both publish the same families, told apart by the ``model`` label. ``pb_utils`` is passed
in: this module stays importable (and testable) without Triton.
"""

from __future__ import annotations

CACHED_SEQUENCES = "gpt2_engine_cached_sequences"
CACHED_TOKENS = "gpt2_engine_cached_tokens"


class EngineGauges:
    def __init__(self, pb_utils, engine_kind: str, model: str) -> None:
        # A MetricFamily must outlive its Metric objects: keep both.
        self.families = [
            pb_utils.MetricFamily(
                name=CACHED_SEQUENCES,
                description="Sequences whose KV cache the engine holds",
                kind=pb_utils.MetricFamily.GAUGE,
            ),
            pb_utils.MetricFamily(
                name=CACHED_TOKENS,
                description="KV-cache positions held (a padded cache: padding included)",
                kind=pb_utils.MetricFamily.GAUGE,
            ),
        ]
        labels = {"engine": engine_kind, "model": model}
        self.sequences, self.tokens = (f.Metric(labels=labels) for f in self.families)

    def publish(self, engine) -> None:
        self.sequences.set(engine.cached_sequences)
        self.tokens.set(engine.cached_tokens)
