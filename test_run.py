"""test_run.py -- the run's machinery, proven with pytest: the command line,
its flags and their errors, checkpoints, resumes, stop signals, output
files, machine resources and the documents' commands.

Run: python -m pytest -q test_roa.py test_run.py   (CI=true selects the reproducible CI profile).
The math's properties are tested in test_roa.py.
"""

import contextlib
import copy
import io
import json
import math
import os
import re
import resource
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import tracemalloc
import types
import zipfile

import numpy
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import autograd as ag
import machinery
import roa
import tasks
from test_roa import GPU_SKIP, idx_bytes, seeds, write_fake_mnist     # (and test_roa's Hypothesis profiles)


# ------------------------------------------------------------- training

def test_short_adding_run_beats_the_baseline():
    """A few seconds of training on the adding problem (T = 30) drives the test
    MSE far below the 0.167 of predicting 1."""
    args = machinery.parse_args(["--task", "adding", "--length", "30", "--steps", "1500", "--hidden", "32",
                                 "--lr", "3e-3", "--alpha", "0.9", "--beta", "0.1", "--activation", "tanh"])
    test_mse, _ = machinery.run(args, log=lambda line: None)
    assert test_mse < 0.05


@pytest.mark.parametrize("flags, named", [
    (["--task", "sorting"], "sorting"), (["--task", "adding", "--alpha", "-0.5"], "-0.5"),
    (["--task", "adding", "--beta", "0"], "0"), (["--task", "adding", "--hidden", "0"], "0"),
    (["--task", "adding", "--lr", "abc"], "abc"), (["--task", "adding", "--length", "1"], "1"),
    (["--task", "adding", "--batch", "-3"], "-3"), (["--task", "copy", "--steps", "2.5"], "2.5"),
    (["--task", "adding", "--threads", "100000"], "100000"),
    (["--task", "adding", "--threads", "99999999999999999999"], "99999999999999999999"),
    (["--task", "adding", "--clip", "-1"], "-1"),
    (["--task", "adding", "--save", "x", "--metrics", "./x"], "'x'"),
])
def test_bad_flags_exit_with_a_message_naming_the_value(flags, named, capsys):
    with pytest.raises(SystemExit) as info:
        sys.exit(machinery.main(flags))
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "error" in err and named in err and "Traceback" not in err


# ===================================================== reliability: mistakes, damage, signals

def run_cli(argv, capsys):
    """machinery.main(argv): (exit code, stderr, stdout)."""
    try:
        code = machinery.main(argv)
    except SystemExit as stop:          # argparse's own errors
        code = stop.code
    captured = capsys.readouterr()
    return code, captured.err, captured.out


TINY = ["--task", "adding", "--length", "6", "--hidden", "4", "--batch", "3", "--steps", "10"]


def bad_inputs(tmp_path):
    """(flags, what the message must name) for every kind of user mistake."""
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    write_fake_mnist(corrupt, 3, 2)
    image_file = corrupt / "t10k-images-idx3-ubyte"
    image_file.write_bytes(image_file.read_bytes()[:-100])
    empty = tmp_path / "empty"
    empty.mkdir()
    not_npz = tmp_path / "notes.txt"
    not_npz.write_text("hello")
    wrong_shape = tmp_path / "wrong-shape.npz"
    machinery.main(TINY + ["--save", str(tmp_path / "good.npz"), "--quiet"])
    mnist = tmp_path / "mnist"
    mnist.mkdir()
    write_fake_mnist(mnist, 30, 5)
    with numpy.load(tmp_path / "good.npz") as npz:
        arrays = dict(npz)
    legacy = tmp_path / "legacy.npz"                  # saved before --average-from existed
    config = json.loads(str(arrays["config"]))
    del config["average_from"]
    numpy.savez(legacy, **{**arrays, "config": numpy.array(json.dumps(config))})
    arrays["param.W"] = numpy.zeros((5, 5))
    numpy.savez(wrong_shape, **arrays)
    table = [
        (["--task", "sorting"], "'sorting'"), (TINY + ["--alpha", "-0.5"], "-0.5"),
        (TINY + ["--beta", "0"], "--beta"), (TINY + ["--beta", "-2"], "-2"),
        (TINY + ["--hidden", "0"], "--hidden"), (TINY + ["--length", "1"], "1"),
        (TINY + ["--length", "-4"], "-4"), (TINY + ["--batch", "0"], "--batch"),
        (TINY + ["--lr", "0"], "--lr"), (TINY + ["--lr", "abc"], "'abc'"),
        (TINY + ["--steps", "2.5"], "'2.5'"), (TINY + ["--alpha", "nan"], "nan"),
        (TINY + ["--epochs", "2"], "--epochs"), (["--task", "adding", "--epochs", "2"], "--epochs"),
        (TINY + ["--length", "10000000", "--hidden", "5000"], "GB"),
        (["--task", "psmnist", "--data-dir", str(empty)], str(empty)),
        (["--task", "psmnist", "--data-dir", str(corrupt)], "truncated"),
        (TINY + ["--resume", str(tmp_path / "missing.npz")], "missing.npz"),
        (TINY + ["--resume", str(not_npz)], "notes.txt"),
        (TINY + ["--resume", str(tmp_path / "good.npz"), "--hidden", "5"], "--hidden 5"),
        (TINY + ["--resume", str(wrong_shape), "--steps", "20"], "parameter W"),
        (TINY + ["--resume", str(tmp_path / "good.npz"), "--schedule", "cosine"], "--schedule cosine"),
        (TINY + ["--init", str(tmp_path / "good.npz"), "--alpha", "0.5"], "--alpha 0.5"),
        (TINY + ["--init", str(wrong_shape)], "parameter W"),
        (TINY + ["--init", str(tmp_path / "good.npz"), "--resume", str(tmp_path / "good.npz")], "--init"),
        (TINY + ["--optimizer", "sgd", "--weight-decay", "0.1"], "--weight-decay 0.1"),
        (TINY + ["--alpha", "11"], "--alpha: '11' is not allowed: it must be a number in 0 .. 10"),
        (TINY + ["--dropout", "1"], "dropout"), (TINY + ["--dropout", "-0.1"], "-0.1"),
        (TINY + ["--resume", str(tmp_path / "good.npz"), "--dropout", "0.5"], "--dropout 0.5"),
        (TINY + ["--average-from", "1"], "--average-from: '1'"), (TINY + ["--average-from", "-1"], "--average-from"),
        (TINY + ["--average-from", "11"], "a fraction of the run"),
        (TINY + ["--resume", str(tmp_path / "good.npz"), "--average-from", "0.5"], "--average-from 0.5"),
        (TINY + ["--resume", str(legacy), "--steps", "20", "--average-from", "0.25"], "no weight average"),
        (TINY + ["--resume", str(tmp_path / "good.npz"), "--weight-decay", "0.1"], "--weight-decay 0.1"),
        (["--task", "psmnist", "--data-dir", str(mnist), "--validation", "8", "--batch", "64",
          "--steps", "2"], "--batch"),
    ]
    with numpy.load(tmp_path / "good.npz") as npz:
        good = dict(npz)
    table += damaged_data(tmp_path) + damaged_checkpoints(tmp_path, good) + [
        (["--task", "adding", "--length", "2000000", "--batch", "1"], "GB of held-out data"),
        (TINY + ["--depth", "5"], "--depth is not used by the adding task"),
        (TINY + ["--validation", "100"], "--validation is not used by the adding task"),
        (TINY + ["--data-dir", str(mnist)], "--data-dir is not used by the adding task"),
        (["--task", "psmnist", "--length", "5"], "--length is not used by the psmnist task"),
        (TINY + ["--save-every", "5"], "--save-every 5 saves nothing without --save"),
        (TINY + ["--threads", "0"], "--threads"), (TINY + ["--threads", "two"], "'two'"),
    ]
    if GPU_SKIP is not None:
        table.append((TINY + ["--device", "gpu"], "gpu"))
    return table


def damaged_data(tmp_path):
    """MNIST folders whose labels or splits are wrong: (flags, what the message names)."""
    cases = []
    for name, labels, code, bad in [("label200", [3, 200], 0x08, 200), ("label77", [77, 1], 0x08, 77),
                                    ("minus1", [-1, 2], 0x09, -1), ("float", [3.5, 1.0], 0x0D, 3.5)]:
        folder = tmp_path / name
        folder.mkdir()
        write_fake_mnist(folder, 30, 5)
        raw = idx_bytes(numpy.array(labels + [1] * 28), code)
        (folder / "train-labels-idx1-ubyte").write_bytes(raw)
        cases.append((["--task", "psmnist", "--data-dir", str(folder), "--validation", "8"],
                      f"train-labels-idx1-ubyte: labels must be integers 0-9, got {bad!r}"))
    empty_test = tmp_path / "no-test"
    empty_test.mkdir()
    write_fake_mnist(empty_test, 30, 0)
    cases.append((["--task", "psmnist", "--data-dir", str(empty_test)], "no images in the t10k split"))
    return cases


def damaged_checkpoints(tmp_path, arrays):
    """Checkpoints damaged in their contents, from a good one's arrays: (flags, what the message names)."""
    config = json.loads(str(arrays["config"]))
    cases = []

    def case(name, named, flag="--resume", **changes):
        path = tmp_path / f"{name}.npz"
        numpy.savez(path, **{**arrays, **changes})
        cases.append((TINY[:2] + [flag, str(path)], named))

    case("negative-step", "step must be one integer >= 0, got -3", step=numpy.array(-3))
    case("vector-step", "step must be one integer >= 0", step=numpy.array([1, 2]))
    case("config-list", "not a JSON object", config=numpy.array(json.dumps([1, 2])))
    bad_values = [("hidden", "abc", "hidden must be an integer >= 1, got 'abc'"),
                  ("batch", 0, "batch must be an integer >= 1, got 0"),
                  ("lr", -1, "lr must be a finite number > 0, or one per curriculum stage"),
                  ("lr", [0.1, 0.2], "its lr 0.1,0.2 is 2 rates for a run of 1 stage"),
                  ("alpha", None, "its configuration has no alpha")]
    for n, (key, value, named) in enumerate(bad_values):
        case(f"config-{n}-{key}", named, config=numpy.array(json.dumps({**config, key: value})))
    case("string-param", "param.W holds <U3 values", **{"param.W": numpy.full(arrays["param.W"].shape, "abc")})
    case("complex-param", "param.W holds complex64", **{"param.W": arrays["param.W"] + 1j})
    case("nan-param", "NaN or Inf in param.W", **{"param.W": arrays["param.W"] * numpy.nan})
    case("moment-shape", "Adam moment m of W", **{"optim.m.W": numpy.zeros((2, 2))})
    case("no-t", "Adam's step count", **{"optim.t": numpy.array(3.5)})
    case("init-shape", "parameter W", "--init", **{"param.W": numpy.zeros((5, 5))})
    huge = tmp_path / "huge.npz"
    with zipfile.ZipFile(tmp_path / "good.npz") as good, zipfile.ZipFile(huge, "w") as bad:
        for member in good.namelist():
            data = good.read(member)
            if member == "param.W.npy":
                header = io.BytesIO()
                numpy.lib.format.write_array_header_1_0(header, {"descr": "<f8", "fortran_order": False,
                                                                 "shape": (10**12,)})
                data = header.getvalue() + data[-64:]                  # (the header holds the magic)
            bad.writestr(member, data)
    cases.append((TINY[:2] + ["--resume", str(huge)], "is damaged or not plain numbers"))
    noise = tmp_path / "noise.npz"
    noise.write_bytes(numpy.random.default_rng(0).bytes(4096))
    cases.append((TINY[:2] + ["--resume", str(noise)], "is not a roa checkpoint (not an .npz archive)"))
    return cases


def test_every_bad_input_exits_2_with_one_clear_line(tmp_path, capsys):
    table = bad_inputs(tmp_path)
    capsys.readouterr()                                # (what making the table printed)
    for flags, named in table:
        code, err, out = run_cli(flags, capsys)
        assert code == 2, " ".join(flags)
        assert "error" in err and named in err, (flags, err)
        assert "Traceback" not in err and "pickle" not in err and err.count("\n") == 1, err
        assert not re.search("^step ", out, re.MULTILINE), (flags, out)     # refused before any training


@pytest.mark.parametrize("make, named", [
    (lambda: roa.RoaRNN(2, 1, 4, 1.0, 0.1, seed=-1), "seed must be an integer >= 0, got -1"),
    (lambda: roa.RoaRNN(2, 1, 4, 1.0, 0.1, seed="abc"), "seed must be an integer >= 0, got 'abc'"),
    (lambda: roa.RoaRNN(2, 1, 4, 1.0, 0.1, activation=["tanh"]), "activation must be one of"),
    (lambda: roa.RoaRNN(2, 1, 4, 1.0, 0.1, readout="first"), "readout must be one of"),
    (lambda: roa.RoaFNN(3, 2, 4, 2, 1.0, 0.1, seed=1.5), "seed must be an integer"),
    (lambda: roa.RoaRNN(2, 1, 4, 1e308, 0.1), "alpha must be a number in 0 .. 10"),
    (lambda: roa.RoaFNN(3, 2, 4, 2, 10.5, 0.1), "alpha must be a number in 0 .. 10 (above 1 the state grows like alpha^T), got 10.5"),
    (lambda: roa.RoaFNN(3, 2, 4, 2, -1e-9, 0.1), "got -1e-09"),
])
def test_bad_api_arguments_raise_the_projects_error(make, named):
    with pytest.raises(ag.RoaError, match=re.escape(named)):
        make()


