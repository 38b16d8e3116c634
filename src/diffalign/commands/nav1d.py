"""Nav1D commands: ``diffalign optimum`` and ``diffalign data nav1d`` (thin library calls)."""

from __future__ import annotations

import json as _json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from ..errors import UserError


@dataclass
class OptimumArgs:
    """Print the DP-optimal and the random-policy expected return of Nav1D."""

    layout_seed: int = 0
    """Seed of the reward layout (mu_t, sigma_t)."""
    json: bool = False
    """Print one JSON object instead of a readable line."""
    horizon: int = 32
    """Episode length T."""

    def __post_init__(self) -> None:
        if self.layout_seed < 0:
            raise UserError(f"layout_seed must be >= 0, got layout_seed={self.layout_seed}")
        if self.horizon < 1:
            raise UserError(f"horizon must be >= 1, got horizon={self.horizon}")


def optimum_main(args: OptimumArgs) -> dict[str, Any]:
    """Compute (cached) and print the reference returns; returns the printed numbers."""
    from diffalign.envs.nav1d_optimum import nav1d_optimum

    res = nav1d_optimum(layout_seed=args.layout_seed, horizon=args.horizon)
    out = {
        "optimal_return": res["optimal_return"],
        "random_return": res["random_return"],
        "random_return_stderr": res["random_return_stderr"],
        "random_policy": res["random_policy"],
        "layout_seed": args.layout_seed,
        "horizon": args.horizon,
    }
    if args.json:
        print(_json.dumps(out))
    else:
        print(
            f"Nav1D layout_seed={args.layout_seed} horizon={args.horizon}: "
            f"optimal return {out['optimal_return']:.4f}, random (i.i.d. uniform actions) "
            f"return {out['random_return']:.4f} ± {out['random_return_stderr']:.4f}"
        )
    return out


@dataclass
class DataNav1DArgs:
    """Generate a Nav1D offline dataset (HDF5 in D4RL layout, or Minari) and its picture."""

    dataset: Literal["partial", "full", "expert"] = "full"
    """partial: correlated random policy, starts in [-1, -0.2]; full: same policy, starts in
    [-1, 1]; expert: DP-optimal policy plus Gaussian action noise."""
    out: Path | None = None
    """HDF5 file to write (.hdf5 or .h5; default nav1d-DATASET.hdf5). The picture goes to the
    same path with suffix .png. With format=minari only the picture's location."""
    episodes: int = 1000
    """Number of episodes (each exactly `horizon` = 32 steps)."""
    layout_seed: int = 0
    """Seed of the reward layout (mu_t, sigma_t)."""
    seed: int = 0
    """Seed of the start states and the behaviour policy's randomness."""
    format: Literal["hdf5", "minari"] = "hdf5"
    """Output format. minari needs `pip install minari==0.5.4` and a dataset --id."""
    id: str | None = None
    """Minari dataset id, e.g. nav1d/full-v0 (format=minari only)."""

    def __post_init__(self) -> None:
        from diffalign.data.nav1d_datasets import DATASET_KINDS

        if self.dataset not in DATASET_KINDS:
            raise UserError(
                f"dataset must be one of {DATASET_KINDS}, got dataset={self.dataset!r}"
            )
        n = self.episodes
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise UserError(f"episodes must be an integer >= 1, got episodes={n!r}")
        if self.layout_seed < 0 or self.seed < 0:
            raise UserError(
                f"seeds must be >= 0, got layout_seed={self.layout_seed} seed={self.seed}"
            )
        if self.format not in ("hdf5", "minari"):
            raise UserError(f"format must be 'hdf5' or 'minari', got format={self.format!r}")
        if self.out is not None:
            self.out = Path(self.out)
        if self.format == "minari":
            if not self.id:
                raise UserError(f"format='minari' needs a dataset id, got id={self.id!r}")
        elif self.out is not None and self.out.suffix.lower() not in (".hdf5", ".h5"):
            raise UserError(
                f"out must end in .hdf5 or .h5 for format='hdf5', got out={str(self.out)!r}"
            )


def data_nav1d_main(args: DataNav1DArgs) -> dict[str, Any]:
    """Generate, write and picture the dataset; print and return a summary."""
    from diffalign.data import nav1d_datasets as nd

    data = nd.generate_nav1d_dataset(
        args.dataset, episodes=args.episodes, layout_seed=args.layout_seed, seed=args.seed
    )
    attrs = nd.nav1d_dataset_attrs(
        args.dataset, layout_seed=args.layout_seed, seed=args.seed, episodes=args.episodes
    )
    if args.format == "hdf5":
        path = args.out if args.out is not None else Path(f"nav1d-{args.dataset}.hdf5")
        written = nd.write_nav1d_hdf5(path, data, attrs)
        picture = path.with_suffix(".png")
    else:
        nd.write_nav1d_minari(data, args.id, kind=args.dataset, layout_seed=args.layout_seed)
        from minari.storage import get_dataset_path

        written = get_dataset_path(args.id)
        picture = args.out.with_suffix(".png") if args.out is not None else written / "nav1d.png"
    nd.plot_nav1d_dataset(
        data,
        args.layout_seed,
        picture,
        title=f"Nav1D {args.dataset} (layout {args.layout_seed}): 50 of {args.episodes} episodes",
    )
    returns = nd.episode_returns(data)
    optimum = attrs["ref_max_score"]
    summary = {
        "dataset": args.dataset,
        "path": str(written),
        "picture": str(picture),
        "episodes": int(len(returns)),
        "steps": int(len(data["rewards"])),
        "mean_return": float(returns.mean()),
        "optimal_return": float(optimum),
        "percent_of_optimum": float(100.0 * returns.mean() / optimum),
    }
    print(
        f"wrote {summary['path']} ({summary['episodes']} episodes, {summary['steps']} steps) "
        f"and {summary['picture']}: mean return {summary['mean_return']:.3f} = "
        f"{summary['percent_of_optimum']:.1f}% of the optimum {optimum:.3f}"
    )
    return summary
