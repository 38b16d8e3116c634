"""Readers and writers for offline datasets: D4RL HDF5, robomimic HDF5 and Minari.

Every reader returns :class:`~diffalign.data.episodes.Episodes` with ``meta["source"]`` set
to the file (or dataset id) and ``meta["format"]`` naming the layout. Malformed input raises
:class:`~diffalign.data.episodes.DatasetError` naming the field and the file. ``h5py`` and
``minari`` are imported inside the functions that need them.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from diffalign.atomic import atomic_path
from diffalign.data.episodes import DatasetError, Episodes

__all__ = [
    "D4RL_KEYS",
    "load_dataset",
    "read_d4rl_hdf5",
    "read_minari",
    "read_robomimic_hdf5",
    "write_d4rl_hdf5",
    "write_minari",
    "write_robomimic_hdf5",
]

D4RL_KEYS = ("observations", "actions", "rewards", "terminals", "timeouts")
"""Datasets a D4RL HDF5 file must hold (``next_observations`` is optional)."""

PathLike = str | os.PathLike


# ---------------------------------------------------------------------- helpers
def _import_h5py():
    try:
        import h5py
    except ImportError as exc:  # pragma: no cover - h5py is in the dev/envs extras
        raise ImportError("reading HDF5 datasets needs h5py: pip install h5py") from exc
    return h5py


def _open_hdf5(path: PathLike):
    """Open ``path`` read-only, with clear errors for missing, empty and non-HDF5 files."""
    h5py = _import_h5py()
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{p}: no such dataset file")
    if p.is_dir():
        raise DatasetError(f"{p}: is a directory, not an HDF5 file")
    if p.stat().st_size == 0:
        raise DatasetError(f"{p}: file is empty (0 bytes), not an HDF5 dataset")
    if not h5py.is_hdf5(str(p)):
        raise DatasetError(f"{p}: not an HDF5 file (no HDF5 signature)")
    try:
        return h5py.File(str(p), "r")
    except OSError as exc:
        raise DatasetError(f"{p}: cannot open as HDF5: {exc}") from exc


def _py(value: Any) -> Any:
    """HDF5 attribute value -> plain Python value."""
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return [_py(v) for v in value.tolist()] if value.dtype == object else value.tolist()
    return value


def _attrs_to_meta(attrs) -> dict[str, Any]:
    return {str(k): _py(v) for k, v in attrs.items()}


def _meta_to_attrs(meta: Mapping[str, Any], attrs) -> None:
    """Write scalars and strings as they are; lists/dicts as JSON strings; skip None."""
    for key, value in meta.items():
        if key == "source" or value is None:
            continue
        if isinstance(value, np.generic):
            value = value.item()
        if isinstance(value, (str, bool, int, float)):
            attrs[key] = value
        else:
            attrs[key] = json.dumps(value, default=str)


def _atomic_write(path: PathLike, write: Callable[[Any], None]) -> Path:
    """Write an HDF5 file through a temporary file in the same folder, then rename."""
    h5py = _import_h5py()
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        write(f)
    return Path(path)


def _read_array(group, key: str, where: str):
    if key not in group:
        raise DatasetError(f"{where}: missing required key '{key}'")
    obj = group[key]
    if not hasattr(obj, "shape") or not hasattr(obj, "dtype"):
        raise DatasetError(f"{where}: key '{key}' is a group, expected a dataset")
    return obj[()]


# ---------------------------------------------------------------------- D4RL
def read_d4rl_hdf5(path: PathLike) -> Episodes:
    """Read a D4RL-layout HDF5 file.

    Required datasets: ``observations (N, obs_dim)``, ``actions (N, act_dim)``,
    ``rewards (N,)``, ``terminals (N,)``, ``timeouts (N,)``; optional
    ``next_observations (N, obs_dim)``. Other datasets/groups (``infos/``, ``metadata/``) are
    ignored. File attributes become ``meta`` (plus ``source`` and ``format="d4rl_hdf5"``).
    """
    where = str(path)
    with _open_hdf5(path) as f:
        arrays = {k: _read_array(f, k, where) for k in D4RL_KEYS}
        next_obs = _read_array(f, "next_observations", where) if "next_observations" in f else None
        meta = _attrs_to_meta(f.attrs)
    meta["format"] = "d4rl_hdf5"
    return Episodes.from_arrays(**arrays, next_observations=next_obs, meta=meta, source=where)


def write_d4rl_hdf5(path: PathLike, episodes: Episodes, compression: str | None = None) -> Path:
    """Write ``episodes`` as a D4RL-layout HDF5 file (atomically: temp file + os.replace).

    ``meta`` entries become file attributes (scalars/strings as is, lists/dicts as JSON
    strings, ``source`` and None values skipped). Returns the path written.
    """

    def write(f) -> None:
        f.create_dataset("observations", data=episodes.observations, compression=compression)
        f.create_dataset("actions", data=episodes.actions, compression=compression)
        f.create_dataset("rewards", data=episodes.rewards, compression=compression)
        f.create_dataset("terminals", data=episodes.terminals, compression=compression)
        f.create_dataset("timeouts", data=episodes.timeouts, compression=compression)
        if episodes.next_observations is not None:
            f.create_dataset(
                "next_observations", data=episodes.next_observations, compression=compression
            )
        _meta_to_attrs({k: v for k, v in episodes.meta.items() if k != "format"}, f.attrs)

    return _atomic_write(path, write)


# ---------------------------------------------------------------------- robomimic
_DEMO_RE = re.compile(r"^demo_(\d+)$")


def _demo_names(data_group) -> list[str]:
    names = [k for k in data_group.keys() if _DEMO_RE.match(k)]
    return sorted(names, key=lambda k: int(_DEMO_RE.match(k).group(1)))


def _is_robomimic(path: PathLike) -> bool:
    with _open_hdf5(path) as f:
        return "data" in f and hasattr(f["data"], "keys") and bool(_demo_names(f["data"]))


def read_robomimic_hdf5(path: PathLike, obs_keys: Sequence[str] | None = None) -> Episodes:
    """Read a robomimic-layout HDF5 file: ``data/demo_<i>/{obs/<key>, actions, rewards,
    dones}`` (``next_obs/<key>`` optional).

    Demos are read in numeric order (demo_2 before demo_10). Observation keys are flattened
    per step and concatenated in ``obs_keys`` order (default: sorted keys of the first demo).
    Each demo is one episode: its last step ends it, as a terminal when ``dones[-1]`` is set
    and a timeout otherwise (``dones`` inside a demo do not split it). ``meta`` gets the
    ``data`` group's attributes, ``env_id`` from ``env_args`` when present, ``obs_keys`` and
    ``demos``.
    """
    where = str(path)
    episodes: list[dict[str, np.ndarray]] = []
    with _open_hdf5(path) as f:
        if "data" not in f or not hasattr(f["data"], "keys"):
            raise DatasetError(f"{where}: missing required group 'data' (robomimic layout)")
        data = f["data"]
        demos = _demo_names(data)
        if not demos:
            raise DatasetError(f"{where}: group 'data' holds no 'demo_<i>' groups (empty dataset)")
        meta = _attrs_to_meta(data.attrs)
        if "obs" not in data[demos[0]]:
            raise DatasetError(f"{where}: missing required key 'data/{demos[0]}/obs'")
        keys = list(obs_keys) if obs_keys is not None else sorted(data[demos[0]]["obs"].keys())
        if not keys:
            raise DatasetError(f"{where}: 'data/{demos[0]}/obs' holds no observation keys")
        has_next = all("next_obs" in data[d] for d in demos)
        for name in demos:
            demo = data[name]
            dwhere = f"{where} (demo '{name}')"
            if "obs" not in demo:
                raise DatasetError(f"{dwhere}: missing required key 'data/{name}/obs'")
            actions = _read_array(demo, "actions", dwhere)
            t = len(actions)

            def flat(group, gname: str, name=name, dwhere=dwhere, t=t) -> np.ndarray:
                parts = []
                for k in keys:
                    arr = _read_array(group, k, f"{dwhere} group '{gname}'")
                    arr = np.asarray(arr)
                    if arr.ndim == 0 or len(arr) != t:
                        raise DatasetError(
                            f"{dwhere}: field 'data/{name}/{gname}/{k}' has shape {arr.shape} "
                            f"but 'actions' has {t} steps (ragged demo)"
                        )
                    parts.append(arr.reshape(t, -1).astype(np.float32))
                return np.concatenate(parts, axis=1)

            dones = np.asarray(_read_array(demo, "dones", dwhere)).reshape(-1)
            rewards = _read_array(demo, "rewards", dwhere)
            if t == 0:
                raise DatasetError(f"{dwhere}: field 'data/{name}/actions' is empty")
            rewards = np.asarray(rewards).reshape(-1)
            for k, arr in (("dones", dones), ("rewards", rewards)):
                if len(arr) != t:
                    raise DatasetError(
                        f"{dwhere}: field 'data/{name}/{k}' has {len(arr)} steps but "
                        f"'actions' has {t} (ragged demo)"
                    )
            terminals = np.zeros(t, bool)
            timeouts = np.zeros(t, bool)
            if bool(dones[-1]):
                terminals[-1] = True
            else:
                timeouts[-1] = True
            ep = {
                "observations": flat(demo["obs"], "obs"),
                "actions": np.asarray(actions).reshape(t, -1),
                "rewards": rewards,
                "terminals": terminals,
                "timeouts": timeouts,
            }
            if has_next:
                ep["next_observations"] = flat(demo["next_obs"], "next_obs")
            episodes.append(ep)
    meta["format"] = "robomimic_hdf5"
    meta["obs_keys"] = keys
    meta["demos"] = demos
    meta["source"] = where
    env_args = meta.get("env_args")
    if isinstance(env_args, str):
        try:
            meta.setdefault("env_id", json.loads(env_args).get("env_name"))
        except (json.JSONDecodeError, AttributeError):
            pass
    return Episodes.from_episode_list(episodes, meta=meta)


def write_robomimic_hdf5(
    path: PathLike,
    demos: Sequence[Mapping[str, Any]] | Episodes,
    env_args: Mapping[str, Any] | None = None,
    obs_key: str = "state",
) -> Path:
    """Write a robomimic-layout HDF5 file (atomically). Used by tests to create fixtures.

    ``demos`` is a list of dicts ``{"obs": {key: (T, ...)}, "actions": (T, A),
    "rewards": (T,), "dones": (T,), "next_obs": {key: ...} (optional)}``, or an
    :class:`Episodes` (each episode becomes a demo, observations under ``obs/<obs_key>``,
    ``dones`` = terminals). ``env_args`` is stored as a JSON string attribute of ``data``.
    """
    if isinstance(demos, Episodes):
        eps = demos
        demos = []
        for i in range(len(eps)):
            e = eps.episode(i)
            d = {
                "obs": {obs_key: e["observations"]},
                "actions": e["actions"],
                "rewards": e["rewards"],
                "dones": e["terminals"].astype(np.int64),
            }
            if "next_observations" in e:
                d["next_obs"] = {obs_key: e["next_observations"]}
            demos.append(d)
        if env_args is None and eps.meta.get("env_id"):
            env_args = {"env_name": eps.meta["env_id"], "type": 0, "env_kwargs": {}}

    def write(f) -> None:
        data = f.create_group("data")
        total = 0
        for i, demo in enumerate(demos):
            g = data.create_group(f"demo_{i}")
            obs = g.create_group("obs")
            for k, v in demo["obs"].items():
                obs.create_dataset(k, data=np.asarray(v))
            if demo.get("next_obs") is not None:
                nobs = g.create_group("next_obs")
                for k, v in demo["next_obs"].items():
                    nobs.create_dataset(k, data=np.asarray(v))
            for k in ("actions", "rewards", "dones"):
                if k in demo:
                    g.create_dataset(k, data=np.asarray(demo[k]))
            n = len(demo["actions"]) if "actions" in demo else 0
            g.attrs["num_samples"] = n
            total += n
        data.attrs["total"] = total
        if env_args is not None:
            data.attrs["env_args"] = json.dumps(dict(env_args))

    return _atomic_write(path, write)


# ---------------------------------------------------------------------- Minari
def _flatten_obs(obs: Any, t: int) -> np.ndarray:
    """Minari observations (array, dict or tuple, possibly nested) -> (t, D) float32."""
    if isinstance(obs, Mapping):
        parts = [_flatten_obs(obs[k], t) for k in sorted(obs)]
        return np.concatenate(parts, axis=1)
    if isinstance(obs, tuple):
        return np.concatenate([_flatten_obs(o, t) for o in obs], axis=1)
    return np.asarray(obs).reshape(t, -1).astype(np.float32)


def _first_len(obs: Any) -> int:
    if isinstance(obs, Mapping):
        return _first_len(obs[sorted(obs)[0]])
    if isinstance(obs, tuple):
        return _first_len(obs[0])
    return len(obs)


def read_minari(dataset_id_or_path: PathLike) -> Episodes:
    """Load a local Minari dataset (by id, e.g. ``"mujoco/hopper/medium-v0"``, or by the
    dataset's folder) and flatten it to the D4RL layout. Never downloads.

    Minari episodes hold ``T + 1`` observations for ``T`` actions: ``observations`` gets the
    first ``T`` and ``next_observations`` the last ``T``. Dict/tuple observations are
    flattened (dict keys sorted). ``terminals``/``timeouts`` come from
    ``terminations``/``truncations``. ``meta`` gets ``dataset_id``, ``env_id`` (when the
    dataset records an env spec), ``ref_min_score``/``ref_max_score`` (when recorded).
    Needs ``pip install minari``.
    """
    try:
        import minari
        from minari.dataset.minari_dataset import MinariDataset
    except ImportError as exc:
        raise ImportError(
            "reading Minari datasets needs the minari package: pip install minari"
        ) from exc

    spec = str(dataset_id_or_path)
    p = Path(spec)
    if p.is_dir():
        data_path = p / "data" if (p / "data").is_dir() else p
        try:
            ds = MinariDataset(str(data_path))
        except (ValueError, OSError, KeyError) as exc:
            raise DatasetError(f"{spec}: not a readable Minari dataset folder: {exc}") from exc
    else:
        try:
            ds = minari.load_dataset(spec, download=False)
        except FileNotFoundError as exc:
            root = os.environ.get("MINARI_DATASETS_PATH", "~/.minari/datasets")
            raise DatasetError(
                f"Minari dataset '{spec}' is not available offline (not found under {root}); "
                f"download it where there is network (`minari download {spec}`) and copy it "
                "under MINARI_DATASETS_PATH"
            ) from exc
        except ValueError as exc:
            raise DatasetError(f"Minari dataset '{spec}': {exc}") from exc

    storage_meta = dict(getattr(getattr(ds, "storage", None), "metadata", {}) or {})
    where = str(getattr(ds.spec, "data_path", spec))
    eps: list[dict[str, np.ndarray]] = []
    for ep in ds.iterate_episodes():
        t = len(np.asarray(ep.rewards).reshape(-1))
        if _first_len(ep.observations) != t + 1:
            raise DatasetError(
                f"{where}: field 'observations' of episode {ep.id} has "
                f"{_first_len(ep.observations)} steps, expected {t + 1} (T + 1)"
            )
        if isinstance(ep.actions, (Mapping, tuple)):
            raise DatasetError(f"{where}: field 'actions' is a dict/tuple space (unsupported)")
        obs = _flatten_obs(ep.observations, t + 1)
        eps.append(
            {
                "observations": obs[:-1],
                "next_observations": obs[1:],
                "actions": np.asarray(ep.actions).reshape(t, -1),
                "rewards": np.asarray(ep.rewards).reshape(-1),
                "terminals": np.asarray(ep.terminations).reshape(-1).astype(bool),
                "timeouts": np.asarray(ep.truncations).reshape(-1).astype(bool),
            }
        )
    if not eps:
        raise DatasetError(f"{where}: Minari dataset '{spec}' holds no episodes (empty)")
    meta: dict[str, Any] = {"format": "minari", "dataset_id": storage_meta.get("dataset_id", spec)}
    env_spec = getattr(ds, "env_spec", None)
    if env_spec is not None:
        meta["env_id"] = env_spec.id
        if getattr(env_spec, "max_episode_steps", None) is not None:
            meta["max_episode_steps"] = int(env_spec.max_episode_steps)
        kwargs = getattr(env_spec, "kwargs", None)
        if kwargs:
            meta["env_kwargs"] = json.dumps(kwargs, default=str)
    for key in ("ref_min_score", "ref_max_score", "algorithm_name", "minari_version"):
        if storage_meta.get(key) is not None:
            meta[key] = _py(storage_meta[key])
    meta["source"] = where
    return Episodes.from_episode_list(eps, meta=meta)


def write_minari(
    episodes: Episodes,
    dataset_id: str,
    env_id: str,
    env_kwargs: Mapping[str, Any] | None = None,
    algorithm_name: str | None = None,
    description: str | None = None,
) -> Any:
    """Create the local Minari dataset ``dataset_id`` from ``episodes`` (which need
    ``next_observations``: Minari keeps ``T + 1`` observations per episode).

    ``env_id``/``env_kwargs``: the gymnasium env the data comes from (``gym.make`` must know
    it; its spec is stored with the dataset). ``ref_min_score``/``ref_max_score`` are taken
    from ``episodes.meta`` when set. The dataset lands in Minari's root
    (``MINARI_DATASETS_PATH``, default ``~/.minari/datasets``); an existing one raises
    ``ValueError``. Needs ``minari``. Returns the ``MinariDataset``.
    """
    import warnings

    import gymnasium as gym

    try:
        import minari
        from minari.data_collector.episode_buffer import EpisodeBuffer
    except ImportError as exc:
        raise ImportError("writing Minari datasets needs minari: "
                          "pip install minari==0.5.4") from exc
    if episodes.next_observations is None:
        raise DatasetError(f"{dataset_id}: Minari needs next_observations, the dataset has none")
    buffers = []
    for i in range(len(episodes)):
        ep = episodes.episode(i)
        obs = np.concatenate([ep["observations"], ep["next_observations"][-1:]])
        buffers.append(
            EpisodeBuffer(
                id=i,
                observations=np.asarray(obs, dtype=np.float32),
                actions=np.asarray(ep["actions"], dtype=np.float32),
                rewards=list(np.asarray(ep["rewards"], dtype=np.float64)),
                terminations=list(np.asarray(ep["terminals"], dtype=bool)),
                truncations=list(np.asarray(ep["timeouts"], dtype=bool)),
                infos={},
            )
        )
    env = gym.make(env_id, **dict(env_kwargs or {}))
    meta = episodes.meta
    refs = {}
    if meta.get("ref_min_score") is not None and meta.get("ref_max_score") is not None:
        refs = {"ref_min_score": float(meta["ref_min_score"]),
                "ref_max_score": float(meta["ref_max_score"])}
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r"`(code_permalink|author|author_email)`")
            warnings.filterwarnings("ignore", message=r"`eval_env` is set to None")
            return minari.create_dataset_from_buffers(
                dataset_id=dataset_id,
                buffer=buffers,
                env=env,
                algorithm_name=algorithm_name or str(meta.get("policy", "unknown")),
                description=description or f"{env_id}: {len(episodes)} episodes",
                requirements=["diffalign"],
                **refs,
            )
    finally:
        env.close()


# ---------------------------------------------------------------------- dispatch
def load_dataset(spec: PathLike | Episodes, **kwargs: Any) -> Episodes:
    """Load a dataset from ``spec``.

    - an :class:`Episodes`: returned as is;
    - a path ending in ``.hdf5``/``.h5``: robomimic when it has a ``data`` group holding
      ``demo_*`` groups (``kwargs`` go to :func:`read_robomimic_hdf5`), D4RL otherwise;
    - anything else: a Minari dataset id or folder (:func:`read_minari`).
    """
    if isinstance(spec, Episodes):
        return spec
    p = Path(spec)
    if p.suffix.lower() in (".hdf5", ".h5"):
        if _is_robomimic(p):
            return read_robomimic_hdf5(p, **kwargs)
        if kwargs:
            raise TypeError(f"unexpected options for a D4RL file: {sorted(kwargs)}")
        return read_d4rl_hdf5(p)
    return read_minari(spec)