def test_backward_losses_optimisers_and_set_params_check_their_inputs():
    """The API refuses, in one RoaError naming what is wrong, what would
    otherwise broadcast into a silently wrong number or climb the loss."""
    model = roa.RoaRNN(2, 1, 4, 1.0, 0.1, dtype="float64")
    u = numpy.zeros((5, 3, 2))
    z, cache = model.forward(u)
    cases = [
        (lambda: model.backward(numpy.zeros((3,)), cache), "dz must be dL/dz"),         # (B,) for (B, 1)
        (lambda: model.backward(numpy.zeros((3, 2)), cache), "shape (3, 1)"),
        (lambda: model.backward(numpy.zeros((3, 1), numpy.float32), cache), "float64 array"),   # mixed dtypes
        (lambda: ag.Adam("x"), "lr must be a finite number > 0, got 'x'"),
        (lambda: roa.RoaRNN(2, 1, 4, 1.0, 0.1, dtype="float64").backward(numpy.zeros((3, 1)), cache),
         "the cache was made by another model's forward"),
        (lambda: ag.rnn_forward(u, numpy.zeros((3, 5)), model.params["W"], model.O, model.params["U"],
                                model.params["b"], 1.0, 0.1, model.act), "h0 must be"),
        (lambda: model.forward(numpy.zeros((5, 0, 2))), "no size 0"),                 # an empty batch
        (lambda: model.set_params({"W": numpy.zeros((3, 3))}), "shape (4, 4)"),
        (lambda: model.set_params({"Q": numpy.zeros((4, 4))}), "one of"),
        (lambda: ag.mse_loss(numpy.zeros((3, 1)), numpy.zeros(3)), "one shape"),       # (B, 1) against (B,)
        (lambda: ag.softmax_cross_entropy(numpy.zeros((2, 10)), numpy.array([3, -1])), "0 .. 9"),
        (lambda: ag.softmax_cross_entropy(numpy.zeros((2, 10)), numpy.array([3, 10])), "0 .. 9"),
        (lambda: ag.softmax_cross_entropy(numpy.zeros((2, 10)), numpy.array([3.0, 1.0])), "integers"),
        (lambda: ag.Adam(lr=-1), "lr must be a finite number > 0"),
        (lambda: ag.SGD(lr=float("nan")), "lr must be"),
        (lambda: ag.Adam(1e-3, weight_decay=-0.1), "weight_decay must be"),
        (lambda: ag.SGD(0.1).step({"W": numpy.zeros((2, 2))}, {"W": numpy.zeros(2)}), "shape (2, 2)"),
        (lambda: ag.Adam(0.1).step({"W": numpy.zeros((2, 2))}, {"V": numpy.zeros((2, 2))}), "one of ['W']"),
    ]
    for call, named in cases:
        with pytest.raises(ag.RoaError, match=re.escape(named)):
            call()


@pytest.mark.parametrize("u, named", [
    (numpy.zeros((5, 3, 3)), "shape (any, any, 2)"),                    # the wrong input size
    (numpy.zeros((3, 2)), "shape (any, any, 2)"),                       # the wrong rank
    (numpy.zeros((5, 3, 2), dtype=numpy.float32), "float64 array"),      # the wrong dtype
    ([[[0.0, 0.0]]], "got list"),                                        # not an array
])
def test_forward_and_inference_check_their_inputs(u, named):
    model = roa.RoaRNN(2, 1, 4, 1.0, 0.1, dtype="float64")
    for run in (model.forward, model.inference):
        with pytest.raises(ag.RoaError, match=re.escape(named)):
            run(u)
    fnn = roa.RoaFNN(3, 2, 4, 2, 1.0, 0.1, dtype="float64")
    with pytest.raises(ag.RoaError, match=re.escape("shape (any, 3)")):
        fnn.forward(numpy.zeros((4, 2)))


@pytest.mark.parametrize("flags, low", [
    (["--task", "adding", "--length", "3000", "--hidden", "32", "--batch", "16", "--steps", "2", "--beta", "0.01"],
     0.95),                                              # its peak: evaluation, in one chunk
    (["--task", "adding", "--length", "5000", "--steps", "1"], 0.95),        # evaluation, in chunks of 1 GiB
    (["--task", "adding", "--length", "1000", "--batch", "2048", "--steps", "1"], 0.7),     # the training step
    (["--task", "copy", "--length", "500", "--batch", "1024", "--steps", "1"], 0.95),
    (["--task", "copy", "--length", "1000", "--hidden", "32", "--batch", "16", "--steps", "2"], 0.85),
    (["--task", "deepmlp", "--depth", "3000", "--hidden", "32", "--batch", "16", "--steps", "2", "--validation", "8"],
     0.75),
])
def test_the_memory_estimate_bounds_the_measured_peak(flags, low, tmp_path):
    """The whole run's peak (traced) lies within the estimate check_memory
    uses, and not far below it, whichever part of the run makes the peak."""
    write_fake_mnist(tmp_path, 40, 10)
    flags = flags + (["--data-dir", str(tmp_path)] if "deepmlp" in flags else [])
    args = machinery.parse_args(flags)
    machinery.fill_defaults(args)
    estimate, _ = machinery.memory_needed(args, machinery.make_task(args, print))
    tracemalloc.start()
    assert machinery.main(flags + ["--quiet"]) == 0
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert low * estimate <= peak <= estimate, (peak, estimate)


@pytest.mark.parametrize("make, u_shape, low", [
    (lambda: roa.RoaRNN(2, 1, 64, 1.0, 0.1), (1, 200, 2), 0.6),
    (lambda: roa.RoaRNN(2, 1, 64, 1.0, 0.1), (50, 200, 2), 0.9),
    (lambda: roa.RoaRNN(784, 10, 16, 1.0, 0.1), (5, 500, 784), 0.9),
    (lambda: roa.RoaRNN(10, 9, 32, 1.0, 0.1, readout="every"), (300, 100, 10), 0.75),
    (lambda: roa.RoaRNN(2, 1, 64, 1.0, 0.1, readout="every"), (50, 200, 2), 0.9),
    (lambda: roa.RoaFNN(784, 10, 64, 3, 1.0, 0.1), (200, 784), 0.9),
    (lambda: roa.RoaFNN(2, 1, 64, 10, 1.0, 0.1), (500, 2), 0.8),
])
def test_inference_bytes_bounds_the_traced_peak_of_inference(make, u_shape, low):
    """evaluate() sizes its chunks by inference_bytes: the peak of one chunk
    (its inputs' copy and the inference) lies within it, and not far below."""
    model = make()
    u = numpy.ones(u_shape, numpy.float32)
    tracemalloc.start()
    model.inference(u.copy())
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    estimate = model.inference_bytes(u_shape)
    assert low * estimate <= peak <= estimate, (peak, estimate)


def saved_params(path):
    checkpoint = machinery.load_checkpoint(str(path))
    return checkpoint.step, checkpoint.params, checkpoint.optim


def test_init_starts_a_new_run_from_the_saved_parameters(tmp_path):
    """--init: a run at another length, learning rate and step count starts from
    a checkpoint's parameters (so, with a tiny lr, ends next to them), unlike a
    fresh model of the same seed; its checkpoint records the new run."""
    first, second, fresh = (str(tmp_path / name) for name in ("first.npz", "second.npz", "fresh.npz"))
    assert machinery.main(TINY + ["--lr", "0.05", "--save", first, "--quiet"]) == 0
    later = ["--task", "adding", "--length", "9", "--steps", "3", "--lr", "1e-9", "--quiet"]
    assert machinery.main(later + ["--init", first, "--save", second]) == 0
    assert machinery.main(later + ["--hidden", "4", "--save", fresh]) == 0
    _, start, _ = saved_params(first)
    step, ended, optim = saved_params(second)
    _, fresh_params, _ = saved_params(fresh)
    assert step == 3 and int(optim["t"]) == 3 and machinery.load_checkpoint(second).config["length"] == 9
    assert max(numpy.abs(ended[k] - start[k]).max() for k in start) < 1e-7
    assert max(numpy.abs(fresh_params[k] - start[k]).max() for k in start) > 1e-2


def test_resume_is_exact_bit_for_bit(tmp_path, capsys):
    """N steps in one go == a finished run of k steps extended by `--resume
    PATH --steps N` (NumPy float64, Adam, dropout: its masks too depend on
    (seed, step) alone): the same parameters, optimiser state and test line."""
    flags = TINY[:-2] + ["--dropout", "0.2", "--dtype", "float64"]
    one, two = str(tmp_path / "one.npz"), str(tmp_path / "two.npz")
    code, _, out_one = run_cli(flags + ["--steps", "10", "--save", one], capsys)
    assert code == 0
    assert machinery.main(flags + ["--steps", "4", "--save", two, "--quiet"]) == 0
    code, _, out_two = run_cli(["--resume", two, "--steps", "10"], capsys)
    assert code == 0
    step_one, params_one, optim_one = saved_params(one)
    step_two, params_two, optim_two = saved_params(two)
    assert step_one == step_two == 10
    for name in params_one:
        assert numpy.array_equal(params_one[name], params_two[name]), name
    for name in optim_one:
        assert numpy.array_equal(optim_one[name], optim_two[name]), name
    assert final_line(out_one) == final_line(out_two)


@given(st.lists(st.lists(st.floats(-1e3, 1e3), min_size=3, max_size=3).map(numpy.array), min_size=1, max_size=6))
def test_weight_average_is_the_mean_of_what_it_folded(snapshots):
    average = roa.WeightAverage(start=1)
    for W in snapshots:
        average.fold({"W": W})
    assert average.count == len(snapshots)
    assert numpy.allclose(average.mean["W"], numpy.mean(snapshots, axis=0), rtol=1e-12, atol=1e-9)


class Recorder(roa.Hooks):
    """train's hooks that print nothing, keep every report and the parameters
    after every step."""

    def __init__(self, model):
        self.model, self.reports, self.after = model, [], {}

    def reported(self, report, line):
        self.reports.append(report)

    def step_done(self, progress):
        self.after[progress.step] = {k: v.copy() for k, v in self.model.params.items()}


def test_averaged_run_validates_and_scores_the_mean_of_the_reported_parameters():
    """With a WeightAverage from step 5 and reports every 2 steps, the reports
    at steps 6, 8, 10 validate the mean of the parameters of steps 6..step; the
    test scores the best report's parameters; training itself goes on from the
    parameters of the last step, not from the mean."""
    args = machinery.fill_defaults(machinery.parse_args(TINY + ["--dtype", "float64"]))
    task = machinery.make_task(args, print)
    model = machinery.make_model(args, task)
    hooks = Recorder(model)
    plan = roa.Plan(steps=10, batch=3, seed=0, eval_every=2, lr=0.05)
    test_loss, _, best_step = roa.train(model, task, ag.Adam(0.05), plan, roa.Progress(roa.WeightAverage(5)), hooks)
    after, reports = hooks.after, hooks.reports

    def validated(step):                         # the parameters the report at `step` validates
        folded = [s for s in (6, 8, 10) if s <= step]
        return {k: numpy.mean([after[s][k] for s in folded], axis=0) for k in after[step]} if folded \
            else after[step]

    assert [r["averaged"] for r in reports] == [0, 0, 1, 2, 3]
    for report in reports:
        loss, _ = roa.evaluate_params(model, validated(report["step"]), task, task.validation)
        assert numpy.isclose(report["val_loss"], loss, rtol=1e-10), report["step"]
    best = min(reports, key=lambda r: r["val_metric"])
    assert best_step == best["step"]
    assert numpy.isclose(test_loss, roa.evaluate_params(model, validated(best_step), task, task.test)[0],
                         rtol=1e-10)
    assert all(numpy.array_equal(model.params[k], after[10][k]) for k in model.params)


def test_resume_keeps_the_weight_average(tmp_path, monkeypatch):
    """10 steps with averaging from step 3 (--average-from 0.3) in one go == stopped after step 6 and
    resumed: the checkpoint carries the running mean, its count and its start."""
    flags = TINY + ["--dtype", "float64", "--eval-every", "2", "--average-from", "0.3", "--quiet", "--save"]
    one, two = str(tmp_path / "one.npz"), str(tmp_path / "two.npz")
    assert machinery.main(flags + [one]) == 0
    signal_at(monkeypatch, [6])
    assert machinery.main(flags + [two]) == 128 + signal.SIGTERM
    monkeypatch.undo()
    assert int(machinery.load_checkpoint(two).average["start"]) == 3
    assert machinery.main(["--resume", two, "--steps", "10", "--quiet"]) == 0
    average_one, average_two = machinery.load_checkpoint(one).average, machinery.load_checkpoint(two).average
    assert int(average_one["count"]) == 4                  # the reports at steps 4, 6, 8, 10
    assert average_one.keys() == average_two.keys()
    for name in average_one:
        assert numpy.array_equal(average_one[name], average_two[name]), name


def test_nan_stops_at_its_step_and_keeps_the_checkpoint(tmp_path, monkeypatch, capsys):
    clean = tasks.Adding.train_batch

    def poisoned(self, seed, step, B):
        u, y = clean(self, seed, step, B)
        if step + 1 == 7:                      # training step 7 gets a NaN input
            u[0, 0, 0] = numpy.nan
        return u, y

    monkeypatch.setattr(tasks.Adding, "train_batch", poisoned)
    path = tmp_path / "run.npz"
    code, err, _ = run_cli(TINY + ["--save", str(path), "--save-every", "5", "--quiet"], capsys)
    assert code == 2 and "step 7" in err and "Traceback" not in err
    step, params, _ = saved_params(path)
    assert step == 5 and all(numpy.isfinite(p).all() for p in params.values())


