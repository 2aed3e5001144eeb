"""Record the Triton kernel launches of a small MoE workload (run under ``TRITON_INTERPRET=1``).

Used by ``test_kernels_compile.py``: every launch's kernel, argument types, integer
specialisations, constexprs, warps and stages, with the tile configurations the GPU would use
(not the interpreter's small ones), written as JSON for a process that compiles them for sm_90.

    TRITON_INTERPRET=1 python tests/kernel_launches.py OUT.json
"""

from __future__ import annotations

import json
import sys

import torch
import triton.runtime.interpreter as interpreter

TYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.int32: "i32",
         torch.int64: "i64", torch.int8: "i8", torch.bool: "i1"}  # fmt: skip


def _describe(value):
    if isinstance(value, torch.Tensor):
        return {"ptr": TYPES[value.dtype], "aligned": value.data_ptr() % 16 == 0}
    if isinstance(value, bool):
        return {"const": value}
    if isinstance(value, int):
        return {"int": value}
    if isinstance(value, float):
        return {"float": value}
    if isinstance(value, str):
        return {"const": value}
    raise TypeError(f"unexpected kernel argument {value!r}")


def record(path: str) -> None:
    launches = []
    original = interpreter.InterpretedFunction.run

    def run(self, *args, grid, warmup, **kwargs):
        names = self.arg_names
        bound = dict(zip(names, args, strict=False))
        bound.update({k: v for k, v in kwargs.items() if k in names})
        launches.append({
            "module": self.fn.__module__,
            "name": self.fn.__name__,
            "args": {k: _describe(v) for k, v in bound.items()},
            "num_warps": kwargs.get("num_warps", 4),
            "num_stages": kwargs.get("num_stages", 3),
        })  # fmt: skip
        return original(self, *args, grid=grid, warmup=warmup, **kwargs)

    interpreter.InterpretedFunction.run = run
    # The GPU's tile configurations and block sizes, not the interpreter's small ones.
    import lightning_moe.kernels.availability as availability

    availability.interpreter_enabled = lambda: False
    from lightning_moe.kernels import combine, grouped_gemm, router

    for module in (combine, grouped_gemm, router):
        module.interpreter_enabled = lambda: False
    from lightning_moe.kernels.moe_ffn import grouped_ffn, moe_experts

    torch.manual_seed(0)
    T, H, F, E, K = 48, 64, 64, 4, 2
    cases = [(torch.float16, "swiglu", 1.25, True), (torch.float16, "gelu", None, False),
             (torch.float16, "relu", None, False), (torch.float32, "swiglu", 1.0, False)]  # fmt: skip
    for dtype, activation, cf, pad in cases:
        x = torch.randn(T, H, dtype=dtype, requires_grad=True)
        wg = torch.randn(E, H, requires_grad=True)
        mask = torch.zeros(T, dtype=torch.bool)
        if pad:
            mask[-5:] = True
        r = router.fused_route(x, wg, K, cf, padding_mask_T=mask if pad else None, random_priority=cf is not None)
        w1 = torch.randn(E, H, F, dtype=dtype, requires_grad=True)
        w3 = torch.randn(E, H, F, dtype=dtype, requires_grad=True) if activation == "swiglu" else None
        w2 = torch.randn(E, F, H, dtype=dtype, requires_grad=True)
        y = moe_experts(x, r.weights, r.kept, r.row_pair, r.kept_per_expert, w1, w3, w2, activation)
        (y.float().sum() + r.aux_loss + r.z_loss).backward()
        rows = torch.randn(30, H, dtype=dtype, requires_grad=True)
        out = grouped_ffn(rows, torch.tensor([10, 0, 15, 5]), w1, w3, w2, activation)
        out.float().sum().backward()
    router.rts_permutation(100, (1, 2, 3, 4))
    with open(path, "w") as f:
        json.dump(launches, f)


if __name__ == "__main__":
    record(sys.argv[1])
