"""roa.py -- random orthogonal additive networks (A. Ceni, arXiv:2210.01245).

    roaFNN:  x_{l+1} = alpha O_l x_l + beta phi(W_l x_l + b_l)
    roaRNN:  h_t     = alpha O h_{t-1} + beta phi(W h_{t-1} + U u_t + b)

Read it top to bottom: the two models, one training step, evaluation and
the training loop. The models hold their parameters in a dict of arrays
(NumPy or CuPy) and expose forward(u, rng=None) -> (z, cache) and
backward(dz, cache) -> (grads, dL/d first state), the gradients named as
the parameters; forward with an rng is a training pass (dropout on the
readout's input, where asked for); inference(u) -> z is evaluation's
forward, with no cache. The layers and their backward passes live in
autograd.py, the tasks and their data in tasks.py.

What a command-line run adds around the loop -- flags, pace lines,
checkpoints, the metrics log, stop signals, threads, memory -- lives in
machinery.py and reaches the loop through its hooks (Hooks); nothing here
imports it.
"""

import math
import numbers
import sys
from typing import NamedTuple

import numpy

from autograd import (ACTIVATIONS, RoaError, activation, array_module, dropout_backward, dropout_forward,
                      get_array_module, linear_backward, linear_forward, random_orthogonal, rnn_backward,
                      rnn_forward, rnn_inference, roa_backward, roa_forward, roa_inference)
from tasks import on_device, random_stream


# ------------------------------------------------ what the models accept

def is_integer(value):
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_real(value):
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


SIZE = (lambda v: is_integer(v) and v >= 1, "an integer >= 1")
DTYPES = ("float32", "float64")
READOUTS = ("last", "every")    # the roaRNN's: from h_T alone, or from every h_t


def one_of(choices):
    return (lambda v: isinstance(v, str) and v in choices, f"one of {', '.join(choices)}")


# What the models' arguments may be: (test, what is allowed). The command
# line and a checkpoint's configuration are held to these rules too, with
# the run's own flags added in machinery.py.
RULES = {
    "n_in": SIZE, "n_out": SIZE, "width": SIZE, "hidden": SIZE, "depth": SIZE,
    "seed": (lambda v: is_integer(v) and v >= 0, "an integer >= 0"),
    "alpha": (lambda v: is_real(v) and 0 <= v <= 10, "a number in 0 .. 10 (above 1 the state grows "
              "like alpha^T)"),
    "beta": (lambda v: is_real(v) and v > 0, "a finite number > 0"),
    "dropout": (lambda v: is_real(v) and 0 <= v < 1, "a number >= 0 and < 1"),
    "input_noise": (lambda v: is_real(v) and v >= 0, "a finite number >= 0"),
    "activation": one_of(sorted(ACTIVATIONS)), "dtype": one_of(DTYPES), "readout": one_of(READOUTS),
}


def check(name, value, source=None):
    """Raise RoaError naming `value` (and `source`, where it came from) unless
    RULES[name] allows it; return it."""
    test, allowed = RULES[name]
    if not test(value):
        raise RoaError((f"{source}: " if source else "") + f"{name} must be {allowed}, got {value!r}")
    return value


# ------------------------------------------------------------ the models

def inference_bytes(u_shape, width, n_out, readout, dtype):
    """Bytes that a model's inference takes for inputs of shape u_shape:
    (B, n_in) for the roaFNN, (T, B, n_in) for the roaRNN. Per example: the
    inputs; the roaRNN's input terms U u_t + b of all T steps, made (as
    every product plus bias is) as two arrays, then one, beside which the
    readout "every" keeps every state; a few (B, N) arrays of one layer or
    step; the scores (one set, or T with the readout "every"), twice."""
    *steps, B, n_in = u_shape
    T = steps[0] if steps else 1
    input_terms = 2 * T * width if steps else 0
    outputs = T * n_out if readout == "every" else n_out
    return B * (T * n_in + input_terms + 6 * width + 2 * outputs) * numpy.dtype(dtype).itemsize


