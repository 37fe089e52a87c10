"""Tools on top of the API: command line, demo, benchmarks, fidelity, video, plots.

The only code that imports ``models_zoo``."""
