"""The closed loop's early stop (``rollout.run_closed_loop(stop_hopeless=True)``) and the bound it rests on
(``world.reach.min_steps_to_success``): the bound never exceeds the steps a policy actually needed, the facts it
mirrors from the env hold, stopping changes no success, and the per-episode record says what happened. Also: the
loop draws only the camera the policy reads, and that image is the one the full render draws."""

from __future__ import annotations

import math

import numpy as np
import pytest

from vla_bridge.data import world as W
from vla_bridge.data.world import reach
from vla_bridge.data.world.expert import grasp_height
from vla_bridge.data.world.scene import _in_target_region
from vla_bridge.evaluation import policies, rollout

MAX_STEPS = W.DEFAULT_MAX_STEPS


def _tasks() -> list[str]:
    s = W.SPLITS
    groups = (s.heldout_tasks, s.heldout_family_tasks, s.unseen_color_tasks, s.finetune, s.pretrain)
    out = []
    for i in range(max(len(g) for g in groups)):
        out += [g[i] for g in groups if i < len(g)]
    return out


def _dash(env: W.TabletopEnv) -> np.ndarray:
    """A picker faster than the expert: full-speed straight lines to the grasp, then to the target, no hover; it
    closes as soon as the next step lands on the grasp and opens as soon as the object would land in the region."""
    o, t = env.instructed_object, env.instructed_target
    lim = W.ACTION_XYZ_LIMIT
    if env.held == env.obj_index:
        off = np.array([o.x, o.y]) - env.pos[:2]
        d = np.clip(np.array([t.x, t.y]) - off - env.pos[:2], -lim, lim)
        nxt = env.pos[:2] + d + off
        return np.r_[d, 0.0, 0.0, 0.0, 0.0, float(_in_target_region(t.kind, t.x, t.y, t.yaw, *nxt))]
    if env.held is not None or env.gripper <= 0.5:
        return np.r_[np.zeros(6), 1.0]
    d = np.clip(np.array([o.x, o.y, grasp_height(o)]) - env.pos, -lim, lim)
    nxt = env.pos + d
    close = math.hypot(o.x - nxt[0], o.y - nxt[1]) < 0.5 * W.FAMILY_SPECS[o.family].grasp_radius \
        and abs(nxt[2] - grasp_height(o)) < 0.005
    return np.r_[d, 0.0, 0.0, 0.0, 0.0 if close else 1.0]


def _bounds_along(task: str, seed: int, act) -> tuple[bool, int, list[int]]:
    env = W.TabletopEnv(render=False, max_steps=MAX_STEPS)
    env.reset(task, seed)
    bounds = [reach.min_steps_to_success(env)]
    while env.t < MAX_STEPS and not env.success:
        env.step(act(env))
        bounds.append(reach.min_steps_to_success(env))
    return env.success, env.t, bounds


@pytest.mark.parametrize("who", ["expert", "dash"])
def test_bound_never_exceeds_the_steps_a_successful_policy_still_needed(who):
    """(a) At every step t of every successful episode (success at step T): T - t >= the bound at t."""
    tasks = _tasks()
    n_ok, slack0 = 0, []
    for i in range(80):
        task, seed = tasks[i % len(tasks)], 5000 + i
        env_act = (lambda env: W.expert_action(env)) if who == "expert" else _dash
        ok, T, bounds = _bounds_along(task, seed, env_act)
        if not ok:
            continue
        n_ok += 1
        assert bounds[-1] == 0
        for t, b in enumerate(bounds):
            assert T - t >= b, (who, task, seed, t, T, b)
        slack0.append(T - bounds[0])
    assert n_ok >= 75
    if who == "dash":   # the bound is close to what a fast policy needs (not a vacuous 1)
        assert np.mean(slack0) < 4 and min(slack0) >= 0


