"""roa.py -- random orthogonal additive networks (A. Ceni, arXiv:2210.01245).

    roaFNN:  x_{l+1} = alpha O_l x_l + beta phi(W_l x_l + b_l)
    roaRNN:  h_t     = alpha O h_{t-1} + beta phi(W h_{t-1} + U u_t + b)

The models hold their parameters in a dict of arrays (NumPy or CuPy) and
expose forward(u, rng=None) -> (z, cache) and backward(dz, cache) -> grads,
the gradients having the same names as the parameters; forward with an rng
is a training pass (dropout on the readout's input, where asked for);
inference(u) -> z is evaluation's forward, with no cache. The layers and
their backward passes live in autograd.py.

This file reads top to bottom: the two models, one training step,
evaluation, the training loop, and the command line's run and main. What
keeps a run safe -- the flags' rules, checkpoint files, stop signals, CPU
threads and memory -- lives in machinery.py; the tasks and their data in
tasks.py.
"""

import signal
import sys


def stopped_while_loading(signum, frame):
    """Ctrl-C while the libraries below load: one line and status 130, as a
    stop outside training gets later on, instead of an import's traceback."""
    print("roa.py: interrupted while loading; nothing was run", file=sys.stderr)
    sys.exit(130)


if __name__ == "__main__" and signal.getsignal(signal.SIGINT) is signal.default_int_handler:
    signal.signal(signal.SIGINT, stopped_while_loading)     # (an inherited "ignore" stays)

import argparse
import math
import time
from typing import NamedTuple

import numpy

from autograd import (ROA_BLOCK, SGD, Adam, RoaError, activation, array_module, dropout_backward, dropout_forward,
                      get_array_module, linear_backward, linear_forward, random_orthogonal, rnn_backward,
                      rnn_forward, rnn_inference, roa_backward_blocks, roa_forward_blocks, roa_inference)
from machinery import (ARCHITECTURE_FLAGS, DEFAULT_DATA_DIR, EVAL_BYTES, PLAN_FLAGS, TRAINING_FLAGS, StopNow,
                       StopSignals, Stopped, check, check_flags, check_memory, check_same_data, check_task_flags,
                       clock, continue_progress, data_source, exclusive, fill_defaults, filter_fingerprint,
                       kept_bytes, load_checkpoint, metrics_log, non_finite_cause, pace_line, parse_args,
                       planned_steps, prepare_output, rates_text, restore, resume_plan, same_file, save_checkpoint,
                       say, trained_state_finite, unprefixed, use_threads, why_it_ended)
from tasks import MNIST, Adding, Copy, Curriculum, DeepMNIST, PsMNIST, on_device, random_stream

if signal.getsignal(signal.SIGINT) is stopped_while_loading:
    signal.signal(signal.SIGINT, signal.default_int_handler)    # loaded: Ctrl-C raises KeyboardInterrupt again


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
        self.rng = random_stream(seed, "weights")

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

    def readout_forward(self, x, rng):
        """z = V dropout(x) + c; dropout only in a training pass (rng given)."""
        x, mask = dropout_forward(x, self.dropout, rng)
        z, out_cache = linear_forward(x, self.params["V"], self.params["c"])
        return z, (mask, out_cache)

    def readout_backward(self, dz, cache):
        """dL/dx, dL/dV, dL/dc of readout_forward; dz must have the shape of
        the scores z that forward returned."""
        mask, out_cache = cache
        z_shape = out_cache[0].shape[:-1] + (self.params["V"].shape[0],)
        if getattr(dz, "shape", None) != z_shape or get_array_module(dz) is not self.xp:
            got = f"{type(dz).__name__} {getattr(dz, 'shape', '')}".strip()
            raise RoaError(f"backward: dz must be dL/dz, a {self.xp.__name__} array of the scores' shape {z_shape}, "
                           f"got {got}")
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
    block = ROA_BLOCK           # layers per block of roa_forward_blocks (a memory trick)

    def __init__(self, n_in, n_out, width, depth, alpha, beta, activation="tanh",
                 dtype="float32", seed=0, device="cpu", dropout=0.0):
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
        x, roa_caches = roa_forward_blocks(x, p["W"], self.O, p["b"], self.alpha, self.beta, self.act, self.block)
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
        dx, g["W"], g["b"] = roa_backward_blocks(dx, roa_caches)
        _, g["W_in"], g["b_in"] = linear_backward(dx, in_cache)
        return g


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
                 dtype="float32", seed=0, device="cpu", dropout=0.0):
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

HEARTBEAT_SECONDS = 30      # between progress lines when validation reports are further apart


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


