"""The VLAs on the shared code path: ``tiny_vla`` (CPU / offline) and ``openvla`` (OpenVLA-7B, bf16 or 4-bit), with
``lora`` (which linear layers get adapters). Import from the submodules (``from vla_bridge.models.openvla import
load_openvla``). Octo-Small, a JAX model in its own environment, is ``vla_bridge.octo``.
"""