def test_a_failed_save_leaves_the_previous_checkpoint_intact(tmp_path, monkeypatch, capsys):
    path = tmp_path / "run.npz"
    assert machinery.main(TINY + ["--steps", "4", "--save", str(path), "--quiet"]) == 0
    before = path.read_bytes()

    def crash(src, dst):                          # the failure between writing and renaming
        raise OSError("simulated crash before the rename")

    monkeypatch.setattr(machinery.os, "replace", crash)
    code, err, out = run_cli(TINY + ["--resume", str(path), "--save", str(path), "--quiet"], capsys)
    assert code == 2 and "could not save" in err and err.count("\n") == 1
    assert "test MSE" in out                                          # the finished run's result, still
    assert path.read_bytes() == before
    assert [f.name for f in tmp_path.iterdir()] == ["run.npz"]        # no temporary file left behind
    assert saved_params(path)[0] == 4


def test_a_checkpoint_that_cannot_go_to_its_path_goes_beside_it(tmp_path, monkeypatch, capsys):
    """A save whose target cannot be written (here: the rename onto it fails)
    lands beside it, says where in one line, and the run ends normally,
    its later checkpoints going there too."""
    path = tmp_path / "run.npz"
    replace = os.replace

    def refuse_the_target(src, dst):
        if dst == str(path):
            raise OSError("simulated: file too large")
        return replace(src, dst)

    monkeypatch.setattr(machinery.os, "replace", refuse_the_target)
    code, err, out = run_cli(TINY + ["--save", str(path), "--save-every", "4"], capsys)
    rescued = tmp_path / f"run.npz.rescued-{os.getpid()}.npz"
    assert code == 0 and not path.exists() and rescued.exists()
    assert out.count(f"could not write {path}") == 1 and f"is at {rescued}" in out
    assert f"saved {rescued}" in out and "test MSE" in out
    assert machinery.load_checkpoint(str(rescued)).step == 10


def signal_at(monkeypatch, steps, signum=signal.SIGTERM):
    """Make training send itself `signum` right after each step in `steps`
    (as a preemption or Ctrl-C would arrive during it). A suite started as a
    shell's background job, or under nohup, inherits an ignored SIGINT or
    SIGHUP, which a run keeps ignoring: the test process takes the default
    handler back first."""
    if signal.getsignal(signum) is signal.SIG_IGN:
        signal.signal(signum, signal.default_int_handler if signum == signal.SIGINT else signal.SIG_DFL)
    step_once = roa.train_step

    def step_and_signal(model, task, optimizer, seed, step, batch):
        result = step_once(model, task, optimizer, seed, step, batch)
        for _ in range(steps.count(step)):
            os.kill(os.getpid(), signum)
        return result

    monkeypatch.setattr(roa, "train_step", step_and_signal)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP])
def test_a_stop_signal_saves_the_finished_step_and_exits_128_plus_its_number(tmp_path, monkeypatch, capsys, signum):
    signal_at(monkeypatch, [3], signum)
    path = tmp_path / "run.npz"
    code, err, _ = run_cli(TINY + ["--save", str(path), "--quiet"], capsys)
    assert code == 128 + signum
    assert err.count("\n") == 1 and machinery.STOP_SIGNALS[signum] in err and "after step 3" in err
    assert f"python roa.py --resume {path}" in err
    assert saved_params(path)[0] == 3


def test_a_second_signal_stops_at_once_with_one_line(tmp_path, monkeypatch, capsys):
    signal_at(monkeypatch, [5, 5])
    path = tmp_path / "run.npz"
    code, err, _ = run_cli(TINY + ["--save", str(path), "--save-every", "2", "--quiet"], capsys)
    assert code == 128 + signal.SIGTERM and err.count("\n") == 1 and "second SIGTERM" in err
    assert "Traceback" not in err
    assert saved_params(path)[0] == 4                     # the last checkpoint, as it was


def final_line(out):
    """The summary line without its wall time: what the test scored."""
    return out.strip().splitlines()[-1].split("; wall time")[0]


@given(st.integers(1, 23), st.booleans())
def test_a_run_stopped_at_any_step_and_resumed_ends_as_the_run_uninterrupted(stop_at, average):
    """Stopped by SIGTERM after any step, then `--resume PATH` alone: the same
    final parameters and optimiser state, the same reports, and the same test
    line (the step chosen on validation -- here not the last report's --
    and its test metric), bit for bit in float64; with dropout, a warm-up of
    9 steps, reports every 2 steps and, drawn, a weight average."""
    flags = TINY[:-2] + ["--steps", "24", "--dtype", "float64", "--dropout", "0.2", "--eval-every", "2",
                         "--lr", "0.2", "--warmup", "9"] + (["--average-from", "0.29"] if average else [])
    with tempfile.TemporaryDirectory() as folder, pytest.MonkeyPatch.context() as monkeypatch:
        whole, stopped = (os.path.join(folder, name) for name in ("whole.npz", "stopped.npz"))
        capture = []
        monkeypatch.setattr(machinery, "say", capture.append)
        assert machinery.main(flags + ["--save", whole, "--metrics", whole + ".jsonl"]) == 0
        expected = final_line(capture[-1])
        signal_at(monkeypatch, [stop_at])
        assert machinery.main(flags + ["--save", stopped, "--metrics", stopped + ".jsonl"]) == 128 + signal.SIGTERM
        monkeypatch.undo()
        monkeypatch.setattr(machinery, "say", capture.append)
        assert machinery.main(["--resume", stopped]) == 0
        assert final_line(capture[-1]).replace("stopped.npz", "whole.npz") == expected
        reports = [[{k: r[k] for k in ("step", "loss", "val_loss", "val_metric", "averaged")} if "step" in r else r
                    for r in map(json.loads, open(path + ".jsonl"))] for path in (whole, stopped)]
        assert reports[0] == reports[1] and len(reports[0]) == 12 + 1          # and the test result
        one, two = machinery.load_checkpoint(whole), machinery.load_checkpoint(stopped)
        assert one.step == two.step == 24 and one.progress == two.progress
        for group in ("params", "optim", "average", "best"):
            a, b = getattr(one, group), getattr(two, group)
            assert a.keys() == b.keys() and all(numpy.array_equal(a[k], b[k]) for k in a), group


def test_a_resume_continues_the_saved_plan_and_may_extend_or_shorten_it(tmp_path, monkeypatch, capsys):
    """`--resume PATH` alone takes every flag and the run's length from the
    checkpoint; --steps longer extends it; shorter ends it sooner, as the
    shorter run started from scratch would have ended, bit for bit, but not
    before a step it has not trained yet; a cosine run keeps its length."""
    flags = TINY[:-2] + ["--eval-every", "2", "--dtype", "float64", "--quiet"]
    path, short, whole = (str(tmp_path / name) for name in ("run.npz", "short.npz", "whole.npz"))
    signal_at(monkeypatch, [4])
    assert machinery.main(flags + ["--steps", "8", "--save", path]) == 128 + 15
    monkeypatch.undo()
    capsys.readouterr()
    code, err, _ = run_cli(["--resume", path, "--steps", "4"], capsys)
    assert (code, err) == (2, "roa.py: error: --steps 4 is not past the checkpoint's step 4: a resume may "
                              "shorten the run's plan of 8 steps to any step after it\n")
    shutil.copy(path, short)
    code, _, out_short = run_cli(["--resume", short, "--steps", "5"], capsys)
    assert code == 0 and machinery.main(flags + ["--steps", "5", "--save", whole]) == 0
    capsys.readouterr()
    out_whole = run_cli(["--resume", whole], capsys)[2]            # a finished run: its test line, again
    assert final_line(out_short) == final_line(out_whole)
    for one, two in zip(saved_params(short)[1:], saved_params(whole)[1:]):
        assert one.keys() == two.keys() and all(numpy.array_equal(one[k], two[k]) for k in one)
    code, _, out = run_cli(["--resume", path], capsys)
    assert code == 0 and "resuming" in out and "step 8/8" in out and "step 6/8" in out
    assert saved_params(path)[0] == 8 and machinery.load_checkpoint(path).config["hidden"] == 4
    before = open(path, "rb").read()
    code, _, again = run_cli(["--resume", path], capsys)           # a finished run: its test result, again
    assert code == 0 and "finished its run at step 8" in again and "step 8/8" not in again
    assert final_line(again) == final_line(out) and open(path, "rb").read() == before
    code, _, out = run_cli(["--resume", path, "--steps", "10", "--quiet"], capsys)
    assert code == 0 and saved_params(path)[0] == 10
    cosine = str(tmp_path / "cosine.npz")
    assert machinery.main(TINY + ["--schedule", "cosine", "--save", cosine, "--quiet"]) == 0
    code, err, _ = run_cli(["--resume", cosine, "--steps", "20"], capsys)
    assert code == 2 and "cosine schedule" in err


def test_an_epoch_count_gives_its_number_of_steps(tmp_path, capsys):
    """32 training images (40 less 8 held out), batch 4: 8 steps an epoch, 2 epochs 16 steps."""
    write_fake_mnist(tmp_path, 40, 6)
    path = tmp_path / "run.npz"
    code, err, out = run_cli(["--task", "psmnist", "--data-dir", str(tmp_path), "--validation", "8", "--hidden", "4",
                              "--batch", "4", "--epochs", "2", "--save", str(path)], capsys)
    assert code == 0, err
    assert saved_params(path)[0] == 16 and "step 16/16" in out
    assert "94 %, the paper's claim after one epoch" in out


def test_the_best_report_is_chosen_also_when_it_is_not_the_last(monkeypatch, capsys):
    """Validation metrics scripted report by report: the test scores the
    parameters of the best report (lowest MSE, the second of four here)."""
    scripted = iter([0.5, 0.2, 0.9, 0.3])
    scored, evaluate = [], roa.evaluate_params

    def scripted_validation(model, params, task, data):
        if data is task.validation:
            return 1.0, next(scripted)
        scored.append({k: v.copy() for k, v in params.items()})
        return evaluate(model, params, task, data)

    monkeypatch.setattr(roa, "evaluate_params", scripted_validation)
    args = machinery.fill_defaults(machinery.parse_args(TINY + ["--dtype", "float64"]))
    task = machinery.make_task(args, print)
    model = machinery.make_model(args, task)
    hooks = Recorder(model)
    plan = roa.Plan(steps=8, batch=3, seed=0, eval_every=2, lr=0.05)
    _, _, best_step = roa.train(model, task, ag.Adam(0.05), plan, roa.Progress(), hooks)
    assert best_step == 4
    assert all(numpy.array_equal(scored[0][k], hooks.after[4][k]) for k in hooks.after[4])


@given(st.integers(1, 40), seeds)
def test_evaluation_in_any_chunks_equals_the_whole_set_at_once(chunk, seed):
    """The held-out loss and metric, whatever the chunk size, are those of
    all the examples in one forward pass."""
    model = roa.RoaRNN(10, 9, 5, 1.0, 0.5, readout="every", dtype="float64", seed=seed)
    task = tasks.Copy(3)
    u, y = tasks.copy_batch(numpy.random.default_rng(seed), 3, 40)
    z = model.inference(u)
    whole = (task.loss(z, y)[0], task.metric(z, y))
    per_example = model.inference_bytes(u.shape) / 40
    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.setattr(roa, "EVAL_BYTES", int(chunk * per_example) + 1)
        loss, metric = roa.evaluate(model, task, (u, y))
    assert loss == pytest.approx(whole[0], rel=1e-12) and metric == pytest.approx(whole[1], rel=1e-12)


