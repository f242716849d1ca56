"""The embedded world's conventions: BridgeData V2's keys, units, workspace and action bounds, and the version.

The same as the LeRobot conversions of BridgeData V2 and OpenVLA's ``bridge_orig``; the package docstring
(``vla_bridge.data.world``) spells them out. ``WORLD_VERSION`` is part of every dataset's cache key.
"""

from __future__ import annotations

import numpy as np

WORLD_VERSION = "1.2.0"
FPS = 5

IMAGE_KEYS = ("observation.images.image_0", "observation.images.image_1")
STATE_KEY = "observation.state"
ACTION_KEY = "action"
TASK_KEY = "task"
STATE_NAMES = ("x", "y", "z", "roll", "pitch", "yaw", "pad", "gripper")
ACTION_NAMES = ("dx", "dy", "dz", "droll", "dpitch", "dyaw", "gripper")

WORKSPACE_LOW = np.array([0.15, -0.18, 0.0], dtype=np.float64)
WORKSPACE_HIGH = np.array([0.45, 0.18, 0.2], dtype=np.float64)
ACTION_XYZ_LIMIT = 0.04     # env clip per axis, metres per step
ACTION_ROT_LIMIT = 0.25     # env clip per axis, radians per step
EXPERT_MAX_STEP = 0.03      # the expert's per-axis xyz step limit (metres per step)
EXPERT_MAX_YAW_STEP = 0.12  # the expert's yaw step limit (radians per step)
ACTUATION_NOISE = 0.001     # std (m) of the env's execution error on each commanded xyz step
ACTION_LOW = np.array([-ACTION_XYZ_LIMIT] * 3 + [-ACTION_ROT_LIMIT] * 3 + [0.0], dtype=np.float32)
ACTION_HIGH = np.array([ACTION_XYZ_LIMIT] * 3 + [ACTION_ROT_LIMIT] * 3 + [1.0], dtype=np.float32)
ROLL_PITCH_LIMIT = 0.6
DEFAULT_MAX_STEPS = 60
DEFAULT_IMAGE_SIZE = 128
