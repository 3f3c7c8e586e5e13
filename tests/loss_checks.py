"""Shared checks for the losses of `jclip.losses`: a float64 reference and sharded equality.

- `assert_matches_reference(loss, reference, inputs, sharded=...)`: the loss (float32, `jax.jit`)
  against a float64 NumPy reference of its value; gradients against central finite differences of
  that reference, so a reference need only be the formula. The same again on global arrays, the
  `sharded` inputs split over an explicit and an auto mesh of 8 devices, `axis_name=None`: each
  gradient must also come back sharded like its input.
- `assert_sharded_equals_single_device(loss, inputs, sharded)`: the per-device loss under
  `jax.shard_map` and `jax.pmap` on 1, 2 and 8 devices gives the single-device full-batch value and
  gradients, with the conventions of `clip_loss`'s docstring (shard_map: gradients as they are;
  pmap: replicated inputs take `lax.pmean`, the local rows' gradients are N times the global ones).

`loss(**inputs, axis_name=...)` returns a scalar; inputs are NumPy arrays, differentiated where they
are floating point (integer labels, tokens and PRNG keys pass through).
"""

import functools

import jax
import numpy as np
from jax import lax
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from helpers import assert_trees_close

DEVICE_COUNTS = (1, 2, 8)
MESH_KINDS = {"explicit": AxisType.Explicit, "auto": AxisType.Auto}


def numerical_gradient(reference, inputs, eps=1e-6):
    """Central differences of the float64 `reference(**inputs)` for every floating-point input."""
    inputs = {k: np.asarray(v, np.float64) if _is_float(v) else v for k, v in inputs.items()}
    grads = {}
    for name, value in inputs.items():
        if not _is_float(value):
            continue
        grad = np.zeros_like(value)
        for index in np.ndindex(value.shape):
            shifted = []
            for sign in (1, -1):
                moved = value.copy()
                moved[index] += sign * eps
                shifted.append(reference(**{**inputs, name: moved}))
            grad[index] = (shifted[0] - shifted[1]) / (2 * eps)
        grads[name] = grad
    return grads


def assert_close(actual, expected, rtol=2e-5):
    """Within `rtol`, and absolutely within `rtol` times each leaf's largest entry plus 1e-12 (for leaves that are
    zero): `helpers.assert_trees_close` with `atol_fraction=rtol, per_leaf=True`."""
    assert_trees_close(actual, expected, rtol=rtol, atol=1e-12, atol_fraction=rtol, per_leaf=True)


def assert_matches_reference(loss, reference, inputs, *, sharded, rtol=1e-4, **options):
    """`loss(**inputs, **options)` in float32 against the float64 `reference(**inputs)` and its gradient,
    on one device and on global arrays whose `sharded` inputs are split over 8 devices."""
    loss = functools.partial(loss, **options)
    float32 = {k: np.float32(v) if _is_float(v) else v for k, v in inputs.items()}
    expected = reference(**inputs), numerical_gradient(reference, inputs)
    assert_close(_value_and_grads(loss, float32), expected, rtol=rtol)
    for kind in MESH_KINDS:
        placed = on_mesh(float32, sharded, kind)
        value, grads = _value_and_grads(loss, placed)
        try:
            assert_close((value, grads), expected, rtol=rtol)
        except AssertionError as error:
            raise AssertionError(f"global arrays on an {kind} mesh differ from the reference") from error
        assert_sharded_like(grads, placed)


def on_mesh(inputs, sharded, kind, devices=8):
    """`inputs` as global arrays on a 1-D mesh "data" of `kind` ("explicit" or "auto"): the `sharded` ones
    split along their leading (batch) axis, the others replicated. Fewer devices where the machine has fewer
    (one accelerator)."""
    devices = min(devices, jax.device_count())
    mesh = jax.make_mesh((devices,), ("data",), axis_types=(MESH_KINDS[kind],), devices=jax.devices()[:devices])
    return {k: jax.device_put(v, NamedSharding(mesh, P("data") if k in sharded else P())) for k, v in inputs.items()}


