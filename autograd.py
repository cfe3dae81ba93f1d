"""autograd.py -- the hand-written backpropagation engine of roa.

Every function implements numbered equations of A. Ceni, "Random orthogonal
additive filters" (arXiv:2210.01245), as restated in MATH.md:
eqs (1)-(10) for the multilayer perceptron, (7') for the random orthogonal
additive (roa) layer, and MATH.md section 3 for the roaRNN.

Conventions (those of CS231n's layers.py):
- a batch is a stack of rows: x has shape (B, N) and `x @ W.T` is `W x` for
  every sample;
- a forward function returns (out, cache); its backward takes (dout, cache)
  and returns the gradients, `dout` being dL/dout of the batch objective;
- the same code runs on NumPy or CuPy arrays: `xp` is the module that owns
  the arrays it is given (CuPy's idiom), and `array_module` is the one
  place where a device name becomes a module; `fuse` makes the element-wise
  work of a layer one GPU kernel on CuPy and changes nothing on NumPy.
"""

import functools
from typing import Callable, NamedTuple

import numpy

try:
    import cupy
except ImportError:
    cupy = None


class RoaError(ValueError):
    """A user mistake, with a message naming the bad value and what is allowed."""


# --------------------------------------------------------------- arrays

def array_module(device):
    """The one array-module switch: numpy for 'cpu', cupy for 'gpu'."""
    if device == "cpu":
        return numpy
    if device != "gpu":
        raise RoaError(f"device must be 'cpu' or 'gpu', got {device!r}")
    if cupy is None:
        raise RoaError("device 'gpu' needs CuPy, which is not installed "
                       "(pip install -r requirements-gpu.txt), or use device 'cpu'")
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except cupy.cuda.runtime.CUDARuntimeError as err:
        raise RoaError(f"device 'gpu': CuPy finds no usable GPU ({err}); use device 'cpu'") from None
    if count == 0:
        raise RoaError("device 'gpu': CuPy finds no GPU; use device 'cpu'")
    return cupy


