"""What the measuring tools report: the machine's name and each tool's results as markdown.

The tools return plain dicts (written as JSON); these functions turn them into the sections that
``benchmarks/docs_section.py`` puts into docs/benchmarks.md.
"""

from __future__ import annotations

import platform
import re
from typing import Any

from ..ops.config import cpu_model  # noqa: F401  (re-exported: every tool names the CPU with it)


def machine_tag(name: str, cpu_kernels: str | None = None) -> str:
    """A short slug of a CPU or GPU model name for file names and section markers: its first two
    words, lower case ("Intel(R) Xeon(R) Processor" -> "intel-xeon", "NVIDIA H200" -> "nvidia-h200"),
    so that figures of different machines live side by side instead of overwriting each other, with
    AMD's Zen generation where the name gives it ("AMD EPYC (Zen 4)" -> "amd-epyc-zen4").
    ``cpu_kernels`` (``cpu_scan.describe_vector_width()``) saying the x86 kernels run without AVX-512
    adds "-avx2": the same CPU run as an AVX2-only one."""
    words = re.sub(r"\((r|tm)\)", " ", name.lower()).replace("processor", " ").split()
    slug = "-".join(re.sub(r"[^a-z0-9]+", "-", w).strip("-") for w in words[:2]) or "unknown"
    zen = re.search(r"\bzen ?(\d+)", name.lower())
    if zen:
        slug += f"-zen{zen.group(1)}"
    if cpu_kernels and "no AVX-512" in cpu_kernels and platform.machine().lower() in ("x86_64", "amd64"):
        slug += "-avx2"
    return slug


def format_number(x: Any, spec: str = ".1f") -> str:
    """``x`` formatted with ``spec``, or "-" for a figure that is missing (None) or not a number."""
    return format(x, spec) if isinstance(x, (int, float)) and not isinstance(x, bool) else "-"


_f = format_number


