"""Student accuracy over several seeds: hard labels, label smoothing and distillation side by side.

On small data label smoothing can match distillation, so a claimed distillation gain is only
shown next to that baseline, and over seeds rather than one run.

    python benchmarks/seeds.py runs/demo/cache.zarr --seeds 5 --epochs 60
"""

from __future__ import annotations

import argparse

import polars as pl
import torch

from softcache.config import StudentConfig, TrainConfig
from softcache.cache.store import open_cache
from softcache.student.train import train


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("cache")
    parser.add_argument("--student", action="append", default=None)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--temperature", type=float, default=4.0)
    parser.add_argument("--alpha", type=float, default=0.9)
    args = parser.parse_args()
    torch.set_num_threads(1)
    cache = open_cache(args.cache)
    specs = args.student or ["softcache.models:mlp,hidden=32", "softcache.models:tiny_cnn"]
    configs = [
        cfg
        for spec in specs
        for seed in range(args.seeds)
        for cfg in (
            StudentConfig(spec=spec, alpha=0.0, seed=seed),
            StudentConfig(spec=spec, alpha=0.0, label_smoothing=0.1, seed=seed),
            StudentConfig(spec=spec, temperature=args.temperature, alpha=args.alpha, seed=seed),
        )
    ]
    board = train(cache, configs, config=TrainConfig(epochs=args.epochs), progress=False).leaderboard
    kind = (pl.when(pl.col("alpha") > 0).then(pl.format("cached soft labels T={} a={}", "temperature", "alpha"))
            .when(pl.col("label_smoothing") > 0).then(pl.lit("label smoothing 0.1")).otherwise(pl.lit("hard labels")))
    table = (board.with_columns(trained_on=kind)
             .group_by("spec", "trained_on")
             .agg((pl.col("test_accuracy").mean() * 100).round(2).alias("mean_%"),
                  (pl.col("test_accuracy").std() * 100).round(2).alias("std_%"), pl.len().alias("seeds"))
             .sort("spec", "mean_%"))
    with pl.Config(tbl_rows=-1, fmt_str_lengths=40, tbl_hide_dataframe_shape=True):
        print(table)


if __name__ == "__main__":
    main()