class Model:
    """What roaFNN and roaRNN share: checked hyperparameters, the array module,
    the fixed orthogonal filters O, the trained parameters and the readout
    z = V x + c, with dropout on its input x in training, and Gaussian noise
    on the model's inputs u in training, where asked for."""

    def __init__(self, alpha, beta, activation_name, dtype, seed, device, dropout, input_noise):
        for name, value in [("alpha", alpha), ("beta", beta), ("dropout", dropout), ("dtype", dtype),
                            ("seed", seed), ("activation", activation_name), ("input_noise", input_noise)]:
            check(name, value)
        self.alpha, self.beta, self.dropout = float(alpha), float(beta), float(dropout)
        self.input_noise = float(input_noise)
        self.act = activation(activation_name)
        self.xp = array_module(device)
        self.dtype = dtype
        self.rng = random_stream(seed, "weights")

    def gaussian(self, shape, fan_in):
        """Weights drawn i.i.d. N(0, 1/fan_in) on the CPU (same seed, same weights on every backend)."""
        return self.rng.standard_normal(shape) / math.sqrt(fan_in)

    def to_device(self, arrays):
        """A dict of NumPy arrays as arrays of this model's module and dtype."""
        return {name: self.xp.asarray(a, dtype=self.dtype) for name, a in arrays.items()}

    def set_params(self, arrays):
        """Copy arrays (NumPy or of this module) into the parameters, in place;
        each must name a parameter and have its shape."""
        for name, a in arrays.items():
            if name not in self.params or getattr(a, "shape", None) != self.params[name].shape:
                wanted = f"shape {self.params[name].shape}" if name in self.params else f"one of {sorted(self.params)}"
                raise RoaError(f"set_params: {name!r} must be {wanted}, got {getattr(a, 'shape', type(a).__name__)}")
            self.params[name][...] = self.xp.asarray(a)

    def check_input(self, u, shape):
        """Inputs u must be an array of this model's module and dtype with the
        shape given (None: any size)."""
        fits = (hasattr(u, "shape") and get_array_module(u) is self.xp and u.dtype == self.dtype
                and u.ndim == len(shape) and all(n is None or n == m for n, m in zip(shape, u.shape))
                and min(u.shape) >= 1)
        if not fits:
            got = f"{type(u).__name__} {getattr(u, 'shape', '')} {getattr(u, 'dtype', '')}".strip()
            wanted = "(" + ", ".join("any" if n is None else str(n) for n in shape) + ")"
            raise RoaError(f"the inputs must be a {self.xp.__name__} {self.dtype} array of shape {wanted}, "
                           f"no size 0, got {got}")

    def noisy(self, u, rng):
        """u + input_noise * e, e i.i.d. N(0, 1) drawn from rng on the CPU, in a
        training pass (rng given); u itself otherwise."""
        if rng is None or self.input_noise == 0:
            return u
        return u + self.xp.asarray(self.input_noise * rng.standard_normal(u.shape), dtype=u.dtype)

    def readout_forward(self, x, rng):
        """z = V dropout(x) + c; dropout only in a training pass (rng given)."""
        x, mask = dropout_forward(x, self.dropout, rng)
        z, out_cache = linear_forward(x, self.params["V"], self.params["c"])
        return z, (mask, out_cache)

    def readout_backward(self, dz, cache):
        """dL/dx, dL/dV, dL/dc of readout_forward; dz must have the shape of
        the scores z that forward returned."""
        mask, out_cache = cache
        if out_cache[1] is not self.params["V"]:        # (the parameters are updated in place: the same arrays)
            raise RoaError("backward: the cache was made by another model's forward; give this model's")
        z_shape = out_cache[0].shape[:-1] + (self.params["V"].shape[0],)
        if (getattr(dz, "shape", None) != z_shape or get_array_module(dz) is not self.xp
                or dz.dtype != self.dtype):
            got = f"{type(dz).__name__} {getattr(dz, 'shape', '')} {getattr(dz, 'dtype', '')}".strip()
            raise RoaError(f"backward: dz must be dL/dz, a {self.xp.__name__} {self.dtype} array of the scores' "
                           f"shape {z_shape}, got {got}")
        dx, dV, dc = linear_backward(dz, out_cache)
        return dropout_backward(dx, mask), dV, dc


