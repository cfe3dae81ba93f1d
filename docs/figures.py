"""docs/figures.py -- the pictures of docs/RESULTS.md, computed by the engine itself.

    python -m pip install -r requirements-plots.txt
    python docs/figures.py                               # figures 1-3, quick: seconds, under 1 GB
    python docs/figures.py --full                        # at the paper's scale: about 11 minutes, 10 GB
    python docs/figures.py --trained runs/deep.npz       # figure 3 also after training (a deepmlp checkpoint)
    python docs/figures.py --curves runs/adding-roa.jsonl runs/adding-vanilla.jsonl ...   # figure 4
    python docs/figures.py --out docs/figures ...        # over the figures that docs/RESULTS.md shows
    python docs/figures.py --curves ... --curves-name copy_curves.png   # figure 4 under another name

Writes PNG files into --out (default runs/figures/, which git ignores):
1. gradient_vs_depth.png: the norm of dL/dx_l, the gradient that backprop
   carries from the loss down to each layer l, in a deep roaFNN and in the
   plain MLP of the same depth, at initialisation (depth 5,000; --full:
   50,000);
2. gradient_vs_lag.png: the largest and smallest singular value of
   d h_T / d h_{T-k} against the lag k, roaRNN against vanilla RNN, with
   the bounds of MATH.md section 4 (lags to 2,000; --full: 10,000);
3. jacobian_singular_values.png: every singular value of the input-output
   Jacobian of a roaFNN of depth 100 with beta = 0.5 / L, where the
   section 4 bounds are informative (beta gamma ||W|| L about 1), between
   those bounds, at initialisation (and, with --trained, after training);
4. learning_curves.png: one panel per task, the validation metric of each
   --metrics log against the step, with the task's baseline and goal, the
   test result that the run wrote at the end of its log, and a
   curriculum's moves to a longer length; a log's panel is the first word
   of its file name before "-" (adding-roa.jsonl and adding-vanilla.jsonl
   share the panel "adding"; PANELS names the tasks).
"""

import argparse
import json
import os
import re
import sys

import numpy

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import autograd as ag  # noqa: E402
import machinery  # noqa: E402
import roa  # noqa: E402

TINY = 1e-300           # where a norm that underflowed to 0 is drawn on a log axis
FLOOR = 1e-30           # the bottom of figure 2: the vanilla RNN's values fall far below it


def pyplot():
    try:
        import matplotlib
    except ImportError:
        sys.exit("figures.py needs matplotlib, an optional extra: pip install -r requirements-plots.txt")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def layer_gradient_norms(depth, alpha, beta, seed=0):
    """||dL/dx_l|| for every layer l = 0 .. L of a fresh roaFNN (width 64,
    batch 64, Gaussian inputs, tanh, float64): delta_l, the gradient that
    backprop carries down from the loss (l = L) to the input (l = 0),
    roa_step_backward by roa_step_backward through the engine's own cache."""
    model = roa.RoaFNN(784, 10, 64, depth, alpha, beta, dtype="float64", seed=seed)
    rng = numpy.random.default_rng(seed)
    z, (_, (_, steps), out_cache) = model.forward(rng.standard_normal((64, 784)))
    _, dz = ag.softmax_cross_entropy(z, rng.integers(0, 10, 64))
    delta, _, _ = model.readout_backward(dz, out_cache)                   # dL/dx_L
    norms = [numpy.linalg.norm(delta)]
    for step in reversed(steps):
        delta, _ = ag.roa_step_backward(delta, step)                      # delta_l = J_l^T delta_{l+1}
        norms.append(numpy.linalg.norm(delta))
    return numpy.array(norms[::-1])                                       # l = 0 .. L


