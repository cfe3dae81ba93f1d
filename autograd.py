"""autograd.py -- the hand-written backpropagation engine of roa.

Every function implements numbered equations of A. Ceni, "Random orthogonal
additive filters" (arXiv:2210.01245), as restated in MATH.md:
eqs (1)-(10) for the multilayer perceptron, (7') for the random orthogonal
additive (roa) layer, and MATH.md section 3 for the roaRNN.

Read it top to bottom beside MATH.md: the activations, the roa layer as
one step (roa_step_forward / roa_step_backward), the roaFNN as a loop over
that step (roa_forward / roa_backward), the roaRNN as a loop over the same
step in time (rnn_forward / rnn_backward, BPTT), then the losses and the
optimisers.

Conventions (those of CS231n's layers.py):
- a batch is a stack of rows: x has shape (B, N) and `x @ W.T` is `W x` for
  every sample;
- a forward function returns (out, cache); its backward takes (dout, cache)
  and returns the gradients, `dout` being dL/dout of the batch objective;
  an `*_inference` function is the forward pass of evaluation, with no cache;
- the same code runs on NumPy or CuPy arrays: `xp` is the module that owns
  the arrays it is given (CuPy's idiom), and `array_module` is the one
  place where a device name becomes a module.
"""

import math
import numbers
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


# ---------------------------------------------------------- activations

class Activation(NamedTuple):
    phi: Callable        # phi(y), element-wise                                   (eq 2)
    phi_prime: Callable  # phi'(y), computed from phi(y) alone (see below)        (eq 4)
    gamma: float         # sup |phi'|, used by the bounds of MATH.md section 4

# phi' is computed from phi(y), which the forward pass has at hand:
# tanh' = 1 - tanh^2, relu' = [relu > 0], sigmoid' = sigmoid (1 - sigmoid).
# This is exact up to rounding, but where phi saturates it loses relative
# accuracy: tanh'(y) comes out as exactly 0 for |y| above about 19 in
# float64 (about 9 in float32), where the true value is tiny but not 0.


def tanh(y):
    return get_array_module(y).tanh(y)


def tanh_prime(phi_y):
    return 1 - phi_y * phi_y


def relu(y):
    return get_array_module(y).maximum(y, 0)


def relu_prime(phi_y):
    return (phi_y > 0).astype(phi_y.dtype)        # 1 where y > 0, else 0


def sigmoid(y):
    """1 / (1 + e^-y), to full relative accuracy on both sides and with no
    overflow: with e = e^-|y| <= 1, it is 1 / (1 + e) for y >= 0 and
    e / (1 + e) = 1 / (1 + e^-y) for y < 0."""
    xp = get_array_module(y)
    e = xp.exp(-xp.abs(y))
    return xp.where(y >= 0, 1, e) / (1 + e)


def sigmoid_prime(phi_y):
    return phi_y * (1 - phi_y)


ACTIVATIONS = {
    "tanh": Activation(tanh, tanh_prime, 1.0),
    "relu": Activation(relu, relu_prime, 1.0),
    "sigmoid": Activation(sigmoid, sigmoid_prime, 0.25),
}


def activation(name):
    """The Activation called `name`, or a clear error."""
    if not isinstance(name, str) or name not in ACTIVATIONS:
        raise RoaError(f"activation must be one of {sorted(ACTIVATIONS)}, got {name!r}")
    return ACTIVATIONS[name]


# --------------------------------------------------- random orthogonal O

def random_orthogonal(rng, n, count, block=1000):
    """`count` Haar-distributed n x n orthogonal matrices, shape (count, n, n).

    Mezzadri (2007): QR-factorise a matrix of i.i.d. standard normals,
    A = QR, and return Q diag(sign(diag(R))). Without the sign correction
    the distribution is not uniform. Drawn on the CPU from the NumPy
    Generator `rng`, so a seed gives the same matrices on every backend;
    `block` matrices at a time, which keeps the factorisation's temporaries
    small and gives the same matrices as drawing them all at once.
    """
    O = numpy.empty((count, n, n))
    for start in range(0, count, block):
        Q, R = numpy.linalg.qr(rng.standard_normal((min(block, count - start), n, n)))
        O[start:start + len(Q)] = Q * numpy.sign(numpy.diagonal(R, axis1=1, axis2=2))[:, None, :]
    return O


# ------------------------------------------------- linear layer, dropout

