#!/usr/bin/env python
"""Write ``<checkpoint>/README.md`` from the checkpoint's metadata and measured evaluations.

    python scripts/model_card.py checkpoints/lift --eval outputs/eval/lift/<run>/eval_info.json \
        --expert checkpoints/lift/expert_eval.json --collect "python -m paradiffpolicy.collect task=lift n_episodes=200 seed=0"

Every number in the card is read from those files; nothing is typed in by hand.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def feature_text(feature: dict) -> str:
    return f"`{feature['name']}` {feature['kind']} {feature['shape']}"


def controller_text(info: dict) -> str:
    """``delay d=4, join trained, n_envs=10``: the mode, and for delay / realtime the join and delay."""
    ctl, mode = info.get("controller", {}), info["control"]["mode"]
    parts = [mode + (f" d={ctl.get('delay')}" if mode == "delay" else f" {info['control'].get('target_hz', 0):g} Hz" if mode == "realtime" else "")]
    if mode != "fast" and ctl.get("join"):
        parts.append(f"join {ctl['join']['method']}")
    return ", ".join(parts + [f"n_envs={info.get('n_envs', 1)}"])


def init_from_text(train: dict) -> str:
    """Where a fine-tune started, and how that source was trained when its metadata says."""
    text = f"- Initialised from `{train['init_from']}`"
    if src := train.get("init_from_train"):
        text += f", itself trained {src['steps']} steps in {src['train_time_s'] / 60:.1f} min"
        if src.get("dataset"):
            text += f" on `{src['dataset']}`"
    return text + "."


def prefix_text(prefix: dict) -> str:
    """How the policy was trained to read committed actions (``train prefix.*``)."""
    text = (f"- Training-time action conditioning: the U-Net reads the committed action prefix (`prefix_conv`, "
            f"zero-initialised from the source); per window a delay d in 0..{prefix['max_delay']} "
            f"({prefix['distribution']}), the first start + d actions given clean and left out of the loss, "
            f"nothing committed with probability {prefix['p_none']}")
    if prefix.get("offset"):
        text += f", the given actions moved by one random offset per window (σ up to {prefix['offset']}, normalised)"
    return text + ". Its join is `trained` (the default for it)."


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("checkpoint")
    ap.add_argument("--eval", action="append", default=[], help="eval_info.json (repeatable)")
    ap.add_argument("--expert", help="python -m paradiffpolicy.data.eval_expert output")
    ap.add_argument("--collect", required=True, help="the exact collection command")
    ap.add_argument("--note", default="")
    ap.add_argument("--trained-alone", action="store_true", help="training had the machine to itself")
    a = ap.parse_args()
    ck = Path(a.checkpoint)
    cfg = json.loads((ck / "config.json").read_text())
    meta, pol = cfg["metadata"], cfg["policy"]
    tr = meta["train"]
    lines = [
        f"# {meta['task']} — Diffusion Policy (paradiffpolicy {cfg['version']})",
        "",
        f"ConditionalUnet1D down_dims={pol['down_dims']}, step embedding {pol['diffusion_step_embed_dim']}, "
        f"To={pol['n_obs_steps']}, T={pol['horizon']}, Ta={pol['n_action_steps']}, obs_dim={pol['obs_dim']}, "
        f"action_dim={pol['action_dim']}; DDPM {pol['scheduler']['num_train_timesteps']} steps, "
        f"{pol['scheduler']['beta_schedule']}, {pol['scheduler']['prediction_type']} prediction, clip_sample={pol['scheduler']['clip_sample']}.",
        *([f"Inputs: {', '.join(feature_text(f) for f in pol['input_features'])}; image encoder "
           f"{pol['vision']['vision_backbone']} trunk of width {pol['vision'].get('backbone_width', 64)} "
           f"({pol['vision'].get('backbone_stages', 4)} of 4 stages), "
           f"{'GroupNorm' if pol['vision']['use_group_norm'] else 'BatchNorm'}, spatial softmax with "
           f"{pol['vision']['spatial_softmax_num_keypoints']} keypoints, crop {pol['vision']['crop_shape']}."]
          if pol.get("input_features") else []),
        "Weights: EMA, `model.safetensors`; configuration and metadata: `config.json`.",
        "",
        "## How it was made",
        "",
        f"- Data: `{a.collect}` → {meta['dataset']['episodes']} successful expert episodes, {meta['dataset']['steps']} steps.",
        f"- Training: `{meta['command']}` ({tr['steps']} steps, batch {tr['batch_size']}, seed {tr['seed']}, lr {tr['lr']}),"
        f" {tr['train_time_s'] / 60:.1f} min on {tr['device']} ({tr['machine']}, {tr['threads']} torch thread(s), "
        f"{'nothing else running' if a.trained_alone else 'other jobs sharing the CPU'}).",
        *([init_from_text(tr)] if tr.get("init_from") else []),
        *([f"- Auxiliary training target: the encoded observation also predicts `{tr['aux_state']}` (simulator "
           f"state, weight {tr['aux_weight']}) through a linear head that is not part of the checkpoint; the "
           "policy sees only its declared inputs."] if tr.get("aux_state") else []),
        *([prefix_text(tr["prefix"])] if tr.get("prefix") else []),
        f"- Versions: torch {meta['versions'].get('torch')}, mujoco {meta['versions'].get('mujoco')}, "
        f"robosuite {meta['versions'].get('robosuite')}, gymnasium {meta['versions'].get('gymnasium')}.",
        "",
        "## Measured success (evaluation seeds 10,000,000+, disjoint from the collection seeds)",
        "",
        "| policy / sampler | episodes | success % (± SE) | avg max reward | latency p50 ms | iterations | NFE | controller |",
        "|---|---|---|---|---|---|---|---|",
    ]
    if a.expert:
        ex = json.loads(Path(a.expert).read_text())
        cov = f", mean max coverage {ex['avg_max_coverage']:.3f}" if "avg_max_coverage" in ex else ""
        lines.append(f"| scripted expert{cov} | {ex['n_episodes']} | {ex['pc_success']:.1f} | {ex['avg_max_reward']:.3f} | - | - | - | - |")
    for path in a.eval:
        info = json.loads(Path(path).read_text())
        blocks = [(info["sampler"], info)]
        if "compare" in info:
            blocks.append(({"name": "sequential (same seeds)", **{k: v for k, v in info["sampler"].items() if k != "name"}},
                           info["compare"]["sequential"]))
        for sampler, res in blocks:
            o, inf = res["overall"], res["inference"]
            desc = sampler["name"] if sampler["name"] != "picard" else \
                f"picard p={sampler['window']} τ={sampler['tol']}{' warm start' if sampler.get('warm_start') else ''}"
            desc += f", {sampler.get('scheduler') or pol['scheduler']['name']}-{sampler['num_inference_steps']}"
            cov = f" (mean max coverage {o['avg_max_coverage']:.3f})" if "avg_max_coverage" in o else ""
            p, n = o["pc_success"] / 100, o["n_episodes"]
            se = 100 * (p * (1 - p) / n) ** 0.5 if n else 0.0
            lines.append(f"| {desc}{cov} | {n} | {o['pc_success']:.1f} ± {se:.1f} | {o['avg_max_reward']:.3f} | "
                         f"{inf['latency_ms']['p50']:.0f} | {inf['iterations_mean']:.1f} | {inf['nfe_mean']:.0f} | "
                         f"{controller_text(info)} |")
        if "compare" in info:
            c = info["compare"]
            lines.append(f"\nSame seeds and noise, Picard vs sequential per call: median speed-up {c['speedup']:.2f}x, "
                         f"largest action deviation {c['max_abs_dev']:.2e} (normalised units).\n")
    if a.note:
        lines += ["", a.note]
    lines += ["", "Latencies above come from the evaluation run, which shared the CPU with other jobs when batched "
              "(n_envs > 1): use `python -m paradiffpolicy.bench.sampler` numbers in `benchmarks/results/` for speed."]
    (ck / "README.md").write_text("\n".join(lines) + "\n")
    print((ck / "README.md").read_text())


if __name__ == "__main__":
    main()
