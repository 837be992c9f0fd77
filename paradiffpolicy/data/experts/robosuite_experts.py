"""Scripted experts for robosuite Lift and Stack (Panda, OSC_POSE delta actions).

A waypoint follower on the simulator's own object poses: align the gripper's yaw with the cube
(mod 90°), descend, close, lift (Lift) or carry and place on the second cube (Stack). Diversity
comes from a per-episode random approach height, grasp offset and speed, plus Gaussian action
noise, all drawn from the episode's seed.
"""

from __future__ import annotations

import numpy as np

POS_GAIN = 10.0  # action 1.0 = 5 cm target offset per step; saturate beyond 10 cm
YAW_GAIN = 2.0


def quat_xyzw_to_mat(q: np.ndarray) -> np.ndarray:
    x, y, z, w = q / np.linalg.norm(q)
    return np.array([
        [1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
        [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
        [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)],
    ])


def yaw_of(q: np.ndarray) -> float:
    r = quat_xyzw_to_mat(q)
    return float(np.arctan2(r[1, 0], r[0, 0]))


def yaw_error(gripper_q: np.ndarray, cube_q: np.ndarray) -> float:
    """Signed yaw from gripper to the nearest cube face orientation, in [-π/4, π/4)."""
    d = yaw_of(cube_q) - yaw_of(gripper_q)
    return float((d + np.pi / 4) % (np.pi / 2) - np.pi / 4)


class _WaypointExpert:
    """Phase machine; subclasses define ``_plan``. ``act(raw_obs) -> action (7,)``."""

    def __init__(self, seed: int, noise: float = 0.05):
        self.rng = np.random.default_rng(seed)
        self.noise = noise
        self.phase = 0
        self.hold = 0
        self.hover = self.rng.uniform(0.06, 0.12)
        self.grasp_dz = self.rng.uniform(-0.01, 0.005)
        self.speed = self.rng.uniform(0.7, 1.0)

    def _move(self, eef, target, grip, yaw=0.0):
        a = np.zeros(7)
        a[:3] = np.clip(POS_GAIN * (target - eef), -1, 1) * self.speed
        a[5] = np.clip(YAW_GAIN * yaw, -1, 1)
        a[:6] += self.rng.normal(0, self.noise, 6) * np.array([1, 1, 1, 0, 0, 0.5])
        a[6] = grip
        return np.clip(a, -1, 1)

    def _advance(self, done: bool, min_hold: int = 0) -> None:
        if done:
            self.hold += 1
            if self.hold > min_hold:
                self.phase += 1
                self.hold = 0


class LiftExpert(_WaypointExpert):
    def act(self, obs: dict) -> np.ndarray:
        eef, cube = obs["robot0_eef_pos"], obs["cube_pos"]
        yaw = yaw_error(obs["robot0_eef_quat"], obs["cube_quat"])
        grasp = cube + np.array([0, 0, self.grasp_dz])
        if self.phase == 0:  # above the cube, yaw aligned
            target = cube + np.array([0, 0, self.hover])
            self._advance(np.linalg.norm(target - eef) < 0.015 and abs(yaw) < 0.05)
            return self._move(eef, target, -1, yaw)
        if self.phase == 1:  # descend
            self._advance(np.linalg.norm(grasp - eef) < 0.008)
            return self._move(eef, grasp, -1, yaw)
        if self.phase == 2:  # close
            self._advance(True, min_hold=6)
            return self._move(eef, grasp, 1)
        return self._move(eef, cube + np.array([0, 0, 0.25]), 1)  # lift


class StackExpert(_WaypointExpert):
    def act(self, obs: dict) -> np.ndarray:
        eef, a_pos, b_pos = obs["robot0_eef_pos"], obs["cubeA_pos"], obs["cubeB_pos"]
        grasp = a_pos + np.array([0, 0, self.grasp_dz])
        if self.phase == 0:
            yaw = yaw_error(obs["robot0_eef_quat"], obs["cubeA_quat"])
            target = a_pos + np.array([0, 0, self.hover])
            self._advance(np.linalg.norm(target - eef) < 0.015 and abs(yaw) < 0.05)
            return self._move(eef, target, -1, yaw)
        if self.phase == 1:
            yaw = yaw_error(obs["robot0_eef_quat"], obs["cubeA_quat"])
            self._advance(np.linalg.norm(grasp - eef) < 0.008)
            return self._move(eef, grasp, -1, yaw)
        if self.phase == 2:
            self._advance(True, min_hold=6)
            return self._move(eef, grasp, 1)
        offset = eef - a_pos  # carry the cube: place its centre, not the gripper's
        top = b_pos[2] + 0.025 + 0.02  # cubeB half-size + cubeA half-size
        if self.phase == 3:  # lift clear
            target = np.array([eef[0], eef[1], top + 0.08 + offset[2]])
            self._advance(eef[2] > top + 0.05 + offset[2])
            return self._move(eef, target, 1)
        if self.phase == 4:  # carry above cubeB, yaw aligned with cubeB
            yaw = yaw_error(obs["cubeA_quat"], obs["cubeB_quat"])
            target = np.array([b_pos[0], b_pos[1], top + 0.06]) + offset
            self._advance(np.linalg.norm(target - eef) < 0.01 and abs(yaw) < 0.08)
            return self._move(eef, target, 1, yaw)
        if self.phase == 5:  # lower onto cubeB
            target = np.array([b_pos[0], b_pos[1], top + 0.003]) + offset
            self._advance(np.linalg.norm(target - eef) < 0.006 or a_pos[2] < top + 0.004)
            return self._move(eef, target, 1)
        if self.phase == 6:  # release
            self._advance(True, min_hold=5)
            return self._move(eef, eef, -1)
        return self._move(eef, eef + np.array([0, 0, 0.05]), -1)  # back off
