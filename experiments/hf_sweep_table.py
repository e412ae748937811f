"""Markdown table of hf_sweep.py runs: one ``NAME.log`` per model in a folder (the output of
``python experiments/hf_sweep.py NAME > DIR/NAME.log``), read from its ``RESULT`` line.

    PYTHONPATH=. python experiments/hf_sweep_table.py DIR [NAME ...]
"""
import json, sys
from pathlib import Path


def row(res: dict) -> str:
    err = res.get("error") or res.get("mon_error") or ""
    shares = ", ".join(f"{k} {v:.0%}" for k, v in sorted(res.get("shares", {}).items(), key=lambda kv: -kv[1])[:4])
    complete = {True: "yes", False: "no", None: "not counted"}[res.get("complete")]
    return (f"| {res['name']} | {res['D']} | {res.get('tracked', '—')} | {res.get('lie') if res.get('lie') is not None else '—'} "
            f"| {complete} | {res.get('missing') if res.get('missing') is not None else '—'} | {shares or '—'} "
            f"| {res.get('monitor_laws', '—')} | {err or 'none'} | {res.get('t_analyze', '—')} | {res.get('t_monitor', '—')} |")


def main() -> None:
    folder = Path(sys.argv[1])
    names = sys.argv[2:] or sorted(p.stem for p in folder.glob("*.log"))
    print("| model | D | tracked (rank) | Lie count | complete | missing | where (share) | monitor laws (verified) | error | analyze s | monitor s |")
    print("| --- | ---: | ---: | ---: | --- | ---: | --- | ---: | --- | ---: | ---: |")
    for name in names:
        path = folder / f"{name}.log"
        lines = [l for l in path.read_text(errors="replace").splitlines() if l.startswith("RESULT ")] if path.exists() else []
        if lines:
            print(row(json.loads(lines[-1][len("RESULT "):])))
        else:
            print(f"| {name} | — | — | — | — | — | — | — | no RESULT line (killed by the timeout?) | — | — |")


if __name__ == "__main__":
    main()