def figure_depth(plt, depth, out):
    layers = numpy.arange(depth + 1)
    fig, ax = plt.subplots(figsize=(7, 4))
    notes = []
    for label, alpha, beta in ((f"roaFNN, alpha 1, beta {5 / depth:g}", 1.0, 5 / depth),
                               ("plain MLP, alpha 0, beta 1", 0.0, 1.0)):
        norms = layer_gradient_norms(depth, alpha, beta)
        zero = norms == 0
        ax.semilogy(layers[~zero], norms[~zero], label=label)
        if zero.any():          # a log axis cannot show 0: say it
            notes.append(f"{label}: ||dL/dx_l|| is exactly 0 (underflow) in {zero.sum():,} of {depth + 1:,} layers")
    if notes:
        ax.text(0.02, 0.04, "\n".join(notes), transform=ax.transAxes, fontsize=8)
    ax.set_xticks([0, depth // 4, depth // 2, 3 * depth // 4, depth],
                  ["0\ninput", f"{depth // 4:,}", f"{depth // 2:,}", f"{3 * depth // 4:,}", f"{depth:,}\nloss"])
    ax.set(xlabel="layer l  (backprop runs from the loss, right, to the input, left)",
           ylabel="||dL/dx_l|| at initialisation",
           title=f"The gradient on its way from the loss to the input, depth {depth:,}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=120)


def figure_lag(plt, T, out):
    N, act = 64, ag.ACTIVATIONS["tanh"]
    rng = numpy.random.default_rng(0)
    u = rng.uniform(size=(T, 2))
    lags = numpy.unique(numpy.geomspace(1, T, 25).astype(int))
    fig, ax = plt.subplots(figsize=(7, 4))
    bands, vanished = [], []
    for label, alpha, beta in (("roaRNN, alpha 1, beta 0.1", 1.0, 0.1), ("vanilla RNN, alpha 0, beta 1", 0.0, 1.0)):
        model = roa.RoaRNN(2, 1, N, alpha, beta, seed=0)
        p = model.params
        hs, _ = ag.rnn_forward(u[:, None, :], numpy.zeros((1, N)), p["W"], model.O, p["U"], p["b"], alpha, beta, act)
        states = numpy.concatenate([numpy.zeros((1, N)), hs[:, 0]])          # h_0 .. h_T
        s = numpy.array([numpy.linalg.svd(ag.rnn_jacobian(u[T - k:], states[T - k], p["W"], model.O, p["U"],
                                                          p["b"], alpha, beta, act), compute_uv=False)[[0, -1]]
                         for k in lags])
        line, = ax.loglog(lags, numpy.maximum(s[:, 0], TINY), label=f"{label}: largest")
        ax.loglog(lags, numpy.maximum(s[:, 1], TINY), "--", color=line.get_color(), label=f"{label}: smallest")
        if alpha > 0:
            w = numpy.linalg.norm(p["W"], 2)
            roa_range = s.min() / 10, s.max() * 10
            with numpy.errstate(over="ignore"):
                bands.append((line.get_color(), (alpha - beta * w) ** lags.astype(float),
                              (alpha + beta * w) ** lags.astype(float)))
        else:
            vanished = lags[s[:, 0] < FLOOR]
    for color, lower, upper in bands:        # the bounds, clipped to the roaRNN's singular values' range
        ax.fill_between(lags, numpy.clip(lower, *roa_range), numpy.clip(upper, *roa_range), color=color,
                        alpha=0.1, label="section 4 bounds (roaRNN), clipped to its values")
    if len(vanished):
        ax.text(0.98, 0.04, f"the vanilla RNN's largest singular value is below {FLOOR:.0e} from lag "
                f"{vanished[0]:,} on", transform=ax.transAxes, ha="right", fontsize=8)
    ax.set(xlabel="lag k = T - t", ylabel="singular values of d h_T / d h_t",
           title=f"Gradient through time at initialisation (N {N}, T {T:,})", ylim=(FLOOR, roa_range[1]))
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=120)


def jacobian_and_bounds(model):
    """Singular values of the engine's d x_L / d x_0 at a Gaussian x_0, and the
    data-independent bounds prod(alpha -/+ beta gamma ||W_l||)."""
    p = {k: ag.to_numpy(v).astype(numpy.float64) for k, v in model.params.items()}
    O = ag.to_numpy(model.O).astype(numpy.float64)
    x0 = numpy.random.default_rng(1).standard_normal(O.shape[-1])
    s = numpy.linalg.svd(ag.roa_jacobian(x0, p["W"], O, p["b"], model.alpha, model.beta, model.act),
                         compute_uv=False)
    norms = model.act.gamma * numpy.linalg.norm(p["W"], 2, axis=(1, 2))
    lower = numpy.prod(model.alpha - model.beta * norms) if numpy.all(model.alpha > model.beta * norms) else 0
    return s, lower, numpy.prod(model.alpha + model.beta * norms)


def figure_singular_values(plt, depth, trained, out):
    """With a trained checkpoint, its model beside the same model at initialisation."""
    shape = dict(width=64, depth=depth, alpha=1.0, beta=0.5 / depth, activation="tanh", dtype="float64", seed=0)
    models = [("at initialisation", roa.RoaFNN(784, 10, **shape))]
    if trained:
        model, config = machinery.load_model(trained)
        if config["task"] != "deepmlp":
            sys.exit(f"figures.py: --trained {trained!r} is a {config['task']} checkpoint; "
                     "figure 3 needs a deepmlp one")
        models = [("at initialisation", roa.RoaFNN(784, 10, config["hidden"], config["depth"], config["alpha"],
                                                   config["beta"], config["activation"], seed=config["seed"])),
                  ("after training", model)]
    fig, ax = plt.subplots(figsize=(7, 4))
    for label, model in models:
        s, lower, upper = jacobian_and_bounds(model)
        dots = ax.plot(numpy.arange(1, len(s) + 1), s, "o", ms=3,
                       label=f"{label} (L {model.O.shape[0]:,}, beta {model.beta:g})")[0]
        ax.axhline(upper, color=dots.get_color(), ls="--", lw=1, label=f"bounds {lower:.3g} .. {upper:.3g}")
        if lower > 0:           # with a factor alpha - beta gamma ||W_l|| <= 0 there is no lower bound
            ax.axhline(lower, color=dots.get_color(), ls="--", lw=1)
    ax.set(xlabel="index i", ylabel="singular value s_i of d x_L / d x_0",
           title="Every singular value lies between the section 4 bounds")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=120)


