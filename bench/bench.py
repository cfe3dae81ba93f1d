"""bench/bench.py -- how fast is roa, against what the machine allows.

    python bench/bench.py                  # all configurations (the 50k-layer ones take minutes)
    python bench/bench.py --only psmnist   # one of the CONFIGS below
    python bench/bench.py --threads 2      # BLAS threads (default: what roa.py's --threads auto picks)
    python bench/bench.py --device gpu     # the same on CuPy

Training configurations: the median time of a training step (forward,
loss, backward, Adam or SGD update, the NaN/Inf check of the parameters and
optimiser state that training makes) after warm-up, the GFLOP/s of its
matrix products, that rate as a fraction of the float32 matrix-product
peak measured in this run by one large product at the same thread count,
the peak memory of one step against the floor set by the activations kept
for backprop, and the step's time again while one other CPU-bound process
(started and stopped by the benchmark) holds a core.
Evaluation configurations: held-out examples per second through roa.py's
evaluate (the inference forward, in its chunks).
"""

import argparse
import os
import statistics
import subprocess
import sys
import time
import tracemalloc

import numpy
from threadpoolctl import threadpool_info, threadpool_limits

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from autograd import Adam, SGD, array_module, free_memory, mse_loss, softmax_cross_entropy  # noqa: E402
from machinery import auto_threads, available_cores, kept_bytes  # noqa: E402
from roa import RoaFNN, RoaRNN, all_finite, evaluate  # noqa: E402
from tasks import Task, accuracy  # noqa: E402

CONFIGS = {
    # name: (model kind, sizes, optimizer, repeats); B is the batch of a training step
    "psmnist": ("rnn", dict(T=784, B=64, N=128, n_in=1, n_out=10), "adam", 7),
    "psmnist256": ("rnn", dict(T=784, B=32, N=256, n_in=1, n_out=10), "adam", 5),
    "psmnist512": ("rnn", dict(T=784, B=32, N=512, n_in=1, n_out=10), "adam", 3),
    "adding1000": ("rnn", dict(T=1000, B=64, N=64, n_in=2, n_out=1), "adam", 7),
    "adding10000": ("rnn", dict(T=10000, B=64, N=64, n_in=2, n_out=1), "adam", 3),
    "deep50k": ("fnn", dict(L=50000, B=64, N=64, n_in=784, n_out=10), "sgd", 3),
    # evaluation: B held-out examples through evaluate(), once
    "eval-psmnist256": ("rnn-eval", dict(T=784, B=5000, N=256, n_in=1, n_out=10), None, 1),
    "eval-deep50k": ("fnn-eval", dict(L=50000, B=10000, N=64, n_in=784, n_out=10), None, 1),
}


class Classification(Task):
    """A stand-in for a classification task's held-out set: what evaluate() reads."""

    def __init__(self, u_axis):
        self.u_axis, self.y_axis = u_axis, 0

    def loss(self, z, y):
        return softmax_cross_entropy(z, y)

    def metric(self, z, y):
        return accuracy(z, y)


class BusyCore:
    """One other CPU-bound process for the while, as another user's job would be."""

    def __enter__(self):
        self.process = subprocess.Popen([sys.executable, "-c", "while True: pass"])
        time.sleep(0.5)
        return self

    def __exit__(self, *exc):
        self.process.kill()
        self.process.wait()


def rnn_flops(T, B, N, n_in, n_out):
    """Matrix-product FLOPs of one roaRNN training step (2 per multiply-add):
    forward W h and O h at every step plus U u for all steps; backward O^T g
    and W^T dz at every step, then dW and dU over all steps; the readout."""
    return 2 * T * B * (2 * N * N + N * n_in) + 2 * T * B * (2 * N * N) + 2 * T * B * (N * N + N * n_in) \
        + 3 * 2 * B * N * n_out


def fnn_flops(L, B, N, n_in, n_out):
    """The same for the roaFNN: W x and O x per layer forward, O^T delta and
    W^T dy backward, dW per layer; input projection and readout (x3: forward,
    input gradient, weight gradient)."""
    return 2 * L * B * (2 * N * N) + 2 * L * B * (2 * N * N) + 2 * L * B * N * N + 3 * 2 * B * N * (n_in + n_out)


def matmul_peak(xp, seconds=2.0, n=2048):
    """GFLOP/s of the best of repeated n x n float32 products."""
    a = xp.asarray(numpy.random.default_rng(0).standard_normal((n, n)), dtype=xp.float32)
    best, end = float("inf"), time.time() + seconds
    while time.time() < end:
        tick = time.perf_counter()
        c = a @ a
        float(c[0, 0])                                      # waits for a GPU, too
        best = min(best, time.perf_counter() - tick)
    return 2 * n ** 3 / best / 1e9


def median_time(step, repeats):
    """The median time of `repeats` calls of step(), after one to warm up."""
    step()
    times = []
    for _ in range(repeats):
        tick = time.perf_counter()
        step()
        times.append(time.perf_counter() - tick)
    return statistics.median(times)