@pytest.mark.parametrize("per_example, rows", [(2**28, 4), (2**28 + 1, 3), (2**31, 1), (1, 40)])
def test_an_evaluation_chunk_takes_at_most_one_gib(per_example, rows, monkeypatch):
    """evaluate() splits a held-out set into the fewest chunks whose inference
    takes at most 2^30 bytes (EVAL_BYTES) each -- never fewer than one example."""
    model = roa.RoaRNN(10, 9, 5, 1.0, 0.5, readout="every", dtype="float64")
    u, y = tasks.copy_batch(numpy.random.default_rng(0), 3, 40)
    seen = []
    monkeypatch.setattr(model, "inference_bytes", lambda shape: shape[1] * per_example)
    monkeypatch.setattr(model, "inference", lambda u: seen.append(u.shape[1]) or numpy.zeros(u.shape[:2] + (9,)))
    roa.evaluate(model, tasks.Copy(3), (u, y))
    assert seen == [rows] * (40 // rows) + ([40 % rows] if 40 % rows else [])


def test_output_paths_are_checked_before_any_work(tmp_path, capsys):
    """A missing folder is made (one line says so); a folder, a device or a
    folder that cannot be written is refused with exit 2 before training."""
    save, metrics = tmp_path / "runs" / "deep" / "a.npz", tmp_path / "logs" / "a.jsonl"
    code, _, out = run_cli(TINY + ["--save", str(save), "--metrics", str(metrics)], capsys)
    assert code == 0 and saved_params(save)[0] == 10 and metrics.read_text().count("\n") == 10 + 1   # and the test
    assert f"created the folder {save.parent}" in out and f"created the folder {metrics.parent}" in out
    for flag, path, named in [("--save", tmp_path, "is a folder"), ("--metrics", tmp_path, "is a folder"),
                              ("--save", "/dev/null", "not a regular file"),
                              ("--metrics", "/dev/null", "not a regular file"),
                              ("--save", "/proc/roa.npz", "cannot write"),
                              ("--save", "/proc/roa/run.npz", "cannot create its folder"),
                              ("--save", tmp_path / ("a" * 245 + ".npz"), "cannot write")]:   # (its temporary name)
        code, err, out = run_cli(TINY + [flag, str(path)], capsys)
        assert code == 2 and named in err and str(path) in err and "step" not in out, (flag, path, err)


@pytest.mark.parametrize("flag", ["--save", "--metrics", "--resume", "--init", "--data-dir"])
def test_an_empty_path_is_an_error_naming_its_flag(flag, tmp_path, capsys):
    code, err, _ = run_cli(TINY + [flag, ""], capsys)
    assert code == 2 and f"{flag} is empty" in err


def test_a_save_never_goes_through_a_planted_link(tmp_path):
    victim, path = tmp_path / "victim", tmp_path / "run.npz"
    victim.write_text("keep me")
    (tmp_path / "run.npz.tmp").symlink_to(victim)
    assert machinery.main(TINY + ["--save", str(path), "--save-every", "1", "--quiet"]) == 0
    assert victim.read_text() == "keep me" and saved_params(path)[0] == 10


def test_a_save_flushes_the_file_and_its_folder_to_disk(tmp_path, monkeypatch):
    flushed = []
    fsync = os.fsync
    monkeypatch.setattr(machinery.os, "fsync", lambda fd: flushed.append(os.fstat(fd).st_mode) or fsync(fd))
    assert machinery.main(TINY + ["--save", str(tmp_path / "run.npz"), "--quiet"]) == 0
    assert [mode & 0o170000 for mode in flushed] == [0o100000, 0o040000]      # a regular file, then a folder


def test_a_second_run_saving_to_the_same_path_is_refused_while_the_first_runs(tmp_path):
    """One run at a time may save to a PATH (an exclusive lock): a second
    is refused in one line, before any work, and so is a third after it (the
    refused run leaves the first one's lock alone); the first finishes, and
    the checkpoint is its own; while it saves every step, every read of PATH
    finds one whole checkpoint. Temporary files that a killed writer left
    are removed by the next run."""
    path = tmp_path / "shared.npz"
    (tmp_path / "shared.npz.abcd1234.tmp").write_bytes(b"left by a killed run")
    command = [sys.executable, os.path.join(ROOT, "roa.py"), *TINY[:-2], "--steps", "400", "--save", str(path),
               "--save-every", "1", "--quiet"]
    first = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
    while not path.exists():
        assert first.poll() is None
    for _ in ("second", "third"):
        other = subprocess.run([arg if arg != "400" else "7" for arg in command] + ["--overwrite"],
                               capture_output=True, text=True)
        assert other.returncode == 2 and "another run is saving" in other.stderr and other.stderr.count("\n") == 1
    reads = 0
    while first.poll() is None:
        with contextlib.suppress(FileNotFoundError):
            assert machinery.load_checkpoint(str(path)).step >= 1
            reads += 1
    assert first.wait() == 0, first.stderr.read()
    assert reads > 0 and machinery.load_checkpoint(str(path)).step == machinery.load_checkpoint(str(path)).config[
        "steps"] == 400
    assert sorted(f.name for f in tmp_path.iterdir()) == ["shared.npz"]           # no lock, no temporary file


def test_save_never_replaces_an_earlier_run_or_another_file_unasked(tmp_path, capsys):
    """--save onto the checkpoint of an earlier run, or onto a file that is
    no checkpoint, is refused before any work, unless --overwrite; the
    resume of a checkpoint saves into it."""
    path, other = tmp_path / "run.npz", tmp_path / "notes.txt"
    assert machinery.main(TINY + ["--save", str(path), "--quiet"]) == 0
    before = path.read_bytes()
    other.write_text("my notes")
    capsys.readouterr()
    for target, named in ((path, "--resume"), (other, "not a roa checkpoint")):
        code, err, out = run_cli(TINY + ["--save", str(target)], capsys)
        assert code == 2 and named in err and "step" not in out
    assert path.read_bytes() == before and other.read_text() == "my notes"
    assert machinery.main(TINY + ["--save", str(path), "--overwrite", "--seed", "1", "--quiet"]) == 0
    assert path.read_bytes() != before
    assert machinery.main(["--resume", str(path), "--steps", "12", "--quiet"]) == 0


def test_sigterm_to_a_real_run_saves_and_the_resume_ends_as_the_whole_run(tmp_path):
    """A subprocess is sent SIGTERM after its first report: it saves, says
    how to resume, exits 143; `--resume PATH` then ends with the test line
    and parameters of the same run left uninterrupted."""
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "roa.py")
    flags = [*TINY[:-2], "--steps", "4000", "--eval-every", "100", "--dtype", "float64"]
    stopped, whole = str(tmp_path / "stopped.npz"), str(tmp_path / "whole.npz")
    run = subprocess.Popen([sys.executable, script, *flags, "--save", stopped], stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)
    assert run.stdout.readline().startswith("roa: adding")
    assert run.stdout.readline().startswith("step")
    run.send_signal(signal.SIGTERM)
    _, err = run.communicate()
    assert run.returncode == 143 and "SIGTERM" in err and f"--resume {stopped}" in err, err
    step = machinery.load_checkpoint(stopped).step
    assert 100 <= step < 4000
    resumed = subprocess.run([sys.executable, script, "--resume", stopped], capture_output=True, text=True)
    uninterrupted = subprocess.run([sys.executable, script, *flags, "--save", whole], capture_output=True, text=True)
    assert resumed.returncode == uninterrupted.returncode == 0
    assert final_line(resumed.stdout).replace(stopped, whole) == final_line(uninterrupted.stdout)
    one, two = machinery.load_checkpoint(whole), machinery.load_checkpoint(stopped)
    assert all(numpy.array_equal(one.params[k], two.params[k]) for k in one.params)


def test_a_run_under_nohup_ignores_sighup_and_finishes(tmp_path):
    """A run started with SIGHUP ignored (nohup, a dropped ssh session) keeps
    it ignored: SIGHUP mid-run changes nothing, the run ends with exit 0."""
    script = os.path.join(ROOT, "roa.py")
    flags = [*TINY[:-2], "--steps", "3000", "--eval-every", "100"]
    run = subprocess.Popen([sys.executable, script, *flags], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           text=True, preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_IGN))
    assert run.stdout.readline().startswith("roa: adding")
    assert run.stdout.readline().startswith("step")
    run.send_signal(signal.SIGHUP)
    out, err = run.communicate()
    assert run.returncode == 0 and err == "" and "step 3000/3000" in out and "test MSE" in out


def test_a_closed_output_pipe_stops_printing_not_training(tmp_path):
    """`python roa.py ... | head -1`: the run goes on to its end and saves."""
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "roa.py")
    path = str(tmp_path / "run.npz")
    run = subprocess.Popen([sys.executable, script, *TINY[:-2], "--steps", "3000", "--eval-every", "1",
                            "--save", path], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    run.stdout.readline()
    run.stdout.close()
    assert run.wait() == 0 and run.stderr.read() == b""
    assert machinery.load_checkpoint(path).step == 3000


@pytest.mark.parametrize("flags, cause", [
    (["--lr", "1e30"], "grown to 1.0e+30 at learning rate 1e+30: lower --lr"),      # float32
    (["--lr", "1e39"], "at learning rate 1e+39 overflowed"),         # float32: the update itself overflows
    (["--beta", "1e10"], "a gradient of 9.6e+20 overflowed the optimiser's state (an exploding gradient)"),
    (["--alpha", "10", "--length", "60"], "--alpha 10.0 > 1"),
    (["--lr", "1e308", "--dtype", "float64"], "lower --lr"),
    (["--lr", "1", "--weight-decay", "1e38"], "lower --weight-decay"),
])
def test_non_finite_numbers_stop_the_run_and_are_never_saved(flags, cause, tmp_path, capsys):
    path = tmp_path / "run.npz"
    tanh = ["--alpha", "0.9", "--beta", "0.1", "--activation", "tanh"]      # (the numbers below are tanh's)
    code, err, _ = run_cli(TINY + tanh + flags + ["--save", str(path), "--save-every", "1", "--quiet"], capsys)
    assert code == 2 and "training stopped at step" in err and cause in err, err
    assert err.count("\n") == 1
    if path.exists():
        _, params, optim = saved_params(path)
        assert all(numpy.isfinite(a).all() for a in [*params.values(), *optim.values()])


def test_an_unwritable_metrics_log_saves_and_stops_with_one_line(tmp_path, monkeypatch, capsys):
    """The metrics log fails at the second report (a full disk): the run saves
    its checkpoint, names the error in one line and exits non-zero."""

    class FullDisk:
        lines = 0

        def write(self, text):
            self.lines += text.count("\n")
            if self.lines >= 2:
                raise OSError(28, "No space left on device")

        def flush(self):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            pass

    metrics_log, real_open = str(tmp_path / "m.jsonl"), open
    monkeypatch.setattr(machinery, "open", lambda path, mode="r": FullDisk() if path == metrics_log else real_open(path, mode),
                        raising=False)
    path = tmp_path / "run.npz"
    code, err, _ = run_cli(TINY + ["--eval-every", "2", "--metrics", metrics_log,
                                   "--save", str(path), "--quiet"], capsys)
    assert code == 2 and err.count("\n") == 1 and "metrics log" in err and "No space left" in err
    assert saved_params(path)[0] == 4


def test_metrics_log_has_one_json_line_per_report_and_the_test_result_last(tmp_path, capsys):
    log = tmp_path / "metrics.jsonl"
    assert machinery.main(TINY + ["--eval-every", "5", "--metrics", str(log), "--quiet"]) == 0
    *lines, test = [json.loads(line) for line in log.read_text().splitlines()]
    assert [line["step"] for line in lines] == [5, 10]
    assert all({"loss", "val_loss", "val_metric", "first_state_grad_norm"} <= set(line) for line in lines)
    best = min(lines, key=lambda line: line["val_metric"])
    printed = re.search(r"test MSE (\d+\.\d+), test loss (\d+\.\d+)", capsys.readouterr().out).groups()
    assert test.keys() == {"test_loss", "test_metric", "chosen_step"} and test["chosen_step"] == best["step"]
    assert (f"{test['test_metric']:.4f}", f"{test['test_loss']:.4f}") == printed


def test_a_resume_mends_the_metrics_log_to_the_checkpoints_step(tmp_path):
    """After a kill, the log may end in half a line, or hold reports made
    after the last checkpoint: the resume keeps the whole reports up to the
    checkpoint's step, and the log ends as that of the run uninterrupted."""
    whole, log, path = tmp_path / "whole.jsonl", tmp_path / "log.jsonl", str(tmp_path / "run.npz")
    flags = TINY[:-2] + ["--eval-every", "2", "--quiet", "--dtype", "float64"]
    assert machinery.main(flags + ["--steps", "10", "--metrics", str(whole)]) == 0
    assert machinery.main(flags + ["--steps", "4", "--metrics", str(log), "--save", path]) == 0
    reports = whole.read_text().splitlines()
    log.write_text("\n".join(reports[:3]) + "\n" + reports[3][:20])     # a report after step 4, then half a line
    assert machinery.main(["--resume", path, "--steps", "10"]) == 0
    assert [json.loads(x).get("step") for x in log.read_text().splitlines()] == [2, 4, 6, 8, 10, None]
    for mine, theirs in zip(log.read_text().splitlines(), reports):
        mine, theirs = json.loads(mine), json.loads(theirs)
        if "step" in mine:
            assert mine["val_loss"] == theirs["val_loss"] and mine["loss"] == theirs["loss"]
        else:                                                   # the test result, the log's last line
            assert mine == theirs


@pytest.mark.parametrize("task, flags", [
    ("copy", ["--length", "5", "--hidden", "8", "--steps", "3"]),
    ("psmnist", ["--hidden", "8", "--steps", "3", "--data-dir", "{data}", "--validation", "8"]),
    ("deepmlp", ["--hidden", "8", "--depth", "200", "--steps", "3", "--data-dir", "{data}", "--validation", "8"]),
])
def test_every_task_command_runs_end_to_end(task, flags, tmp_path, capsys):
    """A smoke version of each task's command: it trains, reports and saves."""
    write_fake_mnist(tmp_path, 40, 10)
    path = tmp_path / "run.npz"
    code, err, out = run_cli(["--task", task, "--batch", "4", "--save", str(path)]
                             + [flag.format(data=tmp_path) for flag in flags], capsys)
    assert code == 0, err
    assert f"roa: {task}: test" in out
    assert saved_params(path)[0] == 3


def test_slow_runs_print_progress_between_reports(monkeypatch, capsys):
    """Steps slower than the heartbeat get a progress line each, validation or not."""
    monkeypatch.setattr(machinery, "HEARTBEAT_SECONDS", 0)
    code, _, out = run_cli(TINY + ["--eval-every", "10"], capsys)
    lines = [line for line in out.splitlines() if line.startswith("step")]
    assert code == 0 and len(lines) == 10
    assert sum("val loss" in line for line in lines) == 1 and all("ETA" in line for line in lines)


def test_figures_draw_curriculum_stages_end_to_end(tmp_path):
    """docs/figures.py: logs joined by + continue each other's steps (the later
    stage started from the earlier one with --init)."""
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "docs"))
    import figures
    stages = [[1, 2, 3], [5, 10]]
    paths = []
    for i, steps in enumerate(stages):
        paths.append(str(tmp_path / f"stage{i}.jsonl"))
        with open(paths[-1], "w") as f:
            f.writelines(json.dumps({"step": s, "val_loss": 1.0 / s, "val_metric": i}) + "\n" for s in steps)
            f.write(json.dumps({"test_loss": 1.0, "test_metric": 0.5, "chosen_step": steps[-1]}) + "\n")
    rows = figures.read_stages("+".join(paths))
    assert [r.get("step") for r in rows] == [1, 2, 3, None, 8, 13, None]
    assert [r.get("val_metric") for r in rows] == [0, 0, 0, None, 1, 1, None]
    assert [r["chosen_step"] for r in rows if "test_metric" in r] == [3, 13]


# -------------------------------------------------------------- documents

ROOT = os.path.dirname(os.path.abspath(__file__))
DOCUMENTS = ["README.md", "docs/MATH.md", "docs/RESULTS.md"]


