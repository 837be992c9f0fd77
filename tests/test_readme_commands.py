"""Every command in the README's shell blocks runs, with tiny settings (slow tier).

Each README command is run as printed, with only the settings that make it small (episodes, steps,
output folders) replaced, and placeholders (``<run>``, a LeRobot folder) filled with what an earlier
command made or a fixture. A README command without an entry in ``TINY`` fails the test, so a new
command cannot go untested. None of them may print robosuite's start-up noise.
"""

from __future__ import annotations

import json
import lzma
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from paradiffpolicy.data.replay_buffer import ReplayBuffer
from paradiffpolicy.envs.robosuite_env import STARTUP_NOISE

ROOT = Path(__file__).resolve().parents[1]
LEROBOT_FIXTURE = ROOT.parent / "shared" / "interop" / "lerobot_lowdim_tiny"
SHORT = {"n_episodes": "1", "task.max_steps": "12", "progress": "false", "hydra.run.dir": "{tmp}/hydra"}

# what each README command (its text up to the first override) gets replaced or added, by name
TINY = {
    "python -m paradiffpolicy.eval backend=openvino": dict(SHORT),
    "python -m paradiffpolicy.collect task=lift": {"n_episodes": "1", "output": "{tmp}/lift.zarr", "progress": "false",
                                                   "hydra.run.dir": "{tmp}/collect"},
    "python -m paradiffpolicy.train task=lift": {"export": "{tmp}/lift_ck", "dataset": "{tmp}/lift.zarr", "steps": "2",
                                                 "batch_size": "4", "output_dir": "{tmp}/train", "progress": "false",
                                                 "threads": "1", "hydra.run.dir": "{tmp}/train/hydra"},
    "python -m paradiffpolicy.eval task=stack": {**SHORT, "n_episodes": "2", "n_envs": "2", "task.max_steps": "4"},
    "python -m paradiffpolicy.eval task=pusht_image controller=realtime": {**SHORT, "task.max_steps": "24",
                                                                           "output_dir": "{tmp}/realtime"},
    "python -m paradiffpolicy.eval controller=delay controller.delay=4": {**SHORT, "n_envs": "1"},
    "python -m paradiffpolicy.eval controller=delay controller.delay_from": {**SHORT, "task": "pusht_image",
                                                                             "task.max_steps": "24"},
    "python -m paradiffpolicy.eval -m": {**SHORT, "task.max_steps": "8", "sampler.window": "8,16",
                                         "sampler.tol": "0.1", "hydra.sweep.dir": "{tmp}/sweep"},
    "python -m paradiffpolicy.convert": {},
    "python -m paradiffpolicy.eval checkpoint=/tmp/latest.ckpt": {**SHORT, "sampler.scheduler": "ddim", "sampler.num_inference_steps": "4"},
    "python -m paradiffpolicy.train task=pusht_image dataset=": {"steps": "1", "batch_size": "4", "output_dir": "{tmp}/tune_dp",
                                                                "progress": "false", "threads": "1", "hydra.run.dir": "{tmp}/tune_dp/hydra"},
    "python -m paradiffpolicy.tune": {"checkpoint": "{tmp}/lift_copy", "windows": "[8]", "inits": "[rollout]",
                                      "updates": "[picard]", "tols": "[0.1]", "tune_samples": "4", "batch_sizes": "[1,8]",
                                      "verify_top": "1", "trials": "2", "backends": "[jit]", "progress": "false",
                                      "hydra.run.dir": "{tmp}/tune"},
    "python scripts/plot_sweep.py": {},
    "python -m paradiffpolicy.serve": {"port": "{port}", "threads": "1", "hydra.run.dir": "{tmp}/serve"},
    "python -m paradiffpolicy.eval task=lift server=": {**SHORT, "server": "127.0.0.1:{port}"},
}
# placeholders in the printed commands, filled per run
FILL = {
    "outputs/eval/lift/<run>/eval_info.json": "{tmp}/realtime/eval_info.json",
    "path/to/lerobot_folder": str(LEROBOT_FIXTURE),
    "checkpoints/mine": "{tmp}/mine",
    "multirun/eval/lift/<date>": "{tmp}/sweep",
    "/tmp/latest.ckpt": "{tmp}/dp_hybrid/latest.ckpt",  # the README's xz line, done by the test
    "path/to/your.zarr": "{tmp}/dp_hybrid/data.zarr",  # arrays named as that policy's inputs, made by the test
    "/tmp/lift_lerobot": "{tmp}/lift_lerobot",
}


