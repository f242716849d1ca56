"""POLICY=octo: Octo-Small in its own JAX environment (``.venv-octo``), driven from the main one.

``protocol`` (stdlib + numpy: framing, worker choice and command line; imported on both sides), ``worker`` (the real
worker, run in ``.venv-octo``), ``standin_worker`` (a JAX-free stand-in for CI), ``worker_common`` (what both workers
share: shard reading, augmentation, checkpoints, log lines), ``client`` (the main environment's side: train_octo,
OctoServer, OctoPolicy) and ``shards`` (the training split written as shards for the worker).

This file imports nothing: the worker imports ``vla_bridge.octo.protocol`` inside ``.venv-octo``, which has no torch
or lerobot.
"""
