"""python -m paradiffpolicy.bench.sampler: every variant is compared with the sequential sample and timed against
each sequential reference in the same run."""

import importlib
import json
import shutil
from pathlib import Path

import pytest
from conftest import needs_backend

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_bench_reports_deviation_and_speedups_for_every_variant(tmp_path):
    out = tmp_path / "bench.json"
    report = importlib.import_module("paradiffpolicy.bench.sampler").main(["checkpoint=random", "down_dims=[16,32]", "diffusion_step_embed_dim=16", "num_inference_steps=20",
                            "trials=2", "warmup=1", "window=8", "tol=0.5", "inits=[copy,rollout]", "backends=[eager,jit]",
                            "threads=1", f"out={out}"])
    variants = report["variants"]
    assert report["cpu"].endswith("cpus")  # the processor is named: speed ratios differ between machines
    assert set(variants) == {"sequential-jit", "picard-copy", "picard-copy-jit", "picard-rollout", "picard-rollout-jit"}
    # the jit reference computes the sequential sample itself; a loose tolerance moves Picard off it
    assert variants["sequential-jit"]["max_abs_dev"] < 1e-5
    assert variants["picard-copy"]["max_abs_dev"] > 1e-4
    for name, r in variants.items():
        # the headline ratio is the median of the per-trial ratios it names
        assert r["speedup_spread"]["p5"] <= r["speedup"] <= r["speedup_spread"]["p95"]
        assert ("speedup_vs" in r) == (not name.startswith("sequential"))
    # every speed-up names its reference: the headline one is against the same backend
    assert variants["picard-rollout-jit"]["speedup_same_backend"]["reference"] == "sequential-jit"
    assert variants["picard-rollout"]["speedup_same_backend"]["reference"] == "sequential"
    assert report["speedup_reference"] == "sequential"
    assert report["speedup"] == report["picard"]["speedup_same_backend"]["median"]  # the first Picard variant's
    assert json.loads(out.read_text())["variants"].keys() == variants.keys()
    md = out.with_suffix(".md").read_text()
    assert "vs sequential-jit" in md and "same backend" in md and "(cross-backend)" in md
    # deviation per sample over the 2 timed trials and the default 64-sample untimed batch
    assert all(r["abs_dev"]["samples"] == 2 + 64 for r in variants.values())


@pytest.mark.slow
def test_bench_sweeps_tolerances_and_counts_deviating_samples(tmp_path):
    report = importlib.import_module("paradiffpolicy.bench.sampler").main(["checkpoint=random", "down_dims=[16,32]", "diffusion_step_embed_dim=16", "num_inference_steps=20",
                            "trials=1", "warmup=0", "window=8", "tols=[0.0,2.0]", "dev_samples=16", "threads=1",
                            f"out={tmp_path / 'bench.json'}"])
    exact, loose = report["variants"]["picard-rollout-tol0"], report["variants"]["picard-rollout-tol2"]
    assert (exact["settings"]["tol"], loose["settings"]["tol"]) == (0.0, 2.0)
    assert exact["abs_dev"]["samples"] == loose["abs_dev"]["samples"] == 17
    assert exact["max_abs_dev"] < 1e-5 and exact["abs_dev"]["over_1e-2"] == 0
    # a tolerance of 2 noise standard deviations accepts the first guess: most samples are off
    assert loose["abs_dev"]["over_1e-2"] > 8 and loose["iterations"]["mean"] < exact["iterations"]["mean"]
    assert loose["abs_dev"]["p50"] <= loose["abs_dev"]["p95"] <= loose["max_abs_dev"]


@pytest.mark.slow
def test_bench_measures_deviation_without_a_jit_reference(tmp_path):
    report = importlib.import_module("paradiffpolicy.bench.sampler").main(["checkpoint=random", "down_dims=[16,32]", "diffusion_step_embed_dim=16", "num_inference_steps=20",
                            "trials=2", "warmup=1", "window=8", "tol=0.5", "inits=[copy]", "threads=1",
                            f"out={tmp_path / 'bench.json'}"])
    assert set(report["variants"]) == {"picard-copy"}
    loose = report["variants"]["picard-copy"]
    # τ = 0.5 stops before N = 20 rounds and leaves the sequential sample (float rounding alone: ~1e-6)
    assert loose["iterations"]["max"] < 20 and loose["abs_dev"]["over_1e-2"] > 0 and loose["max_abs_dev"] > 1e-2


