"""Data layer: episodes, readers/writers, windows, normalisers."""

from __future__ import annotations

import os
import warnings

import numpy as np
import pytest
import torch

from diffalign.data import (
    DatasetError,
    Episodes,
    GaussianNormalizer,
    MinMaxNormalizer,
    NormalizerSet,
    load_dataset,
    make_windows,
    read_d4rl_hdf5,
    read_minari,
    read_robomimic_hdf5,
    window_indices,
    write_d4rl_hdf5,
    write_robomimic_hdf5,
)

h5py = pytest.importorskip("h5py")


def toy_episodes(lengths=(4, 3, 5), obs_dim=2, act_dim=1, tail=False, meta=None, next_obs=True):
    """Episodes with obs[i] = [i, 10*i, ...], actions[i] = -i, rewards[i] = i.

    Episodes end alternately with a terminal and a timeout; with ``tail`` the last one is
    left unterminated."""
    n = sum(lengths)
    idx = np.arange(n, dtype=np.float32)
    obs = np.stack([idx * 10**k for k in range(obs_dim)], axis=1)
    act = np.stack([-idx] * act_dim, axis=1)
    term = np.zeros(n, bool)
    tout = np.zeros(n, bool)
    end = np.cumsum(lengths) - 1
    for j, e in enumerate(end):
        if tail and j == len(end) - 1:
            continue
        (term if j % 2 == 0 else tout)[e] = True
    nobs = obs + 0.5 if next_obs else None
    return Episodes.from_arrays(obs, act, idx, term, tout, nobs, meta=meta or {"env_id": "toy"})


# ---------------------------------------------------------------------- episodes
def test_boundaries_terminals_and_timeouts():
    ep = toy_episodes((4, 3, 5))
    assert len(ep) == 3
    np.testing.assert_array_equal(ep.starts, [0, 4, 7])
    np.testing.assert_array_equal(ep.ends, [4, 7, 12])
    np.testing.assert_array_equal(ep.lengths(), [4, 3, 5])
    np.testing.assert_allclose(ep.returns(), [0 + 1 + 2 + 3, 4 + 5 + 6, sum(range(7, 12))])
    assert ep.obs_dim == 2 and ep.act_dim == 1 and ep.num_steps == 12
    e1 = ep.episode(1)
    np.testing.assert_array_equal(e1["rewards"], [4, 5, 6])
    assert e1["timeouts"][-1] and not e1["terminals"][-1]
    np.testing.assert_array_equal(ep.episode(-1)["rewards"], np.arange(7, 12))
    np.testing.assert_array_equal(ep.episode_ids(), [0] * 4 + [1] * 3 + [2] * 5)
    with pytest.raises(IndexError):
        ep.episode(3)


def test_trailing_tail_counts_as_episode():
    ep = toy_episodes((4, 3, 5), tail=True)
    assert len(ep) == 3
    np.testing.assert_array_equal(ep.ends, [4, 7, 12])
    # no flags at all: one episode
    one = Episodes.from_arrays(np.zeros((6, 1)), np.zeros((6, 1)), np.ones(6))
    assert len(one) == 1 and one.lengths().tolist() == [6]
    assert one.returns().tolist() == [6.0]


def test_from_episode_list_and_select_round_trip():
    ep = toy_episodes((4, 3, 5))
    sub = ep.select([2, 0])
    assert len(sub) == 2
    np.testing.assert_array_equal(sub.lengths(), [5, 4])
    np.testing.assert_array_equal(sub.episode(0)["observations"], ep.episode(2)["observations"])
    np.testing.assert_array_equal(
        sub.episode(1)["next_observations"], ep.episode(0)["next_observations"]
    )
    # an episode given without flags gets a timeout at its end so boundaries survive
    parts = [
        {"observations": np.zeros((3, 1)), "actions": np.zeros((3, 1)), "rewards": np.ones(3)},
        {"observations": np.ones((2, 1)), "actions": np.zeros((2, 1)), "rewards": np.ones(2)},
    ]
    cat = Episodes.from_episode_list(parts)
    np.testing.assert_array_equal(cat.ends, [3, 5])
    assert cat.timeouts.tolist() == [False, False, True, False, True]


