"""The 2-D toy: every process learns the multimodal data far better than a Gaussian does."""

import json

import numpy as np
import pytest

from diffalign.eval.distances import energy_distance, gaussian_moment_match
from diffalign.toy import ToyConfig, run_toy, toy_data


def test_energy_distance_analytic_properties():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1500, 2))
    y = rng.standard_normal((1500, 2))
    assert abs(energy_distance(x, y)) < 0.01
    # 1-D shift by d between two point masses: 2|d| - 0 - 0 (well, no spread): check scaling
    shifted = energy_distance(x, y + np.array([1.0, 0.0]))
    assert shifted > 0.2
    with pytest.raises(ValueError, match="dimension"):
        energy_distance(x, y[:, :1])


def test_gaussian_baseline_is_bad_for_the_ring():
    data = toy_data(3000, seed=0)
    held = toy_data(2000, seed=1)
    assert energy_distance(gaussian_moment_match(data, 2000), held) > 0.03


@pytest.mark.parametrize("process", ["ddpm", "ddim", "sm", "fm"])
def test_each_process_learns_the_toy(tmp_path, process):
    cfg = ToyConfig(process=process, out=tmp_path, train_steps=1200, n_samples=2000, n_paths=10,
                    n_data=5000, width=96, batch_size=256, lr=4e-3)
    res = run_toy(cfg, progress=False)
    assert res["energy_distance"] < 0.25 * res["gaussian_energy_distance"], res
    on_disk = json.loads((tmp_path / "toy.json").read_text())
    assert on_disk["energy_distance"] == res["energy_distance"]
    samples = np.load(tmp_path / "samples.npy")
    assert samples.shape == (2000, 2) and np.isfinite(samples).all()
    assert np.load(tmp_path / "data.npy").shape == (2000, 2)
    assert (tmp_path / "paths.png").read_bytes()[:4] == b"\x89PNG"


def test_toy_config_rejects_bad_values():
    with pytest.raises(ValueError, match="train_steps=0"):
        ToyConfig(train_steps=0)
    with pytest.raises(ValueError, match="n_paths"):
        ToyConfig(n_paths=5000, n_samples=100)