@pytest.mark.slow
def test_bench_uses_the_shipped_observations_and_says_so(tmp_path, capsys):
    """A fresh clone has no training data: the bench reads the observation windows shipped with the
    checkpoint (and refuses obs=dataset rather than fall back silently)."""
    report = importlib.import_module("paradiffpolicy.bench.sampler").main(["checkpoint=checkpoints/pusht", "trials=1", "warmup=0", "window=8", "tol=0.1", "dev_samples=4",
                            "threads=1", "num_inference_steps=10", "scheduler=ddim", f"out={tmp_path / 'b.json'}"])
    assert report["observations"].startswith("shipped sample checkpoints/pusht/observations.safetensors: 256 windows")
    assert "observations: shipped sample" in capsys.readouterr().err
    if not (ROOT / "data" / "pusht.zarr").exists():
        with pytest.raises(SystemExit, match="training data .* is not here"):
            importlib.import_module("paradiffpolicy.bench.sampler").main(["checkpoint=checkpoints/pusht", "obs=dataset", "trials=1", "threads=1"])


def test_bench_rejects_unknown_keys():
    with pytest.raises(SystemExit, match="windw"):
        importlib.import_module("paradiffpolicy.bench.sampler").main(["windw=8"])


@pytest.mark.slow
@pytest.mark.parametrize("checkpoint", [str(ROOT / "tests" / "fixtures" / "interop" / "dp_lowdim_tiny" / "latest.ckpt"),
                                        str(ROOT / "tests" / "fixtures" / "interop" / "lerobot_lowdim_tiny")])
def test_bench_takes_foreign_checkpoints(tmp_path, checkpoint):
    report = importlib.import_module("paradiffpolicy.bench.sampler").main([f"checkpoint={checkpoint}", "num_inference_steps=10", "trials=1", "warmup=0", "window=4",
                            "tol=0.0", "dev_samples=4", "threads=1"])
    assert report["picard"]["max_abs_dev"] < 1e-5  # tol=0: the sequential sample
    assert report["observations"].startswith("uniform")


@pytest.mark.slow
def test_bench_times_the_image_encoder_apart(tmp_path):
    out = tmp_path / "img.json"
    report = importlib.import_module("paradiffpolicy.bench.sampler").main(["checkpoint=random", "image_shape=[3,32,32]", "crop_shape=[28,28]", "obs_dim=2", "action_dim=2",
                            "down_dims=[16,32]", "diffusion_step_embed_dim=16", "num_inference_steps=8", "trials=2",
                            "warmup=0", "window=4", "tol=0.0", "dev_samples=3", "threads=1", "baselines=[ddim:4]", f"out={out}"])
    assert [f["name"] for f in report["features"]] == ["observation.state", "observation.image"]
    enc = report["encoder_ms"]  # timed apart, once per trial
    assert enc["n"] == 2 and enc["min"] <= enc["p50"] <= enc["max"] and report["policy"]["encoder_params_m"] > 10  # ResNet-18
    assert report["picard"]["max_abs_dev"] < 1e-5
    assert "observation encoder" in out.with_suffix(".md").read_text()
    baseline = report["variants"]["baseline-ddim4"]  # another scheduler's sample: timed, no deviation
    assert baseline["iterations"]["mean"] == 4 and "abs_dev" not in baseline
    assert baseline["speedup_spread"]["p5"] <= baseline["speedup"] <= baseline["speedup_spread"]["p95"]


def test_frontier_success_interval_is_wilsons():
    """Textbook Wilson 95% intervals: 50/100 → 40.4-59.6%, 100/100 → 96.3-100%, 0/10 → 0-27.8%."""
    from paradiffpolicy.success_stats import wilson_interval as wilson

    assert wilson(50, 100) == pytest.approx((0.4038, 0.5962), abs=1e-4)
    assert wilson(100, 100) == pytest.approx((0.9630, 1.0), abs=1e-4)
    assert wilson(0, 10) == pytest.approx((0.0, 0.2775), abs=1e-4)