@pytest.mark.parametrize(
    "change, field, words",
    [
        (lambda a: a["observations"].__setitem__((2, 1), np.nan), "observations", "NaN"),
        (lambda a: a["rewards"].__setitem__(3, np.inf), "rewards", "inf"),
        (lambda a: a.__setitem__("actions", a["actions"][:-1]), "actions", "ragged"),
        (lambda a: a.__setitem__("timeouts", a["timeouts"][:5]), "timeouts", "ragged"),
        (
            lambda a: a.__setitem__("next_observations", np.zeros((8, 3))),
            "next_observations",
            "dim",
        ),
        (
            lambda a: a.__setitem__("observations", a["observations"][:, 0]),
            "observations",
            "dimension",
        ),
        (lambda a: a.__setitem__("rewards", np.zeros((8, 2))), "rewards", "dimension"),
        (lambda a: a["terminals"].__setitem__(0, 2.0), "terminals", "0/1"),
    ],
)
def test_validation_errors_name_field_and_file(change, field, words):
    arrays = {
        "observations": np.zeros((8, 2), np.float32),
        "actions": np.zeros((8, 1), np.float32),
        "rewards": np.zeros(8, np.float32),
        "terminals": np.zeros(8, np.float32),
        "timeouts": np.zeros(8, np.float32),
        "next_observations": np.zeros((8, 2), np.float32),
    }
    change(arrays)
    with pytest.raises(DatasetError) as info:
        Episodes.from_arrays(**arrays, source="bad_file.hdf5")
    msg = str(info.value)
    assert "bad_file.hdf5" in msg and f"'{field}'" in msg and words in msg, msg
    assert isinstance(info.value, ValueError)


def test_empty_arrays_rejected():
    with pytest.raises(DatasetError, match=r"empty.hdf5.*'observations'.*empty"):
        Episodes.from_arrays(np.zeros((0, 2)), np.zeros((0, 1)), np.zeros(0), source="empty.hdf5")


# ---------------------------------------------------------------------- D4RL HDF5
def test_d4rl_round_trip(tmp_path):
    ep = toy_episodes(
        (4, 3, 5),
        tail=True,
        meta={"env_id": "hopper-medium-v2", "ref_min_score": -20.272305, "note": [1, 2]},
    )
    path = write_d4rl_hdf5(tmp_path / "d.hdf5", ep)
    assert path.exists()
    assert [p.name for p in tmp_path.iterdir()] == ["d.hdf5"]  # no temp file left over
    back = read_d4rl_hdf5(path)
    for k in ("observations", "actions", "rewards", "terminals", "timeouts", "next_observations"):
        np.testing.assert_array_equal(getattr(back, k), getattr(ep, k), err_msg=k)
    np.testing.assert_array_equal(back.ends, ep.ends)
    assert back.meta["env_id"] == "hopper-medium-v2"
    assert back.meta["ref_min_score"] == pytest.approx(-20.272305)
    assert back.meta["source"] == str(path) and back.meta["format"] == "d4rl_hdf5"
    assert back.meta["note"] == "[1, 2]"  # non-scalars are stored as JSON strings
    via_dispatch = load_dataset(str(path))
    np.testing.assert_array_equal(via_dispatch.observations, ep.observations)


def test_d4rl_without_next_observations(tmp_path):
    ep = toy_episodes(next_obs=False)
    back = read_d4rl_hdf5(write_d4rl_hdf5(tmp_path / "n.h5", ep))
    assert back.next_observations is None
    np.testing.assert_array_equal(back.actions, ep.actions)