def read_stages(curve):
    """The rows of a --metrics log, or of logs joined by "+" (the stages of a
    curriculum, each started with --init from the last), one after another."""
    rows = []
    for path in curve.split("+"):
        try:
            with open(path) as f:
                stage = [json.loads(line) for line in f if line.strip()]
        except OSError as err:
            sys.exit(f"figures.py: cannot read the log {path!r}: {err.strerror}")
        except ValueError as err:
            sys.exit(f"figures.py: {path!r} is not a --metrics log (one JSON report per line): {err}")
        if not stage:
            sys.exit(f"figures.py: the log {path!r} is empty: its run made no validation report yet")
        for number, row in enumerate(stage, 1):
            if not (isinstance(row, dict) and ({"step", "val_metric"} <= row.keys()
                                               or {"test_metric", "chosen_step"} <= row.keys())):
                sys.exit(f"figures.py: line {number} of {path!r} is not a report of a --metrics log "
                         f"(a JSON object with step and val_metric, or the test result): {str(row)[:80]}")
        offset = max((r["step"] for r in rows if "step" in r), default=0)
        rows += [dict(r, step=r["step"] + offset) if "step" in r else dict(r, chosen_step=r["chosen_step"] + offset)
                 for r in stage]
    return rows


# What a panel of figure 4 shows, by the first word of its logs' file names:
# title, metric, log axis?, (baseline, in words), (goal, in words)
PANELS = {
    "adding": ("Adding problem", "validation MSE", True, (0.167, "always answering 1"), (0.01, "solved: MSE 0.01")),
    "copy": ("Copying memory", "validation recall accuracy", False, (0.125, "chance, 1 in 8"),
             (0.99, "solved: 99 %")),
    "ps1": ("psMNIST, one epoch", "validation accuracy", False, (0.1, "chance"), (0.94, "the paper: 94 %")),
    "ps10": ("psMNIST, ten epochs", "validation accuracy", False, (0.1, "chance"), (0.98, "the paper: 98 %")),
    "deep": ("50,000-layer roaFNN on MNIST", "validation accuracy", False, (0.1, "chance"), (0.90, "90 %")),
}


