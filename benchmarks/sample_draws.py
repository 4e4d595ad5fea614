"""Why few draws lose accuracy on the digits: one fixed draw per row, or too few draws at all?

The digits demo's MLP (T = 4, alpha 0.9, the demo's epochs) is trained over several seeds from
three targets of the same teacher: full storage; the N systematic draws per row that a
``sample:N`` cache holds (drawn once, by softcache's own counter-based rule, from the stored
float16 values); and N systematic draws made afresh every epoch, which no cache can hold. If the
fresh draws match full storage, a sampled cache loses only by repeating one noisy target per row;
if they do not, N draws are too few for this teacher whatever is cached.

    python benchmarks/sample_draws.py --draws 12 --seeds 5
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

from softcache import demo
from softcache.config import TEMPERATURE, TrainConfig
from softcache.data import materialize
from softcache.digits import load
from softcache.student._batch import Batch, Soft, TopK
from softcache.student.loaders import open_loader
from softcache.student.run import cached_soft, fit, make_run
from softcache.teacher.build import build
from softcache.teacher.label import sample_counts
from softcache.weights import save_model


def systematic_draws(batch: Batch, draws: int, seed: int) -> TopK:
    """The target a ``sample:N:seed`` cache stores for these rows, drawn from the batch's float16
    values (the build draws from the float32 logits: a draw on a class boundary may differ)."""
    assert isinstance(batch.soft, torch.Tensor)
    logp = torch.log_softmax(batch.soft.float().reshape(len(batch.rows), 1, -1), -1)
    ids, counts = sample_counts(logp, draws, seed, batch.rows.numpy(), systematic=True)
    return TopK.sampled(ids[:, 0], counts[:, 0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--draws", type=int, default=12)
    parser.add_argument("--seeds", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="softcache-draws-") as tmp:
        teacher, _ = demo.train_teacher(seed=0, device="cpu")
        path = save_model(teacher, Path(tmp) / "teacher.safetensors", demo.TEACHER_SPEC)
        cache = build(str(path), demo.DATA_SPEC, str(Path(tmp) / "full.zarr"), temperature=TEMPERATURE,
                      device="cpu", progress=False)
        config = TrainConfig(device="cpu")
        train_x, _ = materialize(load("train"))
        test_x, test_y = materialize(load("test"))
        loader = open_loader(cache, inputs=train_x, batch_size=config.batch_size, mode="memory",
                             shuffle_seed=config.shuffle_seed)

        def target(kind: str, seed: int) -> Callable[[Batch], Soft | None]:
            calls = [0]

            def soft(batch: Batch) -> Soft | None:
                epoch, calls[0] = calls[0] // len(loader), calls[0] + 1
                if kind == "full storage":
                    return cached_soft(batch)
                # fixed: the one cache every seed trains from, as in ``softcache bench --storage-modes``;
                # afresh: other draws for every epoch of every seed
                fresh = 1 + seed * 1000 + epoch
                return systematic_draws(batch, args.draws, 0 if kind.startswith("fixed") else fresh)
            return soft

        kinds = ("full storage", f"fixed {args.draws} draws (a sample:{args.draws} cache)",
                 f"{args.draws} draws afresh each epoch")
        scores: dict[str, list[float]] = {k: [] for k in kinds}
        for seed in range(args.seeds):
            cfg = next(c for c in demo.demo_students(seed)
                       if c.spec_text() == demo.MLP and c.alpha > 0 and c.temperature == TEMPERATURE)
            for kind in kinds:
                run = make_run(cfg, cache.num_classes, train_x[:2], torch.device("cpu"))
                fit([run], loader, config.epochs, target(kind, seed), cache.temperature, group=False)
                with torch.no_grad():
                    scores[kind].append(100 * (run.model.eval()(test_x).argmax(1) == test_y).float().mean().item())
        print(f"digits MLP test accuracy %, {args.seeds} seeds, {config.epochs} epochs, T = {TEMPERATURE:g}:")
        for kind, values in scores.items():
            print(f"  {kind:<40} {statistics.fmean(values):6.2f} +- {statistics.stdev(values):.2f}")


if __name__ == "__main__":
    main()