def free_memory(xp):
    """Bytes free for new arrays of module xp (the GPU's memory for CuPy), or
    None where the system does not say."""
    if xp is not numpy:
        return xp.cuda.Device().mem_info[0]
    try:
        with open("/proc/meminfo") as f:                    # Linux: MemAvailable, in kB
            fields = dict(line.split(":", 1) for line in f)
        return int(fields["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return None


def get_array_module(a):
    """numpy for a NumPy array, cupy for a CuPy array."""
    return numpy if cupy is None else cupy.get_array_module(a)


def to_numpy(a):
    """A NumPy copy of a NumPy or CuPy array (for saving and printing)."""
    return a.get() if hasattr(a, "get") else numpy.asarray(a)


def fuse(f):
    """CuPy's kernel fusion (cupy.fuse): called with CuPy arrays, the
    element-wise calls of f run as one GPU kernel; called with NumPy arrays
    (or without CuPy), f runs call by call, as written."""
    return f if cupy is None else cupy.fuse(f)


# ---------------------------------------------------------- activations

class Activation(NamedTuple):
    phi: Callable    # phi(y): overwrites y with phi(y), element-wise   (eq 2)
    dphi: Callable   # dphi(a, out): writes phi'(y) into out, from a = phi(y)   (eq 4)
    gamma: float     # sup |phi'|, used by the bounds of MATH.md section 4

# The layers below work in place (no temporaries in the inner loops), so phi
# overwrites its argument, and phi' is computed from phi(y) alone, which all
# three activations allow: tanh' = 1 - tanh^2, relu' = [relu > 0],
# sigmoid' = sigmoid (1 - sigmoid).


def _tanh(y):
    get_array_module(y).tanh(y, out=y)


def _tanh_prime(a, out):
    xp = get_array_module(a)
    xp.multiply(a, a, out=out)
    xp.subtract(1, out, out=out)                       # 1 - tanh(y)^2


def _relu(y):
    get_array_module(y).maximum(y, 0, out=y)


def _relu_prime(a, out):
    get_array_module(a).greater(a, 0, out=out)         # 1 where y > 0, else 0


def _sigmoid(y):
    xp = get_array_module(y)                           # 1 / (1 + e^-y) = (1 + tanh(y / 2)) / 2,
    y *= 0.5                                           # which cannot overflow
    xp.tanh(y, out=y)
    y += 1
    y *= 0.5


def _sigmoid_prime(a, out):
    xp = get_array_module(a)
    xp.multiply(a, a, out=out)
    xp.subtract(a, out, out=out)                       # sigmoid(y) (1 - sigmoid(y))


ACTIVATIONS = {
    "tanh": Activation(_tanh, _tanh_prime, 1.0),
    "relu": Activation(_relu, _relu_prime, 1.0),
    "sigmoid": Activation(_sigmoid, _sigmoid_prime, 0.25),
}


def activation(name):
    """The Activation called `name`, or a clear error."""
    if name not in ACTIVATIONS:
        raise RoaError(f"activation must be one of {sorted(ACTIVATIONS)}, got {name!r}")
    return ACTIVATIONS[name]


# --------------------------------------------------- random orthogonal O

def random_orthogonal(rng, n, count):
    """`count` Haar-distributed n x n orthogonal matrices, shape (count, n, n).

    Mezzadri (2007): QR-factorise a matrix of i.i.d. standard normals,
    A = QR, and return Q diag(sign(diag(R))). Without the sign correction
    the distribution is not uniform. Drawn on the CPU from the NumPy
    Generator `rng`, so a seed gives the same matrices on every backend.
    """
    Q, R = numpy.linalg.qr(rng.standard_normal((count, n, n)))
    return Q * numpy.sign(numpy.diagonal(R, axis1=1, axis2=2))[:, None, :]


# --------------------------------------------------------------- layers

def linear_forward(x, W, b):
    """Eq (1), y = W x + b, for every row of x (any leading shape).

    Used for the input projection and the readout.
    """
    return x @ W.T + b, (x, W)


def linear_backward(dy, cache):
    """Gradients of eq (1): dx = W^T dy, dW = dy x^T (eq 3), db = dy,
    the last two summed over every row."""
    x, W = cache
    dy_rows = dy.reshape(-1, dy.shape[-1])
    dW = dy_rows.T @ x.reshape(-1, x.shape[-1])
    return dy @ W, dW, dy_rows.sum(axis=0)


def dropout_forward(x, p, rng):
    """Inverted dropout (Srivastava et al. 2014) on x, any shape. Training
    (rng, a NumPy Generator, given and p > 0): every entry is zeroed with
    probability p and the others are scaled by 1 / (1 - p), so that the
    output's expectation is x; the mask is drawn on the CPU (the same mask on
    every backend). Evaluation (rng None) or p = 0: the identity, mask None.
    Returns (out, mask)."""
    if rng is None or p == 0:
        return x, None
    mask = get_array_module(x).asarray((rng.random(x.shape) >= p) / (1 - p), dtype=x.dtype)
    return x * mask, mask


def dropout_backward(dout, mask):
    """dx = dout * mask: a kept entry passes its gradient, scaled like itself; a dropped one none."""
    return dout if mask is None else dout * mask


def stack_WO(W, O, alpha):
    """The pair (W, alpha O) as one array: (..., 2, N, N) from W, O (..., N, N).

    The layers below take their weights in this form, so that one (batched)
    matrix product gives both W x and alpha O x, each a contiguous block,
    and one gives both W^T dy and alpha O^T delta. The models keep it as
    their storage, their parameter W being a view of it (WO[..., 0, :, :]).
    """
    xp = get_array_module(W)
    return xp.stack([W, alpha * O], axis=-3)


# The element-wise work of one roa layer (or roaRNN time step) around its one
# matrix product, as a function of the arrays it reads and writes: on CuPy,
# fuse() makes each a single GPU kernel (a step is too small for anything but
# launches to cost); on NumPy it runs call by call, in place.

@functools.cache
def forward_step_of(act):
    """forward_step(y, shift, filtered, beta, x_next, d) for activation act:
    from y = W x and filtered = alpha O x, writes x_next = alpha O x +
    beta phi(W x + shift) and d = phi'(W x + shift), where shift is b (the
    roaFNN) or U u_t + b (the roaRNN). y is overwritten."""

    def forward_step(y, shift, filtered, beta, x_next, d):
        y += shift                                         # eq (1): y = W x + b
        act.phi(y)                                         # eq (2), in place: y holds phi(y) now
        act.dphi(y, out=d)                                 # eq (4): d = phi'(y)
        y *= beta
        get_array_module(y).add(filtered, y, out=x_next)   # x_next = alpha O x + beta phi(y)

    return fuse(forward_step)


@fuse
def backward_step(WT_dy, OT_delta, dL_dx, d, beta, delta, dy):
    """From the two halves of the layer above's product, writes its delta =
    W^T dy + alpha O^T delta (eq 7'), plus dL_dx where the loss reads this
    state directly (None where it does not), then d * delta over d (kept for
    the weight gradients) and dy = beta d * delta."""
    xp = get_array_module(d)
    xp.add(WT_dy, OT_delta, out=delta)
    if dL_dx is not None:
        delta += dL_dx
    d *= delta
    xp.multiply(d, beta, out=dy)


def roa_forward(x, WO, b, beta, act):
    """L random orthogonal additive layers (MATH.md section 2):

        x_{l+1} = alpha O_l x_l + beta phi(W_l x_l + b_l),   l = 0 .. L-1.

    x: (B, N) is x_0; WO: (L, 2, N, N), the pairs (W_l, alpha O_l) (stack_WO);
    b: (L, N). With alpha = 0 and beta = 1 this is the plain multilayer
    perceptron, eqs (1)-(2).
    Returns x_L and a cache holding every x_l and every d_l = phi'(y_l).
    """
    xp = get_array_module(x)
    L = b.shape[0]
    xs = xp.empty((L + 1,) + x.shape, x.dtype)
    ds = xp.empty((L,) + x.shape, x.dtype)
    both = xp.empty((2,) + x.shape, x.dtype)
    y, filtered = both                                     # W_l x_l and alpha O_l x_l
    forward_step = forward_step_of(act)
    xs[0] = x
    for l in range(L):
        xp.matmul(xs[l], WO[l].transpose(0, 2, 1), out=both)    # W_l x_l and alpha O_l x_l: one call
        forward_step(y, b[l], filtered, beta, xs[l + 1], ds[l])  # x_{l+1} and d_l
    return xs[L], (xs, ds, WO, beta)


def roa_backward(delta, cache):
    """Backpropagation through roa_forward.

    delta: dL/dx_L, shape (B, N) (the error vector E, eq 3, or what the
    readout sends down). The loop carries delta_l = J_l^T delta_{l+1} down
    the layers (eqs 5-6) with the roa layer Jacobian (7')

        J_l = d x_{l+1} / d x_l = alpha O_l + beta diag(d_l) W_l,

    from one batched product: W_l^T (beta d_l * delta_{l+1}) and alpha O_l^T delta_{l+1},
    which the next step adds up. It keeps d_l * delta_{l+1}, written over
    d_l in the cache (a cache serves one backward pass), and reads all
    weight gradients off it afterwards in one batched product (eq 3).
    Returns dL/dx_0 (B, N), dL/dW (L, N, N), dL/db (L, N).
    """
    xs, ds, WO, beta = cache
    xp = get_array_module(delta)
    L, B, N = ds.shape
    pair, products = xp.empty((2, B, N), ds.dtype), xp.zeros((2, B, N), ds.dtype)
    dy, delta_now = pair                                   # beta d_l * delta_{l+1}, delta_{l+1}
    for l in reversed(range(L)):                           # products hold the halves of delta_{l+1}
        backward_step(*products, delta if l == L - 1 else None, ds[l], beta, delta_now, dy)
        xp.matmul(pair, WO[l], out=products)               # W_l^T dy and alpha O_l^T delta_{l+1}
    xp.add(products[0], products[1], out=delta_now)        # eq (7'): delta_0 = J_0^T delta_1
    dW = ds.transpose(0, 2, 1) @ xs[:L]                    # eq (3): beta (d_l * delta_{l+1}) x_l^T
    db = ds.sum(axis=1)                                    # eq (3) without the outer product
    for grad in (dW, db):
        grad *= beta                                       # (the rows held d_l * delta_{l+1})
    return delta_now.copy(), dW, db


def roa_jacobian(x, WO, b, beta, act):
    """The input-output Jacobian d x_L / d x_0 (N, N) of roa_forward at one
    input x (N,), computed by roa_backward itself: with x repeated N times
    and delta = I, row i of the returned dL/dx_0 is J^T e_i, row i of J."""
    xp = get_array_module(x)
    n = x.shape[0]
    _, cache = roa_forward(xp.tile(x, (n, 1)), WO, b, beta, act)
    J, _, _ = roa_backward(xp.eye(n, dtype=x.dtype), cache)
    return J


def rnn_forward(u, h0, WO, U, b, beta, act):
    """The roaRNN (MATH.md section 3), time-major:

        h_t = alpha O h_{t-1} + beta phi(W h_{t-1} + U u_t + b),  t = 1 .. T.

    u: (T, B, n_in); h0: (B, N); WO: (2, N, N), the pair (W, alpha O)
    (stack_WO), so that one product per step gives W h and alpha O h.
    With alpha = 0 and beta = 1 this is the vanilla Elman RNN.
    Returns h_1 .. h_T as (T, B, N) and the cache.
    """
    xp = get_array_module(u)
    (T, B), N = u.shape[:2], b.shape[0]
    hs = xp.empty((T + 1,) + h0.shape, u.dtype)
    ds = xp.empty((T,) + h0.shape, u.dtype)
    both = xp.empty((2,) + h0.shape, u.dtype)
    a, filtered = both                                     # W h_{t-1} and alpha O h_{t-1}
    hs[0] = h0
    # U u_t + b for every t, one product before the loop (a 2-D dot: BLAS even for
    # n_in = 1, where matmul on the 3-D u is ten times slower), held in hs[t]
    # until h_t overwrites it
    rows = hs[1:].reshape(T * B, N)
    xp.dot(u.reshape(T * B, -1), U.T, out=rows)
    rows += b
    forward_step = forward_step_of(act)
    for t in range(1, T + 1):              # hs[t] = h_t; ds[t-1] = phi'(a_t)
        xp.matmul(hs[t - 1], WO.transpose(0, 2, 1), out=both)   # W h_{t-1} and alpha O h_{t-1}: one call
        forward_step(a, hs[t], filtered, beta, hs[t], ds[t - 1])  # h_t, a_t = W h_{t-1} + U u_t + b
    return hs[1:], (u, hs, ds, WO, beta)


def rnn_backward(dhs, cache):
    """Backpropagation through time for rnn_forward (MATH.md section 3).

    dhs: (T', B, N), the gradient that the loss sends into each of the last
    T' states h_{T-T'+1} .. h_T (T' = 1 for a readout of h_T alone, T' = T
    for a readout at every step). With g_t the total gradient reaching h_t,
    the loop runs t = T .. 1:

        dz_t     = beta g_t * phi'(a_t)
        g_{t-1}  = alpha O^T g_t + W^T dz_t   (+ the loss's own gradient at h_{t-1})

    the second from one batched product giving W^T dz_t and alpha O^T g_t. The weight
    gradients are one matrix product each over all (t, batch) pairs
    afterwards, read off g_t * phi'(a_t), which is written over phi'(a_t) in
    the cache (a cache serves one backward pass).
    Returns dL/dh_0, dW, dU, db.
    """
    u, hs, ds, WO, beta = cache
    xp = get_array_module(dhs)
    T, B, N = ds.shape
    first_seen = T - dhs.shape[0]                     # h_t with t > first_seen feed the loss directly
    pair, products = xp.empty((2, B, N), ds.dtype), xp.zeros((2, B, N), ds.dtype)
    dz, g = pair                                           # dz_t and g_t
    for t in range(T, 0, -1):                              # products hold the halves of g_t
        dL_dh = dhs[t - 1 - first_seen] if t > first_seen else None     # the loss's gradient at h_t
        backward_step(*products, dL_dh, ds[t - 1], beta, g, dz)         # g_t; dz_t = beta g_t * phi'(a_t)
        xp.matmul(pair, WO, out=products)                  # W^T dz_t and alpha O^T g_t
    xp.add(products[0], products[1], out=g)                # g_0
    rows = ds.reshape(T * B, N)                            # g_t * phi'(a_t) = dz_t / beta
    dW = rows.T @ hs[:T].reshape(T * B, N)                 # sum_t dz_t h_{t-1}^T
    dU = rows.T @ u.reshape(T * B, -1)                     # sum_t dz_t u_t^T
    db = rows.sum(axis=0)                                  # sum_t dz_t
    for grad in (dW, dU, db):
        grad *= beta                                       # (the rows held dz_t / beta)
    return g.copy(), dW, dU, db


def rnn_jacobian(u, h0, WO, U, b, beta, act):
    """d h_T / d h_0 (N, N) of rnn_forward for one sequence u: (T, n_in) from
    the state h0: (N,), computed by rnn_backward itself: with the sequence
    repeated N times and the gradient I sent into h_T, row i of the returned
    dL/dh_0 is (d h_T / d h_0)^T e_i, row i of the Jacobian."""
    xp = get_array_module(u)
    n = h0.shape[0]
    _, cache = rnn_forward(xp.repeat(u[:, None, :], n, axis=1), xp.tile(h0, (n, 1)), WO, U, b, beta, act)
    J, _, _, _ = rnn_backward(xp.eye(n, dtype=u.dtype)[None], cache)    # the loss sees h_T alone
    return J


# --------------------------------------------------------------- losses

def mse_loss(x, Y):
    """Per-sample loss ||Y - x_L||^2, summed over the output components and
    averaged over the batch (the objective of eq 10).

    Returns the loss and dL/dx_L = E / B for every sample, where
    E = -2 (Y - x_L) is the paper's error vector.
    """
    B = x.shape[0]
    diff = x - Y
    return float((diff * diff).sum()) / B, 2 * diff / B


def softmax_cross_entropy(z, labels):
    """Mean cross-entropy of softmax(z) against integer labels.

    z: (..., K) scores; labels: (...) integers in [0, K). The mean runs over
    every leading position (samples, and time steps for per-step outputs).
    Returns the loss and dL/dz = (softmax(z) - onehot) / n.
    """
    xp = get_array_module(z)
    scores = z.reshape(-1, z.shape[-1])
    labels = labels.reshape(-1)
    n = scores.shape[0]
    shifted = scores - scores.max(axis=1, keepdims=True)
    log_p = shifted - xp.log(xp.exp(shifted).sum(axis=1, keepdims=True))
    rows = xp.arange(n)
    loss = -float(log_p[rows, labels].sum()) / n
    dz = xp.exp(log_p)
    dz[rows, labels] -= 1
    return loss, (dz / n).reshape(z.shape)


# ----------------------------------------------------------- optimisers

class SGD:
    """Eqs (8)-(10): W(i) = W(i-1) - mu dL/dW, the gradient being the mean
    over the mini-batch (the losses above already average)."""

    def __init__(self, lr):
        self.lr = lr

    def step(self, params, grads):
        """Update params in place. The gradients are scaled in place too (so a
        50,000-layer gradient needs no second copy): they are used up."""
        for name, grad in grads.items():
            grad *= self.lr                                # eq (9): dW = -mu dL/dW ...
            params[name] -= grad                           # eq (8): W(i) = W(i-1) + dW

    def state(self):
        return {}

    def load_state(self, state):
        pass


class Adam:
    """Adam (Kingma & Ba 2015) on the same averaged gradient as SGD.
    `b1`, `b2` are Adam's decay rates (not the roa beta). With weight_decay
    lambda > 0 every parameter also shrinks by the factor 1 - lr lambda each
    step, apart from the gradient (AdamW, Loshchilov & Hutter 2019)."""

    def __init__(self, lr, weight_decay=0.0, b1=0.9, b2=0.999, eps=1e-8):
        self.lr, self.weight_decay, self.b1, self.b2, self.eps = lr, weight_decay, b1, b2, eps
        self.t = 0
        self.m, self.v = {}, {}

    def step(self, params, grads):
        self.t += 1
        xp = get_array_module(next(iter(grads.values())))
        for name, grad in grads.items():
            if name not in self.m:
                self.m[name] = xp.zeros_like(grad)
                self.v[name] = xp.zeros_like(grad)
            m, v = self.m[name], self.v[name]
            m *= self.b1
            m += (1 - self.b1) * grad                      # first moment
            v *= self.b2
            v += (1 - self.b2) * grad * grad               # second moment
            m_hat = m / (1 - self.b1 ** self.t)            # bias corrections
            v_hat = v / (1 - self.b2 ** self.t)
            if self.weight_decay:                          # decoupled weight decay
                params[name] *= 1 - self.lr * self.weight_decay
            params[name] -= self.lr * m_hat / (xp.sqrt(v_hat) + self.eps)

    def state(self):
        """Arrays and numbers that restore this optimiser exactly."""
        state = {"t": self.t}
        state.update({f"m.{k}": a for k, a in self.m.items()})
        state.update({f"v.{k}": a for k, a in self.v.items()})
        return state

    def load_state(self, state):
        self.t = int(state["t"])
        self.m = {k[2:]: a for k, a in state.items() if k.startswith("m.")}
        self.v = {k[2:]: a for k, a in state.items() if k.startswith("v.")}