def test_d4rl_write_is_atomic(tmp_path):
    path = tmp_path / "keep.hdf5"
    write_d4rl_hdf5(path, toy_episodes((2, 2)))
    before = path.read_bytes()

    class Broken(Episodes):
        @property
        def rewards(self):  # noqa: D401 - raising property to break the writer mid-way
            raise RuntimeError("disk on fire")

    ep = toy_episodes((3, 3))
    broken = object.__new__(Broken)
    broken.__dict__.update({k: v for k, v in ep.__dict__.items() if k != "rewards"})
    with pytest.raises(RuntimeError, match="disk on fire"):
        write_d4rl_hdf5(path, broken)
    assert path.read_bytes() == before  # the old file is untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.hdf5"]  # temp file removed


def _write_raw_h5(path, **arrays):
    with h5py.File(path, "w") as f:
        for k, v in arrays.items():
            f.create_dataset(k, data=v)


def _d4rl_arrays(n=6):
    return {
        "observations": np.zeros((n, 2), np.float32),
        "actions": np.zeros((n, 1), np.float32),
        "rewards": np.zeros(n, np.float32),
        "terminals": np.zeros(n, bool),
        "timeouts": np.zeros(n, bool),
    }


def test_d4rl_missing_key(tmp_path):
    arrays = _d4rl_arrays()
    del arrays["timeouts"]
    path = tmp_path / "missing.hdf5"
    _write_raw_h5(path, **arrays)
    with pytest.raises(DatasetError) as info:
        read_d4rl_hdf5(path)
    assert "'timeouts'" in str(info.value) and "missing.hdf5" in str(info.value)


@pytest.mark.parametrize(
    "field, value, words",
    [
        ("observations", np.full((6, 2), np.nan, np.float32), "NaN"),
        ("actions", np.full((6, 1), np.inf, np.float32), "inf"),
        ("rewards", np.zeros(5, np.float32), "ragged"),
        ("next_observations", np.zeros((6, 4), np.float32), "dim"),
    ],
)
def test_d4rl_bad_content(tmp_path, field, value, words):
    arrays = _d4rl_arrays()
    arrays[field] = value
    path = tmp_path / f"bad_{field}.hdf5"
    _write_raw_h5(path, **arrays)
    with pytest.raises(DatasetError) as info:
        read_d4rl_hdf5(path)
    msg = str(info.value)
    assert f"bad_{field}.hdf5" in msg and f"'{field}'" in msg and words in msg, msg


def test_empty_and_not_hdf5_files(tmp_path):
    empty = tmp_path / "empty.hdf5"
    empty.write_bytes(b"")
    with pytest.raises(DatasetError, match=r"empty\.hdf5.*empty \(0 bytes\)"):
        read_d4rl_hdf5(empty)
    text = tmp_path / "notes.hdf5"
    text.write_text("observations,actions\n1,2\n")
    with pytest.raises(DatasetError, match=r"notes\.hdf5.*not an HDF5 file"):
        read_d4rl_hdf5(text)
    with pytest.raises(DatasetError, match="not an HDF5 file"):
        load_dataset(text)
    no_data = tmp_path / "zero_steps.hdf5"
    _write_raw_h5(no_data, **_d4rl_arrays(0))
    with pytest.raises(DatasetError, match=r"zero_steps\.hdf5.*'observations'.*empty"):
        read_d4rl_hdf5(no_data)
    with pytest.raises(FileNotFoundError):
        read_d4rl_hdf5(tmp_path / "absent.hdf5")


# ---------------------------------------------------------------------- robomimic
def _demos():
    rng = np.random.default_rng(0)
    demos = []
    for t in (5, 3, 4):
        demos.append(
            {
                "obs": {
                    "robot0_eef_pos": rng.normal(size=(t, 3)),
                    "object": rng.normal(size=(t, 2, 2)),  # flattened to 4 dims
                },
                "next_obs": {
                    "robot0_eef_pos": rng.normal(size=(t, 3)),
                    "object": rng.normal(size=(t, 2, 2)),
                },
                "actions": rng.normal(size=(t, 7)),
                "rewards": np.arange(t, dtype=np.float64),
                "dones": np.r_[np.zeros(t - 2), 1, 1] if t != 3 else np.zeros(t),
            }
        )
    return demos