def linear_forward(x, W, b):
    """Eq (1), y = W x + b, for every row of x: (..., n_in) -> (..., n_out).

    Used for the input projection, the readout and the roaRNN's input term
    U u_t + b. The rows are flattened into one 2-D product: for the time-major
    (T, B, n_in) inputs of the roaRNN this is one BLAS call, where a 3-D
    matmul would be a loop of small ones (ten times slower for n_in = 1).
    """
    y = (x.reshape(-1, x.shape[-1]) @ W.T).reshape(x.shape[:-1] + (W.shape[0],)) + b
    return y, (x, W)


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


# ------------------------------------------------ the roa layer, one step

def roa_step_forward(x, W, O, b, alpha, beta, act):
    """One random orthogonal additive layer (MATH.md section 2):

        x_next = alpha O x + beta phi(W x + b)

    x: (B, N), a batch of inputs x_l; W, O: (N, N); b: (N,) -- or, for a
    roaRNN time step, (B, N), the input term U u_t + b. alpha, beta: floats.
    Returns x_next (B, N) and the cache for roa_step_backward.
    """
    alpha, beta = float(alpha), float(beta)       # (a NumPy float64 would make float32 arrays float64)
    y = x @ W.T + b                               # eq (1): y_l = W_l x_l + b_l
    phi_y = act.phi(y)                            # eq (2): phi(y_l)
    d = act.phi_prime(phi_y)                      # eq (4): d_l = phi'(y_l)
    x_next = alpha * (x @ O.T) + beta * phi_y     # (roa): x_{l+1} = alpha O_l x_l + beta phi(y_l)
    return x_next, (x, d, W, O, alpha, beta)


def roa_step_backward(delta_next, cache):
    """Backpropagation through one roa layer.

    delta_next: (B, N), dL/dx_{l+1} for every sample. With the layer's
    Jacobian (7'), J_l = alpha O_l + beta diag(d_l) W_l:

        dy    = beta d_l * delta_{l+1}                 dL/dy_l
        delta = J_l^T delta_{l+1} = alpha O_l^T delta_{l+1} + W_l^T dy

    Returns delta (B, N), dL/dx_l, and dy (B, N). The weight gradients
    dL/dW_l = dy x_l^T and dL/db_l = dy (eq 3) are left to the caller, which
    forms them for all layers or time steps at once (roa_backward, rnn_backward).
    """
    x, d, W, O, alpha, beta = cache
    dy = beta * d * delta_next                        # eqs (3)-(4) with the roa layer's beta
    delta = alpha * (delta_next @ O) + dy @ W         # eqs (5)-(7'): delta_l = J_l^T delta_{l+1}
    return delta, dy


# ------------------------------------------------- the roaFNN: L layers

def roa_forward(x, W, O, b, alpha, beta, act):
    """L random orthogonal additive layers (MATH.md section 2):

        x_{l+1} = alpha O_l x_l + beta phi(W_l x_l + b_l),   l = 0 .. L-1.

    x: (B, N) is x_0; W, O: (L, N, N); b: (L, N). With alpha = 0 and
    beta = 1 this is the plain multilayer perceptron, eqs (1)-(2).
    Returns x_L (B, N) and the cache: every x_l, kept in one (L+1, B, N)
    array for the weight gradients, and each layer's step cache.
    """
    xp = get_array_module(x)
    L = W.shape[0]
    xs = xp.empty((L + 1,) + x.shape, x.dtype)
    xs[0] = x
    steps = []
    for l in range(L):
        x_next, step = roa_step_forward(xs[l], W[l], O[l], b[l], alpha, beta, act)
        xs[l + 1] = x_next
        steps.append(step)
    return xs[L], (xs, steps)


def roa_backward(delta, cache):
    """Backpropagation through roa_forward.

    delta: (B, N), dL/dx_L (the error vector E of eq 3, or what the readout
    sends down). The loop carries delta_l down the layers, L-1 .. 0
    (eqs 5-6), one roa_step_backward each, keeping dy_l = dL/dy_l.
    The weight gradients (eq 3) are then one batched product over all layers:
    they need nothing from the loop but dy_l and x_l, and one call on
    (L, N, B) x (L, B, N) costs less than L small ones.
    Returns dL/dx_0 (B, N), dL/dW (L, N, N), dL/db (L, N).
    """
    xs, steps = cache
    xp = get_array_module(delta)
    L = len(steps)
    dys = xp.empty((L,) + delta.shape, delta.dtype)   # dy_l = dL/dy_l = beta d_l * delta_{l+1}
    for l in reversed(range(L)):
        delta, dys[l] = roa_step_backward(delta, steps[l])
    dW = dys.transpose(0, 2, 1) @ xs[:L]              # eq (3): dL/dW_l = dy_l x_l^T, summed over the batch
    db = dys.sum(axis=1)                              # eq (3) without the outer product
    return delta, dW, db