def test_paired_counts_and_exact_mcnemar_p():
    """Won / lost count only discordant episodes; the p-value is the two-sided exact binomial test
    on them (18 vs 35 → 0.0270, as scipy.stats.binomtest(18, 53) gives; 0 vs 5 → 2/32; a tie → 1)."""
    from paradiffpolicy.success_stats import paired, sign_test

    these, ref = [True, True, False, False, True], [True, False, True, False, False]
    assert paired(these, ref) == {"won": 2, "lost": 1, "p_value": 1.0}
    assert sign_test(18, 35) == pytest.approx(0.027008, abs=1e-6)
    assert sign_test(35, 18) == sign_test(18, 35)
    assert sign_test(0, 5) == pytest.approx(0.0625) and sign_test(0, 0) == 1.0
    with pytest.raises(ValueError, match="same episodes"):
        paired(these, ref[:4])


def test_holm_adjusts_for_the_number_of_pairs():
    """Holm (1979): sorted p 0.005, 0.01, 0.03, 0.04 of 4 tests → 0.02, 0.03, 0.06, 0.06 (kept monotone),
    returned in the input order."""
    from paradiffpolicy.success_stats import holm

    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert holm([0.5]) == [0.5] and holm([0.6, 0.7]) == [1.0, 1.0]


def test_delay_points_pool_disjoint_seed_sets_and_pair_within_each():
    """Two seed sets of one point are joined; a comparison pairs episodes only within a set both ran,
    on that set's shared first seeds; a set run twice is refused."""
    from paradiffpolicy.bench.delay import aligned, pool_seed_sets

    def point(method, first, flags):
        return {"sampler": "picard", "method": method, "delay": 4, "seeds": [first, first + len(flags) - 1], "source": f"{first}",
                "success_per_seed": flags, "iterations_mean": 10.0, "avg_max_reward": float(sum(flags)) / len(flags)}

    set1 = [point("naive", 10, [True, False, True, True]), point("hard", 10, [True, True])]
    set2 = [point("naive", 20, [False, False]), point("hard", 20, [True, True, False])]
    pooled = {p["method"]: p for p in pool_seed_sets([set1, set2])}
    naive, hard = pooled["naive"], pooled["hard"]
    assert naive["n_episodes"] == 6 and naive["success_per_seed"] == [True, False, True, True, False, False]
    assert hard["avg_max_reward"] == pytest.approx(4 / 5) and [s["first_seed"] for s in hard["seed_sets"]] == [10, 20]
    a, b = aligned(hard, naive)  # set 10: the first 2 of naive's 4; set 20: the first 2 of hard's 3
    assert (a, b) == ([True, True, True, True], [True, False, False, False])
    a, b = aligned(hard, point("naive", 30, [True]))  # no set in common: nothing to pair
    assert a == b == []
    with pytest.raises(SystemExit, match="disjoint seed sets"):
        pool_seed_sets([set1, set1])


