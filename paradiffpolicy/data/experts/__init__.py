"""Scripted experts, by name. ``make_expert(name, seed).act(env.expert_state()) -> action``."""

from __future__ import annotations


def make_expert(name: str, seed: int):
    from paradiffpolicy.data.experts import pusht_expert, robosuite_experts

    experts = {
        "lift": robosuite_experts.LiftExpert,
        "stack": robosuite_experts.StackExpert,
        "pusht": pusht_expert.PushTExpert,
    }
    if name not in experts:
        raise ValueError(f"task.expert={name!r} is unknown; expected one of {sorted(experts)}")
    return experts[name](seed)