def roa_inference(x, W, O, b, alpha, beta, act):
    """roa_forward without the cache, for evaluation: the same operations in
    the same order (so the same numbers, bit for bit), but keeping only the
    current x_l, so that memory does not grow with the depth."""
    alpha, beta = float(alpha), float(beta)
    for l in range(W.shape[0]):
        x = alpha * (x @ O[l].T) + beta * act.phi(x @ W[l].T + b[l])     # (roa), eqs (1)-(2)
    return x


def roa_jacobian(x, W, O, b, alpha, beta, act):
    """The input-output Jacobian d x_L / d x_0 (N, N) of roa_forward at one
    input x (N,), computed by roa_backward itself: with x repeated N times
    and delta = I, row i of the returned dL/dx_0 is J^T e_i, row i of J."""
    xp = get_array_module(x)
    n = x.shape[0]
    _, cache = roa_forward(xp.tile(x, (n, 1)), W, O, b, alpha, beta, act)
    J, _, _ = roa_backward(xp.eye(n, dtype=x.dtype), cache)
    return J


# ---------------------------------------------- the roaRNN: T time steps

def rnn_step_forward(h_prev, W, O, input_term, alpha, beta, act):
    """One roaRNN time step (MATH.md section 3):

        h_t = alpha O h_{t-1} + beta phi(y_t),   y_t = W h_{t-1} + U u_t + b

    h_prev: (B, N), h_{t-1}; W, O: (N, N); input_term: (B, N), U u_t + b.
    This is the roa layer with the bias b_l replaced by U u_t + b, so it is
    roa_step_forward, with the arguments in the same order.
    Returns h_t (B, N) and the cache for rnn_step_backward.
    """
    return roa_step_forward(h_prev, W, O, input_term, alpha, beta, act)


def rnn_step_backward(g, cache):
    """Backpropagation through one time step. g: (B, N), the total gradient
    g_t = dL/dh_t. Returns dL/dh_{t-1} from this step, alpha O^T g_t + W^T dy_t,
    and dy_t = dL/dy_t = beta g_t * phi'(y_t), both (B, N)."""
    return roa_step_backward(g, cache)


def rnn_forward(u, h0, W, O, U, b, alpha, beta, act):
    """The roaRNN (MATH.md section 3), time-major:

        h_t = alpha O h_{t-1} + beta phi(W h_{t-1} + U u_t + b),  t = 1 .. T.

    u: (T, B, n_in), u[t-1] being u_t; h0: (B, N); W, O: (N, N); U: (N, n_in);
    b: (N,). With alpha = 0 and beta = 1 this is the vanilla Elman RNN.
    Returns h_1 .. h_T as (T, B, N) and the cache: every h_t in one
    (T+1, B, N) array, and each step's cache.
    """
    xp = get_array_module(u)
    T = u.shape[0]
    if getattr(h0, "shape", None) != (u.shape[1], W.shape[0]):
        raise RoaError(f"h0 must be the first state, of shape (B, N) = {(u.shape[1], W.shape[0])}, "
                       f"got {getattr(h0, 'shape', type(h0).__name__)}")
    # U u_t + b for every t in one product before the loop: it does not depend
    # on the state, and one large product is far cheaper than T small ones
    input_terms, _ = linear_forward(u, U, b)
    hs = xp.empty((T + 1,) + h0.shape, u.dtype)
    hs[0] = h0
    steps = []
    for t in range(1, T + 1):
        h, step = rnn_step_forward(hs[t - 1], W, O, input_terms[t - 1], alpha, beta, act)
        hs[t] = h
        steps.append(step)
    return hs[1:], (u, hs, steps)


