"""The ``diffalign`` command: a thin dispatcher onto library functions.

Each command is a dataclass (its fields are the flags, their docstrings the help text) and a
function taking it; tyro builds the parser, so defaults and help cannot drift from the code.
Commands with two words (``diffalign nav1d optimum``) are looked up by both words.

Exit codes say the cause: 0 done; 2 bad input, reported in one line (the arguments, which
includes any exception raised while tyro builds and validates the command's dataclass, or
a :class:`~diffalign.errors.UserError` or missing/misplaced file while the command runs);
130 interrupted. Any other exception is a fault of the program: it propagates with its
traceback (exit 1 from the console script).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from dataclasses import dataclass

from .errors import UserError

__all__ = ["COMMANDS", "main"]


@dataclass(frozen=True)
class Command:
    """One CLI command: where its config class and entry function live."""

    summary: str
    load: Callable[[], tuple[type, Callable]]


def _toy():
    from .toy import ToyConfig, run_toy

    def main(cfg: ToyConfig) -> None:
        res = run_toy(cfg)
        print(json.dumps({k: v for k, v in res.items() if k != "config"}, indent=2))
        extra = ", align.png, aligned_<reward>.npy" if getattr(cfg, "align", False) else ""
        print(f"wrote {cfg.out}/data.npy, samples.npy, paths.png{extra}, toy.json")

    return ToyConfig, main


def _nav1d_optimum():
    from .commands.nav1d import OptimumArgs, optimum_main

    return OptimumArgs, optimum_main


def _data_nav1d():
    from .commands.nav1d import DataNav1DArgs, data_nav1d_main

    return DataNav1DArgs, data_nav1d_main


def _loader(module: str, cfg: str, fn: str):
    def load():
        import importlib

        mod = importlib.import_module(f"diffalign.commands.{module}")
        return getattr(mod, cfg), getattr(mod, fn)

    return load


COMMANDS: dict[str, Command] = {
    "run nav1d": Command("the main job: data, foundation, critic, alignment, cascade, report",
                         _loader("run", "RunNav1DArgs", "run_nav1d")),
    "run": Command("the same pipeline on any task: run TASK --out DIR (nav1d/*, metaworld/*, "
                   "mujoco/*, a dataset file)", _loader("run", "RunArgs", "run_main")),
    "train": Command("train a foundation model (diffuser, dd, dp, synther)",
                     _loader("train", "TrainArgs", "train_main")),
    "critic": Command("train an IQL critic on a task's data",
                      _loader("critic", "CriticArgs", "critic_main")),
    "evaluate": Command("roll out a model, an exported stage or a run's stage; write eval.json",
                        _loader("evaluate", "EvaluateArgs", "evaluate_main")),
    "export": Command("write a run's stage as a plain model directory (adapter merged)",
                      _loader("export", "ExportArgs", "export_main")),
    "align": Command("align a reference model to a critic (RL, DPO, SFT, cascade; LoRA)",
                     _loader("align", "AlignArgs", "align_main")),
    "toy": Command("train the 2-D toy with one process; samples, paths, energy distance", _toy),
    "nav1d optimum": Command("the Nav1D optimum by dynamic programming (and random return)",
                             _nav1d_optimum),
    "data nav1d": Command("write a Nav1D dataset (partial/full/expert) as HDF5 or Minari",
                          _data_nav1d),
    "collect": Command("collect an offline dataset in a simulator (MetaWorld, MuJoCo, ...)",
                       _loader("collect", "CollectArgs", "collect_main")),
    "bench": Command("grid of task x model x process x seed cells; Table 2/3 and plots",
                     _loader("bench", "BenchArgs", "bench_main")),
}

#: Exceptions of a running command that are the user's input being wrong: reported in one
#: line, exit code 2. A ValueError or KeyError from inside a command is not among them: it
#: may as well be a fault of the program, whose traceback must not be lost.
USER_ERRORS: tuple[type[BaseException], ...] = (UserError, FileNotFoundError, FileExistsError,
                                                 IsADirectoryError, NotADirectoryError)


class _BadArguments(Exception):
    """A :class:`UserError` of a command's argument checks, carried past tyro (which would
    draw a multi-line box around any ValueError raised while it builds the arguments)."""


def _checked(cfg_cls: type) -> type:
    """``cfg_cls`` whose ``__post_init__`` raises its UserErrors as :class:`_BadArguments`."""
    post = getattr(cfg_cls, "__post_init__", None)
    if post is None:
        return cfg_cls

    def __post_init__(self):
        try:
            post(self)
        except UserError as e:
            raise _BadArguments(e) from None

    return type(cfg_cls.__name__, (cfg_cls,), {"__post_init__": __post_init__,
                                               "__doc__": cfg_cls.__doc__,
                                               "__module__": cfg_cls.__module__,
                                               "__qualname__": cfg_cls.__qualname__})


def _report(name: str, e: BaseException) -> int:
    if isinstance(e, _BadArguments):
        e = e.args[0]
    msg = e.args[0] if isinstance(e, KeyError) and e.args else e
    line = " ".join(str(msg).split()) or type(e).__name__
    print(f"diffalign {name}: error: {line}", file=sys.stderr)
    return 2


def _usage() -> str:
    width = max(len(n) for n in COMMANDS)
    lines = ["usage: diffalign COMMAND [--help] [OPTIONS]", "", "commands:"]
    lines += [f"  {n.ljust(width)}  {c.summary}" for n, c in COMMANDS.items()]
    lines += ["", "Run `diffalign COMMAND --help` for the options of a command."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``diffalign`` console script; returns the exit code."""
    import tyro

    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    name = None
    if len(argv) >= 2 and f"{argv[0]} {argv[1]}" in COMMANDS:
        name, rest = f"{argv[0]} {argv[1]}", argv[2:]
    elif argv[0] in COMMANDS:
        name, rest = argv[0], argv[1:]
    if name is None:
        groups = sorted({n.split()[0] for n in COMMANDS})
        print(f"diffalign: unknown command {' '.join(argv[:2])!r}; commands: "
              f"{', '.join(COMMANDS)} (groups: {', '.join(groups)})", file=sys.stderr)
        return 2
    cfg_cls, fn = COMMANDS[name].load()
    try:
        try:
            cfg = tyro.cli(_checked(cfg_cls), args=rest, prog=f"diffalign {name}",
                           description=COMMANDS[name].summary)
        except SystemExit as e:  # --help (0) or a parse/validation error tyro reported (2)
            return int(e.code or 0)
        except Exception as e:  # raised by __post_init__: the arguments are wrong
            return _report(name, e)
        fn(cfg)
    except USER_ERRORS as e:
        return _report(name, e)
    except KeyboardInterrupt:
        print(f"diffalign {name}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