# -- shufflemamba bench ----------------------------------------------------------------------------------
def bench_markdown(res: dict[str, Any]) -> str:
    """The section of ``shufflemamba bench``'s results (:func:`shufflemamba.bench.suite.main`); a part
    the run skipped is left out, and the targets are stated once, in docs/benchmarks.md's text."""
    m = res["meta"]
    kernels = m.get("cpu_kernels") or ""
    isa = " (AVX-512 off: -mno-avx512f)" if "CPU_ISA=avx2" in kernels else ""
    lines = [
        f"## Benchmark suite (`shufflemamba bench`), {m['device_name']}{isa}", "",
        f"Run {m['date']}{' (--quick: tiny sizes, smoke test only)' if m['quick'] else ''} on "
        f"**{m['device_name']}** ({m['device']}, {m['threads']} threads), torch {m['torch']}, "
        f"triton {m['triton']}, mambapy {m['mambapy']}, timm {m['timm']}. Medians of interleaved repeats."
        + (f" {kernels[0].upper()}{kernels[1:]}." if kernels else "")
        + (f" Torch's CPU kernels: {m['torch_cpu_capability']}." if m.get("torch_cpu_capability") else "")
        + (f" {m['cpu_gemm']}." if m.get("cpu_gemm") else ""),
    ]
    if res.get("scan"):
        lines += ["", "### Selective scan, forward + backward", "",
                  "| shape | batch, E, L, N | impl | ms | speedup vs reference | max abs err vs ref | status |",
                  "|---|---|---|---|---|---|---|"]
        for r in res["scan"]:
            lines.append(
                f"| {r['shape']} | {r['batch']}, {r['E']}, {r['L']}, {r['N']} | {r['impl']} | {_f(r.get('ms_fwd_bwd'))}"
                f" | {_f(r.get('speedup_vs_ref'), '.2f')} | {_f(r.get('max_abs_err_vs_ref'), '.1e')} | {r['status']} |")
    t = res.get("train") or {}
    if t.get("models"):
        lines += ["", f"### Training step (batch {t['batch']}, {t['img_size']} px, "
                      f"{t['amp'] or 'fp32'}, fused AdamW), SLWS off vs rate 0.5", "",
                  "| model | img/s SLWS off | img/s SLWS 0.5 | overhead (ratio of medians) | overhead (median of pairs) |"
                  " shuffle ops alone, every block | status |", "|---|---|---|---|---|---|---|"]
        for name, r in t["models"].items():
            lines.append(f"| {name} | {_f(r.get('images_per_s_off'), '.2f')} | {_f(r.get('images_per_s_slws'), '.2f')}"
                         f" | {_f(100 * r['slws_overhead'] if 'slws_overhead' in r else None, '+.2f')}%"
                         f" | {_f(100 * r['slws_overhead_paired'] if 'slws_overhead_paired' in r else None, '+.2f')}%"
                         f" | {_f(r.get('slws_ops_ms'), '.2f')} ms = "
                         f"{_f(100 * r['slws_ops_fraction'] if 'slws_ops_fraction' in r else None, '.2f')}% of a step"
                         f" | {r['status']} |")
    if res.get("vit"):
        lines += vit_markdown(res["vit"])
    if res.get("pair"):
        lines += ["", "### The paper's pair: vim_tiny (24 blocks) vs deit_tiny (12 blocks), fp32", ""]
        lines += pair_markdown(res["pair"])
    g = res.get("gpu")
    if g and "skipped" not in g:
        lines += ["", "### GPU", "", f"Copy peak (device-to-device): {_f(g['copy_peak_gbytes_per_s'])} GB/s."]
        for b in g["scan_bandwidth"]:
            lines.append(f"- Triton scan {b['shape']}: {_f(b['gbytes_per_s'])} GB/s = "
                         f"{_f(100 * b['fraction_of_peak'])}% of peak (minimum-traffic byte count)")
        tv = g["train_vs_deit"]
        for name in ("vim_small_patch16_224", "deit_small_patch16_224"):
            lines.append(f"- {name}: {_f(tv[name].get('images_per_s'))} img/s (batch {tv['batch']}, "
                         f"{tv['amp']}) {tv[name]['status']}")
        lines.append(f"- Vim-S / DeiT-S: {_f(tv.get('vim_over_deit'), '.2f')}x (target >= 0.7x)")
    return "\n".join(lines) + "\n"


