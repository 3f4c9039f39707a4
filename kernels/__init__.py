"""longtrain.kernels: the hot ops of the model, one module per op.

Each op module holds a pure-torch `reference` that is obviously right and a dispatch
function that picks the best available backend (see `registry.py`).
"""
if __name__ == "kernels":
    # This folder was imported as the top-level `kernels`: the repository root is on sys.path (`python -m pytest`
    # or `python -c` from a checkout). That name belongs to Hugging Face's kernels package, which transformers
    # imports; hand the importer that package (or its absence) instead of this one.
    import importlib
    import os
    import sys

    _root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _root]
    del sys.modules[__name__]
    sys.modules[__name__] = importlib.import_module(__name__)  # the import statement returns this entry
