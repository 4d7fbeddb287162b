"""xl with our flash attention, regional compile: first step from an empty cache (where the seconds
go: dynamo, AOT/inductor, Triton JIT) and the steady-state step; frame counts for recompiles."""
import os
import statistics
import time

import torch
from torch._dynamo.utils import compile_times, counters

from cs336_systems.parallel.parallelize import parallelize
from cs336_systems.presets import ModelConfig
from cs336_systems.training.loss import lm_loss

assert os.environ.get("TORCHINDUCTOR_FORCE_DISABLE_CACHES") == "1"
torch.manual_seed(0)
cfg = ModelConfig(preset="xl", vocab_size=10_000, context_length=512, attention="flash")
with torch.device("cuda"):
    model = cfg.build()
forward, _ = parallelize(model, 1, compile_model=True, compile_mode=os.environ.get("MODE", "regional"))
opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
x = torch.randint(0, 10_000, (4, 513), device="cuda")


def step():
    opt.zero_grad(set_to_none=True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = lm_loss(forward, x[:, :-1], x[:, 1:])
    loss.backward()
    opt.step()
    torch.cuda.synchronize()


t = time.perf_counter()
step()
first = time.perf_counter() - t
print(f"first step {first:.1f} s; dynamo frames {dict(counters['stats'])}")
print(compile_times(repr="str", aggregate=True)[:3000])
times = []
for _ in range(8):
    t = time.perf_counter()
    step()
    times.append(time.perf_counter() - t)
print(f"steady state: median {statistics.median(times[2:]) * 1e3:.1f} ms/step; frames after {dict(counters['stats'])}")