def pair_markdown(records: list[dict[str, Any]]) -> list[str]:
    """The rows of :func:`shufflemamba.bench.paper_pair.bench_paper_pair`: Vim's speed relative to DeiT's
    (DeiT time / Vim time) beside the multiply-add parity it is held against; "vs DeiT on Vim's GEMM" (where
    the Vim's linears run on oneDNN): the same with DeiT's linears on oneDNN too, "-" where both use torch's."""
    rows = ["| mode | px | batch | Vim-Ti s | DeiT-Ti s | Vim speed vs DeiT | vs DeiT on Vim's GEMM | MAC parity "
            "| GMACs Vim / DeiT | peak MB Vim / DeiT |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in records:
        peak = f"{r['vim_peak_mb']:.0f} / {r['deit_peak_mb']:.0f}" if "vim_peak_mb" in r else "-"
        same = _f(r.get("vim_vs_deit_same_gemm"), ".2f") + ("x" if "vim_vs_deit_same_gemm" in r else "")
        rows.append(f"| {r['mode']} | {r['img_size']} | {r['batch']} | {r['vim_s']:.3f} | {r['deit_s']:.3f} | "
                    f"{r['vim_vs_deit']:.2f}x | {same} | {r['parity']:.2f}x | {r['vim_gmacs']:.2f} / {r['deit_gmacs']:.2f} "
                    f"| {peak} |")
    return rows


def vit_markdown(res: dict[str, Any]) -> list[str]:
    """The lines of the Vim vs ViT section (:func:`shufflemamba.bench.vit.bench_vs_vit`)."""
    lines = ["", f"### Vim vs timm's ViT of the same width, depth and tokens (training, {res['amp'] or 'fp32'}, "
                 f"fused AdamW, {res['threads']} threads)", "",
             "| setup | batch | tokens | params Vim / ViT | img/s Vim | img/s ViT | Vim / ViT (median of pairs) "
             "| pairs' quartiles | Vim / ViT on Vim's GEMM | pairs | status |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in res["setups"].items():
        params = (f"{r['params_vim'] / 1e6:.2f}M / {r['params_vit'] / 1e6:.2f}M" if "params_vim" in r else "-")
        q = r.get("vim_over_vit_quartiles")
        quart = f"{q[0]:.2f}-{q[1]:.2f}" if q else "-"
        lines.append(f"| {name} | {r['batch']} | {r.get('tokens', '-')} | {params} | {_f(r.get('images_per_s_vim'))}"
                     f" | {_f(r.get('images_per_s_vit'))} | {_f(r.get('vim_over_vit_paired'), '.2f')}x | {quart}"
                     f" | {_f(r.get('vim_over_vit_same_gemm_paired'), '.2f')}{'x' if 'vim_over_vit_same_gemm_paired' in r else ''}"
                     f" | {r.get('repeats', '-')} | {r['status']} |")
    return lines


# -- shufflemamba doctor --gpu ---------------------------------------------------------------------------
def gpu_check_markdown(rep: dict[str, Any]) -> str:
    """The section of the GPU check's report (:func:`shufflemamba.bench.gpu_check.run_check`)."""
    env = rep.get("environment", {})
    m = rep["meta"]
    lines = ["## GPU check (`make gpu-check`)", "",
             f"Run {m['date']}{' (--quick: tiny sizes, a smoke test of the check itself)' if m['quick'] else ''} on "
             f"**{env.get('device_name', m['device'])}** ({m['device']}), torch {env.get('torch')}, CUDA "
             f"{env.get('cuda')}, triton {env.get('triton')}, timm {env.get('timm')}, mamba_ssm {env.get('mamba_ssm')}, "
             f"causal-conv1d {env.get('causal_conv1d')}; scan impls {', '.join(env.get('scan_impls', []))}; "
             f"\"auto\" picks {env.get('auto_impl')}. {m['seconds']:.0f} s in all.", ""]
    for name, sec in rep.items():
        if name == "meta":
            continue
        if sec.get("status") not in ("ok", "fail", None):
            lines += [f"**{name}**: {sec.get('status')}: {sec.get('error') or sec.get('reason', '')}", ""]
    p = rep.get("pytest", {})
    if p.get("status") in ("ok", "fail"):
        lines += [f"`pytest -m gpu`: **{p['status']}** ({p.get('summary')}, {p.get('seconds')} s)", ""]
    par = rep.get("parity", {})
    if par.get("rows"):
        lines += ["### Scan parity vs the float64 reference (max |err| / max |ref|, worst of out and 8 gradients)", "",
                  "| shape | dtype | direction | impl | worst | error | status |", "|---|---|---|---|---|---|---|"]
        for r in par["rows"]:
            lines.append(f"| {r['shape']} (B {r['batch']}) | {r['dtype']} | {'reverse' if r['reverse'] else 'forward'} "
                         f"| {r['impl']} | {r.get('worst', '-')} | {_f(r.get('worst_err'), '.1e')} "
                         f"| {r['status']}{': ' + r['error'] if 'error' in r else ''} |")
        lines.append("")
    st = rep.get("scan_timing", {})
    if st.get("rows"):
        lines += [f"### Scan forward + backward (copy peak {_f(st.get('copy_peak_gbytes_per_s'))} GB/s)", "",
                  "| shape | dtype | impl | ms | vs ref | GB/s | % of copy peak | status |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in st["rows"]:
            frac = r.get("fraction_of_copy_peak")
            lines.append(f"| {r['shape']} (B {r['batch']}) | {r['dtype']} | {r['impl']} | {_f(r.get('ms_fwd_bwd'), '.2f')} "
                         f"| {_f(r.get('speedup_vs_ref'), '.1f')}x | {_f(r.get('gbytes_per_s'))} "
                         f"| {_f(100 * frac if frac is not None else None)} | {r['status']}"
                         f"{': ' + r['error'] if 'error' in r else ''} |")
        lines.append("")
    ts = rep.get("train_step", {})
    if ts.get("rows"):
        lines += ["### Training step (AdamW, bf16 autocast)", "",
                  "| model | scan | batch | img/s | peak memory GiB | vs DeiT-S | status |", "|---|---|---|---|---|---|---|"]
        for r in ts["rows"]:
            lines.append(f"| {r['model']} | {r.get('scan_impl', '-')} | {r['batch']} | {_f(r.get('images_per_s'))} "
                         f"| {_f(r.get('peak_memory_gib'), '.2f')} | {_f(r.get('vs_deit_s'), '.2f')} "
                         f"| {r['status']}{': ' + r['error'] if 'error' in r else ''} |")
        lines.append("")
    sl = rep.get("slws", {})
    sl_models = sl.get("models") or {r["model"]: r for r in sl.get("rows", []) if "model" in r}  # a killed child: rows
    if sl_models:
        lines += [f"### SLWS overhead at rate 0.5 (batch {sl.get('batch')}, bf16)", "",
                  "| model | img/s off | img/s 0.5 | overhead (median of pairs) | shuffle ops alone | status |",
                  "|---|---|---|---|---|---|"]
        for name, r in sl_models.items():
            ov = r.get("slws_overhead_paired")
            lines.append(f"| {name} | {_f(r.get('images_per_s_off'))} | {_f(r.get('images_per_s_slws'))} "
                         f"| {_f(100 * ov if ov is not None else None, '+.2f')}% | {_f(r.get('slws_ops_ms'), '.2f')} ms "
                         f"| {r.get('status')} |")
        lines.append("")
    lines += _short_train_markdown(rep.get("short_train", {}))
    return "\n".join(lines)


def _short_train_markdown(tr: dict[str, Any]) -> list[str]:
    if not tr.get("rows"):
        return []
    verdict = "agree" if tr.get("agree") else "do not agree" if "agree" in tr else "not compared"
    lines = [f"### Short bf16 training run (Vim-S, batch {tr.get('batch')}, {tr.get('steps')} steps, synthetic data)",
             "", f"Losses per impl, mean of each {tr.get('window')}-step window; the impls agree when every window "
             f"is within {100 * tr.get('tolerance', 0.1):.0f}% of the first window's loss: **{verdict}**.", "",
             "| impl | steps | first window | last window | max gap | s | status |", "|---|---|---|---|---|---|---|"]
    for r in tr["rows"]:
        m = tr.get("window_means", {}).get(r["impl"], [])
        lines.append(f"| {r['impl']} | {r.get('steps')} | {_f(m[0] if m else None, '.3f')} "
                     f"| {_f(m[-1] if m else None, '.3f')} | {_f(tr.get('max_gap', {}).get(r['impl']), '.3f')} "
                     f"| {_f(r.get('seconds'))} | {r.get('status')}{': ' + r['error'] if 'error' in r else ''} |")
    return lines + [""]


# -- benchmarks/bench_scan.py ----------------------------------------------------------------------------
def scan_markdown(rows: list[dict]) -> str:
    """A markdown table of :func:`shufflemamba.bench.scan.bench_scan` rows."""
    lines = [
        "| shape (batch, E, L, N) | impl | forward ms | fwd+bwd ms (median) | fwd+bwd ms (min) | vs unbind loop |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        shape = f"{r['shape']} ({r['batch']}, {r['E']}, {r['L']}, {r['N']})"
        speed = f"{r['speedup']:.1f}x" if r.get("speedup") else "-"
        lines.append(
            f"| {shape} | {r['impl']} | {r['fwd_ms']:.1f} | {r['fwd_bwd_ms']:.1f} | {r['fwd_bwd_min_ms']:.1f} | {speed} |"
        )
    return "\n".join(lines)
