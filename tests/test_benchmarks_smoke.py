"""benchmarks/hf_train_step.py runs end to end at tiny sizes on CPU (the H200 run is the lead's)."""

import importlib.util
import json
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "hf_train_step.py"


def test_hf_train_step_tiny_cpu(tmp_path, monkeypatch, capsys):
    spec = importlib.util.spec_from_file_location("hf_train_step", BENCH)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "hf_train_step", module)  # dataclasses look their module up
    spec.loader.exec_module(module)
    out = tmp_path / "r.json"
    monkeypatch.setattr(
        sys, "argv", ["hf_train_step.py", "--tiny", "--device", "cpu", "--steps", "2", "--json", str(out)]
    )
    module.main()
    rows = json.loads(out.read_text())["rows"]
    assert {(r["shape"], r["mode"], r["impl"].split()[0]) for r in rows} == {
        (s, m, i) for s in ("mixtral", "qwen3_moe") for m in ("bf16", "amp") for i in ("ours", "hf")
    }
    assert all(r["tokens_per_s"] > 0 and r["steps"] >= 2 for r in rows)
    assert "| mixtral (2 layers) | bf16 |" in capsys.readouterr().out
    # the FLOP count: 6 x active matmul parameters + attention, per token
    shape = module.TINY["mixtral"]
    attn = 64 * 4 * 16 * 2 + 2 * 64 * 2 * 16
    active = 2 * (attn + 2 * 3 * 64 * 128 + 4 * 64) + 256 * 64
    assert module.step_flops(shape, 32) == 6 * active + 12 * 2 * 64 * 32


def test_ep_throughput_sweep_runs_on_two_cpu_processes(tmp_path):
    """benchmarks/ep_throughput.py (the multi-GPU weak-scaling sweep) end to end, tiny, on gloo."""
    import os
    import subprocess

    script = BENCH.parent / "ep_throughput.py"
    out = tmp_path / "r.json"
    env = {k: v for k, v in os.environ.items() if k not in ("LOCAL_RANK", "WORLD_SIZE", "MASTER_PORT", "RANK")}
    cmd = [sys.executable, str(script), "--all", "--gpus", "2", "--cpu-smoke", "--configs", "fsdp_ep2_tp1_n2",
           "--json", str(out)]  # fmt: skip
    proc = subprocess.run(
        cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path, env={**env, "OMP_NUM_THREADS": "1"}
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (row,) = json.loads(out.read_text())["results"]
    assert (row["devices"], row["expert_parallel_size"], row["data_parallel"]) == (2, 2, "fsdp")
    assert row["all_to_all_calls_per_step"] > 0 and row["tokens_per_s_per_gpu"] > 0
    assert row["fsdp_all_gather_ms_per_step"] > 0  # FSDP2's collectives were seen


def test_ep_throughput_configuration_names():
    spec = importlib.util.spec_from_file_location("ep_throughput", BENCH.parent / "ep_throughput.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.parse_config("fsdp_ep4_tp2_n8") == {"devices": 8, "strategy": "ep", "mode": "fsdp", "ep": 4, "tp": 2}
    assert module.parse_config("ep2")["ep"] == 2
    assert module.default_configs(8, 64) == [
        "1gpu", "fsdp_ep1_n8", "fsdp_ep2_n8", "fsdp_ep4_n8", "fsdp_ep8_n8", "ddp_ep8_n8", "fsdp_ep4_tp2_n8",
    ]  # fmt: skip