def panel_of(curve):
    """The PANELS key of a log: the first word of its file name, up to "-"."""
    word = os.path.basename(curve).split("-")[0].split(".")[0]
    return next((key for key in sorted(PANELS, key=len, reverse=True) if word.startswith(key)), word)


def figure_curves(plt, curves, out):
    """One panel per task, each log's validation metric against the step,
    with the task's baseline and goal; a log's test result (its last line,
    where the run wrote one) is marked at the step whose parameters it
    scored, and a curriculum's moves to a longer length are marked."""
    from matplotlib.ticker import FuncFormatter, MaxNLocator
    panels = {}
    for curve in curves:
        panels.setdefault(panel_of(curve), []).append(curve)
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.2), squeeze=False)
    for ax, (key, logs) in zip(axes[0], panels.items()):
        title, metric, log_axis, baseline, goal = PANELS.get(key, (key, "validation metric", False, None, None))
        for curve in logs:
            rows = read_stages(curve)
            reports = [r for r in rows if "val_metric" in r]
            label = os.path.splitext(os.path.basename(curve))[0].split("-", 1)[-1]
            label = re.sub(r"(^|-)s(\d+)$", lambda m: f"{' ' if m.group(1) else ''}seed {m.group(2)}", label)
            line, = ax.plot([r["step"] for r in reports], [r["val_metric"] for r in reports], label=label)
            for test in (r for r in rows if "test_metric" in r):
                ax.plot(test["chosen_step"], test["test_metric"], "X", ms=9, color=line.get_color(),
                        markeredgecolor="black", label=f"{label}: test {test['test_metric']:.4g}")
            for before, after in zip(reports, reports[1:]):
                if after.get("length", 0) > before.get("length", 0) > 0:
                    ax.axvline(after["step"], color=line.get_color(), ls=":", lw=1)
                    ax.annotate(f"T={after['length']:,}", (after["step"], 1), xycoords=("data", "axes fraction"),
                                rotation=90, va="top", ha="right", fontsize=7, color=line.get_color())
        for (value, words), style in ((baseline, "--"), (goal, "-.")) if baseline else ():
            ax.axhline(value, color="gray", ls=style, lw=1, label=words)
        ax.set(xlabel="training step", ylabel=metric, title=title, yscale="log" if log_axis else "linear")
        ax.xaxis.set_major_locator(MaxNLocator(5, integer=True))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x:,.0f}"))
        ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(out, dpi=120)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--full", action="store_true", help="figures 1 and 2 at the paper's scale: depth 50,000, "
                   "lags to 10,000 (about 11 minutes and 10 GB; default: depth 5,000, lags to 2,000, about "
                   "15 seconds and 1 GB)")
    p.add_argument("--trained", help="a deepmlp checkpoint for figure 3")
    p.add_argument("--curves", nargs="*", default=[], help="--metrics logs for figure 4; logs joined by + "
                   "are the stages of one curriculum, drawn end to end")
    p.add_argument("--curves-name", default="learning_curves.png",
                   help="file name of figure 4 in --out (default learning_curves.png)")
    p.add_argument("--out", default=os.path.join(os.path.dirname(HERE), "runs", "figures"),
                   help="folder to write the figures into (default runs/figures; docs/figures holds those "
                   "that docs/RESULTS.md shows)")
    args = p.parse_args()
    for curve in args.curves:                              # check every log before the minutes of figures 1-3
        read_stages(curve)
    plt = pyplot()
    os.makedirs(args.out, exist_ok=True)
    figure_depth(plt, 50000 if args.full else 5000, os.path.join(args.out, "gradient_vs_depth.png"))
    figure_lag(plt, 10000 if args.full else 2000, os.path.join(args.out, "gradient_vs_lag.png"))
    figure_singular_values(plt, 100, args.trained,
                           os.path.join(args.out, "jacobian_singular_values.png"))
    if args.curves:
        figure_curves(plt, args.curves, os.path.join(args.out, args.curves_name))
    print(f"figures written to {args.out}")


if __name__ == "__main__":
    main()
