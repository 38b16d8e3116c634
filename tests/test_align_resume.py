"""Alignment checkpoints at stage boundaries: a run stopped after any stage, or killed with
SIGKILL in the middle of one, resumes and ends with the same adapters as an uninterrupted
run; a resume with other settings is refused."""

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

pytest.importorskip("peft")

SCRIPT = textwrap.dedent('''
    import sys, torch
    torch.set_num_threads(1)
    from diffalign.align.runner import AlignConfig, align
    from diffalign.align.sequence import SequenceConfig
    from diffalign.align.dpo import DPOConfig
    from diffalign.align.sft import SFTConfig
    from diffalign.align.rl import RLConfig
    from diffalign.align.final_stage import FinalStageConfig
    from diffalign.models.registry import build_model
    from diffalign.tasks import resolve_task

    class Critic(torch.nn.Module):
        def q(self, obs, act):
            return -((torch.as_tensor(act)[..., 0] - 0.6) ** 2)

    out, stop_after = sys.argv[1], int(sys.argv[2])
    task = resolve_task("nav1d/full", episodes=60)
    torch.manual_seed(0)
    model = build_model("dp", "ddpm", None, task.obs_dim, task.act_dim,
                        process_kwargs={"default_steps": 5})
    ds = model.make_dataset(task.episodes)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(60):
        loss = model.loss(ds.sample(32, g), g)["loss"]
        opt.zero_grad(); loss.backward(); opt.step()
    model.eval()
    seq = SequenceConfig(methods=("dpo", "sft", "rl"), passes=1, max_updates=4, eval_every=2,
                         patience=5)
    cfg = AlignConfig(sequence=seq, conditions=64, val_conditions=16, cascade=None,
                      pessimism=None, final=FinalStageConfig(states=16),
                      rl=RLConfig(states_per_update=8, group_size=2, ppo_epochs=1),
                      dpo=DPOConfig(states_per_update=8, candidates=4, updates_per_batch=1),
                      sft=SFTConfig(states_per_update=8, candidates=4, epochs=2), seed=0)
    seen = []

    def on_stage_end(st, net):
        seen.append(st.name)
        print("stage", st.name, flush=True)
        if len(seen) == stop_after:
            raise SystemExit(3)

    align(model, Critic(), task.episodes, cfg, out_dir=out, progress=False,
          on_stage_end=on_stage_end)
    print("done", flush=True)
''')


def _run(script, out, stop_after=0, **kw):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, str(script), str(out), str(stop_after)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


def _adapters(out: Path) -> dict[str, bytes]:
    files = sorted(out.glob("stages/*/adapter/adapter_model.safetensors"))
    files.append(out / "adapter" / "adapter_model.safetensors")
    return {str(f.relative_to(out)): f.read_bytes() for f in files}


@pytest.mark.slow
def test_stopped_and_killed_alignments_resume_to_the_same_adapters(tmp_path):
    script = tmp_path / "align_job.py"
    script.write_text(SCRIPT)
    whole = _run(script, tmp_path / "whole")
    # stopped right after its first stage (the callback raises), then resumed
    stopped = _run(script, tmp_path / "stopped", stop_after=1)
    assert stopped.wait(300) == 3
    assert whole.wait(300) == 0, whole.stdout.read()
    resumed = _run(script, tmp_path / "stopped")
    log = resumed.communicate(timeout=300)[0]
    assert resumed.returncode == 0, log
    # the finished stages are called back again (from their saved adapters), then the rest
    stages = [line.split()[1] for line in log.splitlines() if line.startswith("stage ")]
    assert stages == ["dpo", "sft", "rl"]
    expect = _adapters(tmp_path / "whole")
    assert len(expect) == 4  # three stages and the final adapter
    assert _adapters(tmp_path / "stopped") == expect
    # SIGKILL in the middle of the third stage: its boundary state is the second's
    killed = _run(script, tmp_path / "killed")
    state = tmp_path / "killed" / "progress" / "state.json"
    seen = []
    for line in killed.stdout:
        if not line.startswith("stage "):
            continue
        seen.append(line.split()[-1])
        if len(seen) == 2:
            deadline = time.monotonic() + 60
            while not state.exists() or '"sft"' not in state.read_text():
                assert time.monotonic() < deadline
                time.sleep(0.05)
            os.kill(killed.pid, signal.SIGKILL)
            break
    killed.wait(60)
    again = _run(script, tmp_path / "killed")
    assert again.wait(300) == 0, again.stdout.read()
    assert _adapters(tmp_path / "killed") == expect


def test_resume_with_other_settings_is_refused(tmp_path):
    import json

    from diffalign.align.runner import _fingerprint, _load_boundary
    from diffalign.errors import UserError

    where = tmp_path / "progress"
    where.mkdir()
    (where / "state.json").write_text(json.dumps({"fingerprint": "other"}))
    with pytest.raises(UserError, match="other settings"):
        _load_boundary(where, "mine")
    assert _fingerprint.__doc__
