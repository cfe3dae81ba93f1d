"""bench/torch_compare.py -- our roaRNN training step against the same model in PyTorch (CPU autograd).

    python bench/torch_compare.py                # psMNIST shape: N 128, batch 64, T 784, float32, Adam
    python bench/torch_compare.py --T 1000 --N 64 --n-in 2 --n-out 1

PyTorch is an optional dependency used by this script alone
(pip install torch); without it the script says so and exits.
Both models are timed in the same process, on the same data, each the
median of several steps after warm-up, at one and then two threads (our
BLAS threads through threadpoolctl, PyTorch's through set_num_threads);
the ratios printed are ours / PyTorch at each count. The two compute the
same gradients: the script checks that first.
"""

import argparse
import os
import sys

import numpy
from threadpoolctl import threadpool_limits

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from autograd import Adam, softmax_cross_entropy  # noqa: E402
from bench import median_time  # noqa: E402  (bench/bench.py)
from roa import RoaRNN  # noqa: E402


def torch_step_fn(torch, ours, u, y, lr):
    """The same roaRNN written with torch tensors and autograd, from the parameters
    `ours` has now; returns (step, gradients), two functions."""
    p = {k: torch.tensor(numpy.array(v), requires_grad=True) for k, v in ours.params.items()}
    N = ours.O.shape[-1]
    O = torch.tensor(numpy.array(ours.O))                     # the fixed filter
    alpha, beta = ours.alpha, ours.beta
    u_t, y_t = torch.tensor(u), torch.tensor(y)
    optimizer = torch.optim.Adam(p.values(), lr=lr)

    def loss():
        h = torch.zeros(u.shape[1], N)
        inputs = (u_t @ p["U"].T + p["b"]).unbind(0)        # (indexing inputs[t] instead would make
        for t in range(u.shape[0]):                          #  autograd zero-fill a (T, B, N) array per step)
            h = alpha * h @ O.T + beta * torch.tanh(h @ p["W"].T + inputs[t])
        return torch.nn.functional.cross_entropy(h @ p["V"].T + p["c"], y_t)

    def step():
        optimizer.zero_grad()
        loss().backward()
        optimizer.step()

    def gradients():
        loss().backward()
        return {k: v.grad.numpy().copy() for k, v in p.items()}

    return step, gradients


def main():
    a = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    a.add_argument("--T", type=int, default=784)
    a.add_argument("--N", type=int, default=128)
    a.add_argument("--B", type=int, default=64)
    a.add_argument("--n-in", type=int, default=1)
    a.add_argument("--n-out", type=int, default=10)
    a.add_argument("--repeats", type=int, default=7)
    a.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="thread counts to compare at")
    args = a.parse_args()
    try:
        import torch
    except ImportError:
        print("torch_compare: PyTorch is not installed (pip install torch); nothing to compare with")
        return 0
    rng = numpy.random.default_rng(0)
    u = rng.standard_normal((args.T, args.B, args.n_in)).astype(numpy.float32)
    y = rng.integers(0, args.n_out, args.B)
    ours = RoaRNN(args.n_in, args.n_out, args.N, 1.0, 0.1, dtype="float32")
    torch_step, torch_gradients = torch_step_fn(torch, ours, u, y, 1e-4)
    z, cache = ours.forward(u)
    our_grads, _ = ours.backward(softmax_cross_entropy(z, y)[1], cache)
    optimizer = Adam(1e-4)

    def our_step():
        z, cache = ours.forward(u)
        optimizer.step(ours.params, ours.backward(softmax_cross_entropy(z, y)[1], cache)[0])

    torch_grads = torch_gradients()
    for name, g in our_grads.items():
        error = numpy.linalg.norm(g - torch_grads[name]) / numpy.linalg.norm(torch_grads[name])
        if error > 1e-3:
            print(f"torch_compare: gradients of {name} differ (relative {error:.1e}): not the same model")
            return 1
    print(f"roaRNN T={args.T} N={args.N} batch {args.B} float32 Adam; torch {torch.__version__}; gradients agree")
    for threads in args.threads:
        threadpool_limits(threads, user_api="blas")
        torch.set_num_threads(threads)
        ours_s = median_time(our_step, args.repeats)
        torch_s = median_time(torch_step, args.repeats)
        print(f"{threads} thread{'s' * (threads > 1)}: ours {ours_s * 1e3:.1f} ms/step   PyTorch {torch_s * 1e3:.1f} "
              f"ms/step   ours / PyTorch = {ours_s / torch_s:.2f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
