"""Tests of the embedded demo world (vla_bridge.data.world): determinism, expert, random baseline,
conventions, splits, paraphrases and rendering."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from vla_bridge.data import world as W

IMG0, IMG1 = W.IMAGE_KEYS
SIZE = 64  # small images keep the suite fast; rendering is resolution independent


def _frames_equal(a: W.Episode, b: W.Episode) -> bool:
    if len(a) != len(b):
        return False
    for fa, fb in zip(a.frames, b.frames):
        for k in (IMG0, IMG1, W.STATE_KEY, W.ACTION_KEY):
            if fa[k].dtype != fb[k].dtype or not np.array_equal(fa[k], fb[k]):
                return False
    return True


def _split_pairs(per_split: int, seed: int = 7) -> list[tuple[str, str, int, str]]:
    out = []
    for split in W.SPLIT_NAMES:
        for task, ep_seed, prompt in W.sample_task_seeds(per_split, seed, split):
            out.append((split, task, ep_seed, prompt))
    return out


def _run_expert_fast(task: str, seed: int, prompt: str | None = None) -> W.TabletopEnv:
    env = W.TabletopEnv(render=False)
    env.reset(task, seed, prompt=prompt)
    expert = W.Expert(env)
    while env.t < env.max_steps:
        a = expert.act()
        if expert.finished:
            break
        env.step(a)
    return env


# ---------------------------------------------------------------------------------------------------
# determinism
# ---------------------------------------------------------------------------------------------------
def test_same_seed_gives_identical_episodes():
    task = W.SPLITS.pretrain[3]
    a = W.generate_episode(task, 11, image_size=SIZE)
    b = W.generate_episode(task, 11, image_size=SIZE)
    assert _frames_equal(a, b)
    assert a.meta == b.meta


def test_different_seeds_differ():
    task = W.SPLITS.pretrain[3]
    a = W.generate_episode(task, 11, image_size=SIZE)
    b = W.generate_episode(task, 12, image_size=SIZE)
    assert not np.array_equal(a.frames[0][IMG0], b.frames[0][IMG0])
    n = min(len(a), len(b))
    assert not np.allclose(a.actions[:n], b.actions[:n])


def test_generate_episodes_is_deterministic():
    a = list(W.generate_episodes(3, seed=5, split="finetune", image_size=SIZE))
    b = list(W.generate_episodes(3, seed=5, split="finetune", image_size=SIZE))
    assert all(_frames_equal(x, y) and x.task == y.task and x.meta == y.meta for x, y in zip(a, b))
    c = list(W.generate_episodes(3, seed=6, split="finetune", image_size=SIZE))
    assert [e.meta["seed"] for e in a] != [e.meta["seed"] for e in c]


def test_reset_reproduces_recorded_episode():
    """(instruction, seed) -> the same scene; replaying the recorded actions gives the same frames."""
    ep = W.generate_episode(W.SPLITS.finetune[2], 42, image_size=SIZE, blank_task_prob=1.0)
    assert ep.task == "" and ep.meta["instruction"] == W.SPLITS.finetune[2]
    env = W.TabletopEnv(image_size=SIZE)
    obs = env.reset(ep.meta["instruction"], ep.meta["seed"], prompt=ep.task)
    assert obs["task"] == ""
    success = False
    for frame in ep.frames:
        for k in (IMG0, IMG1, W.STATE_KEY):
            assert np.array_equal(obs[k], frame[k])
        obs, _done, success, _info = env.step(frame[W.ACTION_KEY])
    assert success and ep.meta["success"]


def test_paraphrase_gives_same_scene():
    task = W.SPLITS.finetune[0]
    base = W.TabletopEnv(image_size=SIZE).reset(task, 3)
    for alt in W.paraphrases(task)[:4]:
        obs = W.TabletopEnv(image_size=SIZE).reset(alt, 3)
        assert obs["task"] == alt
        assert np.array_equal(obs[IMG0], base[IMG0]) and np.array_equal(obs[IMG1], base[IMG1])


# ---------------------------------------------------------------------------------------------------
# expert and random baseline
# ---------------------------------------------------------------------------------------------------
def test_expert_succeeds_everywhere():
    pairs = _split_pairs(per_split=8)  # 48 (task, seed) pairs over all splits
    assert {s for s, *_ in pairs} == set(W.SPLIT_NAMES)
    lengths = []
    for split, task, seed, prompt in pairs:
        env = _run_expert_fast(task, seed, prompt)
        assert env.success, (split, task, seed)
        lengths.append(env.t)
    assert 15 <= np.mean(lengths) <= 40 and max(lengths) < W.DEFAULT_MAX_STEPS


def test_expert_on_every_heldout_task():
    tasks = W.SPLITS.heldout_tasks + W.SPLITS.heldout_family_tasks + W.SPLITS.unseen_color_tasks
    for i, task in enumerate(tasks):
        assert _run_expert_fast(task, 1000 + i).success, task


def test_expert_is_reactive_and_recovers_from_disturbances():
    """The expert acts from the visible state, not a phase counter: a fresh Expert attached mid-episode picks up
    where the scene is, and knocking the object out of the gripper or shoving the arm is recovered from."""
    task, seed = W.SPLITS.finetune[0], 21
    env = W.TabletopEnv(render=False)
    env.reset(task, seed)
    expert = W.Expert(env)
    seen, dropped, shoved = [], False, False
    while env.t < env.max_steps and not expert.finished:
        a = expert.act()
        seen.append(expert.phase)
        if expert.phase == "carry" and not dropped and env.pos[2] > 0.09:
            a = a.copy()
            a[6] = 1.0          # open mid-carry: the object falls off, away from the target
            dropped = True
            env.step(a)
            expert = W.Expert(env)  # a new expert must not need the old one's memory
            continue
        if dropped and not shoved and expert.phase in ("approach", "descend"):
            env.pos[:2] += np.array([0.04, -0.04])   # shove the arm sideways
            shoved = True
        env.step(a)
    assert dropped and shoved and env.success
    assert seen.count("grasp") >= 2                  # it grasped again after the drop
    assert {"approach", "descend", "lift", "carry", "lower", "release", "retreat"} <= set(seen)


def test_run_expert_returns_full_episode():
    ep = W.run_expert(W.SPLITS.heldout_family_tasks[0], 9, image_size=SIZE)
    assert ep.meta["success"] and ep.meta["family"] == W.HELDOUT_FAMILY
    assert ep.meta["split"] == "heldout_family" and ep.task == W.SPLITS.heldout_family_tasks[0]
    env = W.TabletopEnv(image_size=SIZE)
    env.reset(W.SPLITS.heldout_family_tasks[0], 9)
    actions = []
    while env.t < env.max_steps:
        a = W.expert_action(env)
        if env._expert.finished:
            break
        actions.append(a)
        env.step(a)
    assert np.array_equal(np.stack(actions), ep.actions)


def test_random_actions_rarely_succeed():
    rng = np.random.default_rng(0)
    n, wins = 60, 0
    for i in range(n):
        env = W.TabletopEnv(render=False)
        env.reset(W.SPLITS.pretrain[i % len(W.SPLITS.pretrain)], 500 + i)
        done = success = False
        while not done:
            a = rng.uniform(W.ACTION_LOW, W.ACTION_HIGH)
            a[6] = float(rng.integers(0, 2))
            _, done, success, _ = env.step(a)
        wins += bool(success)
        assert env.t <= env.max_steps
    assert wins / n <= 0.05


# ---------------------------------------------------------------------------------------------------
# conventions
# ---------------------------------------------------------------------------------------------------
def test_shapes_dtypes_and_conventions():
    ep = W.generate_episode(W.SPLITS.pretrain[0], 5, image_size=SIZE)
    assert 15 <= len(ep) <= 45
    for f in ep.frames:
        assert f[IMG0].shape == (SIZE, SIZE, 3) and f[IMG0].dtype == np.uint8
        assert f[IMG1].shape == (SIZE, SIZE, 3) and f[IMG1].dtype == np.uint8
        assert f[W.STATE_KEY].shape == (8,) and f[W.STATE_KEY].dtype == np.float32
        assert f[W.ACTION_KEY].shape == (7,) and f[W.ACTION_KEY].dtype == np.float32
    s, a = ep.states, ep.actions
    assert np.all(s[:, 6] == 0.0)  # pad
    assert s[0, 7] == 1.0  # starts open
    assert set(np.unique(a[:, 6]).tolist()) == {0.0, 1.0}  # absolute gripper command
    assert np.all(np.abs(a[:, :3]) <= W.EXPERT_MAX_STEP + 1e-6)  # per-axis speed limit, commands carry no noise
    assert np.abs(a[:, :3]).max() > 0.02  # Bridge-like magnitudes, not tiny
    assert np.all(np.abs(a[:, 3:6]) < 0.2)
    assert all(a[:, d].std() > 1e-4 for d in (0, 1, 2, 5))  # xyz and yaw vary
    assert np.all(a[:, 3:5] == 0.0)  # the expert never tilts the wrist (roll / pitch commands are 0)
    assert np.all(s[:, :3] >= W.WORKSPACE_LOW - 1e-6) and np.all(s[:, :3] <= W.WORKSPACE_HIGH + 1e-6)
    # state[t+1] = state[t] + action[t] for xyz (no clipping happens for the expert)
    # the arm lands near (not exactly on) the commanded step: seeded actuation noise of ACTUATION_NOISE std
    err = s[1:, :3] - (s[:-1, :3] + a[:-1, :3])
    inside = np.all((s[1:, :3] > W.WORKSPACE_LOW + 1e-3) & (s[1:, :3] < W.WORKSPACE_HIGH - 1e-3), axis=1)
    assert np.abs(err[inside]).max() < 5 * W.ACTUATION_NOISE and 0.3 * W.ACTUATION_NOISE < err[inside].std() < 2 * W.ACTUATION_NOISE
    # gripper state follows the absolute command
    np.testing.assert_array_equal(s[1:, 7], a[:-1, 6])
    # the episode grasps (close) then releases (open)
    g = a[:, 6]
    first_close = int(np.argmax(g == 0.0))
    assert g[0] == 1.0 and np.any(g[first_close:] == 1.0)


def test_step_clips_and_reports():
    env = W.TabletopEnv(render=False, max_steps=5, actuation_noise=0.0)
    obs = env.reset("put the red block on the plate", 0)
    assert set(obs) == {W.STATE_KEY, W.TASK_KEY}
    z0 = obs[W.STATE_KEY][2]
    obs, done, success, info = env.step([0, 0, 1.0, 0, 0, 0, 1])
    assert obs[W.STATE_KEY][2] == pytest.approx(z0 + W.ACTION_XYZ_LIMIT, abs=1e-6) or \
        obs[W.STATE_KEY][2] == pytest.approx(W.WORKSPACE_HIGH[2])
    assert not done and not success and info["t"] == 1 and info["held"] is None
    for _ in range(4):
        obs, done, success, info = env.step(np.zeros(7))
    assert done and not success
    with pytest.raises(ValueError):
        env.step([0, 0, 0])
    with pytest.raises(ValueError):
        env.reset("", 0)


def test_grasp_and_release_physics():
    env = W.TabletopEnv(render=False)
    env.reset("put the blue cup in the pot", 3)
    o = env.instructed_object
    # go above the object, descend, close
    for goal_z in (0.1, 0.02):
        for _ in range(20):
            d = np.array([o.x, o.y, goal_z]) - env.pos
            env.step([*np.clip(d, -0.03, 0.03), 0, 0, 0, 1.0])
    _, _, _, info = env.step([0, 0, 0, 0, 0, 0, 0.0])
    assert info["holding_instructed"] and info["held"] == "cup"
    env.step([0, 0, 0.03, 0, 0, 0, 0.0])
    assert o.z > 0.0  # lifted
    _, _, success, info = env.step([0, 0, 0, 0, 0, 0, 1.0])
    assert info["held"] is None and o.z == 0.0 and not success  # dropped where it was, not in the pot


def test_instructed_object_is_unique_in_scene():
    for task, seed, _ in W.sample_task_seeds(40, 3, "pretrain"):
        env = W.TabletopEnv(render=False)
        env.reset(task, seed)
        keys = [(o.color, o.family) for o in env.objects]
        assert len(set(keys)) == len(keys) and 2 <= len(keys) <= 3
        assert len(env.targets) == 2 and len({t.kind for t in env.targets}) == 2
        p = W.parse_task(task)
        assert keys[0] == (p["color"], p["family"]) and env.instructed_target.kind == p["target"]
        items = [(o.x, o.y, W.FAMILY_SPECS[o.family].radius) for o in env.objects]
        items += [(t.x, t.y, W.TARGET_SPECS[t.kind].radius) for t in env.targets]
        for (x1, y1, r1), (x2, y2, r2) in itertools.combinations(items, 2):
            assert np.hypot(x1 - x2, y1 - y2) > r1 + r2  # non-overlapping
        # training scenes never contain the held-out family or the unseen colour
        assert all(o.family != W.HELDOUT_FAMILY and o.color != W.UNSEEN_COLOR for o in env.objects)


# ---------------------------------------------------------------------------------------------------
# splits, parsing, paraphrases
# ---------------------------------------------------------------------------------------------------
def test_splits_are_disjoint_by_design():
    sp = W.task_catalog(0)
    assert sp == W.SPLITS
    pre, ft, held = set(sp.pretrain), set(sp.finetune), set(sp.heldout_tasks)
    fam, col = set(sp.heldout_family_tasks), set(sp.unseen_color_tasks)
    assert len(held) >= 3 and len(pre) >= 30 and len(ft) >= 10
    groups = [pre, ft, held, fam, col]
    for a, b in itertools.combinations(groups, 2):
        assert not a & b

    def triple(t):
        p = W.parse_task(t)
        return p["color"], p["family"], p["target"]

    train = [triple(t) for t in sp.training]
    assert len(set(train)) == len(train)
    for c, f, t in train:
        assert f != sp.heldout_family and c != sp.unseen_color
    for c, f, t in map(triple, sp.heldout_tasks):
        assert (c, f, t) not in train
        assert any((c2, f2) == (c, f) for c2, f2, _ in train)  # object trained with other targets
        assert any(t2 == t for _, _, t2 in train)  # target trained with other objects
        assert f != sp.heldout_family and c != sp.unseen_color
    assert all(triple(t)[1] == sp.heldout_family for t in sp.heldout_family_tasks)
    assert all(triple(t)[0] == sp.unseen_color for t in sp.unseen_color_tasks)
    # fine-tuning objects and targets are also present in pretraining
    pre_t = [triple(t) for t in sp.pretrain]
    for c, f, t in map(triple, sp.finetune):
        assert any((c2, f2) == (c, f) for c2, f2, _ in pre_t) and any(t2 == t for *_, t2 in pre_t)
    # other catalog seeds: still a partition of the same training tasks
    other = W.task_catalog(1)
    assert set(other.training) == set(sp.training) and other.heldout_tasks == sp.heldout_tasks


def test_parse_task_and_paraphrases():
    assert W.parse_task("") == {"verb": None, "color": None, "family": None, "target": None}
    assert W.parse_task("put the red block on the plate") == {
        "verb": "put", "color": "red", "family": "block", "target": "plate"}
    all_tasks = (W.SPLITS.training + W.SPLITS.heldout_tasks + W.SPLITS.heldout_family_tasks
                 + W.SPLITS.unseen_color_tasks)
    for task in all_tasks:
        p = W.parse_task(task)
        assert None not in p.values(), task
        alts = W.paraphrases(task)
        assert len(alts) >= 5 and task not in alts and len(set(alts)) == len(alts)
        for alt in alts:
            q = W.parse_task(alt)
            assert (q["color"], q["family"], q["target"]) == (p["color"], p["family"], p["target"]), alt
            assert q["verb"] is not None
            assert W.canonical_task(alt) == task
    assert W.SPLITS.split_of(W.paraphrases(W.SPLITS.finetune[0])[0]) == "paraphrase"
    assert W.SPLITS.split_of(W.SPLITS.heldout_tasks[0]) == "heldout"
    assert W.paraphrases("") == []


def test_blank_tasks_share_and_paraphrase_split():
    tasks = W.SPLITS.pretrain
    n = 400
    share = np.mean([W.is_blank_episode(tasks[i % len(tasks)], i, 0.1) for i in range(n)])
    assert 0.05 <= share <= 0.16
    assert not any(W.is_blank_episode(t, 1, 0.0) for t in tasks)
    assert W.default_blank_task_prob("pretrain") == 0.1 and W.default_blank_task_prob("heldout") == 0.0
    for task, _seed, prompt in W.sample_task_seeds(10, 0, "paraphrase"):
        assert task in W.SPLITS.finetune and prompt != task and prompt in W.paraphrases(task)
    ep = next(W.generate_episodes(1, seed=0, split="paraphrase", image_size=SIZE))
    assert ep.task != ep.meta["instruction"] and W.canonical_task(ep.task) == ep.meta["instruction"]
    assert ep.meta["split"] == "paraphrase"


# ---------------------------------------------------------------------------------------------------
# rendering
# ---------------------------------------------------------------------------------------------------
def test_cameras_differ_and_images_depend_on_scene():
    env = W.TabletopEnv(image_size=SIZE)
    obs = env.reset(W.SPLITS.pretrain[1], 2)
    i0, i1 = obs[IMG0], obs[IMG1]
    assert np.abs(i0.astype(int) - i1.astype(int)).mean() > 10  # two visibly different views
    assert i0.std() > 10 and i1.std() > 10
    # move a resting distractor object -> pixels change in both views
    env.objects[1].x += 0.04
    moved = env.render()
    assert np.abs(moved[IMG0].astype(int) - i0.astype(int)).sum() > 0
    assert np.abs(moved[IMG1].astype(int) - i1.astype(int)).sum() > 0
    env.objects[1].x -= 0.04
    assert np.array_equal(env.render()[IMG0], i0)


def test_images_depend_on_gripper_height_and_opening():
    env = W.TabletopEnv(image_size=SIZE)
    obs = env.reset(W.SPLITS.pretrain[1], 2)
    down, _, _, _ = env.step([0, 0, -0.04, 0, 0, 0, 1])
    for k in W.IMAGE_KEYS:
        assert np.abs(down[k].astype(int) - obs[k].astype(int)).sum() > 0
    closed, _, _, _ = env.step([0, 0, 0, 0, 0, 0, 0])
    assert np.abs(closed[IMG0].astype(int) - down[IMG0].astype(int)).sum() > 0


def test_image_size_and_fingerprint():
    env = W.TabletopEnv(image_size=96)
    obs = env.reset(W.SPLITS.unseen_color_tasks[0], 0)
    assert obs[IMG0].shape == (96, 96, 3) and obs[IMG1].shape == (96, 96, 3)
    fp = W.world_fingerprint()
    assert isinstance(fp, str) and len(fp) == 16 and fp == W.world_fingerprint()
    assert isinstance(W.WORLD_VERSION, str)