@pytest.mark.slow
def test_delay_benchmark_runs_resumes_reports_and_times_the_joins(tmp_path):
    """python -m paradiffpolicy.bench.delay on the shipped PushT keypoints policy, short episodes:
    complete points are skipped on rerun; the report pairs every point with naive at the same d
    and with its own d = 0; the cost phase times every join on the shipped observations."""
    from paradiffpolicy.bench import delay as bench_delay

    common = ["task=pusht_keypoints", "methods=[naive,soft]", "delays=[0,3]", "n_episodes=3", "n_envs=2", "max_steps=24",
              "threads=1", f"runs={tmp_path / 'runs'}", f"out={tmp_path / 'out'}"]
    bench_delay.main(["phase=success", *common])
    info_path = tmp_path / "runs" / "pusht_keypoints" / "picard" / "soft" / "d3" / "eval_info.json"
    first = info_path.stat().st_mtime_ns
    bench_delay.main(["phase=success", *common])  # complete: nothing reruns
    assert info_path.stat().st_mtime_ns == first
    info = json.loads(info_path.read_text())
    assert info["controller"]["join"]["method"] == "soft" and info["inference"]["delay_ticks"]["max"] == 3
    report = bench_delay.main(["phase=report", *common])
    points = {(p["method"], p["delay"]): p for p in report["points"]}
    assert set(points) == {("naive", 0), ("naive", 3), ("soft", 0), ("soft", 3)}
    for (method, d), p in points.items():
        assert p["n_episodes"] == 3 and p["seeds"] == [10_000_000, 10_000_002]
        if method != "naive":  # paired on the seeds: the difference in successes is won minus lost
            ref = points[("naive", d)]
            assert p["vs_naive"]["won"] - p["vs_naive"]["lost"] == sum(p["success_per_seed"]) - sum(ref["success_per_seed"])
        assert (p["vs_d0"] is None) == (d == 0) and (d == 0 or p["vs_d0"]["reference"] == f"picard {method} d=0")
        assert p["jumps"]["seam"]["n"] > 0 and p["jumps"]["inner"]["n"] > 0
    (pooled,) = report["pooled_vs_naive"]  # soft against naive over every d > 0 (here only d = 3)
    assert (pooled["method"], pooled["delays"], pooled["episodes"]) == ("soft", [3], 3)
    assert (pooled["won"], pooled["lost"]) == (points[("soft", 3)]["vs_naive"]["won"], points[("soft", 3)]["vs_naive"]["lost"])
    assert json.loads((tmp_path / "out" / "delay-pusht_keypoints.json").read_text())["points"] == report["points"]
    assert (tmp_path / "out" / "delay-pusht_keypoints.md").read_text().count("| picard |") == 4 + 1  # points, pooled row
    summary = bench_delay.main(["phase=summary", "tasks=[pusht_keypoints]", *common])
    (pair,) = summary["pairs"]  # naive vs soft over d = 3, the one delay > 0
    assert (pair["a"], pair["b"], pair["points"], pair["episodes"]) == ("naive", "soft", ["pusht_keypoints d=3"], 3)
    assert (pair["lost"], pair["won"]) == (pooled["won"], pooled["lost"]) and pair["p_holm"] == pair["p_value"]
    assert [(r["method"], r["delay"]) for r in summary["rows"]] == [("naive", 0), ("naive", 3), ("soft", 0), ("soft", 3)]
    with pytest.raises(SystemExit, match="no report for"):
        bench_delay.main(["phase=summary", "tasks=[pusht_keypoints,stack]", *common])
    # another policy of the task (here converted to read the committed prefix) under its own label,
    # paired seed for seed against the baseline label's naive points at the same d
    from paradiffpolicy import load_policy, save_policy
    from paradiffpolicy.policy import with_prefix_input
    save_policy(with_prefix_input(load_policy(ROOT / "checkpoints" / "pusht_keypoints")), tmp_path / "conditioned")
    other = [c for c in common if not c.startswith(("methods=", "delays="))]
    trained = [f"checkpoint={tmp_path / 'conditioned'}", "label=picard-trained", "methods=[trained]", "delays=[3]", "baseline=picard"]
    bench_delay.main(["phase=success", *trained, *other])
    run = json.loads((tmp_path / "runs" / "pusht_keypoints" / "picard-trained" / "trained" / "d3" / "eval_info.json").read_text())
    assert run["checkpoint"] == str(tmp_path / "conditioned") and run["controller"]["join"]["method"] == "trained"
    both = bench_delay.main(["phase=report", *trained, *other])
    (p,) = [p for p in both["points"] if p["sampler"] == "picard-trained"]
    naive3 = points[("naive", 3)]
    assert p["vs_baseline_naive"]["reference"] == "picard naive d=3" and p["vs_baseline_hard"] is None
    assert p["vs_baseline_naive"]["won"] - p["vs_baseline_naive"]["lost"] == sum(p["success_per_seed"]) - sum(naive3["success_per_seed"])
    assert "`picard-trained` against `picard`" in (tmp_path / "out" / "delay-pusht_keypoints.md").read_text()
    side = bench_delay.main(["phase=policies", "tasks=[pusht_keypoints]", "label=picard-trained", "baseline=picard", *other])
    (pair,) = side["pairs"]  # trained against the baseline's naive at d = 3 (no hard point ran)
    assert (pair["a"], pair["b"], pair["points"]) == ("picard-trained trained", "picard naive", ["pusht_keypoints d=3"])
    assert (pair["won"], pair["lost"]) == (p["vs_baseline_naive"]["won"], p["vs_baseline_naive"]["lost"])
    assert {(r["policy"], r["method"], r["delay"]) for r in side["rows"]} == {
        ("picard-trained", "trained", 3), ("picard", "naive", 0), ("picard", "naive", 3)}
    assert (tmp_path / "out" / "delay-policies-picard-trained.png").is_file()
    shutil.rmtree(tmp_path / "runs" / "pusht_keypoints" / "picard-trained")
    # a complete point grows by the missing seeds only; the report pools its parts
    grow = [c for c in common if not c.startswith(("methods=", "delays=", "n_episodes="))]
    bench_delay.main(["phase=success", "methods=[soft]", "delays=[3]", "n_episodes=5", *grow])
    assert info_path.stat().st_mtime_ns == first and (info_path.parent / "more-10000003" / "eval_info.json").is_file()
    grown = {(p["method"], p["delay"]): p for p in bench_delay.main(["phase=report", *common])["points"]}[("soft", 3)]
    assert grown["n_episodes"] == 5 and grown["seeds"] == [10_000_000, 10_000_004]
    assert grown["success_per_seed"][:3] == points[("soft", 3)]["success_per_seed"] and grown["vs_naive"]["episodes"] == 3
    # a second, disjoint seed set in its own runs folder: pooled point by point, paired within each set
    runs2 = [c for c in grow if not c.startswith("runs=")] + [f"runs={tmp_path / 'runs2'}", "seed=20000000"]
    bench_delay.main(["phase=success", "methods=[naive,soft]", "delays=[3]", "n_episodes=2", *runs2])
    both_sets = {(p["method"], p["delay"]): p for p in bench_delay.main(
        ["phase=report", *common, f"more_runs=[{tmp_path / 'runs2'}]"])["points"]}
    soft3, naive3 = both_sets[("soft", 3)], both_sets[("naive", 3)]
    assert [x["first_seed"] for x in soft3["seed_sets"]] == [10_000_000, 20_000_000] and soft3["n_episodes"] == 7
    assert soft3["vs_naive"]["episodes"] == 3 + 2 and naive3["n_episodes"] == 5
    cost = bench_delay.main(["phase=cost", "methods=[naive,hard,guided]", "trials=2", "warmup=1", *common[2:]])
    assert set(cost["methods"]) == {"naive", "hard", "guided"} and cost["observations"]["held_out"] is True
    with pytest.raises(SystemExit, match="methods"):
        bench_delay.main(["methods=[naive,psychic]"])