class RoaFNN(Model):
    """Input projection, L roa layers of width N, linear readout:

        x_0 = W_in u + b_in,
        x_{l+1} = alpha O_l x_l + beta phi(W_l x_l + b_l),   l = 0 .. L-1,
        z = V x_L + c.

    alpha = 0, beta = 1 is the plain multilayer perceptron baseline.
    """
    first_state = "x_0"         # backward's second answer is dL/dx_0, the gradient that reached layer 1

    def __init__(self, n_in, n_out, width, depth, alpha, beta, activation="tanh",
                 dtype="float32", seed=0, device="cpu", dropout=0.0, input_noise=0.0):
        for name, value in [("n_in", n_in), ("n_out", n_out), ("width", width), ("depth", depth)]:
            check(name, value)
        super().__init__(alpha, beta, activation, dtype, seed, device, dropout, input_noise)
        N, L = width, depth
        self.params = self.to_device({"W_in": self.gaussian((N, n_in), n_in), "b_in": numpy.zeros(N),
                                      "W": self.gaussian((L, N, N), N), "b": numpy.zeros((L, N)),
                                      "V": self.gaussian((n_out, N), N), "c": numpy.zeros(n_out)})
        self.O = self.xp.asarray(random_orthogonal(self.rng, N, L), dtype=self.dtype)   # fixed: never trained

    def inference_bytes(self, u_shape):
        """Bytes that inference takes for inputs of shape u_shape = (B, n_in)."""
        return inference_bytes(u_shape, self.params["b"].shape[1], self.params["c"].shape[0], "last", self.dtype)

    def forward(self, u, rng=None):
        """u: (B, n_in) -> scores z: (B, n_out), and the cache for backward.
        rng: a training pass, drawing the input noise and dropout masks from it."""
        p = self.params
        self.check_input(u, (None, p["W_in"].shape[1]))
        x, in_cache = linear_forward(self.noisy(u, rng), p["W_in"], p["b_in"])      # (the noisy u, for dW_in)
        x, roa_cache = roa_forward(x, p["W"], self.O, p["b"], self.alpha, self.beta, self.act)
        z, out_cache = self.readout_forward(x, rng)
        return z, (in_cache, roa_cache, out_cache)

    def inference(self, u):
        """The scores z of forward(u), computed without a cache (evaluation)."""
        p = self.params
        self.check_input(u, (None, p["W_in"].shape[1]))
        x, _ = linear_forward(u, p["W_in"], p["b_in"])
        x = roa_inference(x, p["W"], self.O, p["b"], self.alpha, self.beta, self.act)
        z, _ = linear_forward(x, p["V"], p["c"])
        return z

    def backward(self, dz, cache):
        """dz = dL/dz (B, n_out) -> (the gradient of every parameter, named as
        the parameters; dL/dx_0 (B, N), the gradient that reached the first
        roa layer: in a deep plain MLP it vanishes). The cache stays usable."""
        in_cache, roa_cache, out_cache = cache
        g = {}
        dx, g["V"], g["c"] = self.readout_backward(dz, out_cache)
        dx0, g["W"], g["b"] = roa_backward(dx, roa_cache)
        _, g["W_in"], g["b_in"] = linear_backward(dx0, in_cache)
        return g, dx0