def rnn_backward(dhs, cache):
    """Backpropagation through time for rnn_forward (MATH.md section 3).

    dhs: (T', B, N), the gradient that the loss sends into each of the last
    T' states h_{T-T'+1} .. h_T (T' = 1 for a readout of h_T alone, T' = T
    for a readout at every step). The loop runs t = T .. 1, carrying g_t, the
    total gradient reaching h_t: what step t+1 sends back, plus the loss's own
    gradient at h_t. The weight gradients are then one matrix product each
    over all (t, batch) pairs: they need nothing from the loop but dy_t, h_{t-1}
    and u_t, and one large product costs far less than T small ones.
    Returns dL/dh_0 (B, N), dL/dW (N, N), dL/dU (N, n_in), dL/db (N,).
    """
    u, hs, steps = cache
    xp = get_array_module(dhs)
    T, (B, N) = len(steps), dhs.shape[1:]
    unread = T - dhs.shape[0]                         # the loss reads h_t only for t > unread ...
    dys = xp.empty((T, B, N), dhs.dtype)              # dy_t = dL/dy_t, in dys[t-1]
    g = xp.zeros((B, N), dhs.dtype)                   # g_{T+1}: nothing comes from after h_T
    for t in range(T, 0, -1):
        if t > unread:
            g = g + dhs[t - 1 - unread]               # ... and dhs[t-1-unread] is its gradient at h_t
        g, dys[t - 1] = rnn_step_backward(g, steps[t - 1])    # step t's cache
    dy_rows = dys.reshape(T * B, N)                   # row t*B + i: dy_{t+1} of sample i
    dW = dy_rows.T @ hs[:T].reshape(T * B, N)         # sum_t dy_t h_{t-1}^T  (hs[t-1] is h_{t-1})
    dU = dy_rows.T @ u.reshape(T * B, -1)             # sum_t dy_t u_t^T      (u[t-1] is u_t)
    db = dy_rows.sum(axis=0)                          # sum_t dy_t
    return g, dW, dU, db


def rnn_inference(u, h0, W, O, U, b, alpha, beta, act, all_states=False):
    """rnn_forward without the cache, for evaluation: the same operations in
    the same order (the same numbers, bit for bit), keeping only the current
    state -- or, with all_states (a readout at every step), every h_t but
    nothing else. Returns h_T (B, N), or h_1 .. h_T (T, B, N)."""
    xp = get_array_module(u)
    alpha, beta = float(alpha), float(beta)
    input_terms, _ = linear_forward(u, U, b)
    hs = xp.empty(input_terms.shape, u.dtype) if all_states else None
    h = h0
    for t in range(1, u.shape[0] + 1):
        h = alpha * (h @ O.T) + beta * act.phi(h @ W.T + input_terms[t - 1])    # h_t, MATH.md section 3
        if all_states:
            hs[t - 1] = h
    return hs if all_states else h


def rnn_jacobian(u, h0, W, O, U, b, alpha, beta, act):
    """d h_T / d h_0 (N, N) of rnn_forward for one sequence u: (T, n_in) from
    the state h0: (N,), computed by rnn_backward itself: with the sequence
    repeated N times and the gradient I sent into h_T, row i of the returned
    dL/dh_0 is (d h_T / d h_0)^T e_i, row i of the Jacobian."""
    xp = get_array_module(u)
    n = h0.shape[0]
    _, cache = rnn_forward(xp.repeat(u[:, None, :], n, axis=1), xp.tile(h0, (n, 1)), W, O, U, b, alpha, beta, act)
    J, _, _, _ = rnn_backward(xp.eye(n, dtype=u.dtype)[None], cache)    # the loss sees h_T alone
    return J


# --------------------------------------------------------------- losses

def mse_loss(x, Y):
    """Per-sample loss ||Y - x_L||^2, summed over the output components and
    averaged over the batch (the objective of eq 10).

    x, Y: (B, K) outputs and targets, or (T, B, K) for an output at every time
    step (time-major: the batch is always the second-to-last axis), whose
    per-sample loss sums over the steps too. Returns the loss and
    dL/dx_L = E / B for every sample, where E = -2 (Y - x_L) is the paper's
    error vector.
    """
    if getattr(x, "shape", None) != getattr(Y, "shape", None) or x.ndim < 2:
        raise RoaError(f"mse_loss: the outputs and targets must have one shape (B, K) or (T, B, K), got "
                       f"{getattr(x, 'shape', None)} and {getattr(Y, 'shape', None)}")
    B = x.shape[-2]
    diff = x - Y
    return float((diff * diff).sum()) / B, 2 * diff / B


