"""docs/study.py -- what each lever does to a short run, measured on validation before a recipe is frozen.

    python docs/study.py adding                   # the adding problem's plateau: every lever, seeds 0-4, T 200 and 500
    python docs/study.py adding --only base --only clip1 --lengths 200
    python docs/study.py copy --lengths 300       # the copying problem's falls
    python docs/study.py psmnist                  # psMNIST in 2 epochs, seeds 0 and 1
    python docs/study.py psmnist --table          # print the table of the logs at hand, run nothing
    python docs/study.py adding --state-norm --lengths 200 1000     # the state at initialisation

A study is one short base run of a task, and levers: sets of flags added
to it. Each lever runs on each seed (and, for the synthetic tasks, each
length T), two runs at a time at one BLAS thread each. A run's validation
reports go to runs/study/TASK/LEVER-TT-seedSEED.jsonl (psMNIST: LEVER-
seedSEED.jsonl), its checkpoints to the .npz beside it: a finished log is
not run again, a run cut short is resumed from its checkpoint, and a longer
--steps extends the finished ones.

The table gives, per lever and length: the runs finished; for each mark
(adding: *escaped* the plateau of 0.167, the loss of always answering 1,
at a validation MSE below 0.05, and *solved* below 0.01; copying: solved
at a recall of 99 %) the seeds that reached it at length T (a curriculum's
reports at shorter lengths do not count) and the median step they first
did; copying's *falls* (a report whose recall is 20 points or more below
the best report before it starts one, a new best ends it; summed over
the seeds); the median of the seeds' best and last validation metric,
with the range over seeds; and the median wall time (a resumed run's
pieces added up). Validation only: a log's last line, the run's test
result, is never read.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


class Study:
    """base(T, seed, steps) -> the flags of the base run; levers: {name: (what it
    changes, flags(T) -> the flags it adds)}; steps None: the base gives --epochs."""

    def __init__(self, base, levers, seeds, lengths, steps, marks=(), fall=None, lower_is_better=False):
        self.base, self.levers, self.seeds, self.lengths, self.steps = base, levers, seeds, lengths, steps
        self.marks, self.fall, self.lower_is_better = marks, fall, lower_is_better

    def better(self, a, b):
        return a < b if self.lower_is_better else a > b

    def reached(self, metric, threshold):
        return metric < threshold if self.lower_is_better else metric >= threshold


def adding_base(T, seed, steps):
    """The adding problem's plateau study: alpha 1, beta 0.1, tanh, N 64, Adam 2e-3, batch 64."""
    return ["--task", "adding", "--length", str(T), "--alpha", "1", "--beta", "0.1", "--activation", "tanh",
            "--steps", str(steps), "--eval-every", "100", "--save-every", "1000"]


ADDING_LEVERS = {
    "base": ("alpha 1, beta 0.1, Adam lr 2e-3, batch 64", lambda T: []),
    "beta-T": ("beta 10 / T", lambda T: ["--beta", f"{10 / T:.4g}"]),
    "alpha0.9": ("alpha 0.9 (beta 0.1)", lambda T: ["--alpha", "0.9"]),
    "alpha0.7": ("alpha 0.7, beta 0.3", lambda T: ["--alpha", "0.7", "--beta", "0.3"]),
    "clip1": ("gradients clipped to global norm 1", lambda T: ["--clip", "1"]),
    "curriculum": ("curriculum T/4, T/2, T (each until val MSE < 0.01)",
                   lambda T: ["--curriculum", f"{T // 4},{T // 2},{T}"]),
    "curriculum-on": ("curriculum T/4, T/2, T, each until val MSE < 0.05",
                      lambda T: ["--curriculum", f"{T // 4},{T // 2},{T}", "--advance-at", "0.05"]),
    "curriculum-on+beta": ("curriculum-on with beta 0.3 / sqrt(T)",
                           lambda T: ["--curriculum", f"{T // 4},{T // 2},{T}", "--advance-at", "0.05",
                                      "--beta", f"{0.3 / T ** 0.5:.4g}"]),
    "beta-sqrtT": ("beta 0.3 / sqrt(T)", lambda T: ["--beta", f"{0.3 / T ** 0.5:.4g}"]),
    "lr5e-3": ("Adam lr 5e-3", lambda T: ["--lr", "5e-3"]),
    "lr1e-3": ("Adam lr 1e-3", lambda T: ["--lr", "1e-3"]),
    "batch256": ("batch 256", lambda T: ["--batch", "256"]),
    "relu": ("phi = ReLU (beta 0.1)", lambda T: ["--activation", "relu"]),
    "relu-beta-sqrtT": ("phi = ReLU, beta 0.3 / sqrt(T)",
                        lambda T: ["--activation", "relu", "--beta", f"{0.3 / T ** 0.5:.4g}"]),
    **{f"{phi}-beta{c}-T": (f"phi = {phi}, beta {c} / T",
                            lambda T, phi=phi, c=c: ["--activation", phi, "--beta", f"{c / T:.4g}"])
       for phi in ("tanh", "relu") for c in (5, 10, 20, 40)},
}


