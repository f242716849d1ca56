"""Evaluation of a fine-tuned VLA: the held-out table, the probes, the rollout video and failure mining.

One concept per module: :mod:`.metrics` (L1, drift, gripper events, bootstraps, KL), :mod:`.inference` (the
batched predictor), :mod:`.policies` (the :class:`Policy` protocol, the VLA and the baselines), :mod:`.rollout`
(the closed loop), :mod:`.table` (table.md, :class:`EvalReport`), :mod:`.evaluate` (task selection,
:func:`run_evaluation`), :mod:`.perturbations` / :mod:`.probes` / :mod:`.probe_report` (the probes),
:mod:`.failures` (failure mining, the contact sheet) and :mod:`.video` (the rollout video). The names below are what
the notebook, the write-up, the ablations and the benchmarks call.
"""

from .evaluate import CONTRAST_GROUPS, EvalConfig, run_evaluation
from .failures import mine_failures
from .inference import BatchedActionPredictor, per_frame_predict
from .metrics import ci_separated, compare_metric, summarize
from .policies import POLICY_BASE, POLICY_FINETUNED, POLICY_MEAN, Policy
from .probe_report import KL_SMALL
from .probes import run_probes
from .table import MIN_VERDICT_EPISODES, EvalReport, format_metric, task_verdicts
from .video import rollout_video

__all__ = [
    "CONTRAST_GROUPS", "EvalConfig", "run_evaluation", "mine_failures", "BatchedActionPredictor",
    "per_frame_predict", "ci_separated", "compare_metric", "summarize", "POLICY_BASE", "POLICY_FINETUNED",
    "POLICY_MEAN", "Policy", "KL_SMALL", "run_probes", "MIN_VERDICT_EPISODES", "EvalReport", "format_metric",
    "task_verdicts", "rollout_video",
]
