"""paradiffpolicy.tune: the chosen setting keeps its budget, is written beside the checkpoint and
is what sampler=tuned loads."""

import itertools
import json
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from conftest import tiny_policy
from paradiffpolicy import DiffusionPolicy, PolicyConfig, SamplerConfig, load_policy, save_policy
from paradiffpolicy.data.obs_sample import load_observation_sample, save_observation_sample
import paradiffpolicy.eval  # noqa: F401 - registers the eval schema with Hydra
from paradiffpolicy.tune import TuneConfig, predict_ms, run_tune

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("ck") / "tiny"
    save_policy(tiny_policy(), path)
    windows = torch.rand(48, 2, 5, generator=torch.Generator().manual_seed(1))
    save_observation_sample(path, {"observation.state": windows}, {"source": "48 random windows (test)"})
    return path


def test_observation_sample_round_trip(checkpoint):
    windows, source = load_observation_sample(checkpoint)
    assert windows["observation.state"].shape == (48, 2, 5) and source["source"].startswith("48 random")
    assert load_observation_sample(checkpoint.parent) is None


@pytest.mark.slow
def test_tune_writes_a_setting_that_keeps_the_budget_and_sampler_tuned_loads_it(checkpoint, tmp_path):
    cfg = TuneConfig(checkpoint=str(checkpoint), max_dev=0.1, windows=[2, 4, 8], inits=["rollout"], backends=["eager", "jit"],
                     batch_sizes=[1, 2, 4, 8], tune_samples=24, verify_top=2, trials=3, threads=1, progress=False)
    report = run_tune(cfg, tmp_path / "run")
    chosen = report["chosen"]
    assert chosen["name"] in ("picard", "sequential")  # sequential when no Picard setting is faster here
    assert {t["label"] for t in report["timed"]} >= {"sequential eager", report["chosen_label"]}
    assert report["tune_samples"] == report["held_out_samples"] == 24
    picked = next(t for t in report["timed"] if t["label"] == report["chosen_label"])
    assert picked["tune_over"] == 0 and picked["tune_dev_max"] <= 0.05  # coverage 0.99 of 24: none over 0.5 x 0.1
    assert any(t["label"].startswith("README preset") for t in report["timed"])  # timed side by side
    assert report["speedup"]["reference"] == f"sequential, backend={report['chosen_backend']}"
    # the other reference: the fastest sequential sampler on any backend searched, timed in the same run
    sequential = {t["label"]: t["latency_ms"]["p50"] for t in report["timed"] if t["label"].startswith("sequential ")}
    assert set(sequential) == {"sequential eager", "sequential jit"}
    assert report["speedup_vs_fastest_sequential"]["reference"] == min(sequential, key=sequential.get)
    # tolerances are scanned loosest first and the scan stops at the first that keeps the budget
    for window, update in itertools.product((2, 4, 8), ("picard", "frozen_x0")):  # each window update searched
        scan = [t for t in report["tried"] if t["window"] == window and t["update"] == update]
        assert scan
        assert [t["tol"] for t in scan] == sorted((t["tol"] for t in scan), reverse=True)
        assert all(t["over"] > 0 for t in scan[:-1])
    held = report["held_out"]
    assert held["samples"] == 24 and held["meets_budget"] == (held["fraction_within"] >= 0.99)
    assert json.loads((tmp_path / "run" / "tune_report.json").read_text())["chosen"] == chosen
    saved = json.loads((checkpoint / "sampler_tuned.json").read_text())
    assert saved["sampler"] == chosen and saved["tuned_on"]["max_dev"] == 0.1 and saved["backend"] == report["chosen_backend"]
    # sampler=tuned, from Python and from Hydra; warm_start stays the caller's choice
    policy = load_policy(checkpoint, sampler=SamplerConfig(name="tuned", warm_start=True))
    assert policy.sampler_config == SamplerConfig(**{**chosen, "warm_start": True})
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        eval_cfg = OmegaConf.to_object(compose(config_name="eval", overrides=["sampler=tuned", f"checkpoint={checkpoint}"]))
    assert eval_cfg.sampler.name == "tuned"
    tuned = load_policy(checkpoint, sampler="tuned")
    assert tuned.sampler_config == SamplerConfig(**chosen) and tuned.backend == report["chosen_backend"]  # timed there
    assert load_policy(checkpoint, sampler="tuned", backend="eager").backend == "eager"  # unless the caller says


def test_tuned_without_a_preset_and_bad_settings_say_what_to_do(tmp_path, checkpoint):
    with pytest.raises(ValueError, match="sampler_tuned.json does not exist; run python -m paradiffpolicy.tune"):
        load_policy(ROOT / "checkpoints" / "pusht", sampler="tuned")
    with pytest.raises(ValueError, match="load_policy"):
        DiffusionPolicy(PolicyConfig(obs_dim=2, action_dim=2), SamplerConfig(name="tuned"))
    for kw, match in ((dict(max_dev=0), "max_dev"), (dict(coverage=1.5), "coverage"), (dict(margin=0), "margin"), (dict(tols=[0.0]), "tols"),
                      (dict(backends=["onnx"]), "backends"), (dict(device="cuda:7" if torch.cuda.is_available() else "cuda"), "device")):
        with pytest.raises(ValueError, match=match):
            TuneConfig(**kw)


def test_latency_prediction_interpolates_the_measured_batch_cost():
    cost = {1: 2.0, 4: 3.0, 16: 9.0}
    assert predict_ms(cost, 0.5, iterations=10, rows=4) == pytest.approx(10 * (3.0 + 0.5))
    assert predict_ms(cost, 0.5, iterations=10, rows=10) == pytest.approx(10 * (6.0 + 0.5))


def test_a_preset_written_before_backends_moved_out_of_the_sampler_still_loads(tmp_path):
    from paradiffpolicy.presets import load_tuned, tuned_path

    ckpt = tmp_path / "ck"
    ckpt.mkdir()
    legacy = {"sampler": {"name": "picard", "window": 8, "tol": 0.1, "backend": "jit"}, "tuned_on": {}}
    tuned_path(ckpt).write_text(json.dumps(legacy))
    sampler, backend = load_tuned(ckpt)
    assert sampler == SamplerConfig(name="picard", window=8, tol=0.1) and backend == "jit"
    tuned_path(ckpt).write_text(json.dumps({**legacy, "sampler": {**legacy["sampler"], "backend": "tpu"}}))
    with pytest.raises(ValueError, match="backend in .*sampler_tuned.json='tpu' is unknown"):
        load_tuned(ckpt)


def test_quick_mode_is_a_coarser_grid_and_overrides_still_win():
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        full = OmegaConf.to_object(compose(config_name="tune"))
        quick = OmegaConf.to_object(compose(config_name="tune", overrides=["tune_mode=quick"]))
        mixed = OmegaConf.to_object(compose(config_name="tune", overrides=["tune_mode=quick", "windows=[4]"]))
    assert full == TuneConfig()  # the full search is the schema's defaults
    assert quick.windows == [8, 16] and quick.tune_samples < full.tune_samples and quick.trials < full.trials
    assert mixed.windows == [4] and mixed.tune_samples == quick.tune_samples
