"""docs/plateau_study.py -- what gets a roaRNN off the adding problem's plateau?

    python docs/plateau_study.py                     # run every lever (resumable), then print the table
    python docs/plateau_study.py --only base --only clip1 --lengths 200
    python docs/plateau_study.py --table             # print the table of the logs at hand, run nothing
    python docs/plateau_study.py --state-norm --lengths 200 1000     # the state at initialisation

Each lever is a set of flags added to one short roaRNN run of the adding
problem (alpha 1, beta 0.1, tanh, N 64, Adam 2e-3, batch 64), run at each length on
seeds 0-4, two runs at a time at one BLAS thread each. A run's validation
MSE reports go to runs/study/LEVER-TLENGTH-seedSEED.jsonl, its checkpoints
to the .npz beside it (a finished log is not run again; a run cut short is
resumed from its checkpoint, and a longer STEPS extends the finished ones).
A seed has *escaped* the plateau (0.167, the loss of always answering 1)
at the first report whose validation MSE is below ESCAPE at length T (a
curriculum's reports at shorter lengths do not count), and *solved* it at
the first below SOLVED; the table gives, per lever and length, the seeds
escaped and solved, the median step of each of those seeds, and the
median of every seed's best validation MSE at T.
Validation only: no test score is looked at here.
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
ESCAPE = 0.05           # a validation MSE below this has left the plateau (0.167) for good
SOLVED = 0.01           # a validation MSE below this solves the task (tasks.Adding.goal)
SEEDS = range(5)
STEPS, EVERY, SAVE_EVERY = 8000, 100, 1000

LEVERS = {      # name: (what it changes, the flags added to the base run at length T)
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


def log_path(lever, T, seed, ext="jsonl"):
    """The run's metrics log (or, with ext="npz", its checkpoint)."""
    return os.path.join(ROOT, "runs", "study", f"{lever}-T{T}-seed{seed}.{ext}")


def command(lever, T, seed):
    """The roa.py command of one run of the study: a new run, or the resume
    of its checkpoint where a run was cut short (the resume mends its log)."""
    checkpoint = log_path(lever, T, seed, "npz")
    if os.path.exists(checkpoint):
        return [sys.executable, os.path.join(ROOT, "roa.py"), "--resume", checkpoint, "--steps", str(STEPS), "--quiet"]
    return [sys.executable, os.path.join(ROOT, "roa.py"), "--task", "adding", "--length", str(T),
            "--alpha", "1", "--beta", "0.1", "--activation", "tanh", "--steps", str(STEPS),
            "--eval-every", str(EVERY), "--seed", str(seed),
            "--threads", "1", "--quiet", "--metrics", log_path(lever, T, seed), "--save", checkpoint,
            "--save-every", str(SAVE_EVERY), *LEVERS[lever][1](T)]


def reports(path):
    """The validation reports of a log, [] if there is none (the log's last
    line, the test result, is not read: the study looks at validation only)."""
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [report for report in map(json.loads, filter(str.strip, f)) if "step" in report]


def finished(path):
    r = reports(path)
    return bool(r) and r[-1]["step"] == STEPS


def run_one(args):
    lever, T, seed = args
    path = log_path(lever, T, seed)
    if finished(path):
        return
    if os.path.exists(path) and not os.path.exists(log_path(lever, T, seed, "npz")):
        os.remove(path)                 # a log cut short with no checkpoint: run it again from the start
    done = subprocess.run(command(lever, T, seed), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    best = min((r["val_metric"] for r in reports(path)), default=None)      # (the test line is not looked at)
    print(f"{lever} T={T} seed {seed}: exit {done.returncode}, best val MSE {best} {done.stderr.strip()}", flush=True)


def table(levers, lengths):
    print("| lever | T | escaped | median escape step | solved | median solve step | median best val MSE |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for lever in levers:
        for T in lengths:
            escapes, solves, bests, runs = [], [], [], 0
            for seed in SEEDS:
                r = reports(log_path(lever, T, seed))
                if not r or r[-1]["step"] != STEPS:
                    continue
                runs += 1
                r = [x for x in r if x.get("length", T) == T]     # (a curriculum's reports at length T)
                bests.append(min((x["val_metric"] for x in r), default=float("nan")))
                below = [x["step"] for x in r if x["val_metric"] < ESCAPE]
                if below:
                    escapes.append(below[0])
                solved = [x["step"] for x in r if x["val_metric"] < SOLVED]
                if solved:
                    solves.append(solved[0])
            if runs:
                median = f"{statistics.median(escapes):,.0f}" if escapes else "-"
                solve_median = f"{statistics.median(solves):,.0f}" if solves else "-"
                reached = [b for b in bests if b == b]      # (a curriculum that never got to T has no MSE at T)
                best = f"{statistics.median(reached):.4f}" if reached else "-"
                if len(reached) < runs:
                    best += f" ({runs - len(reached)} never reached T)"
                print(f"| {lever}: {LEVERS[lever][0]} | {T} | {len(escapes)} / {runs} | {median} | "
                      f"{len(solves)} / {runs} | {solve_median} | {best} |")


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
    global STEPS
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.error = lambda message: p.exit(2, f"{p.prog}: error: {message} (see --help)\n")   # one line
    p.add_argument("--only", action="append", choices=sorted(LEVERS), help="run these levers only")
    p.add_argument("--lengths", type=positive, nargs="+", default=[200, 500])
    p.add_argument("--jobs", type=positive, default=2, help="runs at a time (default 2)")
    p.add_argument("--steps", type=positive, default=STEPS, help=f"steps of each run (default {STEPS})")
    p.add_argument("--table", action="store_true", help="print the table of the logs at hand, run nothing")
    p.add_argument("--state-norm", action="store_true", help="print the state's norm and saturation at "
                   "initialisation at each length, run nothing")
    args = p.parse_args(argv)
    STEPS = args.steps
    if args.state_norm:
        return state_norms(args.lengths)
    levers = args.only or list(LEVERS)
    os.makedirs(os.path.join(ROOT, "runs", "study"), exist_ok=True)
    if not args.table:
        jobs = [(lever, T, seed) for T in args.lengths for lever in levers for seed in SEEDS]
        with ThreadPoolExecutor(args.jobs) as pool:
            list(pool.map(run_one, jobs))
    table(levers, args.lengths)


if __name__ == "__main__":
    main()
