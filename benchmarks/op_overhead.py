"""Host cost of one fxforge custom-op call on CUDA (python benchmarks/op_overhead.py): through torch.ops (custom_op dispatch) vs the
bound Triton launcher called directly, and a bare torch op for scale. Tiny inputs, so launches,
not kernels, are timed (per call, after warm-up, one sync at the end of each batch of calls)."""
import time

import torch

from fxforge.ir import ops
from fxforge.kernels import norm, swiglu


def per_call(fn, n=300):
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / n * 1e6


dev = "cuda"
x = torch.randn(64, 576, device=dev, dtype=torch.bfloat16)
w = torch.ones(576, device=dev, dtype=torch.bfloat16)
g = torch.randn(64, 1536, device=dev, dtype=torch.bfloat16)
# ops bound to "triton", as the lower pass binds them: CUDA tensors go to the Triton kernels
print(f"torch add                       {per_call(lambda: x + x):7.1f} us")
print(f"torch.ops.fxforge.rmsnorm       {per_call(lambda: ops.RMSNORM(x, w, 1e-5, ops.TRITON)):7.1f} us")
print(f"rmsnorm_triton direct           {per_call(lambda: norm.rmsnorm_triton(x, w, 1e-5)):7.1f} us")
print(f"torch.ops.fxforge.swiglu        {per_call(lambda: ops.SWIGLU(g, g, ops.TRITON)):7.1f} us")
print(f"swiglu_triton direct            {per_call(lambda: swiglu.swiglu_triton(g, g)):7.1f} us")
