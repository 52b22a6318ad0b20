"""Dataset sources, one module each, registered by config schema in :mod:`transferlab.sources.registry`."""