@pytest.mark.slow
def test_frontier_success_latency_report_on_the_same_seeds(tmp_path):
    """python -m paradiffpolicy.bench.frontier end to end on the shipped PushT policy, three samplers, short
    episodes: complete settings are skipped on rerun, the report has success ± SE, its interval,
    wins/losses against DDPM-100 and latency; the summary joins reports and names missing ones."""
    mod = importlib.import_module("paradiffpolicy.bench.frontier")
    common = ["task=pusht", "settings=[ddpm100,ddim8,paraddim10-p4]", "n_episodes=3", "n_envs=2", "max_steps=24", "threads=1",
              f"runs={tmp_path / 'runs'}", f"out={tmp_path / 'out'}"]
    mod.main(["phase=success", *common])
    first = (tmp_path / "runs" / "pusht" / "ddim8" / "eval_info.json").stat().st_mtime_ns
    mod.main(["phase=success", *common])  # complete: nothing reruns
    assert (tmp_path / "runs" / "pusht" / "ddim8" / "eval_info.json").stat().st_mtime_ns == first
    mod.main(["phase=latency", "trials=2", "warmup=1", "backends=[eager,jit]", *common])
    latency = json.loads((tmp_path / "runs" / "pusht" / "latency.json").read_text())
    for s in latency["settings"].values():  # each setting on both backends; the row shows its fastest
        assert set(s["by_backend"]) == {"eager", "jit"} and s["latency_ms"] == s["by_backend"][s["backend"]]["latency_ms"]
        assert s["latency_ms"]["p50"] == min(b["latency_ms"]["p50"] for b in s["by_backend"].values())
    report = mod.main(["phase=report", *common])
    assert json.loads((tmp_path / "out" / "frontier-pusht.json").read_text())["settings"].keys() == report["settings"].keys()
    rows = report["settings"]
    assert set(rows) == {"ddpm100", "ddim8", "paraddim10-p4"}
    for r in rows.values():
        p = r["pc_success"] / 100
        assert r["n_episodes"] == 3 and r["pc_success_se"] == pytest.approx(100 * (p * (1 - p) / 3) ** 0.5)
        lo, hi = r["pc_success_ci95"]
        assert lo <= r["pc_success"] <= hi and hi - lo > 0
        # paired on the seeds: the difference in successes is what was won minus what was lost
        paired = r["vs_ddpm100"]
        assert paired["won"] - paired["lost"] == round(3 * (r["pc_success"] - rows["ddpm100"]["pc_success"]) / 100)
        assert len(r["success_per_seed"]) == 3 and r["latency_ms"]["p5"] <= r["latency_ms"]["p50"] <= r["latency_ms"]["p95"]
    assert report["latency"]["observations"]["held_out"] is True  # the shipped observation windows
    import matplotlib.image

    assert matplotlib.image.imread(tmp_path / "out" / "frontier-pusht.png").std() > 0  # a drawn plot
    assert "± " in (tmp_path / "out" / "frontier-pusht.md").read_text()
    summary = mod.main(["phase=summary", "tasks=[pusht]", *common])
    assert "| sequential DDIM-8 |" in summary and (tmp_path / "out" / "frontier-summary.md").read_text() == summary
    with pytest.raises(SystemExit, match="no report for"):
        mod.main(["phase=summary", "tasks=[pusht,lift]", *common])
    # a second, disjoint seed set, then both pooled: pairs on all 6 episodes
    second = [c for c in common if not c.startswith(("runs=", "settings="))]
    mod.main(["phase=success", "seed=20000000", "settings=[ddpm100,ddim8]", f"runs={tmp_path / 'runs2'}", *second])
    pooled = mod.main(["phase=pooled", f"pooled_runs=[{tmp_path / 'runs'},{tmp_path / 'runs2'}]", *common])
    assert set(pooled["settings"]) == {"ddpm100", "ddim8"}  # paraddim10-p4 is missing from the second set
    assert [s["n_episodes"] for s in pooled["seed_sets"]] == [3, 3] and pooled["episodes_per_setting"] == 6
    (pair,) = pooled["pairs"]
    a, b = pooled["settings"]["ddpm100"]["success_per_seed"], pooled["settings"]["ddim8"]["success_per_seed"]
    assert len(a) == 6 and pair["won"] - pair["lost"] == sum(a) - sum(b)
    assert pair["p_holm"] == pair["p_value"]  # one pair: nothing to adjust
    assert (pair["verdict"] == "no measurable difference") == (pair["p_value"] >= 0.05)
    assert "| pair | won / lost | p | p (Holm) | verdict |" in (tmp_path / "out" / "frontier-pooled-pusht.md").read_text()
    with pytest.raises(SystemExit, match="disjoint"):
        mod.main(["phase=pooled", f"pooled_runs=[{tmp_path / 'runs'},{tmp_path / 'runs'}]", *common])


