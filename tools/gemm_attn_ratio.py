#!/usr/bin/env python3
"""Puts mmkd's GEMM and attention timings beside PyTorch's and says which bars they meet.

Inputs (JSON files from one GPU run of tools/gpu-check.sh):
  --mmkd FILE ...   `gemm_attn` benchmark reports (bench_gemm_attn.json, bench_gemm_tma.json,
                    bench_gemm_ws.json)
  --torch FILE      tools/torch_gemm_attn_bench.py --json output

Bars (issue 6): each GEMM layout at >= 80% of cuBLAS, i.e. cuBLAS time / mmkd time >= 0.8,
taking mmkd's fastest path for that layout (mma.sync, wgmma, wgmma fed by TMA, the persistent
warp-specialised kernels, and the weight gradient split along K);
attention forward + backward at least as fast as PyTorch's SDPA (ratio >= 1.0), with and
without the key-padding mask. Prints a Markdown table and, with --json, writes the rows.
Exits 0 whatever the verdicts: a missed bar is a result, not a failure of this script.
"""
import argparse
import json
import sys

GEMM_BAR = 0.8
ATTN_BAR = 1.0


def load(path):
    with open(path) as f:
        return json.load(f)


def base_layout(layout):
    """`fwd_wgmma` -> (`fwd`, `wgmma`); `fwd` -> (`fwd`, `mma`)."""
    base, _, path = layout.partition("_")
    return base, path or "mma"


def compare(mmkd_reports, torch_report):
    gemm = {}  # (tower, layer, layout) -> {path: ms}
    attn = {}  # (tower, masked) -> ms of forward + backward
    for rep in mmkd_reports:
        for c in rep.get("cases", []):
            if c["kind"] == "gemm":
                base, path = base_layout(c["layout"])
                gemm.setdefault((c["tower"], c["layer"], base), {})[path] = c["median_ms"]
            elif c["kind"] == "attention" and c["layout"] == "fwd+bwd":
                attn[(c["tower"], c["layer"] == "masked")] = c["median_ms"]
    rows = []
    for t in torch_report.get("cases", []):
        if t["kind"] == "gemm" and "torch_ms" in t:
            paths = gemm.get((t["tower"], t["layer"], t["layout"]))
            if not paths:
                continue
            best = min(paths, key=paths.get)
            ratio = t["torch_ms"] / paths[best]
            rows.append(
                {
                    "kind": "gemm",
                    "case": f"{t['tower']} {t['layer']} {t['layout']} M={t['M']} N={t['N']} K={t['K']}",
                    "mmkd_ms": paths,
                    "best_path": best,
                    "torch_ms": t["torch_ms"],
                    "ratio": ratio,
                    "bar": GEMM_BAR,
                    "meets_bar": ratio >= GEMM_BAR,
                }
            )
        elif t["kind"] == "attention" and t["layout"] == "bwd":
            for masked in (False, True):
                key = "torch_masked_ms" if masked else "torch_ms"
                ms = attn.get((t["tower"], masked))
                if ms is None or key not in t:
                    continue
                ratio = t[key] / ms
                rows.append(
                    {
                        "kind": "attention",
                        "case": f"{t['tower']} fwd+bwd BH={t['BH']} L={t['L']}"
                        + (" key-padding mask" if masked else ""),
                        "mmkd_ms": {"fused": ms},
                        "best_path": "fused",
                        "torch_ms": t[key],
                        "ratio": ratio,
                        "bar": ATTN_BAR,
                        "meets_bar": ratio >= ATTN_BAR,
                    }
                )
    return rows


def render(rows):
    out = ["| case | mmkd ms by path | PyTorch ms | PyTorch / mmkd (best) | bar | met |",
           "| --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        paths = ", ".join(f"{p} {ms:.3f}" for p, ms in sorted(r["mmkd_ms"].items()))
        out.append(
            f"| {r['kind']} {r['case']} | {paths} | {r['torch_ms']:.3f} | "
            f"{r['ratio']:.3f} ({r['best_path']}) | {r['bar']} | {'yes' if r['meets_bar'] else 'no'} |"
        )
    met = sum(r["meets_bar"] for r in rows)
    out.append(f"\n{met} of {len(rows)} cases meet their bar.")
    return "\n".join(out)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--mmkd", nargs="+", required=True, help="gemm_attn benchmark JSON reports")
    p.add_argument("--torch", required=True, help="torch_gemm_attn_bench.py JSON")
    p.add_argument("--json", help="write the rows here")
    a = p.parse_args()
    reports = []
    for path in a.mmkd:
        try:
            reports.append(load(path))
        except (OSError, ValueError) as e:
            print(f"{path}: skipped ({e})", file=sys.stderr)
    try:
        torch_report = load(a.torch)
    except (OSError, ValueError) as e:
        print(f"{a.torch}: cannot compare without it ({e})", file=sys.stderr)
        return 1
    rows = compare(reports, torch_report)
    if not rows:
        print("no case appears in both sides", file=sys.stderr)
        return 1
    print(render(rows))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
