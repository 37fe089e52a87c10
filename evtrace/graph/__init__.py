"""Graph core: typed node metadata and its accessors, errors, the tracer, the plan record.

Imports nothing of evtrace above it."""
