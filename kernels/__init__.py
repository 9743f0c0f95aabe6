"""Pallas kernels for e5lite (installed as ``e5lite.kernels``).

- :mod:`.flash_attention`: fused masked self-attention forward (online softmax, block skipping for
  padding and packed segments), with a pure-jnp reference and a reference-based VJP.
"""