def document(name):
    with open(os.path.join(ROOT, name)) as f:
        return f.read()


def roa_commands(text):
    """Every `python roa.py ...` command in a document: in code blocks (joined
    across lines ending in a backslash) and in `inline code`."""
    text = text.replace("\\\n", " ")
    inline = re.findall(r"`(python roa\.py[^`]*)`", text)
    blocks = [line.strip().rstrip("&").strip() for line in text.splitlines()
              if line.strip().startswith("python roa.py")]
    return [command.split("#")[0] for command in inline + blocks]


@pytest.mark.parametrize("name", DOCUMENTS)
def test_every_roa_command_in_the_documents_parses(name):
    commands = roa_commands(document(name))
    assert name != "README.md" or len(commands) >= 8
    for command in commands:
        words = shlex.split(command)[2:]
        if words == ["--help"]:
            continue
        try:
            args = machinery.parse_args(words)
        except SystemExit:
            pytest.fail(f"{name}: {command!r} does not parse")
        assert args.task or args.resume, command


@pytest.mark.parametrize("name", DOCUMENTS)
def test_every_file_the_documents_link_exists_and_none_lies_outside(name):
    text = document(name)
    folder = os.path.dirname(os.path.join(ROOT, name))
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if "://" not in target:
            path = os.path.normpath(os.path.join(folder, target.split("#")[0]))
            assert os.path.exists(path) and path.startswith(ROOT + os.sep), (name, target)
    assert not re.search(r"/tmp/|\.\./|(?<![\w.])/(home|root|work|Users)/", text), name
    assert not re.search(r"\bsessions?\b|\bissue \d", text, re.IGNORECASE), name


@pytest.mark.parametrize("content, named", [(None, "cannot read the log"), ("", "is empty"),
                                            ("not json\n", "is not a --metrics log")])
def test_figures_say_clearly_when_a_log_is_missing_empty_or_not_a_log(content, named, tmp_path, capsys):
    sys.path.insert(0, os.path.join(ROOT, "docs"))
    import figures
    path = tmp_path / "run.jsonl"
    if content is not None:
        path.write_text(content)
    with pytest.raises(SystemExit) as stop:
        figures.read_stages(str(path))
    assert named in str(stop.value) and str(path) in str(stop.value)


def readme_python_examples():
    return re.findall(r"```python\n(.*?)```", document("README.md"), re.S)


def test_readme_python_examples_run_as_written(tmp_path, monkeypatch, capsys):
    """README's "Use it from Python": on held-out data the roaRNN's loss falls
    below a tenth of the vanilla RNN's, which stays near the loss of answering
    0, while the vanilla's dL/dh_0 is below 1e-9 and the roaRNN's above 0.1;
    the task of one's own is solved through train; and a model saved by the
    command line loads in one call and predicts the test set as the run
    scored it."""
    train_example, own_task_example, load_example = readme_python_examples()
    exec(compile(train_example, "README.md", "exec"), {})
    lines = re.findall(r"(roa|vanilla) +step \d+: held-out loss (\d+\.\d+)  \|dL/dh_0\| (\S+)",
                       capsys.readouterr().out)
    roa_loss, vanilla_loss = (float(loss) for name, loss, _ in (lines[3], lines[7]))
    assert len(lines) == 8 and roa_loss < 0.1 * vanilla_loss and vanilla_loss > 4
    assert all(float(dh0) > 0.1 for _, _, dh0 in lines[:4]) and all(float(dh0) < 1e-9 for _, _, dh0 in lines[4:])
    exec(compile(own_task_example, "README.md", "exec"), {})
    assert float(re.search(r"test accuracy (\d\.\d+)", capsys.readouterr().out).group(1)) >= 0.98
    monkeypatch.chdir(tmp_path)
    assert machinery.main(["--task", "adding", "--length", "20", "--steps", "200", "--save", "runs/adding.npz"]) == 0
    test_mse = float(re.search(r"test MSE (\d+\.\d+)", capsys.readouterr().out).group(1))
    exec(compile(load_example, "README.md", "exec"), {})
    assert abs(float(re.search(r"test MSE (\d+\.\d+)", capsys.readouterr().out).group(1)) - test_mse) < 1e-4


def test_readout_probe_runs_on_a_copy_checkpoint_and_refuses_others(tmp_path, capsys):
    sys.path.insert(0, os.path.join(ROOT, "docs"))
    import readout_probe
    copy, adding = str(tmp_path / "copy.npz"), str(tmp_path / "adding.npz")
    assert machinery.main(["--task", "copy", "--length", "6", "--hidden", "8", "--steps", "5", "--save", copy]) == 0
    assert machinery.main(TINY + ["--save", adding]) == 0
    capsys.readouterr()
    assert readout_probe.main([copy, "--length", "12", "--sequences", "64"]) == 0
    scores = [float(x) for x in re.findall(r"scores (\d\.\d+)", capsys.readouterr().out)]
    assert len(scores) == tasks.COPY_SYMBOLS and all(0 <= s <= 1 for s in scores)
    assert readout_probe.main([adding, "--length", "12"]) == 2
    assert "adding checkpoint, not copy" in capsys.readouterr().err


def test_a_resume_trains_on_the_data_it_was_trained_on(tmp_path, capsys):
    """An MNIST checkpoint records its data's folder and SHA-256: --resume
    alone goes back to that folder, and other data is refused (--init may
    start a new run from the parameters on it)."""
    first, other = tmp_path / "first", tmp_path / "other"
    first.mkdir(), other.mkdir()
    write_fake_mnist(first, 12, 6)
    write_fake_mnist(other, 12, 6)
    (other / "t10k-labels-idx1-ubyte").write_bytes(idx_bytes(numpy.arange(6) % 10))
    path = str(tmp_path / "run.npz")
    flags = ["--task", "psmnist", "--hidden", "4", "--batch", "2", "--validation", "4", "--schedule", "constant",
             "--quiet"]
    assert machinery.main(flags + ["--steps", "2", "--data-dir", str(first), "--save", path]) == 0
    config = machinery.load_checkpoint(path).config
    assert config["data_dir"] == str(first) and len(config["data_sha256"]) == 64
    capsys.readouterr()
    code, err, out = run_cli(["--resume", path, "--steps", "3", "--data-dir", str(other)], capsys)
    assert code == 2 and "other MNIST data" in err and str(first) in err and "step" not in out
    assert machinery.main(["--resume", path, "--steps", "3", "--quiet"]) == 0          # back to its own folder
    assert machinery.main(flags + ["--init", path, "--steps", "1", "--data-dir", str(other)]) == 0


def test_non_finite_pixels_and_pipes_are_refused_as_data(tmp_path, capsys):
    """Images stored as floats must be finite, in the training and the
    held-out files alike; a FIFO named like a data file is refused, not
    waited on."""
    for split in ("train", "t10k"):
        folder = tmp_path / split
        folder.mkdir()
        write_fake_mnist(folder, 12, 6)
        images = numpy.zeros((12 if split == "train" else 6, 28, 28))
        images[1, 3, 4] = numpy.nan
        (folder / f"{split}-images-idx3-ubyte").write_bytes(idx_bytes(images, 0x0D))
        code, err, _ = run_cli(["--task", "psmnist", "--hidden", "4", "--batch", "2", "--validation", "4",
                                "--steps", "1", "--data-dir", str(folder)], capsys)
        assert code == 2 and "NaN or Inf" in err and f"{split}-images" in err
    fifo = tmp_path / "fifo"
    fifo.mkdir()
    write_fake_mnist(fifo, 12, 6)
    (fifo / "t10k-images-idx3-ubyte").unlink()
    os.mkfifo(fifo / "t10k-images-idx3-ubyte")
    code, err, _ = run_cli(["--task", "psmnist", "--steps", "1", "--data-dir", str(fifo)], capsys)
    assert code == 2 and "not a regular file" in err


@pytest.mark.parametrize("version", ["v2", "v1"])
def test_the_memory_left_is_the_least_under_every_cgroup_above_the_process(tmp_path, version):
    """A limit set on a child cgroup (Slurm, systemd-run) counts, as does
    any group above it; "max" or a missing file is no limit."""
    GiB = 2**30
    groups = {"": ("max", 5 * GiB), "job": (8 * GiB, 6 * GiB), "job/step": (1 * GiB, GiB // 4)}
    base = tmp_path if version == "v2" else tmp_path / "memory"
    limit_name, usage_name = (("memory.max", "memory.current") if version == "v2"
                              else ("memory.limit_in_bytes", "memory.usage_in_bytes"))
    for group, (limit, usage) in groups.items():
        folder = base / group
        folder.mkdir(parents=True, exist_ok=True)
        (folder / limit_name).write_text(f"{limit}\n")
        (folder / usage_name).write_text(f"{usage}\n")
    proc = tmp_path / "cgroup"
    proc.write_text("0::/job/step\n" if version == "v2" else "5:cpu,cpuacct:/\n4:memory:/job/step\n0::/\n")
    assert machinery.cgroup_memory_left(str(proc), str(tmp_path)) == GiB - GiB // 4
    (base / "job" / "step" / limit_name).write_text("max\n" if version == "v2" else f"{16 * GiB}\n")
    assert machinery.cgroup_memory_left(str(proc), str(tmp_path)) == 2 * GiB          # the parent's
    proc.write_text("1:cpu:/\n")
    assert machinery.cgroup_memory_left(str(proc), str(tmp_path)) is None
    assert machinery.cgroup_memory_left(str(tmp_path / "none"), str(tmp_path)) is None


CURRICULUM = ["--task", "adding", "--curriculum", "4,8,16", "--hidden", "16", "--lr", "0.01", "--alpha", "0.9",
              "--steps", "900", "--eval-every", "25", "--dtype", "float64"]


def test_a_curriculum_moves_on_when_validation_solves_a_stage(tmp_path, monkeypatch, capsys):
    """--curriculum 4,8,16 trains at T = 4 until a report's validation MSE
    is below 0.01, then at 8, then at 16, the length the run is scored at;
    the progress lines, the metrics log and the checkpoint say the stage;
    only the last stage's reports may be chosen for the test."""
    path, log = str(tmp_path / "run.npz"), str(tmp_path / "run.jsonl")
    assert machinery.main(CURRICULUM + ["--save", path, "--metrics", log]) == 0
    out = capsys.readouterr().out
    reports = [report for report in map(json.loads, open(log)) if "step" in report]
    assert [r["length"] for r in reports] == sorted(r["length"] for r in reports)
    for before, after in zip(reports, reports[1:]):
        if after["length"] != before["length"]:               # a stage ends at a report that solves it
            assert before["val_metric"] < 0.01 and after["stage"] == before["stage"] + 1
            assert f"T={before['length']} solved on validation at step {before['step']}; now T={after['length']}" in out
        else:
            assert before["val_metric"] >= 0.01 or before["length"] == 16
    assert reports[-1]["length"] == 16 and "[T=16, stage 3/3]" in out and "T=16 (curriculum 4,8,16)" in out
    checkpoint = machinery.load_checkpoint(path)
    assert checkpoint.progress["stage"] == 2 and checkpoint.config["curriculum"] == [4, 8, 16]
    assert checkpoint.config["length"] == 16
    chosen = checkpoint.progress["best_step"]
    assert [r["length"] for r in reports if r["step"] == chosen] == [16]
    assert checkpoint.progress["best_metric"] == min(r["val_metric"] for r in reports if r["length"] == 16)


@settings(max_examples=12)
@given(st.integers(1, 240))
def test_a_curriculum_stopped_at_any_step_resumes_as_the_run_uninterrupted(stop_at):
    """Stopped after any step, before or after a stage ends, the resumed run
    ends as the run uninterrupted: same stage, reports and parameters (each
    stage at its own learning rate)."""
    flags = CURRICULUM[:-6] + ["--steps", "240", "--eval-every", "5", "--lr", "0.02,0.01,0.005", "--dtype", "float64"]
    with tempfile.TemporaryDirectory() as folder, pytest.MonkeyPatch.context() as monkeypatch:
        whole, stopped = (os.path.join(folder, name) for name in ("whole.npz", "stopped.npz"))
        monkeypatch.setattr(machinery, "say", lambda line: None)
        assert machinery.main(flags + ["--save", whole, "--quiet"]) == 0
        signal_at(monkeypatch, [stop_at])
        assert machinery.main(flags + ["--save", stopped, "--quiet"]) == 128 + signal.SIGTERM
        monkeypatch.undo()
        monkeypatch.setattr(machinery, "say", lambda line: None)
        assert machinery.main(["--resume", stopped, "--quiet"]) == 0
        one, two = machinery.load_checkpoint(whole), machinery.load_checkpoint(stopped)
        assert one.progress == two.progress and one.progress["stage"] >= 1
        assert all(numpy.array_equal(one.params[k], two.params[k]) for k in one.params)


@pytest.mark.parametrize("flags, named", [
    (["--task", "adding", "--curriculum", "20,10"], "growing"),
    (["--task", "adding", "--curriculum", "10"], "two or more"),
    (["--task", "adding", "--curriculum", "10,x"], "10,x"),
    (["--task", "adding", "--curriculum", "10,20", "--length", "30"], "last length, 20"),
    (["--task", "psmnist", "--curriculum", "10,20"], "--curriculum is not used by the psmnist task"),
    (["--task", "adding", "--advance-at", "0.05"], "give --curriculum too"),
    (["--task", "adding", "--curriculum", "10,20", "--advance-at", "-1"], "--advance-at"),
    (["--task", "adding", "--curriculum", "10,20", "--lr", "0.1,0.2,0.3"], "3 rates for a run of 2 stages"),
    (["--task", "adding", "--lr", "0.1,0.2"], "2 rates for a run of 1 stage"),
    (["--task", "adding", "--curriculum", "10,20", "--lr", "0.1,-0.2"], "'0.1,-0.2' is not allowed"),
])
def test_bad_curricula_are_refused_in_one_line(flags, named, capsys):
    code, err, out = run_cli(flags, capsys)
    assert code == 2 and named in err and err.count("\n") == 1 and "step" not in out


@settings(max_examples=300)
@given(st.booleans(), st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 7)), min_size=1, max_size=3))
def test_a_checkpoint_with_flipped_bits_loads_whole_or_gives_one_clear_error(compress, flips):
    """Any few bit flips, in a stored or a compressed archive: load_checkpoint
    returns a checkpoint or raises RoaError, never another exception."""
    raw = bytearray(small_checkpoint(compress))
    for position, bit in flips:
        raw[position % len(raw)] ^= 1 << bit
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "flipped.npz")
        with open(path, "wb") as f:
            f.write(raw)
        try:
            machinery.load_checkpoint(path)
        except ag.RoaError:
            pass