def test_robomimic_round_trip(tmp_path):
    demos = _demos()
    path = write_robomimic_hdf5(tmp_path / "lift.hdf5", demos, env_args={"env_name": "Lift"})
    ep = read_robomimic_hdf5(path)
    assert len(ep) == 3 and ep.lengths().tolist() == [5, 3, 4]
    assert ep.obs_dim == 7 and ep.act_dim == 7
    assert ep.meta["obs_keys"] == ["object", "robot0_eef_pos"]  # sorted by default
    assert ep.meta["env_id"] == "Lift" and ep.meta["format"] == "robomimic_hdf5"
    d0 = ep.episode(0)
    expected = np.concatenate(
        [demos[0]["obs"]["object"].reshape(5, 4), demos[0]["obs"]["robot0_eef_pos"]], axis=1
    )
    np.testing.assert_allclose(d0["observations"], expected, rtol=1e-6)
    np.testing.assert_allclose(d0["actions"], demos[0]["actions"], rtol=1e-6)
    np.testing.assert_allclose(
        ep.episode(2)["next_observations"][:, 4:], demos[2]["next_obs"]["robot0_eef_pos"], rtol=1e-6
    )
    # dones=1 inside a demo does not split it; the last step is terminal iff dones[-1]
    assert ep.terminals.tolist() == [0, 0, 0, 0, 1] + [0, 0, 0] + [0, 0, 0, 1]
    assert ep.timeouts.tolist() == [0] * 5 + [0, 0, 1] + [0] * 4
    # given key order, and the dispatcher recognises the layout
    ep2 = load_dataset(path, obs_keys=["robot0_eef_pos"])
    assert ep2.obs_dim == 3
    np.testing.assert_allclose(
        ep2.episode(1)["observations"], demos[1]["obs"]["robot0_eef_pos"], rtol=1e-6
    )


def test_robomimic_demos_sorted_numerically(tmp_path):
    demos = []
    for i in range(12):  # demo_10, demo_11 sort after demo_9 numerically, not as strings
        demos.append(
            {
                "obs": {"x": np.full((2, 1), i)},
                "actions": np.zeros((2, 1)),
                "rewards": np.zeros(2),
                "dones": np.zeros(2),
            }
        )
    ep = read_robomimic_hdf5(write_robomimic_hdf5(tmp_path / "many.hdf5", demos))
    firsts = [ep.episode(i)["observations"][0, 0] for i in range(len(ep))]
    assert firsts == list(range(12))
    assert ep.meta["demos"][10] == "demo_10"


def test_robomimic_from_episodes_and_errors(tmp_path):
    src = toy_episodes((4, 3, 5))
    path = write_robomimic_hdf5(tmp_path / "from_eps.hdf5", src)
    back = read_robomimic_hdf5(path)
    np.testing.assert_array_equal(back.observations, src.observations)
    np.testing.assert_array_equal(back.ends, src.ends)
    np.testing.assert_array_equal(back.terminals, src.terminals)

    demos = _demos()
    del demos[1]["actions"]
    bad = write_robomimic_hdf5(tmp_path / "no_actions.hdf5", demos)
    with pytest.raises(DatasetError) as info:
        read_robomimic_hdf5(bad)
    assert "'actions'" in str(info.value) and "no_actions.hdf5" in str(info.value)
    assert "demo_1" in str(info.value)

    with pytest.raises(DatasetError, match=r"'missing_key'"):
        read_robomimic_hdf5(path, obs_keys=["missing_key"])

    demos = _demos()
    demos[2]["obs"]["object"][1, 0, 0] = np.nan
    with pytest.raises(DatasetError, match=r"nan_obs\.hdf5.*'observations'.*NaN"):
        read_robomimic_hdf5(write_robomimic_hdf5(tmp_path / "nan_obs.hdf5", demos))

    with h5py.File(tmp_path / "no_demos.hdf5", "w") as f:
        f.create_group("data")
    with pytest.raises(DatasetError, match=r"no_demos\.hdf5.*no 'demo_<i>'"):
        read_robomimic_hdf5(tmp_path / "no_demos.hdf5")