def copy_base(T, seed, steps):
    """The copying problem's falls: the copy preset (N 128, alpha 1, beta 0.1, tanh, Adam 1e-3, batch 64)."""
    return ["--task", "copy", "--length", str(T), "--steps", str(steps), "--eval-every", "100",
            "--save-every", "500"]


COPY_LEVERS = {
    "base": ("the copy preset: beta 0.1, Adam lr 1e-3 constant, batch 64", lambda T: []),
    "clip1": ("gradients clipped to global norm 1", lambda T: ["--clip", "1"]),
    "lr5e-4": ("Adam lr 5e-4", lambda T: ["--lr", "5e-4"]),
    "cosine": ("Adam lr 1e-3 decayed along half a cosine", lambda T: ["--schedule", "cosine"]),
    "beta0.05": ("beta 0.05", lambda T: ["--beta", "0.05"]),
    "beta0.2": ("beta 0.2", lambda T: ["--beta", "0.2"]),
}


def psmnist_base(T, seed, steps):
    """psMNIST in 2 epochs with the ten-epoch recipe's regularisers: the preset
    (N 256, beta 0.05, ReLU, Adam 2e-3 cosine, batch 32), weight decay 0.1,
    dropout 0.3, the weights averaged over the second half."""
    return ["--task", "psmnist", "--epochs", "2", "--weight-decay", "0.1", "--dropout", "0.3",
            "--average-from", "0.5", "--eval-every", "859", "--save-every", "859"]


PSMNIST_LEVERS = {
    "base": ("N 256, beta 0.05, Adam 2e-3 cosine, batch 32, weight decay 0.1, dropout 0.3, average 0.5",
             lambda T: []),
    "hidden512": ("N 512", lambda T: ["--hidden", "512"]),
    "standardize": ("pixels standardised", lambda T: ["--standardize"]),
    "beta0.1": ("beta 0.1", lambda T: ["--beta", "0.1"]),
    "beta0.025": ("beta 0.025", lambda T: ["--beta", "0.025"]),
    "lr1e-3": ("Adam lr 1e-3", lambda T: ["--lr", "1e-3"]),
    "warmup500": ("lr warmed up over 500 steps", lambda T: ["--warmup", "500"]),
    "batch64": ("batch 64 (half the steps)", lambda T: ["--batch", "64", "--eval-every", "430"]),
    "decay0.3": ("weight decay 0.3 (on W, U, b and the readout)", lambda T: ["--weight-decay", "0.3"]),
    "noise0.1": ("Gaussian noise 0.1 on every input pixel", lambda T: ["--input-noise", "0.1"]),
    "clip1": ("gradients clipped to global norm 1", lambda T: ["--clip", "1"]),
}

STUDIES = {
    "adding": Study(adding_base, ADDING_LEVERS, range(5), [200, 500], 8000,
                    marks=(("escaped", 0.05), ("solved", 0.01)), lower_is_better=True),
    "copy": Study(copy_base, COPY_LEVERS, range(5), [200, 500], 6000, marks=(("solved", 0.99),), fall=0.2),
    "psmnist": Study(psmnist_base, PSMNIST_LEVERS, range(2), [None], None),
}


def log_path(task, lever, T, seed, ext="jsonl"):
    """The run's metrics log (or, with ext="npz", its checkpoint)."""
    length = "" if T is None else f"-T{T}"
    return os.path.join(ROOT, "runs", "study", task, f"{lever}{length}-seed{seed}.{ext}")


