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