def assert_sharded_like(grads, inputs):
    """Every gradient is laid out over the devices as its input is."""
    for name, grad in grads.items():
        assert grad.sharding.is_equivalent_to(inputs[name].sharding, grad.ndim), (
            f"the gradient of {name} is laid out as {grad.sharding}, its input as {inputs[name].sharding}"
        )


def _is_float(value):
    return np.issubdtype(np.asarray(value).dtype, np.floating)


def _split(inputs, sharded):
    groups = ({}, {}, {}, {})  # float sharded, float replicated, other sharded, other replicated
    for name, value in inputs.items():
        groups[(0 if _is_float(value) else 2) + (0 if name in sharded else 1)][name] = value
    return groups


def _value_and_grads(loss, inputs, axis_name=None, sharded=()):
    """The value and `{name: gradient}` of every floating-point input."""
    float_sharded, float_replicated, other_sharded, other_replicated = _split(inputs, sharded)
    value, (grad_sharded, grad_replicated) = jax.jit(
        jax.value_and_grad(lambda fs, fr: loss(**fs, **fr, **other_sharded, **other_replicated, axis_name=axis_name),
                           argnums=(0, 1))
    )(float_sharded, float_replicated)
    return value, {**grad_sharded, **grad_replicated}


def per_device_value_and_grads(loss, inputs, sharded, mode, devices):
    """Value and gradients of the global batch from `loss` run per device over axis "data"."""
    groups = _split(inputs, sharded)

    def local(float_sharded, float_replicated, other_sharded, other_replicated):
        value, (grad_sharded, grad_replicated) = jax.value_and_grad(
            lambda fs, fr: loss(**fs, **fr, **other_sharded, **other_replicated, axis_name="data"), argnums=(0, 1)
        )(float_sharded, float_replicated)
        if mode == "pmap":
            grad_replicated = lax.pmean(grad_replicated, "data")
        return value, grad_sharded, grad_replicated

    if mode == "pmap":
        shard = lambda tree: jax.tree.map(lambda x: x.reshape(devices, -1, *x.shape[1:]), tree)
        # in_axes as whole trees: pmap misreads a prefix tuple whose length equals the number of leaves.
        in_axes = tuple(jax.tree.map(lambda _: axis, group) for group, axis in zip(groups, (0, None, 0, None)))
        value, grad_sharded, grad_replicated = jax.pmap(
            local, axis_name="data", in_axes=in_axes, devices=jax.devices()[:devices]
        )(shard(groups[0]), groups[1], shard(groups[2]), groups[3])
        value, grad_replicated = value[0], jax.tree.map(lambda g: g[0], grad_replicated)
        grad_sharded = jax.tree.map(lambda g: g.reshape(-1, *g.shape[2:]) / devices, grad_sharded)
    else:
        mesh = jax.make_mesh((devices,), ("data",), axis_types=(jax.sharding.AxisType.Auto,),
                             devices=jax.devices()[:devices])
        value, grad_sharded, grad_replicated = jax.jit(
            jax.shard_map(local, mesh=mesh, in_specs=(P("data"), P(), P("data"), P()),
                          out_specs=(P(), P("data"), P()))
        )(*groups)
    return value, {**grad_sharded, **grad_replicated}


def assert_sharded_equals_single_device(loss, inputs, sharded, devices=DEVICE_COUNTS, modes=("shard_map", "pmap"),
                                        rtol=2e-5, **options):
    """Per-device `loss` on each device count and mode gives the whole batch's value and gradients.

    `sharded` names the inputs whose leading axis is the batch; the others are replicated.
    """
    loss = functools.partial(loss, **options)
    float32 = {k: np.float32(v) if _is_float(v) else v for k, v in inputs.items()}
    expected = _value_and_grads(loss, float32)
    for mode in modes:
        for count in devices:
            actual = per_device_value_and_grads(loss, float32, sharded, mode, count)
            try:
                assert_close(actual, expected, rtol=rtol)
            except AssertionError as error:
                raise AssertionError(f"{mode} on {count} devices differs from the whole batch") from error