@pytest.mark.slow
def test_make_obs_sample_ships_held_out_windows(tmp_path):
    """python -m paradiffpolicy.data.make_obs_sample: windows of To real observations from expert episodes on a
    collection seed other than the training data's, with their source recorded."""
    import shutil

    from paradiffpolicy.data.obs_sample import load_observation_sample

    mod = importlib.import_module("paradiffpolicy.data.make_obs_sample")
    ck = tmp_path / "pusht"
    shutil.copytree(ROOT / "checkpoints" / "pusht", ck)
    (ck / "observations.safetensors").unlink()
    mod.main(["task=pusht", f"checkpoint={ck}", "episodes=2", "windows=16"])
    windows, source = load_observation_sample(ck)
    assert windows["observation.state"].shape == (16, 2, 5)
    assert source["held_out"] and source["training_collection_seed"] == 0
    assert all(s // 1_000_000 == 7 for s in source["episode_seeds"])
    with pytest.raises(SystemExit, match="training data's collection seed"):
        mod.main(["task=pusht", f"checkpoint={ck}", "seed=0"])


@pytest.mark.slow
def test_make_obs_sample_keeps_camera_frames(tmp_path):
    """A camera policy's sample holds every feature it reads, frames as the environment's uint8
    (H, W, 3), and the policy accepts a window of it."""
    import torch

    from paradiffpolicy import load_policy
    from paradiffpolicy.convert import convert
    from paradiffpolicy.data.obs_sample import load_observation_sample

    image = ROOT.parent / "shared" / "interop" / "lerobot_image_small"
    if not image.is_dir():
        pytest.skip("../shared/interop/lerobot_image_small is not here")
    mod = importlib.import_module("paradiffpolicy.data.make_obs_sample")
    ck = tmp_path / "pusht_image"
    convert(image, ck)
    mod.main(["task=pusht_image", f"checkpoint={ck}", "episodes=1", "windows=8"])
    windows, source = load_observation_sample(ck)
    frames, state = windows["observation.image"], windows["observation.state"]
    assert frames.dtype == torch.uint8 and frames.shape == (8, 2, 96, 96, 3) and frames.float().std() > 0
    assert state.dtype == torch.float32 and state.shape == (8, 2, 2)
    assert source["task"] == "pusht_image" and source["held_out"]
    assert load_policy(ck).predict_action({k: v[:1] for k, v in windows.items()}).actions.shape[0] == 1


@pytest.mark.slow
def test_compare_checkpoints_measures_the_weight_format_against_the_sampler(tmp_path):
    import torch

    from conftest import tiny_policy
    from paradiffpolicy import DiffusionPolicy, PolicyConfig, save_policy
    from paradiffpolicy.data.obs_sample import save_observation_sample

    policy = tiny_policy()
    cfg = policy.config
    save_policy(policy, tmp_path / "f32")
    save_policy(policy, tmp_path / "f16", weights_dtype="float16")
    windows = torch.rand(4, 2, 5, generator=torch.Generator().manual_seed(1))
    save_observation_sample(tmp_path / "f16", {"observation.state": windows}, {"source": "4 random windows (test)"})
    compare = importlib.import_module("paradiffpolicy.bench.compare_checkpoints").main
    out = tmp_path / "cmp.json"
    report = compare([f"a={tmp_path / 'f16'}", f"b={tmp_path / 'f32'}", "threads=1", f"out={out}"])
    assert report["windows"] == 4 and (report["a_weights_dtype"], report["b_weights_dtype"]) == ("float16", "float32")
    assert 0 < report["a_vs_b"]["max"] < 1e-2  # float16 rounding moves the sample, a little
    # on this untrained network Picard at τ = 0.1 moves the sample far more than float16 weights do
    assert report["picard_p16_tol0.1_vs_sequential_on_b"]["max"] > 10 * report["a_vs_b"]["max"]
    assert json.loads(out.read_text())["a_vs_b"] == report["a_vs_b"]
    assert compare([f"a={tmp_path / 'f16'}", f"b={tmp_path / 'f16'}", "threads=1"])["a_vs_b"]["max"] == 0
    save_policy(DiffusionPolicy(PolicyConfig(**{**cfg.__dict__, "down_dims": [16, 16]})), tmp_path / "other")
    with pytest.raises(SystemExit, match="different policies"):
        compare([f"a={tmp_path / 'f16'}", f"b={tmp_path / 'other'}", "threads=1"])


@pytest.mark.slow
def test_eval_expert_scores_the_scripted_expert_on_the_evaluation_seeds(tmp_path):
    out = tmp_path / "expert.json"
    report = importlib.import_module("paradiffpolicy.data.eval_expert").main(["task=pusht", "n_episodes=2", f"out={out}"])
    assert report["seeds"] == [10_000_000, 10_000_001]
    assert [r["seed"] for r in report["per_episode"]] == [10_000_000, 10_000_001]
    assert report["avg_max_reward"] > 0.9  # the expert pushes the T onto the goal
    assert all(r["length"] > 0 and (r["success"] or r["failure_reason"] == "time limit") for r in report["per_episode"])
    assert json.loads(out.read_text())["pc_success"] == report["pc_success"]


@pytest.mark.slow
@needs_backend("openvino")
def test_backend_bench_names_the_fastest_sequential_and_measures_each_backends_deviation(tmp_path):
    from paradiffpolicy.bench.backends import main

    r = main(["task=lift", "backends=[eager,openvino]", "threads=[1]", "batches=[1,4]", "trials=3", "warmup=1", f"out={tmp_path}"])
    m = r["by_threads"][0]
    calls, fastest = m["calls"], m["fastest_sequential"]
    seq = [k for k in calls if k.startswith(m["reference"])]
    assert fastest in seq and all(calls[k]["latency_ms"]["p50"] >= calls[fastest]["latency_ms"]["p50"] for k in seq)
    assert calls[fastest]["speedup_vs_fastest_sequential"]["p50"] == 1.0  # a reference against itself
    assert calls[f"{m['reference']} | eager"]["max_abs_dev_vs_eager_reference"] == 0.0
    assert calls[f"{m['reference']} | openvino"]["max_abs_dev_vs_eager_reference"] < 1e-4  # another runtime, same sample
    assert set(m["network_ms"]["openvino"]) == {1, 4} and r["provenance"]["backends"]["openvino"]
    md = (tmp_path / "backend-cost-lift.md").read_text()
    assert fastest in md and (tmp_path / "backend-cost-lift.png").stat().st_size > 0
