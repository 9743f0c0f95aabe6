"""Pallas kernels for e5lite (installed as ``e5lite.kernels``).

- :mod:`.flash_attention`: fused masked self-attention forward (online softmax, block skipping for
  padding and packed segments), with a pure-jnp reference and a reference-based VJP.

This folder sits at the checkout's root, so whenever the root is on ``sys.path`` (``python -m pytest``, a REPL,
a notebook or ``python -c`` started there) Python also finds it as a top-level ``kernels``: the name of Hugging
Face's package, which transformers imports. Imported under any name but ``e5lite.kernels``, it hands over to the
``kernels`` installed elsewhere on the path, or to none, so that nothing named ``kernels`` comes from e5lite.
"""

if __name__ != "e5lite.kernels":  # pragma: no branch - the hand-over; see the docstring
    import importlib.machinery
    import importlib.util
    import os
    import sys

    _here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    _path = [p for p in sys.path if os.path.abspath(p or os.curdir) != _here]
    _spec = importlib.machinery.PathFinder.find_spec(__name__, _path)
    if _spec is None or _spec.loader is None:
        del sys.modules[__name__]
        raise ModuleNotFoundError(
            f"No module named {__name__!r} (e5lite's kernels/ folder is e5lite.kernels)", name=__name__
        )
    _module = importlib.util.module_from_spec(_spec)
    sys.modules[__name__] = _module  # the import statement returns what sys.modules holds after this file runs
    _spec.loader.exec_module(_module)