def train_step(model, task, optimizer, seed, step, batch):
    """One step: input -> forward -> loss -> backward -> update. Returns the
    loss and the norm of the gradient that reached the input layer.
    A loss that is not finite (before the update), or parameters or optimiser
    state that are not finite after it, stop training (RoaError), saying
    what most likely went wrong."""
    u, y = on_device(model.xp, *task.train_batch(seed, step - 1, batch), model.dtype)
    z, cache = model.forward(u, random_stream(seed, "dropout", step - 1))      # this step's dropout masks
    loss, dz = task.loss(z, y)
    grads = None
    if math.isfinite(loss):
        grads = model.backward(dz, cache)
        input_grad = float(model.xp.linalg.norm(grads[model.input_layer]))
        optimizer.step(model.params, grads)
    if grads is None or not trained_state_finite(model, optimizer):
        raise RoaError(f"training stopped at step {step}: {non_finite_cause(model, u, loss, grads, optimizer)}; "
                       "the last checkpoint saved, if any, is kept as it was")
    return loss, input_grad


class Plan(NamedTuple):
    """How long and how to train: steps first+1 .. steps at learning rate lr
    (a list: one per curriculum stage) under `schedule`, and what to report
    and save when."""
    steps: int
    batch: int
    seed: int
    eval_every: int
    lr: float                   # or a list of floats, one per curriculum stage
    schedule: str = "constant"  # or "cosine": see learning_rate
    save_every: int = 0         # 0: save only at the end (and when stopped)
    advance_at: float = None    # a curriculum's stage ends at this validation metric (None: when solved)


def learning_rate(plan, step, stage=0):
    """The learning rate of step `step` (1 .. plan.steps), trained on
    curriculum stage `stage`: the stage's rate lr throughout, or decayed along
    half a cosine from lr at step 1 towards 0 at the run's end."""
    lr = plan.lr[stage] if isinstance(plan.lr, list) else plan.lr
    if plan.schedule == "cosine":
        return lr * 0.5 * (1 + math.cos(math.pi * (step - 1) / plan.steps))
    return lr


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
        self.count = int(state["count"])
        self.start = int(state.get("start", self.start))       # (a resume that extends the run keeps it)
        self.mean = {k: xp.asarray(a) for k, a in unprefixed("mean", state).items()}