# ---------------------------------------------------------------------- minari
def test_minari_round_trip(tmp_path, monkeypatch):
    minari = pytest.importorskip("minari")
    gym = pytest.importorskip("gymnasium")
    from minari.data_collector import EpisodeBuffer

    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path / "minari"))
    rng = np.random.default_rng(1)
    episodes = []
    for i, (t, terminated) in enumerate([(5, True), (3, False)]):
        obs = rng.normal(size=(t + 1, 3)).astype(np.float32)
        act = rng.uniform(-2, 2, size=(t, 1)).astype(np.float32)
        episodes.append((obs, act))
        term = [False] * (t - 1) + [terminated]
        trunc = [False] * (t - 1) + [not terminated]
        buf = EpisodeBuffer(
            id=i,
            observations=list(obs),
            actions=list(act),
            rewards=list(np.arange(t, dtype=np.float64)),
            terminations=term,
            truncations=trunc,
        )
        episodes[-1] += (buf,)
    with warnings.catch_warnings():  # minari warns about unset eval_env etc.
        warnings.simplefilter("ignore")
        minari.create_dataset_from_buffers(
            "diffalign/toy-v0",
            [b for *_, b in episodes],
            env="Pendulum-v1",
            action_space=gym.spaces.Box(-2, 2, (1,), np.float32),
            observation_space=gym.spaces.Box(-np.inf, np.inf, (3,), np.float32),
            ref_min_score=-100.0,
            ref_max_score=0.0,
            algorithm_name="random",
            author="tests",
            author_email="tests@example.com",
            code_permalink="n/a",
            description="toy",
        )
    ep = read_minari("diffalign/toy-v0")
    assert len(ep) == 2 and ep.lengths().tolist() == [5, 3]
    np.testing.assert_allclose(ep.episode(0)["observations"], episodes[0][0][:-1])
    np.testing.assert_allclose(ep.episode(0)["next_observations"], episodes[0][0][1:])
    np.testing.assert_allclose(ep.episode(1)["actions"], episodes[1][1])
    assert ep.terminals.tolist() == [0, 0, 0, 0, 1, 0, 0, 0]
    assert ep.timeouts.tolist() == [0, 0, 0, 0, 0, 0, 0, 1]
    assert ep.meta["ref_min_score"] == -100.0 and ep.meta["ref_max_score"] == 0.0
    assert ep.meta["env_id"] == "Pendulum-v1" and ep.meta["dataset_id"] == "diffalign/toy-v0"
    via_dispatch = load_dataset("diffalign/toy-v0")
    np.testing.assert_array_equal(via_dispatch.actions, ep.actions)
    by_folder = read_minari(tmp_path / "minari" / "diffalign" / "toy-v0")
    np.testing.assert_array_equal(by_folder.observations, ep.observations)

    with pytest.raises(DatasetError, match=r"'diffalign/absent-v0' is not available offline"):
        read_minari("diffalign/absent-v0")