SMALL_CHECKPOINTS = {}


def small_checkpoint(compress):
    """The bytes of a tiny run's checkpoint, stored or (as numpy.savez_compressed writes it) deflated."""
    if compress not in SMALL_CHECKPOINTS:
        with tempfile.TemporaryDirectory() as folder:
            path = os.path.join(folder, "small.npz")
            assert machinery.main(TINY[:-2] + ["--steps", "2", "--save", path, "--quiet"]) == 0
            if compress:
                arrays = machinery.read_arrays(path)
                numpy.savez_compressed(path, **arrays)
            with open(path, "rb") as f:
                SMALL_CHECKPOINTS[compress] = f.read()
    return SMALL_CHECKPOINTS[compress]


def test_a_checkpoint_that_would_inflate_past_memory_is_refused_before_reading(tmp_path, monkeypatch):
    path = tmp_path / "big.npz"
    path.write_bytes(small_checkpoint(True))
    monkeypatch.setattr(machinery, "memory_left", lambda xp: 1000)
    with pytest.raises(ag.RoaError, match="GB once read"):
        machinery.load_checkpoint(str(path))


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="needs 2 cores: --threads may not exceed the machine's")
def test_a_resume_with_another_thread_count_says_so(tmp_path, capsys):
    path = str(tmp_path / "run.npz")
    assert machinery.main(TINY + ["--save", path, "--threads", "1", "--quiet"]) == 0
    assert machinery.load_checkpoint(path).config["threads"] == 1
    capsys.readouterr()
    code, _, out = run_cli(["--resume", path, "--steps", "12", "--threads", "2"], capsys)
    assert code == 0 and "resuming with 2 BLAS threads where the run had 1" in out
    code, _, out = run_cli(["--resume", path, "--steps", "14", "--threads", "2"], capsys)
    assert code == 0 and "BLAS threads where" not in out


# ------------------------------------------- constants that fix every number

def test_the_held_out_sets_and_the_permutation_are_these_numbers():
    """The data every reported number was scored on: the first values of the
    adding problem's validation and test sets (T = 10), of the copying
    memory's symbols, and psMNIST's pixel order."""
    adding = tasks.Adding(10)
    assert adding.validation[0][:2, 0].tolist() == [[0.7687685677317451, 0.0], [0.3199266583422319, 0.0]]
    assert adding.validation[1][:2].ravel().tolist() == [1.3800228814519961, 0.08033197549627602]
    assert adding.test[0][:2, 0].tolist() == [[0.5821200225237724, 0.0], [0.45135609693623713, 0.0]]
    assert tasks.Copy(5).validation[0][:10, 0].argmax(-1).tolist() == [5, 5, 6, 5, 6, 4, 1, 2, 3, 5]
    assert tasks.pixel_permutation(0)[:8].tolist() == [318, 2, 606, 446, 758, 13, 98, 539]
    assert tasks.HELD_OUT == 1000


def test_the_mnist_tasks_constants(tmp_path):
    """10 classes; 5,000 validation images by default; deepmlp's pixels
    scaled by 1/255 into [0, 1]; the models' default seed is 0."""
    write_fake_mnist(tmp_path, 12, 6)
    deep = tasks.DeepMNIST(str(tmp_path), validation_size=4)
    assert deep.n_out == tasks.PsMNIST.n_out == 10
    images = numpy.array([[[0, 255, 51] + [0] * 25] * 28], dtype=numpy.uint8)
    assert deep.inputs(images)[0, :3].tolist() == [0.0, 1.0, 0.2]
    assert machinery.fill_defaults(machinery.parse_args(["--task", "psmnist"])).validation == 5000
    default, zero, one = (roa.RoaRNN(2, 1, 4, 1.0, 0.1, **seed) for seed in ({}, {"seed": 0}, {"seed": 1}))
    assert numpy.array_equal(default.params["W"], zero.params["W"])
    assert not numpy.array_equal(default.params["W"], one.params["W"])


@pytest.mark.parametrize("task, metric, epochs, solved", [
    (tasks.Adding(5), 0.01, None, False), (tasks.Adding(5), 0.00999, None, True),
    (tasks.Copy(5), 0.99, None, True), (tasks.Copy(5), 0.98999, None, False),
])
def test_verdicts_at_their_thresholds(task, metric, epochs, solved):
    assert task.solved(metric, epochs) == solved


def test_psmnist_verdicts_and_their_words(tmp_path):
    write_fake_mnist(tmp_path, 12, 6)
    ps = tasks.PsMNIST(str(tmp_path), validation_size=4)
    assert ps.solved(0.94, 1) and not ps.solved(0.9399, 1) and not ps.solved(0.97, 10) and ps.solved(0.98, 10)
    assert ps.criterion(1) == "test accuracy >= 94 %, the paper's claim after one epoch"
    assert ps.criterion(10) == "test accuracy >= 98 %, the paper's claim after 10 epochs"
    assert tasks.Adding(5).criterion() == "test MSE < 0.01" and tasks.Copy(5).criterion() == "recall accuracy >= 99 %"


def test_the_progress_numbers(monkeypatch):
    """The pace of a run resumed after step 100: the examples trained since
    then over the seconds since then, and the steps left at that pace."""
    now = [1000.0]
    monkeypatch.setattr(machinery, "time", types.SimpleNamespace(time=lambda: now[0]))
    progress = roa.Progress()
    progress.step = 100
    plan = roa.Plan(steps=250, batch=64, seed=0, eval_every=10, lr=0.1)
    hooks = machinery.RunHooks(tasks.Adding(5), plan, progress, print, None, None, None, None)
    now[0] += 100.0
    assert hooks.pace(200) == ({"examples_per_s": 64.0, "elapsed_s": 100.0}, "64 ex/s  elapsed 1:40  ETA 0:50")
    now[0] += 3500.0
    assert hooks.pace(249)[1] == "3 ex/s  elapsed 1:00:00  ETA 0:24"


def test_the_clock_and_short_lengths():
    assert [machinery.clock(s) for s in (0, 59, 61, 3599, 3600, 3661, 36000)] == \
        ["0:00", "0:59", "1:01", "59:59", "1:00:00", "1:01:01", "10:00:00"]
    assert machinery.main(["--task", "adding", "--length", "2", "--hidden", "4", "--steps", "2", "--quiet"]) == 0


def test_a_label_outside_0_to_9_is_refused(tmp_path, capsys):
    write_fake_mnist(tmp_path, 12, 6)
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(idx_bytes(numpy.array([1, 2, 10, 3, 4, 5])))
    code, err, _ = run_cli(["--task", "psmnist", "--steps", "1", "--data-dir", str(tmp_path)], capsys)
    assert code == 2 and "labels must be integers 0-9, got 10" in err


@pytest.mark.parametrize("width, cores, threads", [
    (1023, 8, 1), (1024, 8, 4), (1024, 3, 1), (1024, 4, 2), (1024, 5, 2), (1024, 6, 3), (1024, 7, 3),
    (4096, 16, 4), (64, 64, 1)])
def test_the_thread_rule_at_its_thresholds(width, cores, threads):
    chosen = machinery.auto_threads(width, cores)
    assert chosen == threads and type(chosen) is int          # (threadpoolctl takes an int)


def test_available_cores_reads_the_cgroup_cpu_quota(tmp_path):
    cores = len(os.sched_getaffinity(0))
    assert machinery.available_cores(str(tmp_path)) == cores                 # no quota files
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert machinery.available_cores(str(tmp_path)) == cores
    (tmp_path / "cpu.max").write_text("150000 100000\n")                    # 1.5 cores: 1
    assert machinery.available_cores(str(tmp_path)) == 1
    (tmp_path / "cpu.max").unlink()
    (tmp_path / "cpu").mkdir()
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("100000\n")
    (tmp_path / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert machinery.available_cores(str(tmp_path)) == 1
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")
    assert machinery.available_cores(str(tmp_path)) == cores


def test_the_memory_estimate_counts_adam_and_the_average_as_whole_copies():
    """Adam's two moments and the weight average are each a copy of the
    weights; evaluation's chunk is capped at EVAL_BYTES."""
    def need(*flags):
        args = machinery.fill_defaults(machinery.parse_args(["--task", "adding", "--length", "50", *flags]))
        return machinery.memory_needed(args, machinery.make_task(args, print))[0]
    weights = 64 * (64 + 2 + 1) * 4                                            # N (N + n_in + n_out), float32
    assert need() - need("--optimizer", "sgd") == 2 * weights
    assert need("--average-from", "0.5") - need() == weights
    args = machinery.fill_defaults(machinery.parse_args(["--task", "adding", "--length", "100000", "--batch", "1"]))
    task = machinery.make_task(args, print)
    held_out = 2 * tasks.HELD_OUT * 100000 * 2 * 8
    assert machinery.memory_needed(args, task)[0] <= held_out + 7 * weights + 2 * machinery.EVAL_BYTES + \
        machinery.kept_bytes(100000, 1, 64, "float32") + 100000 * 64 * 4


def test_a_checkpoint_whose_adam_second_moment_holds_exact_zeros_resumes(tmp_path):
    """A dead unit leaves v = 0 exactly: that is a valid state, not damage."""
    path = str(tmp_path / "run.npz")
    assert machinery.main(TINY + ["--save", path, "--quiet"]) == 0
    arrays = machinery.read_arrays(path)
    arrays["optim.v.W"][0] = 0.0
    numpy.savez(path, **arrays)
    assert machinery.main(["--resume", path, "--steps", "12", "--quiet"]) == 0


def test_each_curriculum_stage_trains_at_its_own_learning_rate(tmp_path, monkeypatch, capsys):
    """--lr 0.01,0.02,0.005 with --curriculum 4,8,16: every step at T = 4 is
    taken at 0.01, at T = 8 at 0.02, at T = 16 at 0.005; the progress lines
    say the new rate where a stage ends, and the checkpoint keeps the rates."""
    taken, train_step = [], roa.train_step

    def recording_step(model, task, optimizer, seed, step, batch):
        taken.append((task.T, optimizer.lr))
        return train_step(model, task, optimizer, seed, step, batch)
    monkeypatch.setattr(roa, "train_step", recording_step)
    path = str(tmp_path / "run.npz")
    flags = [f for f in CURRICULUM if f != "0.01"]
    flags[flags.index("--lr")] = "--lr=0.01,0.02,0.005"
    assert machinery.main(flags + ["--save", path]) == 0
    out = capsys.readouterr().out
    assert {T for T, _ in taken} == {4, 8, 16} and len(taken) == 900
    assert all(lr == {4: 0.01, 8: 0.02, 16: 0.005}[T] for T, lr in taken)
    assert "lr=0.01,0.02,0.005 (constant)" in out
    assert "; now T=8 at lr 0.02" in out and "; now T=16 at lr 0.005" in out
    assert machinery.load_checkpoint(path).config["lr"] == [0.01, 0.02, 0.005]


def test_a_curriculums_time_left_goes_by_the_pace_of_its_current_length(monkeypatch, capsys):
    """On a clock that moves T seconds in each training step at length T and
    stands still otherwise, every progress line of --curriculum 4,8,16 gives
    as its ETA T seconds for each step left, T being the line's length: the
    steps of a length just begun are not timed by the shorter ones before."""
    clock, train_step = [0.0], roa.train_step

    def timed_step(model, task, optimizer, seed, step, batch):
        clock[0] += task.T
        return train_step(model, task, optimizer, seed, step, batch)
    monkeypatch.setattr(roa, "train_step", timed_step)
    monkeypatch.setattr(machinery, "time", types.SimpleNamespace(time=lambda: clock[0]))
    assert machinery.main(CURRICULUM) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("step")]
    seen = set()
    for line in lines:
        step, T = map(int, re.match(r"step +(\d+)/900  \[T=(\d+),", line).groups())
        assert line.endswith(f"ETA {machinery.clock(T * (900 - step))}"), line
        seen.add(T)
    assert seen == {4, 8, 16}


def test_a_curriculum_that_never_reaches_its_last_length_says_so_and_what_it_tested(capsys):
    """20 steps do not solve T = 4: the test at T = 16 scores the last step's
    parameters, and the summary says that no report chose them."""
    flags = CURRICULUM[:]
    flags[flags.index("--steps") + 1] = "20"
    code, _, out = run_cli(flags, capsys)
    assert code == 0 and "the curriculum got no further than T=4" in out
    assert "parameters of step 20, the last step's: no validation report reached the curriculum's last length" \
        in final_line(out)


