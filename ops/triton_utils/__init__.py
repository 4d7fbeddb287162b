"""Launch helpers shared by every op: where kernels run and when to skip the op dispatch (device.py,
no triton import), and replayed launches (replay.py: `from ops.triton_utils.replay import
ReplayLauncher`, imported by launchers only, since it imports triton)."""

from ops.triton_utils.device import device_capability, eager, interpreting, sm_count, tf32_tensor_cores, use_triton

__all__ = ["device_capability", "eager", "interpreting", "sm_count", "tf32_tensor_cores", "use_triton"]