def test_chebyshev_to_disk_matches_brute_force():
    rng = np.random.default_rng(0)
    a = np.linspace(0, 2 * np.pi, 20001)
    for _ in range(300):
        dx, dy, r = rng.uniform(-0.3, 0.3), rng.uniform(-0.3, 0.3), rng.uniform(0.0, 0.12)
        if math.hypot(dx, dy) <= r:      # the origin is in the disk
            assert reach.chebyshev_to_disk(dx, dy, r) == 0.0
            continue
        qx, qy = dx + r * np.cos(a), dy + r * np.sin(a)   # else the nearest point is on the circle
        brute = float(np.maximum(np.abs(qx), np.abs(qy)).min())
        assert reach.chebyshev_to_disk(dx, dy, r) == pytest.approx(brute, abs=1e-4)
        assert reach.chebyshev_to_disk(dx, dy, r) <= brute + 1e-12


def test_region_radius_contains_every_target_region():
    rng = np.random.default_rng(1)
    for kind, r in reach.REGION_RADIUS.items():
        for yaw in rng.uniform(-np.pi, np.pi, 8):
            pts = rng.uniform(-0.08, 0.08, (4000, 2))
            inside = np.array([_in_target_region(kind, 0.0, 0.0, yaw, x, y) for x, y in pts])
            assert inside.any() and np.hypot(*pts[inside].T).max() < r + 1e-12


def test_grasp_band_and_radius_match_the_env():
    """The bound's grasp set is the env's: just inside the band and radius the env grasps, just outside it does not."""
    task, seed = W.SPLITS.finetune[0], 3
    for dz, dxy, grasps in [(0.0, 0.0, True), (-0.002, 0.0, True), (0.002, 0.0, False), (None, -0.002, True),
                            (None, 0.002, False)]:
        env = W.TabletopEnv(render=False, actuation_noise=0.0)
        env.reset(task, seed)
        o, spec = env.instructed_object, W.FAMILY_SPECS[env.instructed_object.family]
        env.pos = np.array([o.x, o.y, o.z + spec.height + reach.GRASP_ABOVE + (dz or 0.0)])
        if dz is None:   # test the radius instead, at grasp height (the nearest other object is farther away)
            env.pos = np.array([o.x + spec.grasp_radius + dxy, o.y, grasp_height(o)])
        _, _, _, info = env.step(np.r_[np.zeros(6), 0.0])
        assert info["holding_instructed"] is grasps, (dz, dxy)
        low = W.TabletopEnv(render=False, actuation_noise=0.0)
        low.reset(task, seed)
        lo = low.instructed_object
        low.pos = np.array([lo.x, lo.y, max(0.0, lo.z - reach.GRASP_BELOW)])
        assert low.step(np.r_[np.zeros(6), 0.0])[3]["holding_instructed"]


def test_noise_peak_is_the_noise_the_env_then_draws():
    env = W.TabletopEnv(render=False)
    env.reset(W.SPLITS.heldout_tasks[0], 7)
    env.pos = np.array([0.30, 0.0, 0.10])          # interior: no workspace clip in 20 still steps
    peak = reach.noise_peak(env, 20)
    state = env._act_rng.bit_generator.state
    assert reach.noise_peak(env, 20) == peak and env._act_rng.bit_generator.state == state   # a peek: no draw
    moved = []
    for _ in range(20):
        p = env.pos.copy()
        env.step(np.r_[np.zeros(6), 1.0])
        moved.append(np.abs(env.pos - p).max())
    assert max(moved) == pytest.approx(peak, abs=1e-12) and 0 < peak < 6 * W.ACTUATION_NOISE
    assert reach.step_reach(env, 5) >= W.ACTION_XYZ_LIMIT
    quiet = W.TabletopEnv(render=False, actuation_noise=0.0)
    quiet.reset(W.SPLITS.heldout_tasks[0], 7)
    assert reach.noise_peak(quiet, 20) == 0.0 and reach.step_reach(quiet, 20) == W.ACTION_XYZ_LIMIT


