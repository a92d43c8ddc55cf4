"""Reporting a preset's result: the table `fgds bench` prints."""

from __future__ import annotations


def format_result(result: dict) -> str:
    lines = []
    peak = result.get("matmul_peak_tflops") or 0.0
    for run in result["runs"]:
        lines.append(f"{result['preset']}: {result['steps']} steps of {run.get('scheduler', 'DDIM')} "
                     f"({run.get('feedback_mode', 'shift')} form), feedback every {run['feedback_every']} "
                     f"({run['feedback_steps']} feedback steps), {result['dtype']}, matmul peak "
                     f"{peak:.2f} TFLOP/s; attention {run.get('attention')}, "
                     f"step backend {run.get('backend')}, {run.get('graphs')}, channels-last "
                     f"{run.get('channels_last')}, feedback chunk {run.get('feedback_chunk')}")
        lines.append(f"  {'impl':46} {'batch':>5} {'s/sample':>9} {'median':>9} {'samples/s':>10} "
                     f"{'vs ref':>7} {'TFLOP/s':>8} {'of peak':>8}")
        for r in run["rows"]:
            if r.get("per_sample_s") is None:
                batch = "-" if r.get("batch") is None else r["batch"]
                lines.append(f"  {r['impl']:46} {batch:>5} {r.get('status', 'unknown'):>9}   ({r['note']})")
                continue
            ratio = f"{r['ratio']:6.2f}x" if "ratio" in r else f"{'-':>7}"
            extra = ""
            if "tflops" in r:
                frac = r.get("fraction_of_peak")
                extra = f"{r['tflops']:8.2f} " + (f"{frac:8.1%}" if frac is not None
                                                   else "  (error: above peak)")
            lines.append(f"  {r['impl']:46} {r['batch']:5d} {r['per_sample_s']:9.4f} "
                         f"{r.get('per_sample_median_s', r['per_sample_s']):9.4f} {r['samples_per_s']:10.2f} "
                         f"{ratio} {extra}")
        if run.get("feedback_cost_factor") is not None:
            lines.append(f"  price of feedback at batch {run['breakdown_batch']}: "
                         f"{run['feedback_cost_factor']:.2f}x the unguided engine's seconds per sample")
        b = run.get("breakdown")
        if b:
            lines.append(f"  engine time at batch {run['breakdown_batch']}: CFG steps {b['cfg_steps']:.0%}, "
                         f"feedback steps {b['feedback_steps']:.0%}, final decode + score "
                         f"{b['final_decode_and_score']:.0%}")
    if result.get("auto_batch"):
        lines.append(f"  batch size auto: {result['auto_batch']}")
    if not result.get("complete", True):
        lines.append("  incomplete: the --max-seconds budget ran out or the run was interrupted")
    return "\n".join(lines)