class Progress:
    """Where a run stands, beyond its model and optimiser -- all that a
    checkpoint needs, with them, to continue the run exactly: the last step
    done, the training losses since the last report, the best validation
    report so far (metric, step, the parameters it validated), and the
    weight average (None without --average-from)."""

    def __init__(self, average=None):
        self.step, self.losses, self.stage = 0, [], 0
        self.best_metric, self.best_step, self.best_params = None, 0, None
        self.average = average

    def state(self):
        """The numbers, as one JSON-able dict (its arrays are saved apart)."""
        return {"losses": self.losses, "best_metric": self.best_metric, "best_step": self.best_step,
                "stage": self.stage}


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
    into it and validate (and may choose) its mean. A curriculum's run
    trains on its stage progress.stage and moves on to the next as soon as
    a report solves it (or reaches plan.advance_at); only the last stage's
    reports may be chosen.
    Returns (test loss, test metric, step of the chosen parameters)."""
    start, train_seconds, first = time.time(), 0.0, progress.step
    last_line = start
    stage_began = (start, first)        # when, and after which step, this run began its current length
    average = progress.average
    width = len(str(plan.steps))
    with StopSignals() as stop, numpy.errstate(all="ignore"):     # (train_step checks for NaN and Inf)
        for step in range(first + 1, plan.steps + 1):
            stage = task.stages[progress.stage]
            last_stage = progress.stage == len(task.stages) - 1
            where = "" if len(task.stages) == 1 else f"[T={stage.T}, stage {progress.stage + 1}/{len(task.stages)}]  "
            tick = time.time()
            optimizer.lr = learning_rate(plan, step, progress.stage)
            loss, input_grad = train_step(model, stage, optimizer, plan.seed, step, plan.batch)
            progress.step = step
            progress.losses.append(loss)
            train_seconds += time.time() - tick
            done = step - first
            now = time.time()
            elapsed = now - start
            step_seconds = (now - stage_began[0]) / (step - stage_began[1])     # this length's pace so far
            pace = pace_line(done * plan.batch, train_seconds, elapsed, step_seconds, plan.steps - step)
            if step % plan.eval_every == 0 or step == plan.steps:
                candidate, averaged = model.params, 0
                if average and step >= average.start:
                    average.fold(model.params)
                    candidate, averaged = average.mean, average.count
                val_loss, val_metric = evaluate_params(model, candidate, stage, stage.validation)
                report = dict(step=step, loss=float(numpy.mean(progress.losses)), val_loss=val_loss,
                              val_metric=val_metric, input_grad_norm=input_grad,
                              examples_per_s=done * plan.batch / train_seconds, elapsed_s=elapsed,
                              averaged=averaged)
                if len(task.stages) > 1:
                    report.update(length=stage.T, stage=progress.stage + 1)
                progress.losses = []
                if last_stage and (progress.best_metric is None or task.better(val_metric, progress.best_metric)):
                    progress.best_metric, progress.best_step = val_metric, step
                    progress.best_params = {k: v.copy() for k, v in candidate.items()}
                mean_of = f" (the weights' mean over {averaged} report{'s' * (averaged > 1)})" if averaged else ""
                log(f"step {step:>{width}}/{plan.steps}  {where}loss {report['loss']:.4f}  "
                    f"val loss {val_loss:.4f} (baseline {stage.baseline:.3f})  "
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
                advance = (stage.solved(val_metric) if plan.advance_at is None
                           else stage.reached(val_metric, plan.advance_at))
                if not last_stage and advance:                          # the curriculum's next length
                    progress.stage += 1
                    stage_began = (time.time(), step)
                    why = "solved on validation" if plan.advance_at is None else \
                        f"validation {task.metric_name} {val_metric:.4f} reached {plan.advance_at:g}"
                    now = f"now T={task.stages[progress.stage].T}"
                    if isinstance(plan.lr, list):
                        now += f" at lr {learning_rate(plan, step + 1, progress.stage):g}"
                    log(f"roa: T={stage.T} {why} at step {step}; {now}")
            elif time.time() - last_line > HEARTBEAT_SECONDS:     # slow steps: say where we are
                log(f"step {step:>{width}}/{plan.steps}  {where}loss {loss:.4f}  " + pace)
                last_line = time.time()
            if save and (step == plan.steps or stop.signum
                         or (plan.save_every and step % plan.save_every == 0)):
                save(progress)
            if stop.signum:
                raise Stopped(stop.signum, step)
    chosen = progress.best_params or model.params       # (a checkpoint from before reports were kept: the last)
    return (*evaluate_params(model, chosen, task, task.test), progress.best_step or progress.step)


# -------------------------------------------------------- command line


TASK_CLASSES = {"adding": Adding, "copy": Copy, "psmnist": PsMNIST, "deepmlp": DeepMNIST}


def make_task(args, log):
    task_class = TASK_CLASSES[args.task]
    if not issubclass(task_class, MNIST):
        return Curriculum([task_class(T) for T in args.curriculum]) if args.curriculum else task_class(args.length)
    folder = args.data_dir or DEFAULT_DATA_DIR
    return task_class(folder, fetch=same_file(folder, DEFAULT_DATA_DIR), validation_size=args.validation, log=log)


def make_model(args, task):
    """The model of the flags `args` (a Namespace or a checkpoint's config) for
    `task` (a task, or its class)."""
    common = dict(alpha=args.alpha, beta=args.beta, activation=args.activation, dtype=args.dtype,
                  seed=args.seed, device=args.device, dropout=args.dropout)
    if task.model == "fnn":
        return RoaFNN(task.n_in, task.n_out, width=args.hidden, depth=args.depth, **common)
    return RoaRNN(task.n_in, task.n_out, hidden=args.hidden, readout=task.readout, **common)


def load_model(path, device="cpu"):
    """The model saved in the checkpoint at `path`, built as it was trained
    and holding the parameters that the run's test scored (its best
    validation report's, where the checkpoint has them), ready to predict
    with model.inference(u). Returns (model, its configuration)."""
    checkpoint = load_checkpoint(path)
    config = {"depth": None, "dropout": 0.0, **checkpoint.config, "device": device}
    model = make_model(argparse.Namespace(**config), TASK_CLASSES[config["task"]])
    restore(model, path, checkpoint.best or checkpoint.params, checkpoint.filters)
    return model, checkpoint.config


def describe(args, task, steps):
    curriculum = ""
    if args.curriculum:
        on_at = f", on at {args.advance_at:g}" if args.advance_at is not None else ""
        curriculum = f" (curriculum {','.join(map(str, args.curriculum))}{on_at})"
    shape = (f"roaFNN L={args.depth} N={args.hidden}" if task.model == "fnn"
             else f"T={task.T}{curriculum} | roaRNN N={args.hidden}")
    regularisers = (f" weight decay {args.weight_decay}" if args.weight_decay else "") + \
        (f" clip {args.clip}" if args.clip else "") + \
        (f" dropout {args.dropout}" if args.dropout else "")
    return (f"roa: {task.name} {shape} alpha={args.alpha} beta={args.beta} {args.activation} | "
            f"{args.optimizer} lr={rates_text(args.lr)} ({args.schedule}){regularisers} batch {args.batch} | "
            f"{steps} steps | {args.device} {args.dtype} | seed {args.seed}")


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
            prepare_output(flag, path, log, replace=args.overwrite or same_file(path, args.resume))
    if args.resume and args.data_dir is None:           # the data the run was trained on
        args.data_dir = saved.get("data_dir")
    task = make_task(args, log)
    if saved:
        check_same_data(saved, task, args.resume)
    steps = planned_steps(args, task, saved, checkpoint.step if args.resume else 0)
    args.eval_every = args.eval_every or max(1, steps // 20)
    check_memory(args, task, array_module(args.device))
    threads = use_threads(args.threads, args.hidden)
    if saved and saved.get("threads") not in (None, threads):
        log(f"roa: resuming with {threads} BLAS thread{'s' * (threads > 1)} where the run had {saved['threads']}: "
            "sums may round differently, so the run will not end bit for bit as it would have (--threads)")
    model = make_model(args, task)
    plan = Plan(steps, args.batch, args.seed, args.eval_every, args.lr, args.schedule, args.save_every or 0,
                args.advance_at)
    lr = learning_rate(plan, 1)                         # (train sets each step's rate)
    optimizer = Adam(lr, args.weight_decay, args.clip) if args.optimizer == "adam" else SGD(lr, args.clip)
    average_start = max(1, math.ceil(args.average_from * steps))        # the fraction's first step
    progress = Progress(WeightAverage(average_start) if args.average_from else None)
    if checkpoint:
        restore(model, source, checkpoint.params, checkpoint.filters)
    if args.resume:
        continue_progress(model, optimizer, progress, checkpoint, args.resume)
        if progress.stage >= len(task.stages):
            raise RoaError(f"{args.resume!r}: its curriculum stage {progress.stage + 1} does not exist "
                           f"(the run has {len(task.stages)})")
        log(f"roa: {args.resume} finished its run at step {progress.step}: scoring it on the test set "
            "(a longer run: --steps or --epochs)" if progress.step >= steps
            else f"roa: resuming {args.resume} at step {progress.step}")
    elif args.init:
        log(f"roa: starting from the parameters of {args.init} (its step {checkpoint.step}), a fresh optimiser")
    config = {name: getattr(args, name) for name in TRAINING_FLAGS + PLAN_FLAGS}
    config.update(steps=steps, threads=threads)
    config.update(data_source(args.data_dir or DEFAULT_DATA_DIR, task))
    unsaved = []                                        # the last save's error, where every place failed

    def save(progress):
        try:
            written = save_checkpoint(args.save, model, optimizer, config, progress)
        except RoaError as err:
            if progress.step < steps:
                raise
            unsaved.append(err)                         # a finished run: its test result is computed first
            return
        if written != args.save:                        # from now on the run saves there
            say(f"roa: could not write {args.save}; the checkpoint of step {progress.step} is at {written}, "
                "and the run's later checkpoints will be too")
            args.save = written
    log(describe(args, task, steps) + f" | {threads} BLAS thread{'s' * (threads > 1)}")
    with exclusive(args.save), metrics_log(args.metrics, progress.step if args.resume else None) as record:
        test_loss, test_metric, best_step = train(model, task, optimizer, plan, progress, log,
                                                  args.save and save, record)
    epochs = steps / task.steps_per_epoch(args.batch) if isinstance(task, MNIST) else None
    verdict = "SOLVED" if task.solved(test_metric, epochs) else "not solved"
    if progress.stage < len(task.stages) - 1:
        verdict += f", the curriculum got no further than T={task.stages[progress.stage].T}"
    chosen = "the best on validation" if progress.best_params is not None else \
        "the last step's: no validation report reached the curriculum's last length"
    say(f"roa: {task.name}: test {task.metric_name} {test_metric:.4f}, test loss {test_loss:.4f} "
        f"(baseline {task.baseline:.3f}; parameters of step {best_step}, {chosen}) "
        f"-> {verdict} ({task.criterion(epochs)}); "
        f"wall time {clock(time.time() - wall)}" + (f"; saved {args.save}" if args.save and not unsaved else ""))
    if unsaved:
        raise unsaved[0]
    return test_loss, test_metric


def main(argv=None):
    """The command line: run, and turn a mistake, a damaged file or a stop
    signal into one line on stderr and the exit status."""
    args = parse_args(argv)
    try:
        run(args, log=(lambda line: None) if args.quiet else say)
    except (RoaError, Stopped, StopNow, KeyboardInterrupt) as err:
        line, status = why_it_ended(err, args.save)
        print(f"roa.py: {line}", file=sys.stderr)
        return status
    return 0


if __name__ == "__main__":
    sys.exit(main())