def test_bound_counts_the_gripper_steps():
    env = W.TabletopEnv(render=False, actuation_noise=0.0)
    env.reset(W.SPLITS.finetune[0], 3)
    o = env.instructed_object
    env.pos = np.array([o.x, o.y, grasp_height(o)])
    open_here = reach.min_steps_to_success(env)
    env.gripper = 0.0                                       # closed on nothing: one more step (re-open) at least
    assert reach.min_steps_to_success(env) == open_here + 1 and open_here >= 2   # grasp here, carry, release
    env.gripper = 1.0
    env.step(np.r_[np.zeros(6), 0.0])                      # grasp
    assert env.held == env.obj_index and reach.min_steps_to_success(env) >= 1
    env.success = True
    assert reach.min_steps_to_success(env) == 0 and reach.can_still_succeed(env)


# ------------------------------------------------------------------------------------------------------ the loop


class _PerEpisode:
    """Test policies whose action depends only on each env's own state and step (never on which other envs are still
    running), so stopping some episodes cannot change the others: success with and without the stop must agree."""

    needs_images = False

    def __init__(self, name: str, fn):
        self.name, self.fn, self.frames = name, fn, 0

    def act(self, images, instructions, envs=None, progress=None):
        self.frames += len(instructions)
        return np.stack([self.fn(env) for env in envs])


def _rng(env, k: int) -> np.random.Generator:
    return np.random.default_rng([env.seed, env.t, k])


def _noisy_expert(env):
    a = W.expert_action(env).astype(np.float64)
    r = _rng(env, 1)
    a[:3] += r.normal(0.0, 0.012, 3)
    if r.random() < 0.08:
        a[6] = 1.0 - a[6]
    return a


def _random(env):
    r = _rng(env, 2)
    a = r.uniform(W.ACTION_LOW, W.ACTION_HIGH)
    a[6] = float(r.random() < 0.5)
    return a


MEAN = np.array([0.001, -0.0005, -0.002, 0.0, 0.0, 0.001, 0.55])   # a mean-action-like drift, gripper "open"
POLICIES = {
    "expert": lambda env: W.expert_action(env),
    "noisy expert": _noisy_expert,
    "mean action": lambda env: MEAN,
    "random": _random,
    "down-left": lambda env: np.r_[-0.04, -0.04, -0.04, 0.0, 0.0, 0.0, 1.0],
}


def _episodes(n: int = 16) -> list[rollout.ClosedLoopEpisode]:
    tasks = _tasks()
    return [rollout.ClosedLoopEpisode(tasks[i % len(tasks)], 900 + i, tasks[i % len(tasks)], i) for i in range(n)]


@pytest.mark.parametrize("name", list(POLICIES))
def test_stopping_changes_no_success_and_saves_frames_of_failing_episodes(name):
    """(b) stop on vs off: the same success per episode; fewer policy frames wherever an episode fails."""
    eps = _episodes()
    on_pol, off_pol = _PerEpisode(name, POLICIES[name]), _PerEpisode(name, POLICIES[name])
    on = rollout.run_closed_loop(on_pol, eps, max_steps=MAX_STEPS)
    off = rollout.run_closed_loop(off_pol, eps, max_steps=MAX_STEPS, stop_hopeless=False)
    assert [r["success"] for r in on] == [r["success"] for r in off]
    for a, b in zip(on, off):
        if a["success"]:
            assert a["steps"] == b["steps"] and not a["stopped_early"]
            np.testing.assert_array_equal(a["path"], b["path"])
        else:
            assert b["steps"] == MAX_STEPS and not b["stopped_early"]
            # a failure is stopped early, or it could still have succeeded on its last step (bound 1 at t = 59)
            assert a["stopped_early"] == (a["steps"] < MAX_STEPS)
            np.testing.assert_array_equal(a["path"], b["path"][: a["steps"] + 1])   # the same episode, cut
    assert on_pol.frames == sum(r["steps"] for r in on) and off_pol.frames == sum(r["steps"] for r in off)
    n_fail = sum(not r["success"] for r in off)
    n_stopped = sum(r["stopped_early"] for r in on)
    assert on_pol.frames <= off_pol.frames - n_stopped and (on_pol.frames < off_pol.frames) == (n_stopped > 0)
    if name == "expert":
        assert n_fail == 0
    if name in ("mean action", "random", "down-left"):   # they never succeed: every episode is stopped early
        assert n_fail == n_stopped == len(eps)
    if name == "noisy expert":
        assert 0 < n_fail < len(eps) and n_stopped > 0