def readme_commands() -> list[str]:
    """The README's shell commands, in order (comments and ``VAR=... `` prefixes dropped)."""
    text = (ROOT / "README.md").read_text()
    out = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in block.splitlines():
            line = re.sub(r"^(\w+=\S+ )+", "", line.split("  #")[0].split(" # ")[0]).strip()
            if line.startswith("python ") and "pip " not in line and "pytest" not in line:
                out.append(line)
    return out


def tiny(command: str, tmp: Path, port: int) -> list[str]:
    """``command`` as argv with its ``TINY`` settings and ``FILL`` placeholders applied."""
    key = max((k for k in TINY if command.startswith(k)), key=len, default=None)
    assert key is not None, f"README command without tiny settings in tests/test_readme_commands.py: {command}"
    for placeholder, value in FILL.items():
        command = command.replace(placeholder, value.format(tmp=tmp, port=port))
    argv = shlex.split(command)
    settings = {k: v.format(tmp=tmp, port=port) for k, v in TINY[key].items()}
    out = []
    for a in argv:
        name = a.split("=", 1)[0]
        if "=" in a and name in settings:
            out.append(f"{name}={settings.pop(name)}")
        else:
            out.append(a)
    return [sys.executable if out[0] == "python" else out[0], *out[1:], *(f"{k}={v}" for k, v in settings.items())]


@pytest.mark.slow
def test_every_readme_command_runs_with_tiny_settings(tmp_path):
    if not LEROBOT_FIXTURE.exists():
        pytest.fail(f"the interop fixtures are missing: {LEROBOT_FIXTURE} (../shared beside the checkout)")
    from paradiffpolicy.serve import free_port

    commands = readme_commands()
    assert len(commands) >= 12 and any("serve" in c for c in commands)
    shutil.copytree(ROOT / "checkpoints" / "lift", tmp_path / "lift_copy")  # tune writes beside its checkpoint
    (tmp_path / "dp_hybrid").mkdir()
    with lzma.open(LEROBOT_FIXTURE.parent / "dp_hybrid_image_small" / "latest.ckpt.xz") as f, \
            open(tmp_path / "dp_hybrid" / "latest.ckpt", "wb") as g:
        shutil.copyfileobj(f, g)
    rng = np.random.default_rng(0)
    ReplayBuffer.create(tmp_path / "dp_hybrid" / "data.zarr").add_episode(
        {"image": rng.integers(0, 256, (24, 96, 96, 3), dtype=np.uint8), "agent_pos": rng.random((24, 2), dtype=np.float32),
         "action": rng.random((24, 2), dtype=np.float32)})
    port = free_port()
    env = {**os.environ, "PARADIFFPOLICY_TOKEN": "readme-test-token", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    server = None
    try:
        for command in commands:
            argv = tiny(command, tmp_path, port)
            if "paradiffpolicy.serve" in argv:  # runs beside the next command
                server = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                for line in server.stdout:
                    if line.startswith("serving"):
                        break
                else:
                    pytest.fail(f"{command}: the server did not start (exit {server.wait()})")
                continue
            run = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
            output = run.stdout + run.stderr
            assert run.returncode == 0, f"{command}\n  ran as {argv}\n{output[-3000:]}"
            noise = [line for line in output.splitlines() if any(n in line for n in STARTUP_NOISE)]
            assert not noise, f"{command}: robosuite's start-up noise: {noise[:2]}"
            if command.startswith("python -m paradiffpolicy.eval task=pusht_image controller=realtime"):
                assert "backend openvino" in output or "backend jit" in output, output[-2000:]  # it says what it chose
                assert "inference in a worker process" in output, output[-2000:]
    finally:
        if server is not None:
            server.terminate()
            server.wait(timeout=60)
    assert (tmp_path / "lift_ck" / "model.safetensors").exists() and (tmp_path / "mine" / "config.json").exists()
    assert json.loads((tmp_path / "mine_prefix" / "config.json").read_text())["policy"]["prefix_input"] is True
    assert (tmp_path / "lift_copy" / "sampler_tuned.json").exists() and (tmp_path / "lift_lerobot" / "policy_preprocessor.json").exists()
    assert list((tmp_path / "sweep").glob("sweep.*"))