def test_a_curriculum_may_move_on_at_a_metric_of_its_own(tmp_path, capsys):
    """--advance-at 0.05: a stage ends at the first report whose validation
    MSE is below 0.05, solved or not; the flag is kept by the checkpoint."""
    path, log = str(tmp_path / "run.npz"), str(tmp_path / "run.jsonl")
    assert machinery.main(CURRICULUM + ["--advance-at", "0.05", "--save", path, "--metrics", log]) == 0
    out = capsys.readouterr().out
    reports = [report for report in map(json.loads, open(log)) if "step" in report]
    ends = [(before, after) for before, after in zip(reports, reports[1:]) if after["length"] != before["length"]]
    assert len(ends) == 2 and "(curriculum 4,8,16, on at 0.05)" in out
    for before, after in ends:
        assert before["val_metric"] < 0.05 and f"reached 0.05 at step {before['step']}" in out
    for report in reports:
        assert report["length"] == 16 or report in [b for b, _ in ends] or report["val_metric"] >= 0.05
    assert machinery.load_checkpoint(path).config["advance_at"] == 0.05


def test_mutants_scores_nothing_when_the_unchanged_tests_time_out():
    """docs/mutants.py runs the unchanged suite first: cut by the timeout, it
    scores no mutant (a cut run would count as a kill) and says so in one line."""
    run = subprocess.run([sys.executable, os.path.join(ROOT, "docs", "mutants.py"), "tasks.py", "--sample", "3",
                          "--timeout", "0.001"], capture_output=True, text=True)
    assert run.returncode == 2 and run.stdout == ""
    assert run.stderr == ("mutants.py: the unchanged tests timed out (--timeout 0.001 s): no mutant can be scored; "
                          "fix the tests or give a longer --timeout\n")


def test_mutants_change_one_code_token_at_a_time_and_leave_text_alone(tmp_path):
    """docs/mutants.py: operators, numbers and names of the code are changed,
    one per mutant; docstrings and comments never."""
    sys.path.insert(0, os.path.join(ROOT, "docs"))
    import mutants
    path = tmp_path / "m.py"
    path.write_text('def f(a, b):\n    """a + b < 1"""\n    return a + b < 1.5 and True  # a - b\n')
    found = mutants.mutants(str(path))
    assert [(line, old, new) for line, _, old, new in found] == [
        (3, "+", "-"), (3, "<", "<="), (3, "1.5", "3.0"), (3, "and", "or"), (3, "True", "False")]
    lines = path.read_text().splitlines(keepends=True)
    assert mutants.apply(lines, found[1]).splitlines()[2] == "    return a + b <= 1.5 and True  # a - b"
    assert mutants.apply(lines, found[2]).splitlines()[1] == '    """a + b < 1"""'
    assert mutants.next_number("0x10") == "17" and mutants.next_number("1e-3") == "0.002"
    assert mutants.next_number("0.0") == "1.0"


# ------------------------------------------- the last ways a run ended without a word

def test_a_stop_while_the_test_set_is_scored_says_the_run_is_finished_and_saved(tmp_path, monkeypatch, capsys):
    """SIGTERM after the last step, while the test set is scored: one line
    saying the run is finished and saved and how to score it, exit 143;
    the checkpoint holds the whole run."""
    path, evaluate = str(tmp_path / "run.npz"), roa.evaluate_params

    def scored_then_stopped(model, params, task, data):
        if data is task.test:
            os.kill(os.getpid(), signal.SIGTERM)
        return evaluate(model, params, task, data)
    monkeypatch.setattr(roa, "evaluate_params", scored_then_stopped)
    code, err, out = run_cli(TINY + ["--save", path, "--quiet"], capsys)
    assert code == 128 + signal.SIGTERM and out == "" and err == (
        f"roa.py: stopped by SIGTERM while the test set was scored, after the run's last step 10: the run is "
        f"finished and saved in {path}; score it with: python roa.py --resume {path}\n")
    assert saved_params(path)[0] == 10


@pytest.mark.parametrize("flags", [["--task", "copy", "--curriculum", "5,10", "--advance-at", "5"],
                                   ["--task", "adding", "--curriculum", "5,10", "--advance-at", "0"]])
def test_an_advance_at_the_metric_can_never_reach_is_refused_before_training(flags, capsys):
    code, err, out = run_cli(flags + ["--hidden", "4", "--steps", "3"], capsys)
    assert code == 2 and err.count("\n") == 1 and "can never be reached" in err and "step" not in out


def test_a_shortened_resume_starts_the_weight_average_by_its_new_plan(tmp_path, monkeypatch, capsys):
    """A 60-step run averaging from 0.9 (step 54), stopped at step 25 and
    resumed with --steps 40, averages from step 36 as a 40-step run does,
    and ends as that run."""
    flags = TINY[:-2] + ["--dtype", "float64", "--eval-every", "2", "--average-from", "0.9", "--quiet"]
    assert machinery.main(flags + ["--steps", "40"]) == 0
    expected = final_line(capsys.readouterr().out)
    path = str(tmp_path / "run.npz")
    signal_at(monkeypatch, [25])
    assert machinery.main(flags + ["--steps", "60", "--save", path]) == 128 + signal.SIGTERM
    monkeypatch.undo()
    capsys.readouterr()
    assert machinery.main(["--resume", path, "--steps", "40", "--quiet"]) == 0
    assert final_line(capsys.readouterr().out) == expected
    assert machinery.load_checkpoint(path).average["start"] == 36


def test_a_resume_whose_data_folder_is_gone_says_so_and_names_the_datas_sha256(tmp_path, capsys):
    data = tmp_path / "mnist"
    data.mkdir()
    write_fake_mnist(data, 40, 10)
    path = str(tmp_path / "run.npz")
    assert machinery.main(["--task", "psmnist", "--hidden", "4", "--steps", "2", "--validation", "8",
                           "--data-dir", str(data), "--save", path, "--quiet"]) == 0
    sha = machinery.load_checkpoint(path).config["data_sha256"]
    shutil.rmtree(data)
    code, err, _ = run_cli(["--resume", path, "--steps", "3"], capsys)
    assert code == 2 and err.count("\n") == 1 and f"{data}, which is gone" in err and sha in err
    assert "--data-dir" in err and "--init" in err and "leave --data-dir out" not in err


def test_a_checkpoint_whose_filters_differ_names_the_version_that_made_it(tmp_path, capsys):
    """Filters O that the seed does not draw: a checkpoint without a format
    version was made before the random-stream keys (or is damaged); one
    with it is damaged; a format from a newer roa.py is refused by name."""
    path = str(tmp_path / "run.npz")
    assert machinery.main(TINY + ["--save", path, "--quiet"]) == 0
    arrays = machinery.read_arrays(path)
    config = json.loads(str(arrays["config"]))
    assert config["format"] == machinery.CHECKPOINT_FORMAT == 2
    arrays["filters"] = arrays["filters"] + 1.0
    for changed, named in [({k: v for k, v in config.items() if k != "format"}, "6a5d033"),
                           (config, "it is damaged"), (dict(config, format=3), "format 3, by a newer roa.py")]:
        numpy.savez(path, **dict(arrays, config=numpy.array(json.dumps(changed))))
        for load in (lambda: machinery.load_model(path), lambda: machinery.run(
                machinery.parse_args(["--resume", path, "--steps", "12"]), log=lambda line: None)):
            with pytest.raises(ag.RoaError, match=re.escape(named)):
                load()


def test_a_file_size_limit_below_the_checkpoint_is_refused_before_training(tmp_path):
    path = tmp_path / "run.npz"
    limit = lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (8192, resource.RLIM_INFINITY))    # noqa: E731
    run = subprocess.run([sys.executable, os.path.join(ROOT, "roa.py"), "--task", "adding", "--length", "6",
                          "--steps", "3", "--save", str(path)], capture_output=True, text=True, preexec_fn=limit)
    assert run.returncode == 2 and run.stderr.count("\n") == 1 and "ulimit -f" in run.stderr
    assert "step" not in run.stdout and not path.exists()


def test_a_run_whose_stdout_cannot_be_written_says_so_once_on_stderr_and_saves(tmp_path):
    path = tmp_path / "run.npz"
    with open("/dev/full", "w") as full:
        run = subprocess.run([sys.executable, os.path.join(ROOT, "roa.py"), *TINY, "--save", str(path)],
                             stdout=full, stderr=subprocess.PIPE, text=True)
    assert run.returncode == 0 and run.stderr.count("\n") == 1 and "stdout cannot be written" in run.stderr
    assert machinery.load_checkpoint(str(path)).step == 10


def test_huge_inputs_are_named_as_the_data_and_a_run_that_saved_nothing_says_so(tmp_path, monkeypatch, capsys):
    """Inputs of 1e30 overflow the loss: the line blames the data, not the
    gradient; with --save but no checkpoint made yet, it says nothing was saved."""
    draw = tasks.Adding.train_batch
    monkeypatch.setattr(tasks.Adding, "train_batch", lambda self, seed, step, B: (
        lambda u, y: (u * 1e30, y))(*draw(self, seed, step, B)))
    code, err, _ = run_cli(TINY + ["--activation", "relu", "--save", str(tmp_path / "run.npz"), "--quiet"], capsys)
    assert code == 2 and err.count("\n") == 1 and "inputs as large as 1.0e+30: check the data" in err
    assert "nothing was saved" in err and "--clip" not in err and not (tmp_path / "run.npz").exists()


@pytest.mark.parametrize("script, argv, named", [
    ("figures.py", ["--curves", "{log}"], "line 1 of"),
    ("study.py", ["adding", "--jobs", "0"], "--jobs: '0' is not allowed"),
    ("study.py", ["adding", "--state-norm", "--lengths", "0"], "--lengths: '0' is not allowed"),
    ("study.py", ["psmnist", "--only", "relu"], "--only 'relu' is not a lever of the psmnist study"),
    ("study.py", ["psmnist", "--lengths", "100"], "the psmnist study has no --lengths or --steps"),
    ("mutants.py", ["nonexistent.py"], "no such file in the repository: nonexistent.py"),
])
def test_the_docs_scripts_answer_bad_arguments_in_one_line(script, argv, named, tmp_path):
    log = tmp_path / "x.jsonl"
    log.write_text('{"a": 1}\n')
    run = subprocess.run([sys.executable, os.path.join(ROOT, "docs", script),
                          *[arg.format(log=log) for arg in argv]], capture_output=True, text=True)
    assert run.returncode != 0 and run.stderr.count("\n") == 1 and named in run.stderr, run.stderr


def test_a_validation_metric_of_nan_is_never_the_best_report(tmp_path, capsys):
    """Parameters grown past float32's range in one step (ReLU, lr 1e30)
    validate to NaN: that report is not kept as the best, so every
    checkpoint saved on the way loads again."""
    path = tmp_path / "run.npz"
    code, err, _ = run_cli(TINY + ["--activation", "relu", "--beta", "0.1333", "--lr", "1e30", "--save", str(path),
                                   "--save-every", "1", "--quiet"], capsys)
    assert code == 2 and "training stopped at step" in err
    checkpoint = machinery.load_checkpoint(str(path))
    assert checkpoint.progress["best_metric"] is None and checkpoint.best == {}


def test_the_default_mnist_folder_holds_only_the_releases_files(tmp_path):
    """In the default folder (fetch=True) files that are not the release's,
    by SHA-256, are refused in one line naming the file and --data-dir; the
    same files pass with --data-dir (fetch=False)."""
    write_fake_mnist(tmp_path, 12, 6)
    with pytest.raises(ag.RoaError, match="is not the MNIST release's file .*--data-dir"):
        tasks.load_mnist(str(tmp_path), fetch=True)
    assert len(tasks.load_mnist(str(tmp_path))[0]) == 12


@pytest.mark.parametrize("flags, beta", [([], 0.1333), (["--length", "1000"], 0.02), (["--length", "7"], 2.857),
                                         (["--curriculum", "100,400"], 0.05), (["--beta", "0.3"], 0.3)])
def test_the_adding_presets_beta_is_20_over_the_length(flags, beta):
    """The adding preset's beta is 20 / T, to 4 digits (0.1333 at T = 150,
    the value the study chose), unless --beta is given."""
    args = machinery.fill_defaults(machinery.parse_args(["--task", "adding", *flags]))
    assert args.beta == beta and isinstance(args.beta, float)


# ------------------------------------------------ inputs exactly at their limits

@pytest.mark.parametrize("curriculum, allowed", [("2,10", True), ("10,10", False), ("1,10", False),
                                                 ("10,2", False), ("5", False)])
def test_a_curriculum_of_growing_lengths_from_2(curriculum, allowed, capsys):
    code, err, _ = run_cli(["--task", "adding", "--curriculum", curriculum, "--hidden", "4", "--steps", "2",
                            "--quiet"], capsys)
    assert (code == 0) == allowed and (allowed or "two or more lengths >= 2, growing" in err), err


@pytest.mark.parametrize("flags, named", [
    (["--validation", "0"], "it must be an integer >= 1"), (["--validation", "1"], None),
    (["--validation", "39", "--batch", "1"], None), (["--validation", "40"], "validation size must be in 1 .. 39"),
    (["--validation", "8", "--batch", "32"], None),
    (["--validation", "8", "--batch", "33"], "a batch of 33 is more than the 32 training images")])
def test_mnist_validation_and_batch_sizes_at_their_limits(flags, named, tmp_path, capsys):
    write_fake_mnist(tmp_path, 40, 10)
    code, err, _ = run_cli(["--task", "psmnist", "--hidden", "4", "--steps", "1", "--data-dir", str(tmp_path),
                            "--quiet", *flags], capsys)
    assert (code == 0 and err == "") if named is None else (code == 2 and named in err), err


def test_an_idx_file_whose_first_byte_is_not_0_is_refused():
    raw = idx_bytes(numpy.array([1, 2, 3]))
    assert list(tasks.parse_idx(raw, "x")) == [1, 2, 3]
    with pytest.raises(ag.RoaError, match="not an IDX file"):
        tasks.parse_idx(b"\x01" + raw[1:], "x")