def command(task, lever, T, seed, steps):
    """The roa.py command of one run of the study: a new run, or the resume
    of its checkpoint where a run was cut short (the resume mends its log)."""
    checkpoint = log_path(task, lever, T, seed, "npz")
    roa = [sys.executable, os.path.join(ROOT, "roa.py")]
    if os.path.exists(checkpoint):
        return [*roa, "--resume", checkpoint, *(["--steps", str(steps)] if steps else []), "--quiet"]
    study = STUDIES[task]
    return [*roa, *study.base(T, seed, steps), "--seed", str(seed), "--threads", "1", "--quiet",
            "--metrics", log_path(task, lever, T, seed), "--save", checkpoint, *study.levers[lever][1](T)]


def read_log(path):
    """The validation reports of a log ([] if there is none) and whether the
    run ended (its last line is the test result, which is not read)."""
    if not os.path.exists(path):
        return [], False
    with open(path) as f:
        lines = [json.loads(line) for line in f if line.strip()]
    return [line for line in lines if "step" in line], bool(lines) and "step" not in lines[-1]


def finished(path, steps):
    reports, ended = read_log(path)
    return ended and (steps is None or reports[-1]["step"] >= steps)


def run_one(args):
    task, lever, T, seed, steps = args
    path = log_path(task, lever, T, seed)
    if finished(path, steps):
        return
    if os.path.exists(path) and not os.path.exists(log_path(task, lever, T, seed, "npz")):
        os.remove(path)                 # a log cut short with no checkpoint: run it again from the start
    done = subprocess.run(command(task, lever, T, seed, steps), stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True)
    metrics = [r["val_metric"] for r in read_log(path)[0]]
    last = metrics[-1] if metrics else None
    print(f"{task} {lever} T={T} seed {seed}: exit {done.returncode}, last val metric {last} "
          f"{done.stderr.strip()}", flush=True)


def spread(values):
    """'median (min-max)' of a list, to 4 decimals; '-' for none."""
    if not values:
        return "-"
    middle = f"{statistics.median(values):.4f}"
    return middle if len(values) == 1 else f"{middle} ({min(values):.4f}-{max(values):.4f})"


def wall_time(reports):
    """The seconds a run trained, from its reports' elapsed_s, which a resume
    starts again from 0: the sum of each piece's last (the steps between a
    piece's last checkpoint and its stop are not counted)."""
    ends = [a["elapsed_s"] for a, b in zip(reports, reports[1:]) if b["elapsed_s"] < a["elapsed_s"]]
    return sum(ends) + reports[-1]["elapsed_s"]


def clock(seconds):
    minutes, s = divmod(round(seconds), 60)
    return f"{minutes // 60}:{minutes % 60:02d}:{s:02d}"


def table(task, levers, lengths, steps):
    study = STUDIES[task]
    marks = "".join(f" {word} | median step {word} |" for word, _ in study.marks)
    falls = " falls |" if study.fall else ""
    length = " T |" if study.steps else ""              # (psMNIST has one length)
    print(f"| lever |{length} runs |{marks}{falls} best val | last val | median wall time |")
    print("| --- " * (5 + bool(length) + 2 * len(study.marks) + bool(study.fall)) + "|")
    for lever in levers:
        for T in lengths:
            runs, firsts, fallen, bests, lasts, walls = 0, [[] for _ in study.marks], 0, [], [], []
            for seed in study.seeds:
                path = log_path(task, lever, T, seed)
                if not finished(path, steps):
                    continue
                runs += 1
                walls.append(wall_time(read_log(path)[0]))
                reports = [r for r in read_log(path)[0] if r.get("length", T) == T]    # (a curriculum's at T)
                metrics = [r["val_metric"] for r in reports]
                if not metrics:
                    continue                        # a curriculum that never got to T has no metric at T
                best, down = metrics[0], False
                for metric in metrics:              # a fall counts once, until a new best ends it
                    if study.better(metric, best):
                        best, down = metric, False
                    elif study.fall and not down and best - metric >= study.fall:
                        fallen, down = fallen + 1, True
                bests.append(best)
                lasts.append(metrics[-1])
                for (_, threshold), first in zip(study.marks, firsts):
                    reached = [r["step"] for r in reports if study.reached(r["val_metric"], threshold)]
                    if reached:
                        first.append(reached[0])
            if not runs:
                continue
            cells = "".join(f" {len(first)} / {runs} | {f'{statistics.median(first):,.0f}' if first else '-'} |"
                            for first in firsts)
            cells += f" {fallen} |" if study.fall else ""
            never = f" ({runs - len(bests)} never reached T)" if len(bests) < runs else ""
            print(f"| {lever}: {study.levers[lever][0]} |{f' {T} |' if length else ''} {runs} |{cells} "
                  f"{spread(bests)}{never} | {spread(lasts)} | {clock(statistics.median(walls))} |")


