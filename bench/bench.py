"""bench/bench.py -- how fast is one training step of roa, against what the machine allows.

    python bench/bench.py                  # all configurations (the 50k-layer one takes minutes)
    python bench/bench.py --only psmnist   # one of: psmnist, adding1000, adding10000, deep50k
    python bench/bench.py --device gpu     # the same on CuPy

For each configuration: the median time of a training step (forward, loss,
backward, Adam or SGD update) after warm-up, the GFLOP/s of its matrix
products, that rate as a fraction of the float32 matrix-product peak
measured in this run by one large product, and the peak memory of one step
against the floor set by the activations kept for backprop.
"""

import argparse
import os
import statistics
import sys
import time
import tracemalloc

import numpy

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from autograd import Adam, SGD, array_module, free_memory, mse_loss, softmax_cross_entropy  # noqa: E402
from roa import RoaFNN, RoaRNN  # noqa: E402

CONFIGS = {
    # name: (model kind, sizes, optimizer, repeats)
    "psmnist": ("rnn", dict(T=784, B=64, N=128, n_in=1, n_out=10), "adam", 7),
    "adding1000": ("rnn", dict(T=1000, B=64, N=64, n_in=2, n_out=1), "adam", 7),
    "adding10000": ("rnn", dict(T=10000, B=64, N=64, n_in=2, n_out=1), "adam", 3),
    "deep50k": ("fnn", dict(L=50000, B=64, N=64, n_in=784, n_out=10), "sgd", 3),
}


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


def bench(name, xp, device, peak):
    kind, s, optimizer_name, repeats = CONFIGS[name]
    rng = numpy.random.default_rng(0)
    if kind == "rnn":
        model = RoaRNN(s["n_in"], s["n_out"], s["N"], 1.0, 0.1, dtype="float32", device=device)
        u = xp.asarray(rng.standard_normal((s["T"], s["B"], s["n_in"])), dtype=xp.float32)
        flops = rnn_flops(**s)
    else:
        model = RoaFNN(s["n_in"], s["n_out"], s["N"], s["L"], 1.0, 0.005, dtype="float32", device=device)
        u = xp.asarray(rng.standard_normal((s["B"], s["n_in"])), dtype=xp.float32)
        flops = fnn_flops(**s)
    floor = model.kept_bytes(u.shape)                       # the states and phi' kept for backprop
    y = xp.asarray(rng.integers(0, s["n_out"], s["B"]))
    loss_fn = softmax_cross_entropy if s["n_out"] > 1 else mse_loss
    if loss_fn is mse_loss:
        y = xp.asarray(rng.standard_normal((s["B"], 1)), dtype=xp.float32)
    optimizer = Adam(1e-4) if optimizer_name == "adam" else SGD(1e-4)

    def step():
        z, cache = model.forward(u)
        _, dz = loss_fn(z, y)
        optimizer.step(model.params, model.backward(dz, cache))
        float(model.params["V"][0, 0])                      # waits for a GPU, too

    step()                                                  # warm-up
    times = []
    for _ in range(repeats):
        tick = time.perf_counter()
        step()
        times.append(time.perf_counter() - tick)
    tracemalloc.start()                                     # one more step for the memory: tracing
    step()                                                  # slows every allocation, so not timed
    peak_bytes = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    median = statistics.median(times)
    rate = flops / median / 1e9
    memory = (f"peak memory {peak_bytes / 1e6:,.0f} MB = {peak_bytes / floor:.2f} x the kept-activation "
              f"floor {floor / 1e6:,.0f} MB" if xp is numpy else "peak memory: not traced on the GPU")
    print(f"{name:12s} step {median * 1e3:9.1f} ms (median of {repeats})  {flops / 1e9:7.2f} GFLOP  "
          f"{rate:7.1f} GFLOP/s = {rate / peak:5.1%} of peak  {memory}", flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", choices=sorted(CONFIGS), action="append", help="run only this configuration")
    p.add_argument("--device", default="cpu", choices=["cpu", "gpu"])
    args = p.parse_args()
    xp = array_module(args.device)
    peak = matmul_peak(xp)
    print(f"device {args.device}; float32 matrix-product peak {peak:.1f} GFLOP/s (2048 x 2048, this run); "
          f"BLAS threads {os.environ.get('OPENBLAS_NUM_THREADS', 'default')}; "
          f"free memory {free_memory(xp) / 1e9:.1f} GB", flush=True)
    for name in args.only or CONFIGS:
        bench(name, xp, args.device, peak)


if __name__ == "__main__":
    main()
