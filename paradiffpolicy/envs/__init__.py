"""Environment adapters behind one interface (:class:`~paradiffpolicy.envs.base.PolicyEnv`)."""

from paradiffpolicy.envs.base import PolicyEnv, StepResult, TaskConfig


def make_env(task: TaskConfig, render: bool = False) -> PolicyEnv:
    if task.suite == "robosuite":
        from paradiffpolicy.envs.robosuite_env import RobosuiteEnv

        return RobosuiteEnv(task, render=render)
    from paradiffpolicy.envs.gym_env import GymEnv

    return GymEnv(task, render=render)


__all__ = ["PolicyEnv", "StepResult", "TaskConfig", "make_env"]