class RoaRNN(Model):
    """One roaRNN layer with a linear readout (MATH.md section 3):

        h_t = alpha O h_{t-1} + beta phi(W h_{t-1} + U u_t + b),   h_0 = 0,
        z = V h_T + c            (readout "last": adding, psMNIST)
        z_t = V h_t + c          (readout "every": copying memory)

    alpha = 0, beta = 1 is the vanilla Elman RNN baseline. Inputs are
    time-major, u: (T, B, n_in).
    """

    first_state = "h_0"         # backward's second answer is dL/dh_0, the gradient that reached step 1

    def __init__(self, n_in, n_out, hidden, alpha, beta, activation="tanh", readout="last",
                 dtype="float32", seed=0, device="cpu", dropout=0.0, input_noise=0.0):
        for name, value in [("n_in", n_in), ("n_out", n_out), ("hidden", hidden), ("readout", readout)]:
            check(name, value)
        super().__init__(alpha, beta, activation, dtype, seed, device, dropout, input_noise)
        N = hidden
        self.readout = readout
        W, U, V = self.gaussian((N, N), N), self.gaussian((N, n_in), n_in), self.gaussian((n_out, N), N)
        self.params = self.to_device({"W": W, "U": U, "b": numpy.zeros(N), "V": V, "c": numpy.zeros(n_out)})
        self.O = self.xp.asarray(random_orthogonal(self.rng, N, 1)[0], dtype=self.dtype)  # fixed: never trained

    def inference_bytes(self, u_shape):
        """Bytes that inference takes for inputs of shape u_shape = (T, B, n_in)."""
        return inference_bytes(u_shape, self.params["b"].shape[0], self.params["c"].shape[0], self.readout,
                               self.dtype)

    def forward(self, u, rng=None):
        """u: (T, B, n_in) -> z: (B, n_out) or (T, B, n_out), and the cache.
        rng: a training pass, drawing the input noise and dropout masks from it."""
        p = self.params
        self.check_input(u, (None, None, p["U"].shape[1]))
        h0 = self.xp.zeros((u.shape[1], p["b"].shape[0]), dtype=u.dtype)
        u = self.noisy(u, rng)
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
        """dz = dL/dz, (B, n_out) or (T, B, n_out) -> (the gradient of every
        parameter by BPTT, named as the parameters; dL/dh_0 (B, N), the
        gradient that reached the first step: in a vanilla RNN it vanishes
        as T grows). The cache stays usable."""
        rnn_cache, out_cache = cache
        g = {}
        dh, g["V"], g["c"] = self.readout_backward(dz, out_cache)
        dhs = dh[None] if self.readout == "last" else dh      # the loss sees h_T, or every h_t
        dh0, g["W"], g["U"], g["b"] = rnn_backward(dhs, rnn_cache)
        return g, dh0


# -------------------------------------------------------------- learning

EVAL_BYTES = 2**30          # the most that one chunk of an evaluation may take


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


def evaluate_params(model, params, task, data):
    """evaluate() with `params` in the model for the while."""
    if params is model.params:
        return evaluate(model, task, data)
    trained = {k: v.copy() for k, v in model.params.items()}
    model.set_params(params)
    scores = evaluate(model, task, data)
    model.set_params(trained)
    return scores


class NotFinite(ArithmeticError):
    """A training step whose loss, parameters or optimiser state turned NaN or
    Inf. args: (step, u, loss, grads); grads is None where the loss stopped
    the step before backward (machinery.py says what most likely went wrong)."""


def all_finite(xp, arrays):
    """Do all these arrays hold finite numbers only?"""
    return all(bool(xp.isfinite(a).all()) for a in arrays)


