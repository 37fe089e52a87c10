"""The analysis and rewrite passes, one per module, in the order of ``passes.pipeline.PIPELINE``.

Imports only the graph core and the runtime below it."""
