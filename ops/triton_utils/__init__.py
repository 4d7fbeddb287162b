"""Launch helpers shared by every op: replayed launches (replay.py) and where kernels run (device.py)."""

from ops.triton_utils.device import device_capability, interpreting, tf32_tensor_cores, use_triton
from ops.triton_utils.replay import ReplayLauncher

__all__ = ["ReplayLauncher", "device_capability", "interpreting", "tf32_tensor_cores", "use_triton"]