def test_record_fields():
    """(c) steps = steps run, stopped_early / stopped_at, the bound at the end, and what is 'as of the stop'."""
    eps = _episodes(6)
    res = rollout.run_closed_loop(_PerEpisode("mix", lambda env: W.expert_action(env) if env.seed % 2 else MEAN),
                                  eps, max_steps=MAX_STEPS)
    for ep, r in zip(eps, res):
        assert r["episode_index"] == ep.episode_index
        assert r["path"].shape == (r["steps"] + 1, 3) and r["gripper"].shape == (r["steps"] + 1,)
        if ep.seed % 2:
            assert r["success"] and not r["stopped_early"] and r["stopped_at"] is None
            assert r["min_steps_to_success"] == 0 and r["grasped"]
        else:
            assert not r["success"] and r["stopped_early"] and r["stopped_at"] == r["steps"] < MAX_STEPS
            assert r["min_steps_to_success"] > MAX_STEPS - r["steps"]
            env = W.TabletopEnv(render=False)            # final_distance_cm is the distance at the stop
            env.reset(ep.instruction, ep.seed)
            for _ in range(r["steps"]):
                _, _, _, info = env.step(MEAN)
            assert r["final_distance_cm"] == pytest.approx(100 * info["distance_to_target"])
    short = rollout.run_closed_loop(_PerEpisode("mean", lambda env: MEAN), eps[:2], max_steps=3)
    assert all(r["stopped_early"] and r["steps"] == 0 and r["stopped_at"] == 0 for r in short)   # hopeless at t=0
    assert all(np.isfinite(r["final_distance_cm"]) and r["path"].shape == (1, 3) for r in short)


def test_loop_draws_only_the_policy_view_and_it_equals_the_full_render():
    drawn = []

    class Spy(policies.ConstantPolicy):
        needs_images = True

        def act(self, images, instructions, envs=None, progress=None):
            for im, env in zip(images, envs):
                drawn.append((im.copy(), env.render()))
            return super().act(images, instructions, envs)

    t, s = W.SPLITS.finetune[0], 11
    eps = [rollout.ClosedLoopEpisode(t, s, t), rollout.ClosedLoopEpisode(t, s, t, camera=W.IMAGE_KEYS[1])]
    rollout.run_closed_loop(Spy(np.r_[0.01, 0.0, -0.01, 0.0, 0.0, 0.1, 1.0], "drift"), eps, max_steps=4,
                            image_size=64, stop_hopeless=False)
    assert len(drawn) == 8
    for k, (im, full) in enumerate(drawn):
        assert np.array_equal(im, full[W.IMAGE_KEYS[k % 2]])
    env = W.TabletopEnv(image_size=64, render=False)
    env.reset(t, s)
    assert set(env.render([W.IMAGE_KEYS[1]])) == {W.IMAGE_KEYS[1]}
    with pytest.raises(ValueError):
        env.render(["observation.images.wrist"])


def test_rendering_one_camera_at_a_time_gives_the_same_images_through_a_grasp():
    env, ref = W.TabletopEnv(image_size=64, render=False), W.TabletopEnv(image_size=64)
    for e in (env, ref):
        e.reset(W.SPLITS.finetune[2], 4)
    for k in range(40):
        a = W.expert_action(ref)
        obs, *_ = ref.step(a)
        env.step(a)
        key = W.IMAGE_KEYS[k % 2]
        assert np.array_equal(env.render([key])[key], obs[key])
    assert ref.success
