"""LCE tuning sweep on the GPU: chunk/group budgets and kernel tiles, fwd+bwd ms and extra peak memory."""
import torch
import triton.testing as tt

from ops.linear_cross_entropy import launch, linear_cross_entropy

N, D, V = 65536, 4096, 151936
x = torch.randn(N, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
w = (torch.randn(V, D, device="cuda") / 64).bfloat16().requires_grad_()
t = torch.randint(0, V, (N,), device="cuda")
a, b = (torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16) for _ in range(2))
mm = tt.do_bench(lambda: a @ b, warmup=1000, rep=1000, return_mode="median")
rate = 2 * 8192**3 / mm / 1e9
print(f"matmul {rate:.0f} TFLOP/s; floor of 3 matmuls {3 * 2 * N * D * V / rate / 1e9:.1f} ms")


def step():
    x.grad = w.grad = None
    linear_cross_entropy(x, w, t).backward()


for lb, db, bv, nw in [(512 << 20, 1 << 30, launch.BLOCK_V, launch.NUM_WARPS), (1 << 30, 2 << 30, 4096, 8),
                       (512 << 20, 2 << 30, 4096, 8), (256 << 20, 2 << 30, 4096, 8), (1 << 30, 1 << 30, 4096, 8),
                       (512 << 20, 1 << 30, 8192, 16)]:
    launch.LOGITS_BYTES, launch.DLOGITS_BYTES, launch.BLOCK_V, launch.NUM_WARPS = lb, db, bv, nw
    step()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    ms = tt.do_bench(step, warmup=300, rep=2000, return_mode="median")
    peak = (torch.cuda.max_memory_allocated() - base) / 2**30
    print(f"logits {lb >> 20} MiB, dlogits {db >> 20} MiB, BLOCK_V {bv}, warps {nw}: {ms:.1f} ms, peak {peak:.2f} GiB")
with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as p:
    step()
    torch.cuda.synchronize()
print(p.key_averages().table(sort_by="cuda_time_total", row_limit=10))
