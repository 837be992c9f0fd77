"""Scripted quasi-static pusher for gym-pusht's PushT (state observations).

The block is nearly massless in the push plane (space damping 0: it stops when not pushed), so a
point pusher moves it quasi-statically. Each re-plan picks one push primitive:

* **rotate** when the angle error is large: push a face of the T's bar near its end, which gives
  the largest lever arm about the centre of gravity, in the direction of the needed torque;
* **translate** otherwise: push through the centre of gravity from the side opposite the goal.

The pusher travels to the pre-push point around the block (waypoints on a circle clear of it),
pushes a short stroke, and re-plans. Diversity: per-episode random stroke length, approach
clearance and speed, and noise on the commanded target.
"""

from __future__ import annotations

import numpy as np

GOAL = np.array([256.0, 256.0, np.pi / 4])
COG_LOCAL = np.array([0.0, 45.0])  # centre of gravity of the T in its body frame
AGENT_R = 15.0
GAP = 6.0  # distance between the pusher's edge and the contact point before a stroke
CLEAR_R = 100.0  # circle around the block's CoG that the pusher travels on


def _rot(theta: float) -> np.ndarray:
    c, s = np.cos(theta), np.sin(theta)
    return np.array([[c, -s], [s, c]])


def _wrap(a: float) -> float:
    return float((a + np.pi) % (2 * np.pi) - np.pi)


def _outline(step: float = 5.0) -> list[tuple[np.ndarray, np.ndarray]]:
    """Points along the T's boundary (body frame) with outward normals."""
    edges = [  # (start, end, outward normal)
        ((-60, 0), (60, 0), (0, -1)), ((60, 0), (60, 30), (1, 0)), ((60, 30), (15, 30), (0, 1)),
        ((15, 30), (15, 120), (1, 0)), ((15, 120), (-15, 120), (0, 1)), ((-15, 120), (-15, 30), (-1, 0)),
        ((-15, 30), (-60, 30), (0, 1)), ((-60, 30), (-60, 0), (-1, 0)),
    ]
    out = []
    for a, b, n in edges:
        a, b = np.array(a, float), np.array(b, float)
        k = max(1, int(np.linalg.norm(b - a) / step))
        for t in (np.arange(k) + 0.5) / k:
            out.append((a + (b - a) * t, np.array(n, float)))
    return out


OUTLINE = _outline()
GYRATION = 40.0  # radius of gyration of the T about its centre of gravity, px (approx.)


def _inside_t(p_local: np.ndarray, margin: float) -> bool:
    x, y = p_local
    bar = -60 - margin <= x <= 60 + margin and 0 - margin <= y <= 30 + margin
    stem = -15 - margin <= x <= 15 + margin and 30 - margin <= y <= 120 + margin
    return bar or stem


