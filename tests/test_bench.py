"""scripts/bench_sampler.py: every variant is compared with the sequential sample and timed against
each sequential reference in the same run."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _bench():
    spec = importlib.util.spec_from_file_location("bench_sampler", ROOT / "scripts" / "bench_sampler.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # its dataclasses resolve their module through sys.modules
    spec.loader.exec_module(mod)
    return mod


def test_bench_reports_deviation_and_speedups_for_every_variant(tmp_path):
    out = tmp_path / "bench.json"
    report = _bench().main(["checkpoint=random", "down_dims=[16,32]", "diffusion_step_embed_dim=16", "num_inference_steps=20",
                            "trials=2", "warmup=1", "window=8", "tol=0.5", "inits=[copy,rollout]", "backends=[eager,jit]",
                            "threads=1", f"out={out}"])
    variants = report["variants"]
    assert set(variants) == {"sequential-jit", "picard-copy", "picard-copy-jit", "picard-rollout", "picard-rollout-jit"}
    # the jit reference computes the sequential sample itself; a loose tolerance moves Picard off it
    assert variants["sequential-jit"]["max_abs_dev"] < 1e-5
    assert variants["picard-copy"]["max_abs_dev"] > 0
    for name, r in variants.items():
        assert r["speedup"] > 0
        assert ("speedup_vs" in r) == (not name.startswith("sequential"))
    assert json.loads(out.read_text())["variants"].keys() == variants.keys()
    assert "vs sequential-jit" in out.with_suffix(".md").read_text()


def test_bench_measures_deviation_without_a_jit_reference(tmp_path):
    report = _bench().main(["checkpoint=random", "down_dims=[16,32]", "diffusion_step_embed_dim=16", "num_inference_steps=20",
                            "trials=2", "warmup=1", "window=8", "tol=0.5", "inits=[copy]", "threads=1",
                            f"out={tmp_path / 'bench.json'}"])
    assert set(report["variants"]) == {"picard-copy"}
    assert report["variants"]["picard-copy"]["max_abs_dev"] > 0


def test_bench_rejects_unknown_keys():
    with pytest.raises(SystemExit, match="windw"):
        _bench().main(["windw=8"])