def test_minari_missing_package_message(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name == "minari" or name.startswith("minari."):
            raise ImportError("No module named 'minari'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    with pytest.raises(ImportError, match="pip install minari"):
        read_minari("mujoco/hopper/medium-v0")


# ---------------------------------------------------------------------- windows
def test_window_indices():
    ep = toy_episodes((4, 3, 5))
    full = window_indices(ep, horizon=4, allow_partial=False)
    # episode 0: start 0; episode 1 (len 3): none; episode 2: starts 7, 8
    assert full[:, 0].tolist() == [0, 7, 8]
    assert full[:, 1].tolist() == [0, 2, 2]
    partial = window_indices(ep, horizon=4, allow_partial=True)
    assert partial[:, 0].tolist() == list(range(12))
    assert window_indices(ep, 2, stride=2)[:, 0].tolist() == [0, 2, 4, 6, 7, 9, 11]


def test_windows_shapes_masks_and_edge_padding():
    ep = toy_episodes((4, 3, 5), obs_dim=2, act_dim=1)
    ds = make_windows(ep, horizon=4, obs_history=3)
    assert len(ds) == 12 and ds.dim == 3
    assert ds.key_slices == {"observations": slice(0, 2), "actions": slice(2, 3)}
    item = ds[5]  # start at step 5, inside episode 1 = steps [4, 7)
    assert item["x"].shape == (4, 3) and item["x"].dtype == torch.float32
    assert item["observations"].shape == (4, 2) and item["actions"].shape == (4, 1)
    assert item["mask"].tolist() == [True, True, False, False]
    # edge padding repeats step 6, the episode's last
    assert item["x"][:, 0].tolist() == [5, 6, 6, 6]
    assert item["actions"][:, 0].tolist() == [-5, -6, -6, -6]
    # history: steps 3, 4, 5 -> step 3 is before the episode start, so repeat step 4
    assert item["obs_history"].shape == (3, 2)
    assert item["obs_history"][:, 0].tolist() == [4, 4, 5]
    assert item["history_mask"].tolist() == [False, True, True]
    assert int(item["index"]) == 5 and int(item["episode"]) == 1

    batch = ds.get_batch(np.arange(len(ds)))
    assert batch["x"].shape == (12, 4, 3) and batch["mask"].shape == (12, 4)
    assert batch["obs_history"].shape == (12, 3, 2)
    # number of real positions = min(H, steps to episode end)
    to_end = np.array([4, 3, 2, 1, 3, 2, 1, 5, 4, 3, 2, 1])
    np.testing.assert_array_equal(batch["mask"].sum(1).numpy(), np.minimum(4, to_end))
    # every real position holds its own step's data
    pos = batch["index"][:, None] + torch.arange(4)
    assert torch.equal(batch["x"][..., 0][batch["mask"]], pos[batch["mask"]].float())

    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    assert torch.equal(ds.sample(8, g1)["index"], ds.sample(8, g2)["index"])


def test_windows_zero_padding_full_windows_and_extra_keys():
    ep = toy_episodes((4, 3, 5))
    ds = make_windows(ep, horizon=3, pad="zero", keys=("actions", "rewards"))
    item = ds[3]  # step 3 is the last of episode 0
    assert item["mask"].tolist() == [True, False, False]
    assert item["x"].tolist() == [[-3.0, 3.0], [0.0, 0.0], [0.0, 0.0]]
    full = make_windows(ep, horizon=4, allow_partial=False)
    assert len(full) == 3 and bool(full.get_batch(np.arange(3))["mask"].all())
    with pytest.raises(ValueError, match="horizon=6"):
        make_windows(toy_episodes((4, 5)), horizon=6, allow_partial=False)
    with pytest.raises(ValueError, match="pad"):
        make_windows(ep, horizon=3, pad="reflect")


def test_windows_returns_to_go_and_normalizers():
    ep = toy_episodes((4, 3))
    ds = make_windows(ep, horizon=2, discount=0.5)
    # episode 0 rewards 0,1,2,3: rtg(1) = 1 + .5*2 + .25*3 = 2.75; episode 1 rtg(4)=4+2.5+1.5
    assert ds[1]["returns"].tolist() == [2.75]
    assert ds[4]["returns"].tolist() == [pytest.approx(4 + 0.5 * 5 + 0.25 * 6)]
    ns = NormalizerSet.fit_episodes(ep, kind="minmax")
    nds = make_windows(ep, horizon=2, normalizers=ns, obs_history=2)
    batch = nds.get_batch(np.arange(len(nds)))
    assert float(batch["observations"].min()) == pytest.approx(-1.0)
    assert float(batch["observations"].max()) == pytest.approx(1.0)
    back = ns.unnormalize("observations", batch["observations"])
    raw = ds.get_batch(np.arange(len(ds)))["observations"]
    torch.testing.assert_close(back, raw, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(batch["obs_history"][:, -1], batch["observations"][:, 0])


# ---------------------------------------------------------------------- normalisers
@pytest.mark.parametrize("cls", [GaussianNormalizer, MinMaxNormalizer])
def test_normalizer_round_trip_numpy_and_torch(cls):
    rng = np.random.default_rng(0)
    x = rng.normal(loc=[3.0, -1.0, 0.0], scale=[2.0, 0.1, 5.0], size=(500, 3)).astype(np.float32)
    x[:, 2] = 7.0  # a constant dimension must not blow up
    n = cls().fit(x)
    y = n.normalize(x)
    assert isinstance(y, np.ndarray) and y.dtype == np.float32 and np.isfinite(y).all()
    np.testing.assert_allclose(y[:, 2], 0.0, atol=1e-6)
    if cls is GaussianNormalizer:
        np.testing.assert_allclose(y[:, :2].mean(0), 0.0, atol=1e-5)
        np.testing.assert_allclose(y[:, :2].std(0), 1.0, atol=1e-4)
    else:
        np.testing.assert_allclose(y[:, :2].min(0), -1.0, atol=1e-6)
        np.testing.assert_allclose(y[:, :2].max(0), 1.0, atol=1e-6)
    np.testing.assert_allclose(n.unnormalize(y), x, rtol=1e-5, atol=1e-5)
    xt = torch.from_numpy(x).reshape(50, 10, 3).double()
    yt = n.normalize(xt)
    assert isinstance(yt, torch.Tensor) and yt.dtype == torch.float64 and yt.shape == xt.shape
    np.testing.assert_allclose(yt.reshape(-1, 3).numpy(), y, atol=1e-5)
    torch.testing.assert_close(n.unnormalize(yt), xt)
    with pytest.raises(ValueError, match="dim 3"):
        n.normalize(np.zeros((2, 4)))
    with pytest.raises(RuntimeError, match="not fitted"):
        cls().normalize(x)


def test_normalizer_state_dict_plain_tensors():
    n = GaussianNormalizer().fit(np.arange(12.0).reshape(6, 2))
    sd = n.state_dict()
    assert set(sd) == {"mean", "std"}
    assert all(type(v) is torch.Tensor and v.dtype == torch.float32 for v in sd.values())
    m = GaussianNormalizer().load_state_dict(sd)
    x = torch.randn(4, 2)
    assert torch.equal(m.normalize(x), n.normalize(x))
    with pytest.raises(KeyError, match="std"):
        GaussianNormalizer().load_state_dict({"mean": sd["mean"]})


def test_normalizer_set_safetensors_round_trip(tmp_path):
    from safetensors.torch import load_file, save_file

    ep = toy_episodes((4, 3, 5))
    ns = NormalizerSet.fit_episodes(
        ep,
        fields=("observations", "actions", "rewards"),
        kind={"observations": "gaussian", "actions": "minmax", "rewards": "minmax"},
    )
    tensors = {"model.weight": torch.randn(3, 3)}  # a model's weights share the file
    tensors.update(ns.to_tensors("normalizer."))
    assert "normalizer.observations.mean" in tensors and "normalizer.actions.min" in tensors
    save_file(tensors, tmp_path / "model.safetensors")
    loaded = NormalizerSet.from_tensors(load_file(tmp_path / "model.safetensors"), "normalizer.")
    assert set(loaded) == {"observations", "actions", "rewards"}
    assert isinstance(loaded["observations"], GaussianNormalizer)
    assert isinstance(loaded["actions"], MinMaxNormalizer)
    for name in loaded:
        x = getattr(ep, name)
        np.testing.assert_array_equal(loaded.normalize(name, x), ns.normalize(name, x))
        t = torch.from_numpy(np.asarray(x, np.float32))
        assert torch.equal(loaded.unnormalize(name, t), ns.unnormalize(name, t))


def test_no_stray_files_from_atomic_writer(tmp_path):
    path = tmp_path / "sub" / "x.hdf5"
    write_d4rl_hdf5(path, toy_episodes())
    write_d4rl_hdf5(path, toy_episodes((2, 2)))  # overwrite in place
    assert os.listdir(path.parent) == ["x.hdf5"]
    assert len(read_d4rl_hdf5(path)) == 2