def train_step(model, task, optimizer, seed, step, batch):
    """One step: input -> forward -> loss -> backward -> update. Returns the
    loss and |dL/dh_0| (|dL/dx_0| for the roaFNN), the norm of the gradient
    that reached the first step (layer): where gradients vanish, it falls
    towards 0. A loss that is not finite (before the update), or parameters
    or optimiser state that are not finite after it, raise NotFinite."""
    u, y = on_device(model.xp, *task.train_batch(seed, step - 1, batch), model.dtype)
    z, cache = model.forward(u, random_stream(seed, "dropout", step - 1))      # this step's noise and masks
    loss, dz = task.loss(z, y)
    if not math.isfinite(loss):
        raise NotFinite(step, u, loss, None)
    grads, d_first = model.backward(dz, cache)
    optimizer.step(model.params, grads)
    moments = [a for a in optimizer.state().values() if not numpy.isscalar(a)]     # Adam's m and v
    if not all_finite(model.xp, [*model.params.values(), *moments]):
        raise NotFinite(step, u, loss, grads)
    return loss, float(model.xp.linalg.norm(d_first))


class Plan(NamedTuple):
    """How long and how to train: steps first+1 .. steps at learning rate lr
    (a list: one per curriculum stage) under `schedule`, validated every
    eval_every steps."""
    steps: int
    batch: int
    seed: int
    eval_every: int
    lr: float                   # or a list of floats, one per curriculum stage
    schedule: str = "constant"  # or "cosine": see learning_rate
    advance_at: float = None    # a curriculum's stage ends at this validation metric (None: when solved)
    warmup: int = 0             # steps over which the rate rises linearly from lr / warmup to lr


def learning_rate(plan, step, stage=0):
    """The learning rate of step `step` (1 .. plan.steps), trained on
    curriculum stage `stage`: the stage's rate lr throughout, or decayed along
    half a cosine from lr at step 1 towards 0 at the run's end; with a
    warm-up of W steps, step s < W takes s / W of that rate."""
    lr = plan.lr[stage] if isinstance(plan.lr, list) else plan.lr
    if plan.schedule == "cosine":
        lr = lr * 0.5 * (1 + math.cos(math.pi * (step - 1) / plan.steps))
    return lr * min(1.0, step / plan.warmup) if plan.warmup else lr


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
        return {"count": self.count, "start": self.start, **{f"mean.{k}": a for k, a in self.mean.items()}}

    def load_state(self, state, xp):
        """Continue a saved average; one that has begun keeps its start, one
        that has not keeps the start of the run's (perhaps new) plan."""
        self.count = int(state["count"])
        if self.count:
            self.start = int(state.get("start", self.start))
        self.mean = {k[len("mean."):]: xp.asarray(a) for k, a in state.items() if k.startswith("mean.")}


class Progress:
    """Where a run stands, beyond its model and optimiser -- all that a
    checkpoint needs, with them, to continue the run exactly: the last step
    done, the training losses since the last report, the curriculum's stage,
    the best validation report so far (metric, step, the parameters it
    validated), and the weight average (None without one)."""

    def __init__(self, average=None):
        self.step, self.losses, self.stage = 0, [], 0
        self.best_metric, self.best_step, self.best_params = None, 0, None
        self.average = average

    def state(self):
        """The numbers, as one JSON-able dict (its arrays are saved apart)."""
        return {"losses": self.losses, "best_metric": self.best_metric, "best_step": self.best_step,
                "stage": self.stage}


def validate(model, task, progress, d_first_norm):
    """The validation report of step progress.step, as a dict: the mean
    training loss since the last report, and the loss and metric on the
    current length's validation set of the parameters -- or, once the weight
    average has begun, of their mean, this step's folded in. The best report
    of the last length keeps what it validated, for the test (a NaN metric,
    from parameters grown past float range, is never the best)."""
    stage, last_stage = task.stages[progress.stage], progress.stage == len(task.stages) - 1
    candidate, averaged = model.params, 0
    if progress.average and progress.step >= progress.average.start:
        progress.average.fold(model.params)
        candidate, averaged = progress.average.mean, progress.average.count
    val_loss, val_metric = evaluate_params(model, candidate, stage, stage.validation)
    report = dict(step=progress.step, loss=float(numpy.mean(progress.losses)), val_loss=val_loss,
                  val_metric=val_metric, first_state_grad_norm=d_first_norm, averaged=averaged)
    if len(task.stages) > 1:
        report.update(length=stage.T, stage=progress.stage + 1)
    progress.losses = []
    if last_stage and not math.isnan(val_metric) and (progress.best_metric is None
                                                      or task.better(val_metric, progress.best_metric)):
        progress.best_metric, progress.best_step = val_metric, progress.step
        progress.best_params = {k: v.copy() for k, v in candidate.items()}
    return report