def softmax_cross_entropy(z, labels):
    """Mean cross-entropy of softmax(z) against integer labels.

    z: (..., K) scores; labels: (...) integers in [0, K). The mean runs over
    every leading position (samples, and time steps for per-step outputs).
    Returns the loss and dL/dz = (softmax(z) - onehot) / n.
    """
    xp = get_array_module(z)
    if getattr(labels, "shape", None) != z.shape[:-1] or labels.dtype.kind not in "iu":
        raise RoaError(f"softmax_cross_entropy: labels must be integers of shape {z.shape[:-1]}, got "
                       f"{getattr(labels, 'dtype', type(labels).__name__)} {getattr(labels, 'shape', '')}")
    if labels.size and (int(labels.min()) < 0 or int(labels.max()) >= z.shape[-1]):
        raise RoaError(f"softmax_cross_entropy: labels must be in 0 .. {z.shape[-1] - 1}, got "
                       f"{int(labels.min())} .. {int(labels.max())}")
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

def check_rate(name, value):
    """An optimiser's setting: a finite number, > 0 for the learning rate,
    >= 0 for the others."""
    real = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
    if not real or not (value > 0 if name == "lr" else value >= 0):
        raise RoaError(f"{name} must be a finite number {'> 0' if name == 'lr' else '>= 0'}, got {value!r}")
    return value


def check_gradients(params, grads):
    """The gradients must be a dict, each naming a parameter and of its shape."""
    if not isinstance(grads, dict):
        raise RoaError(f"the gradients must be a dict named as the parameters (the first of backward's two "
                       f"answers), got a {type(grads).__name__}")
    for name, grad in grads.items():
        if name not in params or getattr(grad, "shape", None) != params[name].shape:
            wanted = f"shape {params[name].shape}" if name in params else f"one of {sorted(params)}"
            raise RoaError(f"the gradient {name!r} must be {wanted}, got {getattr(grad, 'shape', type(grad).__name__)}")


def clip_global_norm(grads, max_norm):
    """The gradients scaled by one factor so that their global norm
    sqrt(sum of every squared entry) is at most max_norm (Pascanu et al.
    2013): a step keeps its direction and loses only its size. max_norm
    None or 0: the gradients as they are."""
    if not max_norm:
        return grads
    xp = get_array_module(next(iter(grads.values())))
    norm = float(xp.sqrt(sum(float((g * g).sum()) for g in grads.values())))
    if norm <= max_norm:
        return grads
    return {name: g * (max_norm / norm) for name, g in grads.items()}


class SGD:
    """Eqs (8)-(10): W(i) = W(i-1) - mu dL/dW, the gradient being the mean
    over the mini-batch (the losses above already average). With clip > 0
    the gradients are first clipped to that global norm."""

    def __init__(self, lr, clip=0.0):
        self.lr, self.clip = check_rate("lr", lr), check_rate("clip", clip)

    def step(self, params, grads):
        """Update every parameter in place by its (clipped) gradient."""
        check_gradients(params, grads)
        for name, grad in clip_global_norm(grads, self.clip).items():
            params[name] += -self.lr * grad                # eqs (8)-(9): W(i) = W(i-1) + dW, dW = -mu dL/dW

    def state(self):
        return {}

    def load_state(self, state):
        pass


class Adam:
    """Adam (Kingma & Ba 2015) on the same averaged gradient as SGD.
    `b1`, `b2` are Adam's decay rates (not the roa beta). With weight_decay
    lambda > 0 every parameter also shrinks by the factor 1 - lr lambda each
    step, apart from the gradient (AdamW, Loshchilov & Hutter 2019). With
    clip > 0 the gradients are first clipped to that global norm."""

    def __init__(self, lr, weight_decay=0.0, clip=0.0, b1=0.9, b2=0.999, eps=1e-8):
        self.lr, self.weight_decay, self.clip = (check_rate(name, value) for name, value in
                                                 (("lr", lr), ("weight_decay", weight_decay), ("clip", clip)))
        self.b1, self.b2, self.eps = b1, b2, eps
        self.t = 0
        self.m, self.v = {}, {}

    def step(self, params, grads):
        check_gradients(params, grads)
        self.t += 1
        xp = get_array_module(next(iter(grads.values())))
        for name, grad in clip_global_norm(grads, self.clip).items():
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
