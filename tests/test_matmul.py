"""matmul.py: the projections' hand-written backward pass equals autodiff's (float32 to rounding; bfloat16
operands within bfloat16 rounding of the float32 gradient), with each gradient in its input's dtype."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from e5lite.matmul import project

# the encoder's four projections, at MiniLM-like widths (B, S, D, N, K, F = 3, 5, 24, 4, 6, 40)
SPECS = {
    "BSD,DCNK->BSCNK": ((3, 5, 24), (24, 3, 4, 6), (3, 4, 6)),
    "BSNK,NKD->BSD": ((3, 5, 4, 6), (4, 6, 24), (24,)),
    "BSD,DF->BSF": ((3, 5, 24), (24, 40), (40,)),
    "BSF,FD->BSD": ((3, 5, 40), (40, 24), (24,)),  # K > N: the narrower cotangent is the one transposed
}


def arrays(shapes, seed=0):
    rng = np.random.default_rng(seed)
    return [jnp.asarray(rng.standard_normal(s), jnp.float32) for s in shapes]


def autodiff(spec, x, w, b, g):
    f = lambda x, w, b: jnp.einsum(spec, x, w, precision="highest") + b  # noqa: E731
    return jax.vjp(f, x, w, b)[1](g)


@pytest.mark.parametrize("spec", list(SPECS))
def test_float32_forward_and_gradients_equal_autodiff(spec):
    x, w, b = arrays(SPECS[spec])
    y = project(spec, x, w, b)
    np.testing.assert_array_equal(y, jnp.einsum(spec, x, w, precision="highest") + b)
    g = arrays([y.shape], seed=1)[0]
    got = jax.vjp(lambda *a: project(spec, *a), x, w, b)[1](g)
    for a, want in zip(got, autodiff(spec, x, w, b, g)):
        assert a.dtype == jnp.float32
        np.testing.assert_allclose(a, want, rtol=1e-5, atol=1e-5 * float(jnp.abs(want).max()))


@pytest.mark.parametrize("spec", list(SPECS))
@pytest.mark.parametrize("weights", ["float32", "bfloat16"])
def test_bfloat16_activations_gradients_are_float32_sums(spec, weights):
    """Training in bfloat16: bfloat16 activations, float32 (master) or bfloat16 weights and biases. The
    gradients come back in each input's dtype and within bfloat16 rounding of the float32 ones."""
    x, w, b = arrays(SPECS[spec])
    xb, wb, bb = x.astype(jnp.bfloat16), w.astype(weights), b.astype(weights)
    y = jax.jit(project, static_argnums=0)(spec, xb, wb, bb)
    assert y.dtype == jnp.bfloat16
    g = arrays([y.shape], seed=1)[0]
    got = jax.jit(lambda *a: jax.vjp(lambda *p: project(spec, *p), *a)[1](g.astype(jnp.bfloat16)))(xb, wb, bb)
    want = autodiff(spec, xb.astype(jnp.float32), wb.astype(jnp.float32), bb.astype(jnp.float32),
                    g.astype(jnp.bfloat16).astype(jnp.float32))
    for a, ref, like in zip(got, want, (xb, wb, bb)):
        assert a.dtype == like.dtype
        # the bfloat16 operands are exact; what differs is rounding each result to bfloat16 (2^-8 relative)
        np.testing.assert_allclose(np.asarray(a, np.float32), ref, rtol=1e-2, atol=1e-2 * float(jnp.abs(ref).max()))


def test_a_spec_not_laid_out_as_a_matrix_product_falls_back_to_autodiff():
    spec = "BSD,FD->BSF"  # the weight contracts its last axis
    x, w, b = arrays([(3, 5, 24), (40, 24), (40,)])
    xb = x.astype(jnp.bfloat16)
    g = arrays([(3, 5, 40)], seed=1)[0].astype(jnp.bfloat16)
    got = jax.vjp(lambda *a: project(spec, *a), xb, w, b)[1](g)
    want = jax.vjp(lambda x, w, b: (jnp.einsum(spec, x.astype(jnp.bfloat16), w.astype(jnp.bfloat16),
                                               preferred_element_type=jnp.float32) + b).astype(jnp.bfloat16),
                   xb, w, b)[1](g)
    for a, ref in zip(got, want):
        np.testing.assert_array_equal(a, ref)


def test_split_rows_are_not_gathered_for_the_backward_pass():
    """Data parallel over two host devices: the weight gradient is each device's partial sum, all-reduced;
    the single-device layout trick (a transposed copy of all rows) would gather every device's activations."""
    import os
    import subprocess
    import sys
    import textwrap
    script = textwrap.dedent("""
        import jax, jax.numpy as jnp
        from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
        from e5lite.matmul import project
        mesh = Mesh(jax.devices(), ("data",))
        rows, whole = NamedSharding(mesh, P("data")), NamedSharding(mesh, P())
        x = jax.device_put(jnp.ones((8, 16, 64), jnp.bfloat16), rows)
        w, b = (jax.device_put(a, whole) for a in (jnp.ones((64, 256)), jnp.ones((256,))))
        loss = lambda x, w, b: jnp.sum(project("BSD,DF->BSF", x, w, b).astype(jnp.float32) ** 2)
        print(jax.jit(jax.grad(loss, argnums=(1, 2))).lower(x, w, b).compile().as_text())
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "JAX_PLATFORMS": "cpu",
                              "XLA_FLAGS": "--xla_force_host_platform_device_count=2"})
    assert out.returncode == 0, out.stderr[-2000:]
    assert " all-reduce(" in out.stdout and " all-gather(" not in out.stdout
