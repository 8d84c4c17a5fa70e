"""Activation patching: which sweeps exist and how each activation kind is patched (sweeps.py),
the engine that runs them exactly and fast (engine.py), and the gradient approximation
(attribution_patching.py)."""