def edited_checkpoint(path, **changes):
    """Rewrite the checkpoint at path with some arrays changed (None: removed)."""
    arrays = machinery.read_arrays(path)
    for name, value in changes.items():
        if value is None:
            arrays.pop(name)
        else:
            arrays[name] = value
    numpy.savez(path, **arrays)


def test_checkpoint_edge_cases_resume_or_are_refused_by_name(tmp_path, capsys):
    """An Adam step count of 0 and a progress record without its stage
    resume; a weight average of count 1 whose mean has the wrong shape, and
    a curriculum stage that does not exist, are refused in one line; the
    resume of a finished run with its own --steps scores it again."""
    path = str(tmp_path / "run.npz")
    assert machinery.main(TINY + ["--save", path, "--average-from", "0.5", "--eval-every", "5", "--quiet"]) == 0
    expected = final_line(capsys.readouterr().out)
    assert machinery.main(["--resume", path, "--steps", "10", "--quiet"]) == 0
    assert final_line(capsys.readouterr().out) == expected
    progress = json.loads(str(machinery.read_arrays(path)["progress"]))
    edited_checkpoint(path, **{"optim.t": numpy.array(0),
                               "progress": numpy.array(json.dumps({k: v for k, v in progress.items() if k != "stage"}))})
    assert machinery.main(["--resume", path, "--steps", "11", "--quiet"]) == 0
    good = machinery.read_arrays(path)
    edited_checkpoint(path, **{"average.count": numpy.array(1), "average.mean.W": numpy.zeros((3, 3))})
    code, err, _ = run_cli(["--resume", path, "--steps", "12"], capsys)
    assert code == 2 and err.count("\n") == 1 and "weight average of W" in err
    numpy.savez(path, **dict(good, progress=numpy.array(json.dumps(dict(progress, stage=3)))))
    code, err, _ = run_cli(["--resume", path, "--steps", "12"], capsys)
    assert code == 2 and err.count("\n") == 1 and "its curriculum stage 4 does not exist (the run has 1)" in err


def test_the_test_result_is_printed_before_a_failed_last_save_is_reported(tmp_path, monkeypatch, capsys):
    """Every place to save refused at the end: the finished run's test
    result is printed first, then one line says the save failed, exit 2."""
    path = str(tmp_path / "run.npz")
    monkeypatch.setattr(machinery, "write_whole", lambda where, write: (_ for _ in ()).throw(OSError(28, "full")))
    code, err, out = run_cli(TINY + ["--save", path], capsys)
    assert code == 2 and "test MSE" in final_line(out) and "saved" not in final_line(out)
    assert err.count("\n") == 1 and "could not save the checkpoint" in err


def test_an_address_space_limit_counts_as_memory_left(tmp_path):
    """Under `ulimit -v`, a run that would not fit is refused before any work
    in one line, as under a cgroup limit, and a checkpoint that would
    inflate past the limit is refused by name, not by a MemoryError."""
    path = str(tmp_path / "big.npz")
    numpy.savez_compressed(path, config=numpy.array("{}"), step=numpy.array(0), filters=numpy.zeros(4),
                           **{"param.W": numpy.zeros((5000, 100000), numpy.float32)})       # 2 GB, a few MB zipped
    limit = lambda: resource.setrlimit(resource.RLIMIT_AS, (1536 * 2**20, resource.RLIM_INFINITY))    # noqa: E731
    for flags, named in [(["--task", "adding", "--length", "20000", "--steps", "1"], "this run needs about"),
                         (["--resume", path], "would take 2.0 GB once read")]:
        run = subprocess.run([sys.executable, os.path.join(ROOT, "roa.py"), *flags], capture_output=True, text=True,
                             preexec_fn=limit)
        assert run.returncode == 2 and run.stderr.count("\n") == 1 and named in run.stderr, run.stderr


def test_a_warmup_flag_sets_the_rate_of_the_first_steps(monkeypatch):
    """--warmup 4 --lr 0.01: steps 1-4 take 0.0025, 0.005, 0.0075, 0.01; later steps 0.01."""
    taken, train_step = [], roa.train_step

    def recording_step(model, task, optimizer, seed, step, batch):
        taken.append(optimizer.lr)
        return train_step(model, task, optimizer, seed, step, batch)
    monkeypatch.setattr(roa, "train_step", recording_step)
    assert machinery.main(TINY[:-2] + ["--steps", "6", "--lr", "0.01", "--warmup", "4", "--quiet"]) == 0
    assert numpy.allclose(taken, [0.0025, 0.005, 0.0075, 0.01, 0.01, 0.01], rtol=0, atol=1e-15)


def test_standardize_is_an_mnist_flag_kept_by_the_checkpoint(tmp_path, capsys):
    write_fake_mnist(tmp_path, 40, 10)
    path = str(tmp_path / "run.npz")
    flags = ["--task", "psmnist", "--hidden", "4", "--steps", "2", "--validation", "8", "--data-dir", str(tmp_path)]
    assert machinery.main(flags + ["--standardize", "--save", path, "--quiet"]) == 0
    config = machinery.load_checkpoint(path).config
    assert config["standardize"] is True and 0 < config["pixel_mean"] < 1 and 0 < config["pixel_std"] < 1
    other = str(tmp_path / "other.npz")
    assert machinery.main(flags + ["--init", path, "--save", other, "--quiet"]) == 0      # carried over, unasked
    assert machinery.load_checkpoint(other).config["standardize"] is True
    code, err, _ = run_cli(TINY + ["--standardize"], capsys)
    assert code == 2 and "--standardize is not used by the adding task" in err


def write_log(path, metrics, elapsed=60.0, every=100):
    """A study run's metrics log: one validation report per metric, then the test line."""
    with open(path, "w") as f:
        f.writelines(json.dumps({"step": every * (i + 1), "val_metric": m, "elapsed_s": elapsed}) + "\n"
                     for i, m in enumerate(metrics))
        f.write(json.dumps({"test_loss": 0.0, "test_metric": 0.0, "chosen_step": every * len(metrics)}) + "\n")


def test_the_adding_studys_table_reads_validation_reports_only(tmp_path, monkeypatch, capsys):
    """docs/study.py counts, per lever, the seeds whose validation MSE fell
    below 0.05 (escaped) and 0.01 (solved), from logs that end in the run's
    test line, which it does not read; a log without its test line is not
    counted (the run was cut short)."""
    sys.path.insert(0, os.path.join(ROOT, "docs"))
    import study
    monkeypatch.setattr(study, "log_path", lambda task, lever, T, seed, ext="jsonl": str(tmp_path / f"{seed}.{ext}"))
    for seed in range(5):
        write_log(study.log_path("adding", "base", 10, seed),
                  [0.17, 0.04 if seed < 3 else 0.16, 0.005 if seed < 2 else 0.15], elapsed=60.0 * (seed + 1))
    with open(study.log_path("adding", "base", 10, 4), "a") as f:
        f.write(json.dumps({"step": 400, "val_metric": 0.001, "elapsed_s": 1.0}) + "\n")    # resumed, cut short
    assert study.wall_time([{"elapsed_s": 10}, {"elapsed_s": 20}, {"elapsed_s": 5}, {"elapsed_s": 7}]) == 27
    study.table("adding", ["base"], [10], 300)
    row = capsys.readouterr().out.splitlines()[-1]
    assert row.endswith("| 10 | 4 | 3 / 4 | 200 | 2 / 4 | 300 | 0.0225 (0.0050-0.1500) | 0.0775 (0.0050-0.1500) "
                        "| 0:02:30 |"), row


def test_the_copy_study_counts_falls_from_the_best_report_before_them(tmp_path, monkeypatch, capsys):
    """A fall starts at a report 20 points or more below the best before it
    and counts once, until a new best; psMNIST's table has no marks and no length."""
    sys.path.insert(0, os.path.join(ROOT, "docs"))
    import study
    monkeypatch.setattr(study, "log_path", lambda task, lever, T, seed, ext="jsonl": str(tmp_path / f"{task}{seed}.{ext}"))
    for seed in range(5):
        write_log(study.log_path("copy", "base", 10, seed), [0.64, 0.26, 0.30, 0.78, 0.59, 0.02, 0.995][:7 - seed])
    study.table("copy", ["base"], [10], None)
    row = capsys.readouterr().out.splitlines()[-1]      # falls: seeds 0 and 1: 2 each, seeds 2-4: 1 each
    assert "| 10 | 5 | 1 / 5 | 700 | 7 | 0.7800 (0.6400-0.9950) | 0.5900 (0.0200-0.9950) |" in row, row
    for seed in range(2):
        write_log(study.log_path("psmnist", "base", None, seed), [0.95, 0.97 + seed / 100])
    study.table("psmnist", ["base"], [None], None)
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "| lever | runs | best val | last val | median wall time |" and out[1].count("---") == 5
    assert out[-1].endswith("average 0.5 | 2 | 0.9750 (0.9700-0.9800) | 0.9750 (0.9700-0.9800) | 0:01:00 |")


def test_a_report_line_names_its_stage_and_that_stages_baseline():
    """The copying baseline depends on T: a curriculum's report line gives the
    baseline of the length it validated, and a one-length report (no stage
    entry) that of its task."""
    model = roa.RoaRNN(10, 9, 4, 1.0, 0.1, readout="every")
    plan = roa.Plan(steps=100, batch=2, seed=0, eval_every=10, lr=1e-3)
    report = dict(step=10, loss=0.5, val_loss=0.4, val_metric=0.2, first_state_grad_norm=0.1, averaged=0)
    curriculum = tasks.Curriculum([tasks.Copy(5), tasks.Copy(10), tasks.Copy(30)])
    line = roa.report_line({**report, "stage": 2, "length": 10}, model, curriculum, plan)
    assert " [T=10, stage 2/3]  loss 0.5000" in line and f"(baseline {10 * math.log(8) / 30:.3f})" in line
    line = roa.report_line({**report, "stage": 1, "length": 5}, model, curriculum, plan)
    assert "[T=5, stage 1/3]" in line and f"(baseline {10 * math.log(8) / 25:.3f})" in line
    line = roa.report_line(report, model, tasks.Copy(30), plan)
    assert line.startswith("step  10/100  loss 0.5000")
    assert f"(baseline {10 * math.log(8) / 50:.3f})" in line and "|dL/dh_0| 1.00e-01" in line


def test_training_step_s_draws_its_batch_and_its_noise_from_the_streams_of_index_s_minus_1():
    """Step s (counted from 1) takes the "batch" and "dropout" streams of index
    s - 1 (the training step counted from 0, as tasks.random_stream says): a
    run and any resume of it draw the same numbers."""
    task, seed = tasks.Adding(5), 7
    model = roa.RoaRNN(2, 1, 4, 1.0, 0.1, dtype="float64", dropout=0.5, input_noise=0.1)
    seen = {}

    def forward(u, rng):
        seen["u"], seen["draws"] = u.copy(), copy.deepcopy(rng).random(4)
        return type(model).forward(model, u, rng)

    model.forward = forward
    roa.train_step(model, task, ag.Adam(1e-3), seed, 3, 2)
    assert numpy.array_equal(seen["draws"], tasks.random_stream(seed, "dropout", 2).random(4))
    assert numpy.array_equal(seen["u"], task.train_batch(seed, 2, 2)[0])


@pytest.mark.parametrize("largest, decay, lr, cause", [
    (1.5e6, 0.1, 2e-3, "the parameters have grown to 1.5e+06 at learning rate 0.002: lower --lr"),
    (0.9e6, 0.1, 2e-3, "lower --beta or --lr, or use --dtype float64"),
    (0.9e6, 500.0, 2e-3, "--weight-decay 500 at learning rate 0.002 flips the parameters' sign every step"),
    (0.9e6, 499.0, 2e-3, "lower --beta or --lr, or use --dtype float64"),
])
def test_an_infinite_loss_is_explained_by_the_branch_its_numbers_reach(largest, decay, lr, cause):
    """non_finite_cause at each branch's threshold: parameters above 1e6 have
    grown; weight decay is blamed only where lr times it reaches 1."""
    model = roa.RoaRNN(2, 1, 4, 1.0, 0.1, dtype="float64")
    model.params["W"][0, 0] = largest
    u = numpy.ones((3, 2, 2))
    assert cause in machinery.non_finite_cause(model, u, float("inf"), None, ag.Adam(lr, weight_decay=decay))


def test_a_ctrl_c_outside_training_ends_in_one_line_and_exit_130(tmp_path, monkeypatch, capsys):
    """A KeyboardInterrupt before training (while the data load, say) is the
    shell's 128 + SIGINT, with one line, and touches no checkpoint."""
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(machinery, "make_model", interrupted)
    code, err, _ = run_cli(TINY + ["--save", str(tmp_path / "run.npz")], capsys)
    assert code == 130 == 128 + signal.SIGINT and err.count("\n") == 1
    assert "interrupted outside training; the last checkpoint saved, if any, is as it was" in err
    assert not (tmp_path / "run.npz").exists()


def test_mutants_removes_its_copy_of_the_repository_when_stopped(tmp_path):
    """SIGTERM to docs/mutants.py while it works: exit 143, and the copy it
    made under the temporary folder is gone."""
    run = subprocess.Popen([sys.executable, os.path.join(ROOT, "docs", "mutants.py"), "tasks.py", "--sample", "1"],
                           env={**os.environ, "TMPDIR": str(tmp_path)}, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
    for _ in range(600):                            # until the copy's tests have started
        copies = list(tmp_path.glob("roa-mutants-*"))
        if copies and (copies[0] / ".mutants-coveragerc").exists():
            break
        time.sleep(0.05)
    run.send_signal(signal.SIGTERM)
    assert run.wait(timeout=60) == 143 and copies and not list(tmp_path.glob("roa-mutants-*"))
