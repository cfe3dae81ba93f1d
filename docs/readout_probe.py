"""docs/readout_probe.py -- does a trained copying-memory roaRNN still hold the
symbols after a longer delay than it was trained on?

    python docs/readout_probe.py runs/copy1000.npz --length 10000

Runs the checkpoint's roaRNN (its own U, W, b, O) on fresh sequences of the
new delay, then fits a new linear readout by least squares to the states
at the recall steps, one recalled symbol at a time, on three quarters of
the sequences, and scores it on the last quarter. A high score says the
memory survived the longer delay and only the readout (and the blank
answers) must be learned again; a score near 1/8 says it did not.
"""

import argparse
import os
import sys

import numpy

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from autograd import RoaError, rnn_inference  # noqa: E402
from machinery import load_model  # noqa: E402
from tasks import COPY_SYMBOLS, Copy  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", help="a checkpoint of --task copy")
    p.add_argument("--length", type=int, required=True, help="the new delay T")
    p.add_argument("--sequences", type=int, default=1024)
    args = p.parse_args(argv)
    try:
        model, config = load_model(args.checkpoint)
        if config["task"] != "copy":
            raise RoaError(f"{args.checkpoint!r} is a {config['task']} checkpoint, not copy")
    except RoaError as err:
        print(f"readout_probe.py: error: {err}", file=sys.stderr)
        return 2
    u, y = Copy(args.length).train_batch(seed=123, step=0, B=args.sequences)
    h0 = numpy.zeros((args.sequences, config["hidden"]), model.dtype)
    hs = rnn_inference(u.astype(model.dtype), h0, model.params["W"], model.O, model.params["U"],
                       model.params["b"], model.alpha, model.beta, model.act, all_states=True)
    fit = 3 * args.sequences // 4
    print(f"{args.checkpoint} (trained at T = {config['length']}) at T = {args.length}: "
          f"mean |h| at the end {numpy.linalg.norm(hs[-1], axis=1).mean():.1f}")
    for k in range(COPY_SYMBOLS):
        X = numpy.c_[hs[-COPY_SYMBOLS + k], numpy.ones(args.sequences)]
        labels = y[-COPY_SYMBOLS + k].astype(int)
        readout = numpy.linalg.lstsq(X[:fit], numpy.eye(Copy.n_out)[labels[:fit]], rcond=None)[0]
        accuracy = (numpy.argmax(X[fit:] @ readout, axis=1) == labels[fit:]).mean()
        print(f"  recalled symbol {k + 1}: a new linear readout scores {accuracy:.3f} on held-out sequences")
    return 0


if __name__ == "__main__":
    sys.exit(main())
