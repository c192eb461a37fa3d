"""A simulated device: the real app, batcher and server around an engine that computes nothing
and takes as long as a device of a given speed would.

    python -m tokenreward_service.bench.simulated --rate 1e6 --port 8000

On a GPU the host path (parsing, validation, layout, scheduling, redistribution,
serialisation, HTTP) decides the throughput once the model is fast; this engine makes that
measurable on any machine. Each batch costs ``padded tokens / rate`` seconds of the device's
time, which it runs as a device's stream does: a batch starts once it has been launched and the
one before it is done (the batcher launches the next while one runs), and the thread that
collects it sleeps until its end, which releases the GIL as waiting for a device does. Before
it is launched the engine does the host work a real one does for a batch (laying the sequences
out as one padded tensor), and it returns per-position scores with the digits real ones have,
so that the redistribution and the encoding of the answer cost what they cost with a model.
Prompts are not shared: a batch costs its padded size whatever its groups (what a device
running ``--share-prompts false`` spends).

Every figure measured against it is a simulation and is labelled so (``tokenreward bench
--simulated-device RATE``).
"""

from __future__ import annotations

import argparse
import functools
import sys
import time
from collections.abc import Callable, Sequence

import torch

from tokenreward_service.model import BatchScores, ModelSpec, RewardModel, right_pad

__all__ = ["SimulatedDevice", "main", "simulated_engine"]


class SimulatedDevice(RewardModel):
    """A :class:`RewardModel` stand-in whose forward pass waits ``padded_tokens / rate``."""

    def __init__(self, rate: float, *, vocab_size: int = 32000, max_length: int = 8192) -> None:
        if rate <= 0:
            raise ValueError("rate must be positive (tokens per second)")
        self.rate = rate
        self.spec = ModelSpec(
            id=f"simulated-device-{rate:g}-tokens-per-s",
            revision="simulated",
            architecture="SimulatedDevice",
            vocab_size=vocab_size,
            max_length=max_length,
            dtype="float32",
            device="cpu",
            suffix_ids=(),
            random_weights=True,
        )
        self.tokenizer = None
        self.share_prompts = False
        self.waited_s = 0.0
        """Seconds spent waiting as the device would, over all batches."""
        self._free_at = 0.0
        """When the device is done with what it was given."""

    def score_batch(
        self, sequences: Sequence[Sequence[int]], prompt_lens: Sequence[int]
    ) -> BatchScores:
        return self.launch_batch(sequences, prompt_lens)()

    def launch_batch(
        self, sequences: Sequence[Sequence[int]], prompt_lens: Sequence[int]
    ) -> Callable[[], BatchScores]:
        """As a device's stream runs a batch: it starts once it is launched (after the host
        has laid it out) and the batch before it is done, and takes ``padded / rate``; the
        returned function waits for its end."""
        ids, _ = right_pad(sequences)
        # Deterministic scores in [0, 1) with full float32 digits, like a model's.
        scores = torch.remainder(ids.to(torch.float32) * 0.6180339887, 1.0)
        rows = [scores[row, : len(seq)].clone() for row, seq in enumerate(sequences)]
        padded = ids.numel()
        end = max(time.perf_counter(), self._free_at) + padded / self.rate
        self._free_at = end
        result = BatchScores(
            scores=rows,
            computed_tokens=padded,
            real_tokens=sum(len(seq) for seq in sequences),
            shared_items=0,
        )

        def wait() -> BatchScores:
            left = end - time.perf_counter()
            if left > 0:
                time.sleep(left)
                self.waited_s += left
            return result

        return wait


def simulated_engine(rate: float, vocab_size: int) -> SimulatedDevice:
    """The device for an engine process: its host torch work on one thread, as for a model
    on an accelerator (``host_threads``; the spec says "cpu", since nothing runs)."""
    torch.set_num_threads(1)
    return SimulatedDevice(rate, vocab_size=vocab_size)


def main(argv: Sequence[str] | None = None) -> int:
    from tokenreward_service.app import create_app
    from tokenreward_service.config import Settings
    from tokenreward_service.server import build_server

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rate", type=float, required=True, help="device tokens per second")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--vocab-size", type=int, default=32000)
    parser.add_argument("--max-batch-tokens", type=int, default=Settings().max_batch_tokens)
    parser.add_argument("--max-queued-tokens", type=int, default=Settings().max_queued_tokens)
    parser.add_argument(
        "--min-padding-efficiency", type=float, default=Settings().min_padding_efficiency
    )
    parser.add_argument(
        "--engine-process",
        choices=("on", "off"),
        default="on",
        help="run the engine in a process of its own, as `tokenreward serve` does for a model "
        "on an accelerator (engine_process auto); off: in the server's process",
    )
    parser.add_argument("--log-level", default="warning")
    parser.add_argument("--shutdown-delay-s", type=float, default=0.0)
    args = parser.parse_args(argv)
    settings = Settings(
        port=args.port,
        log_level=args.log_level,
        shutdown_delay_s=args.shutdown_delay_s,
        max_batch_tokens=args.max_batch_tokens,
        max_queued_tokens=args.max_queued_tokens,
        min_padding_efficiency=args.min_padding_efficiency,
        engine_process=args.engine_process,
    )
    sys.setswitchinterval(0.001)  # as `tokenreward serve` runs
    # The host's torch work on one thread, as `tokenreward serve` runs it for a model on an
    # accelerator (host_threads); the engine's spec says "cpu", since nothing runs.
    torch.set_num_threads(1)
    device = functools.partial(simulated_engine, args.rate, args.vocab_size)
    if args.engine_process == "on":
        app = create_app(settings, engine_factory=device)
    else:
        app = create_app(settings, model=device())
    server = build_server(settings, app)
    server.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
