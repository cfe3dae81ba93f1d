"""roa.py -- random orthogonal additive networks (A. Ceni, arXiv:2210.01245).

    roaFNN:  x_{l+1} = alpha O_l x_l + beta phi(W_l x_l + b_l)
    roaRNN:  h_t     = alpha O h_{t-1} + beta phi(W h_{t-1} + U u_t + b)

The models hold their parameters in a dict of arrays (NumPy or CuPy) and
expose forward(u) -> (z, cache) and backward(dz, cache) -> grads, the
gradients having the same names as the parameters. The backward passes
themselves live in autograd.py.
"""

import math

import numpy

from autograd import (RoaError, activation, array_module, linear_backward, linear_forward,
                      random_orthogonal, roa_backward, roa_forward, rnn_backward, rnn_forward)

DTYPES = ("float32", "float64")


def require(ok, name, value, allowed):
    """Raise RoaError naming `value` unless `ok`."""
    if not ok:
        raise RoaError(f"{name} must be {allowed}, got {value!r}")


def require_size(name, value):
    require(isinstance(value, (int, numpy.integer)) and not isinstance(value, bool) and value >= 1,
            name, value, "an integer >= 1")


class Model:
    """What roaFNN and roaRNN share: checked hyperparameters, the array module,
    the fixed orthogonal filters O and the trained parameters."""

    def __init__(self, alpha, beta, activation_name, dtype, seed, device):
        require(isinstance(alpha, (int, float)) and math.isfinite(alpha) and alpha >= 0,
                "alpha", alpha, "a finite number >= 0")
        require(isinstance(beta, (int, float)) and math.isfinite(beta) and beta > 0,
                "beta", beta, "a finite number > 0")
        require(dtype in DTYPES, "dtype", dtype, f"one of {DTYPES}")
        self.alpha, self.beta = float(alpha), float(beta)
        self.act = activation(activation_name)
        self.xp = array_module(device)
        self.dtype = dtype
        self.rng = numpy.random.default_rng(seed)

    def gaussian(self, shape, fan_in):
        """Weights drawn i.i.d. N(0, 1/fan_in) on the CPU (same seed, same weights on every backend)."""
        return self.rng.standard_normal(shape) / math.sqrt(fan_in)

    def to_device(self, arrays):
        """A dict of NumPy arrays as arrays of this model's module and dtype."""
        return {name: self.xp.asarray(a, dtype=self.dtype) for name, a in arrays.items()}


class RoaFNN(Model):
    """Input projection, L roa layers of width N, linear readout:

        x_0 = W_in u + b_in,
        x_{l+1} = alpha O_l x_l + beta phi(W_l x_l + b_l),   l = 0 .. L-1,
        z = V x_L + c.

    alpha = 0, beta = 1 is the plain multilayer perceptron baseline.
    """

    def __init__(self, n_in, n_out, width, depth, alpha, beta, activation="tanh",
                 dtype="float64", seed=0, device="cpu"):
        for name, value in [("n_in", n_in), ("n_out", n_out), ("width", width), ("depth", depth)]:
            require_size(name, value)
        super().__init__(alpha, beta, activation, dtype, seed, device)
        N, L = width, depth
        self.params = self.to_device({
            "W_in": self.gaussian((N, n_in), n_in), "b_in": numpy.zeros(N),
            "W": self.gaussian((L, N, N), N), "b": numpy.zeros((L, N)),
            "V": self.gaussian((n_out, N), N), "c": numpy.zeros(n_out),
        })
        self.O = self.to_device({"O": random_orthogonal(self.rng, N, L)})["O"]

    def forward(self, u):
        """u: (B, n_in) -> scores z: (B, n_out), and the cache for backward."""
        p = self.params
        x0, in_cache = linear_forward(u, p["W_in"], p["b_in"])
        xL, roa_cache = roa_forward(x0, self.O, p["W"], p["b"], self.alpha, self.beta, self.act)
        z, out_cache = linear_forward(xL, p["V"], p["c"])
        return z, (in_cache, roa_cache, out_cache)

    def backward(self, dz, cache):
        """dz = dL/dz -> the gradient of every parameter."""
        in_cache, roa_cache, out_cache = cache
        g = {}
        dxL, g["V"], g["c"] = linear_backward(dz, out_cache)
        dx0, g["W"], g["b"] = roa_backward(dxL, roa_cache)
        _, g["W_in"], g["b_in"] = linear_backward(dx0, in_cache)
        return g


class RoaRNN(Model):
    """One roaRNN layer with a linear readout (MATH.md section 3):

        h_t = alpha O h_{t-1} + beta phi(W h_{t-1} + U u_t + b),   h_0 = 0,
        z = V h_T + c            (readout "last": adding, psMNIST)
        z_t = V h_t + c          (readout "every": copying memory)

    alpha = 0, beta = 1 is the vanilla Elman RNN baseline. Inputs are
    time-major, u: (T, B, n_in).
    """

    READOUTS = ("last", "every")

    def __init__(self, n_in, n_out, hidden, alpha, beta, activation="tanh", readout="last",
                 dtype="float64", seed=0, device="cpu"):
        for name, value in [("n_in", n_in), ("n_out", n_out), ("hidden", hidden)]:
            require_size(name, value)
        require(readout in self.READOUTS, "readout", readout, f"one of {self.READOUTS}")
        super().__init__(alpha, beta, activation, dtype, seed, device)
        N = hidden
        self.readout = readout
        self.params = self.to_device({
            "W": self.gaussian((N, N), N), "U": self.gaussian((N, n_in), n_in), "b": numpy.zeros(N),
            "V": self.gaussian((n_out, N), N), "c": numpy.zeros(n_out),
        })
        self.O = self.to_device({"O": random_orthogonal(self.rng, N, 1)[0]})["O"]

    def forward(self, u):
        """u: (T, B, n_in) -> z: (B, n_out) or (T, B, n_out), and the cache."""
        p = self.params
        h0 = self.xp.zeros((u.shape[1], p["W"].shape[0]), dtype=u.dtype)
        hs, rnn_cache = rnn_forward(u, h0, self.O, p["W"], p["U"], p["b"], self.alpha, self.beta, self.act)
        z, out_cache = linear_forward(hs[-1] if self.readout == "last" else hs, p["V"], p["c"])
        return z, (rnn_cache, out_cache, hs.shape)

    def backward(self, dz, cache):
        """dz = dL/dz -> the gradient of every parameter, by BPTT."""
        rnn_cache, out_cache, hs_shape = cache
        g = {}
        dh, g["V"], g["c"] = linear_backward(dz, out_cache)
        if self.readout == "last":                 # only h_T feeds the loss
            dhs = self.xp.zeros(hs_shape, dtype=dh.dtype)
            dhs[-1] = dh
        else:
            dhs = dh
        _, g["W"], g["U"], g["b"] = rnn_backward(dhs, rnn_cache)
        return g