def state_norms(lengths):
    """At initialisation (seed 0, N 64, alpha 1), for tanh with beta 0.1 and
    0.3 / sqrt(T) and for ReLU with beta 0.1, 20 / T and 0.3 / sqrt(T): the
    mean ||h_T|| over 256 validation sequences, the rms of the last
    preactivation y_T = W h_{T-1} + U u_T + b, and the fraction of units
    whose phi'(y_T) is below 0.19 (tanh: |tanh| > 0.9, saturated; ReLU:
    y_T < 0, off)."""
    sys.path.insert(0, ROOT)
    import numpy
    import autograd
    import roa
    import tasks
    print("| phi | T | beta | mean norm of h_T | preactivation rms | units with phi' < 0.19 |")
    print("| --- | --- | --- | --- | --- | --- |")
    for T in lengths:
        u = tasks.Adding(T).validation[0][:, :256].astype(numpy.float32)
        for phi, betas in (("tanh", (0.1, 0.3 / T ** 0.5)), ("relu", (0.1, 20 / T, 0.3 / T ** 0.5))):
            for beta in dict.fromkeys(betas):         # (at T = 200, 20 / T is 0.1)
                model = roa.RoaRNN(2, 1, 64, 1.0, beta, activation=phi, seed=0)
                p = model.params
                hs = autograd.rnn_inference(u, numpy.zeros((256, 64), numpy.float32), p["W"], model.O, p["U"],
                                            p["b"], 1.0, beta, model.act, all_states=True)
                y = hs[-2] @ p["W"].T + u[-1] @ p["U"].T + p["b"]
                flat = model.act.phi_prime(model.act.phi(y)) < 0.19
                print(f"| {phi} | {T} | {beta:.4f} | {numpy.linalg.norm(hs[-1], axis=1).mean():.2f} | "
                      f"{numpy.sqrt((y * y).mean()):.2f} | {flat.mean():.2f} |")


def positive(text):
    """An argparse type: an integer >= 1."""
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not allowed: it must be an integer >= 1")
    return int(text)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.error = lambda message: p.exit(2, f"{p.prog}: error: {message} (see --help)\n")   # one line
    p.add_argument("task", choices=sorted(STUDIES), help="the study: its base run, levers and seeds")
    p.add_argument("--only", action="append", help="run these levers only (one flag each)")
    p.add_argument("--lengths", type=positive, nargs="+", help="the lengths T (adding and copy; "
                   "default 200 500)")
    p.add_argument("--jobs", type=positive, default=2, help="runs at a time (default 2)")
    p.add_argument("--steps", type=positive, help="steps of each run (default: adding 8000, copy 6000; "
                   "psMNIST runs 2 epochs)")
    p.add_argument("--table", action="store_true", help="print the table of the logs at hand, run nothing")
    p.add_argument("--state-norm", action="store_true", help="adding: print the state's norm and "
                   "saturation at initialisation at each length, run nothing")
    args = p.parse_args(argv)
    study = STUDIES[args.task]
    unknown = [lever for lever in args.only or [] if lever not in study.levers]
    if unknown:
        p.error(f"--only {unknown[0]!r} is not a lever of the {args.task} study: one of {', '.join(study.levers)}")
    if study.steps is None and (args.lengths or args.steps):
        p.error(f"the {args.task} study has no --lengths or --steps: each of its runs is 2 epochs")
    if args.state_norm and args.task != "adding":
        p.error("--state-norm is the adding study's")
    lengths, steps = args.lengths or study.lengths, args.steps or study.steps
    if args.state_norm:
        return state_norms(lengths)
    levers = args.only or list(study.levers)
    if not args.table:
        os.makedirs(os.path.join(ROOT, "runs", "study", args.task), exist_ok=True)
        jobs = [(args.task, lever, T, seed, steps) for T in lengths for lever in levers for seed in study.seeds]
        with ThreadPoolExecutor(args.jobs) as pool:
            list(pool.map(run_one, jobs))
    table(args.task, levers, lengths, steps)


if __name__ == "__main__":
    main()