class PushTExpert:
    def __init__(self, seed: int):
        self.rng = np.random.default_rng(seed)
        self.stroke = self.rng.uniform(30, 50)
        self.clear = self.rng.uniform(CLEAR_R, CLEAR_R + 10)
        self.push_lead = self.rng.uniform(15, 25)
        self.lead = self.rng.uniform(35, 55)  # how far ahead of the pusher the PD target is set
        self.noise = 0.3
        self.plan: list[np.ndarray] = []
        self.pushing = None  # (direction, remaining length)

    # -- geometry -------------------------------------------------------------------------------

    @staticmethod
    def _cog(block: np.ndarray) -> np.ndarray:
        return block[:2] + _rot(block[2]) @ COG_LOCAL

    def _primitive(self, block: np.ndarray, agent: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The boundary point and push direction whose predicted block motion best matches the
        error to the goal.

        Quasi-static pushing with an ellipsoidal limit surface: a unit push along ``d`` at a point
        ``r`` from the centre of gravity moves the block by ``d`` and turns it by ``(r × d) / c²``
        (``c`` the radius of gyration). Candidates are outward-normal pushes (and ±20° inside the
        friction cone) at points every few pixels of the T's outline; the score is the cosine
        between predicted and desired motion in (x, y, c·θ) units, minus a small travel cost.
        """
        R = _rot(block[2])
        cog = self._cog(block)
        goal_cog = GOAL[:2] + _rot(GOAL[2]) @ COG_LOCAL
        want = np.array([*(goal_cog - cog), GYRATION * _wrap(GOAL[2] - block[2])])
        best, best_score = None, -np.inf
        for p_local, n_local in OUTLINE:
            for ang in (0.0, 0.35, -0.35):
                d = R @ (_rot(ang) @ -n_local)
                p = block[:2] + R @ p_local
                pre = p - d * (AGENT_R + GAP)
                if np.any(pre < AGENT_R + 8) or np.any(pre > 512 - AGENT_R - 8):
                    continue
                r = p - cog
                pred = np.array([d[0], d[1], (r[0] * d[1] - r[1] * d[0]) / GYRATION])
                score = pred @ want / (np.linalg.norm(pred) * np.linalg.norm(want) + 1e-9)
                score -= 0.0008 * np.linalg.norm(pre - agent)
                if score > best_score:
                    best, best_score = (p, d, pred), score
        p, d, pred = best
        self._pred_gain = float(pred @ want / (pred @ pred))
        return p, d

    # -- control --------------------------------------------------------------------------------

    def act(self, state: np.ndarray) -> np.ndarray:
        agent, block = state[:2], state[2:5]
        if self.pushing is not None:
            direction, left = self.pushing
            if left > 0:
                self.pushing = (direction, left - float(np.linalg.norm(agent - self._last)))
                self._last = agent.copy()
                return self._out(agent + direction * min(left + 2, self.push_lead))
            self.pushing = None
        if not self.plan:
            contact, direction = self._primitive(block, agent)
            pre = contact - direction * (AGENT_R + GAP)
            self.plan = self._route(agent, pre, block) + [pre]
            self._pending = (direction, self._stroke_len())
        target = self.plan[0]
        final = len(self.plan) == 1
        if np.linalg.norm(target - agent) < (3 if final else 15):
            self.plan.pop(0)
            if not self.plan:
                self.pushing = self._pending
                self._last = agent.copy()
            return self._out(target)
        delta = target - agent
        dist = np.linalg.norm(delta)
        nxt = agent + delta / dist * min(dist if final else dist + 10, self.lead)
        return self._out(nxt)

    def _stroke_len(self) -> float:
        """GAP to reach the contact, then 80% of the push predicted to cancel the error (short
        strokes near the goal for fine corrections)."""
        return GAP + float(np.clip(0.8 * self._pred_gain, 0.3, self.stroke))

    def _route(self, start: np.ndarray, goal: np.ndarray, block: np.ndarray) -> list[np.ndarray]:
        """Waypoints on a circle around the CoG from ``start``'s bearing to ``goal``'s, if the
        straight segment would touch the block."""
        R = _rot(block[2])
        seg = [start + (goal - start) * t for t in np.linspace(0, 1, 20)]
        if not any(_inside_t(R.T @ (p - block[:2]), AGENT_R + 3) for p in seg[1:-1]):
            return []
        cog = self._cog(block)
        a0 = np.arctan2(*(start - cog)[::-1])
        a1 = np.arctan2(*(goal - cog)[::-1])
        best = None
        for da in (_wrap(a1 - a0), _wrap(a1 - a0) - np.sign(_wrap(a1 - a0)) * 2 * np.pi):  # both ways round
            n = max(1, int(abs(da) / 0.5))
            pts = [cog + self.clear * np.array([np.cos(a0 + da * i / n), np.sin(a0 + da * i / n)]) for i in range(n + 1)]
            outside = sum(bool(np.any(p < 20) or np.any(p > 492)) for p in pts)
            if best is None or (outside, abs(da)) < best[0]:
                best = ((outside, abs(da)), pts)
        return [np.clip(p, 20, 492) for p in best[1]]

    def _out(self, target: np.ndarray) -> np.ndarray:
        return np.clip(target + self.rng.normal(0, self.noise, 2), 0, 512)