def stage_label(task, stage):
    """Where a curriculum's run stands, "[T=200, stage 2/3]  "; "" for one length."""
    return "" if len(task.stages) == 1 else f"[T={task.stages[stage].T}, stage {stage + 1}/{len(task.stages)}]  "


def report_line(report, model, task, plan):
    """A validation report as the progress line that a run prints."""
    index = report.get("stage", 1) - 1              # (one length: no stage in the report)
    stage = task.stages[index]
    where = stage_label(task, index)
    n = report["averaged"]
    mean_of = f" (the weights' mean over {n} report{'s' * (n > 1)})" if n else ""
    return (f"step {report['step']:>{len(str(plan.steps))}}/{plan.steps}  {where}loss {report['loss']:.4f}  "
            f"val loss {report['val_loss']:.4f} (baseline {stage.baseline:.3f})  "
            f"val {task.metric_name} {report['val_metric']:.4f}{mean_of}  "
            f"|dL/d{model.first_state}| {report['first_state_grad_norm']:.2e}")


class Hooks:
    """What train does besides learning, at three moments. These print the
    validation reports; machinery.RunHooks adds the pace, checkpoints, the
    metrics log and stop signals."""

    def reported(self, report, line):
        """After a validation report: the report (a dict) and its line."""
        print(line)

    def moved_on(self, report, stage):
        """After a report that ended a curriculum's length: now it trains on `stage`."""
        print(f"T={report['length']} done at step {report['step']}; now T={stage.T}")

    def step_done(self, progress):
        """After every step, its report (if any) included."""


def train(model, task, optimizer, plan, progress, hooks=None):
    """Train by plan from step progress.step + 1 to plan.steps, validating
    every plan.eval_every steps and at the end; then score on the test set
    the parameters of the report with the best validation metric. A
    curriculum trains on its stage progress.stage, and moves on to the next
    at the first report that solves it (or reaches plan.advance_at); only
    the last stage's reports may be chosen.
    Returns (test loss, test metric, step of the chosen parameters)."""
    hooks = hooks or Hooks()
    with numpy.errstate(all="ignore"):                  # (train_step stops on NaN and Inf)
        for step in range(progress.step + 1, plan.steps + 1):
            stage = task.stages[progress.stage]
            optimizer.lr = learning_rate(plan, step, progress.stage)
            loss, d_first_norm = train_step(model, stage, optimizer, plan.seed, step, plan.batch)
            progress.step = step
            progress.losses.append(loss)
            if step % plan.eval_every == 0 or step == plan.steps:
                report = validate(model, task, progress, d_first_norm)
                hooks.reported(report, report_line(report, model, task, plan))
                goal = stage.goal()[0] if plan.advance_at is None else plan.advance_at
                if progress.stage < len(task.stages) - 1 and stage.reached(report["val_metric"], goal):
                    progress.stage += 1                 # the curriculum's next length
                    hooks.moved_on(report, task.stages[progress.stage])
            hooks.step_done(progress)
    chosen = progress.best_params or model.params
    return (*evaluate_params(model, chosen, task, task.test), progress.best_step or progress.step)


if __name__ == "__main__":                              # the command line: flags, checkpoints, signals
    from machinery import main
    sys.exit(main())
