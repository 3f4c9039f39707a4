"""longtrain.kernels: the hot ops of the model, one module per op.

Each op module holds a pure-torch `reference` that is obviously right and a dispatch
function that picks the best available backend (see `registry.py`).
"""
