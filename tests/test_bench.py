"""Smoke test of the benchmark suite: runs ``--quick`` and checks the shape of what it writes, and
benchmarks/docs_section.py, which puts that into docs/benchmarks.md."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from shufflemamba.bench import suite as bench
from shufflemamba.bench.report import machine_tag
from shufflemamba.errors import UserError

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_quick_run_writes_json_and_prints_markdown(tmp_path, capsys):
    md = tmp_path / "benchmarks.md"
    md.write_text("# Benchmarks\n\nHand-written section that must survive.\n")
    js = tmp_path / "bench.json"
    assert bench.main(["--quick", "--device", "cpu", "--repeats", "1", "--json", str(js)]) == 0
    printed = capsys.readouterr().out
    assert "Selective scan, forward + backward" in printed and md.read_text().count("bench:") == 0

    res = json.loads(js.read_text())
    assert set(res) >= {"meta", "scan", "train", "gpu"}
    assert res["meta"]["device"] == "cpu" and res["meta"]["torch"]
    impls = {r["impl"] for r in res["scan"]}
    assert impls >= {"reference", "cpu", "torch", "triton", "mambapy"}
    assert {r["shape"] for r in res["scan"]} == {"vim_ti", "vim_s"}
    for r in res["scan"]:
        assert r["status"] == "ok" or r["status"].startswith("unavailable"), r
        if r["status"] == "ok":
            assert r["ms_fwd_bwd"] > 0 and r["gbytes_per_s"] > 0
            assert r["max_abs_err_vs_ref"] < 1e-3, r  # every implementation agrees with the reference
    ref = [r for r in res["scan"] if r["impl"] == "reference"]
    assert len(ref) == 2 and all(r["status"] == "ok" for r in ref)
    assert next(r for r in res["scan"] if r["impl"] == "triton")["status"].startswith("unavailable")

    for name in ("vim_tiny_patch16_224", "vim_small_patch16_224"):
        r = res["train"]["models"][name]
        if r["status"] == "ok":  # the models package may not have landed yet
            assert r["images_per_s_off"] > 0 and r["images_per_s_slws"] > 0
            assert r["slws_overhead"] > -1 and r["slws_ops_ms"] > 0 and 0 < r["slws_ops_fraction"] < 1
    assert "skipped" in res["gpu"]

    from shufflemamba.bench.vit import SETUPS
    assert set(res["vit"]["setups"]) == set(SETUPS)
    for r in res["vit"]["setups"].values():
        assert r["status"] == "ok", r
        assert r["images_per_s_vim"] > 0 and r["images_per_s_vit"] > 0 and r["vim_over_vit_paired"] > 0
        assert r["vim_over_vit_quartiles"] is None and r["repeats"] == 1  # --quick --repeats 1: one pair
        assert r["tokens"] > 1 and r["params_vim"] > 0 and r["params_vit"] > 0
        # the like-for-like ratio (ViT's linears on oneDNN too) exactly where the Vim's run on oneDNN
        from shufflemamba.ops.cpu_linear import onednn_runs
        assert ("vim_over_vit_same_gemm_paired" in r) == onednn_runs(torch.device("cpu"))

    docs = _script("docs_section")
    assert docs.main(["bench", str(js), "--docs", str(md)]) == 0
    text = md.read_text()
    assert "Hand-written section that must survive." in text
    begin, end = docs.bench_markers(machine_tag(res["meta"]["device_name"], res["meta"].get("cpu_kernels")))
    assert text.count(begin) == 1 and text.count(end) == 1
    assert "Selective scan, forward + backward" in text
    assert "Vim vs timm's ViT of the same width, depth and tokens" in text


def test_write_marked_section_replaces_only_its_section(tmp_path):
    docs = _script("docs_section")

    def write(section: str, tag: str) -> None:
        docs.write_marked_section(md, section, *docs.bench_markers(tag))

    md = tmp_path / "b.md"
    begin, end = docs.bench_markers("intel-xeon")
    other = "\n".join(docs.bench_markers("amd-epyc"))
    md.write_text(f"intro\n\n{begin}\nold\n{end}\n{other}\n\n## Selective scan (CPU)\nkept\n")
    write("new\n", "intel-xeon")
    text = md.read_text()
    assert "old" not in text and "new" in text and other in text  # the other machine's section stays
    assert text.startswith("intro") and text.rstrip().endswith("kept")
    write("newer\n", "intel-xeon")
    assert md.read_text().count(begin) == 1 and "newer" in md.read_text()
    write("gpu\n", "nvidia-h200")  # a new machine's section is appended
    assert md.read_text().count(docs.bench_markers("nvidia-h200")[0]) == 1 and "newer" in md.read_text()


def test_docs_section_refuses_what_is_not_a_result(tmp_path, capsys):
    docs, md = _script("docs_section"), tmp_path / "b.md"
    (tmp_path / "x.json").write_text("{}")
    assert docs.main(["bench", str(tmp_path / "missing.json"), "--docs", str(md)]) == 2
    assert docs.main(["bench", str(tmp_path / "x.json"), "--docs", str(md)]) == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 2 and not md.exists()


@pytest.mark.parametrize("name, tag", [("Intel(R) Xeon(R) Processor", "intel-xeon"),
                                       ("AMD EPYC 9R14 96-Core Processor", "amd-epyc"),
                                       ("AMD EPYC (Zen 4)", "amd-epyc-zen4"), ("AMD Ryzen 9 9950X (Zen 5)", "amd-ryzen-zen5"),
                                       ("NVIDIA H200", "nvidia-h200"), ("", "unknown")])
def test_machine_tag(name, tag):
    assert machine_tag(name) == tag


def test_machine_tag_names_avx2_kernels(monkeypatch):
    """A CPU run with kernels built without AVX-512 gets its own tag."""
    import platform

    monkeypatch.setattr(platform, "machine", lambda: "x86_64")
    no512 = "cpu kernels: compiler default vectors (no AVX-512: one build)"
    assert machine_tag("AMD EPYC (Zen 4)", no512) == "amd-epyc-zen4-avx2"
    assert machine_tag("AMD EPYC (Zen 4)", "cpu kernels: 512-bit vectors (measured)") == "amd-epyc-zen4"


@pytest.mark.parametrize("family, model, name, expected", [
    (25, 1, "AMD EPYC", "AMD EPYC (Zen 3)"), (25, 17, "AMD EPYC", "AMD EPYC (Zen 4)"),
    (26, 2, "AMD EPYC", "AMD EPYC (Zen 5)"), (25, 97, "AMD Ryzen 9 7950X 16-Core Processor",
                                                "AMD Ryzen 9 7950X 16-Core Processor (Zen 4)"),
    (25, 17, "AMD EPYC Zen 4 engineering sample", "AMD EPYC Zen 4 engineering sample"),  # already named
    (99, 1, "AMD EPYC", "AMD EPYC"),  # a family we do not know: the name as it is
])
def test_cpu_model_adds_amds_zen_generation(monkeypatch, family, model, name, expected):
    """Cloud VMs name Zen 3, 4 and 5 all "AMD EPYC": the generation comes from the family and model."""
    from shufflemamba.ops import config

    lines = ["vendor_id\t: AuthenticAMD\n", f"cpu family\t: {family}\n", f"model\t\t: {model}\n",
             f"model name\t: {name}\n"]
    monkeypatch.setattr(config, "_cpuinfo_lines", lambda: lines)
    assert config.cpu_model() == expected
    monkeypatch.setattr(config, "_cpuinfo_lines", lambda: [ln.replace("AuthenticAMD", "GenuineIntel") for ln in lines])
    assert config.cpu_model() == name


def test_bad_arguments():
    with pytest.raises(UserError, match="--repeats"):
        bench.main(["--quick", "--repeats", "0"])
    with pytest.raises(SystemExit):
        bench.main(["--skip", "nonsense"])


def test_vim_vit_pairs_quartiles():
    from shufflemamba.bench.vit import _quartiles

    assert _quartiles([1.0]) is None
    lo, hi = _quartiles([1.3, 0.9, 1.1, 1.0, 1.2])
    assert lo < 1.1 < hi and lo >= 0.9 and hi <= 1.3


def _ab_switch():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "benchmarks" / "ab_switch.py"
    spec = importlib.util.spec_from_file_location("ab_switch", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_ab_switch_quick_run_restores_the_switch(capsys):
    """benchmarks/ab_switch.py times a switch on and off and leaves it as it found it; unknown switches
    and setups end in one error line."""
    from shufflemamba.models import PatchEmbed

    mod = _ab_switch()
    assert mod.main(["PatchEmbed.MATMUL_MAX", "--off", "0", "--quick"]) == 0
    assert PatchEmbed.MATMUL_MAX == 64
    out = capsys.readouterr().out
    assert out.count("off / on (median of pairs)") == 1
    with pytest.raises(SystemExit, match="unknown switch 'CONV_IN_KERNEL'"):  # the kernels' A/Bs are build defines
        mod.main(["CONV_IN_KERNEL", "--quick"])
    with pytest.raises(SystemExit, match="no setup starts with"):
        mod.main(["PatchEmbed.MATMUL_MAX", "--setup", "nope", "--quick"])
