"""The paper's pair benchmark (vim_tiny vs deit_tiny): its multiply-add counts and a quick run."""

from __future__ import annotations

import pytest
import torch

from shufflemamba.bench.paper_pair import bench_paper_pair, child_peak_mb, peak_rss_mb, vim_macs, vit_macs
from shufflemamba.bench.report import pair_markdown


@pytest.mark.parametrize("img,vim_g,deit_g", [(224, 1.41, 1.22), (1024, 29.0, 99.0)])
def test_macs_match_the_hand_count(img, vim_g, deit_g):
    """Within 6% of issue 27's hand count (7.1 M a token over Vim-Ti's 24 blocks; 5.3 M a token over
    DeiT-Ti's 12 blocks plus attention's 2 x tokens x 192 a token and block)."""
    assert vim_macs(img) / 1e9 == pytest.approx(vim_g, rel=0.06)
    assert vit_macs(img) / 1e9 == pytest.approx(deit_g, rel=0.06)
    assert vit_macs(1024) / vim_macs(1024) > 3 > vit_macs(224) / vim_macs(224)


def test_quick_run_times_both_models_and_reports_peak_memory():
    records = bench_paper_pair(torch.device("cpu"), quick=True, repeats=1)
    assert [r["mode"] for r in records] == ["inference", "training"]
    for r in records:
        assert r["vim_s"] > 0 and r["deit_s"] > 0 and r["vim_vs_deit"] == pytest.approx(r["deit_s"] / r["vim_s"], rel=1.0)
    rows = pair_markdown(records)
    assert len(rows) == 2 + len(records) and "MAC parity" in rows[0]
    assert 50 < peak_rss_mb("vim_tiny_patch16_224", "inference", 32, 2, True) < 20000


def test_peak_memory_is_the_childs_own():
    """A child that holds 256 MB more peaks about 256 MB higher (not at this process's inherited peak)."""
    base = child_peak_mb("import torch")
    big = child_peak_mb("import torch; x = torch.ones(64 * 2**20); x += 1")
    assert 200 < big - base < 400, (base, big)


@pytest.mark.parametrize("gemm", ["onednn", "blas"])
def test_deit_on_the_vims_gemm_is_timed_where_the_vim_uses_onednn(monkeypatch, gemm):
    """With the Vim's linears on oneDNN a third model (DeiT-Ti, its linears on oneDNN too) gives the like-for-like
    ratio; with torch's BLAS for both there is none to add."""
    from shufflemamba.ops import cpu_linear

    if gemm == "onednn" and cpu_linear._onednn_linear() is None:
        pytest.skip("this torch has no oneDNN linear")
    monkeypatch.setenv("SHUFFLEMAMBA_CPU_GEMM", gemm)
    records = bench_paper_pair(torch.device("cpu"), quick=True, repeats=1, peak_memory=False)
    assert all(("vim_vs_deit_same_gemm" in r) == (gemm == "onednn") for r in records)
    assert all(r["deit_same_gemm_s"] > 0 for r in records if gemm == "onednn")
    same_gemm_column = [row.split("|")[7].strip() for row in pair_markdown(records)]
    assert same_gemm_column[0] == "vs DeiT on Vim's GEMM" and (same_gemm_column[2] == "-") == (gemm == "blas")
    layer = torch.nn.Linear(8, 4)
    x = torch.randn(3, 8)
    expected = layer(x)
    routed = cpu_linear.convert_linears(torch.nn.Sequential(layer))[0]
    assert type(routed) is cpu_linear.Linear
    torch.testing.assert_close(routed(x), expected, rtol=1e-5, atol=1e-6)


def test_module_command_times_with_the_commands_malloc_setting(monkeypatch):
    """`python -m shufflemamba.bench.paper_pair` applies the `shufflemamba` command's malloc setting before it
    times anything, so that it reproduces the command's figures."""
    from shufflemamba.bench import paper_pair

    calls = []
    monkeypatch.setattr(paper_pair, "tune_malloc", lambda: calls.append("malloc") or True)
    monkeypatch.setattr(paper_pair, "bench_paper_pair", lambda *a, **k: calls.append("bench") or [])
    monkeypatch.setattr(paper_pair, "pair_markdown", lambda records: [])
    assert paper_pair.main(["--quick"]) == 0
    assert calls == ["malloc", "bench"]
