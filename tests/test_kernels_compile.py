"""The Triton kernels compile for Hopper (sm_90) with the installed Triton, without a GPU.

The launches of a small MoE workload are recorded under the interpreter (``kernel_launches.py``,
with the GPU's tile configurations), then each distinct kernel specialisation is compiled ahead
of time to PTX and a cubin for sm_90, 16-bit operands as bfloat16. This catches code that the
interpreter accepts but the compiler rejects (layouts, types, loops), and checks that the GEMMs
reach Hopper's tensor-core instruction (``wgmma``).
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys

import pytest

triton = pytest.importorskip("triton")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _signature(fn, launch):
    sig, constexprs, attrs = {}, {}, {}
    for i, name in enumerate(fn.arg_names):
        desc = launch["args"][name]
        if i in fn.constexprs:
            constexprs[(i,)] = desc["const"] if "const" in desc else desc["int"]
            sig[name] = "constexpr"
        elif "ptr" in desc:
            sig[name] = "*" + ("bf16" if desc["ptr"] == "fp16" else desc["ptr"])
            if desc["aligned"]:
                attrs[(i,)] = [["tt.divisibility", 16]]
        elif "int" in desc:
            value = desc["int"]
            if value == 1:  # Triton specialises integers equal to 1
                constexprs[(i,)] = 1
                sig[name] = "constexpr"
            else:
                sig[name] = "i32" if -(2**31) <= value < 2**31 else "i64"
                if value % 16 == 0:
                    attrs[(i,)] = [["tt.divisibility", 16]]
        elif "float" in desc:
            sig[name] = "fp32"
        else:
            raise AssertionError(f"{fn.__name__}.{name}: {desc}")
    return sig, constexprs, attrs


def test_kernels_compile_for_sm90(tmp_path):
    try:
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
    except ImportError as err:  # pragma: no cover - a Triton without the AOT entry points
        pytest.skip(f"this Triton has no ahead-of-time compile API: {err}")
    out = tmp_path / "launches.json"
    env = dict(os.environ, TRITON_INTERPRET="1")
    subprocess.run([sys.executable, os.path.join(ROOT, "tests", "kernel_launches.py"), str(out)],
                   check=True, env=env, cwd=ROOT, timeout=600)  # fmt: skip
    launches = json.loads(out.read_text())
    assert {launch["name"] for launch in launches} >= {
        "_logits_kernel", "_gate_kernel", "_scan_kernel", "_assign_kernel", "_router_bwd_kernel",
        "_router_dx_kernel", "_router_dw_kernel", "_ffn_up_kernel", "_grouped_mm_kernel",
        "_act_bwd_rows_kernel", "_wgrad_kernel", "_gather_rows_kernel", "_combine_kernel",
        "_combine_bwd_kernel", "_permutation_kernel",
    }  # fmt: skip
    seen, wgmma = set(), {}
    for launch in launches:
        fn = getattr(importlib.import_module(launch["module"]), launch["name"])
        sig, constexprs, attrs = _signature(fn, launch)
        key = json.dumps([launch["name"], sig, sorted(map(str, constexprs.items())), sorted(map(str, attrs)),
                          launch["num_warps"], launch["num_stages"]])  # fmt: skip
        if key in seen:
            continue
        seen.add(key)
        options = {"num_warps": launch["num_warps"], "num_stages": launch["num_stages"]}
        try:
            kernel = triton.compile(
                ASTSource(fn, sig, constexprs, attrs), target=GPUTarget("cuda", 90, 32), options=options
            )
        except Exception as err:
            raise AssertionError(f"{launch['name']} does not compile for sm_90 ({sig}, {constexprs}): {err}") from err
        assert kernel.asm.get("cubin"), launch["name"]
        if "bf16" in str(sig.values()):
            wgmma.setdefault(launch["name"], []).append("wgmma.mma_async" in kernel.asm["ptx"])
    # Every bf16 GEMM kernel reaches the Hopper tensor-core instruction in at least its main variants.
    for name in ("_ffn_up_kernel", "_grouped_mm_kernel", "_wgrad_kernel", "_logits_kernel"):
        assert any(wgmma[name]), f"{name}: no wgmma in any bf16 variant"