def build(kind, s, device):
    if kind.startswith("rnn"):
        return RoaRNN(s["n_in"], s["n_out"], s["N"], 1.0, 0.1, dtype="float32", device=device)
    return RoaFNN(s["n_in"], s["n_out"], s["N"], s["L"], 1.0, 0.005, dtype="float32", device=device)


def bench_evaluation(name, device):
    kind, s, _, _ = CONFIGS[name]
    model = build(kind, s, device)
    rng = numpy.random.default_rng(0)
    shape = (s["T"], s["B"], s["n_in"]) if kind == "rnn-eval" else (s["B"], s["n_in"])
    data = (rng.standard_normal(shape), rng.integers(0, s["n_out"], s["B"]))
    tick = time.perf_counter()
    evaluate(model, Classification(u_axis=1 if kind == "rnn-eval" else 0), data)
    seconds = time.perf_counter() - tick
    print(f"{name:16s} {s['B']:,} held-out examples in {seconds:7.1f} s = {s['B'] / seconds:9.1f} examples/s",
          flush=True)


def bench(name, xp, device, peak):
    kind, s, optimizer_name, repeats = CONFIGS[name]
    if kind.endswith("eval"):
        return bench_evaluation(name, device)
    rng = numpy.random.default_rng(0)
    model = build(kind, s, device)
    if kind == "rnn":
        u = xp.asarray(rng.standard_normal((s["T"], s["B"], s["n_in"])), dtype=xp.float32)
        flops = rnn_flops(**s)
    else:
        u = xp.asarray(rng.standard_normal((s["B"], s["n_in"])), dtype=xp.float32)
        flops = fnn_flops(**s)
    unrolled = s["T"] if kind == "rnn" else s["L"]
    floor = kept_bytes(unrolled, s["B"], s["N"], "float32")  # the states and phi' kept for backprop
    y = xp.asarray(rng.integers(0, s["n_out"], s["B"]))
    loss_fn = softmax_cross_entropy if s["n_out"] > 1 else mse_loss
    if loss_fn is mse_loss:
        y = xp.asarray(rng.standard_normal((s["B"], 1)), dtype=xp.float32)
    optimizer = Adam(1e-4) if optimizer_name == "adam" else SGD(1e-4)

    def finite_check():                                     # as training checks every step (waits for a GPU too)
        moments = [a for a in optimizer.state().values() if not numpy.isscalar(a)]
        all_finite(model.xp, [*model.params.values(), *moments])

    def step():
        z, cache = model.forward(u)
        _, dz = loss_fn(z, y)
        optimizer.step(model.params, model.backward(dz, cache)[0])
        finite_check()

    median = median_time(step, repeats)
    check = median_time(finite_check, repeats)
    with BusyCore():
        busy = median_time(step, repeats)
    tracemalloc.start()                                     # one more step for the memory: tracing
    step()                                                  # slows every allocation, so not timed
    peak_bytes = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    rate = flops / median / 1e9
    memory = (f"peak memory {peak_bytes / 1e6:,.0f} MB = {peak_bytes / floor:.2f} x the kept-activation "
              f"floor {floor / 1e6:,.0f} MB" if xp is numpy else "peak memory: not traced on the GPU")
    print(f"{name:16s} step {median * 1e3:9.1f} ms (median of {repeats})  {flops / 1e9:7.2f} GFLOP  "
          f"{rate:7.1f} GFLOP/s = {rate / peak:5.1%} of peak  {memory}; with a busy core "
          f"{busy * 1e3:.1f} ms ({busy / median:.2f}x); of the step, the NaN/Inf check {check * 1e3:.1f} ms",
          flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", choices=sorted(CONFIGS), action="append", help="run only this configuration")
    p.add_argument("--device", default="cpu", choices=["cpu", "gpu"])
    p.add_argument("--threads", type=int, help="BLAS threads (default: roa.py's --threads auto for each "
                   "configuration's width)")
    args = p.parse_args()
    xp = array_module(args.device)
    peaks = {}                                                  # BLAS threads -> matrix-product peak
    for name in args.only or CONFIGS:
        threads = args.threads or auto_threads(CONFIGS[name][1]["N"], available_cores())
        threadpool_limits(threads, user_api="blas")
        if threads not in peaks:
            peaks[threads] = matmul_peak(xp)
            blas = ", ".join(f"{i['internal_api']} {i['num_threads']} thread(s)" for i in threadpool_info()
                             if i["user_api"] == "blas")
            print(f"device {args.device}; {available_cores()} cores available; BLAS: {blas}; float32 "
                  f"matrix-product peak {peaks[threads]:.1f} GFLOP/s (2048 x 2048, this run); "
                  f"free memory {free_memory(xp) / 1e9:.1f} GB", flush=True)
        bench(name, xp, args.device, peaks[threads])


if __name__ == "__main__":
    main()
