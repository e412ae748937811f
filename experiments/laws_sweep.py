"""Every model of the sweeps, the monitor's laws only: how many laws each gets, and (for the
hand-written ones) every law checked by hand. For comparing the law finder before and after a
change, over all ~165 tiny Hugging Face architectures and ~125 hand-written networks at once.

* ``hf``: every builder of ``experiments/hf_sweep.py`` (tiny configs, float64, eval mode, one
  process, in order): ``ConservationMonitor(model, inputs)``, the laws per group. A model built
  after others gets another random initialization than alone, so a count that depends on the
  routing or on a check near its threshold can differ from a run of that model alone.
* ``handwritten``: the models of ``adversarial_sweep.py``, ``edge_case_sweep.py`` and
  ``handwritten_sweep.py`` (float64): the laws per group and every exact law checked by hand with
  torch.func (``adversarial_sweep.residuals``) at θ and with every parameter moved by 10 %.

    PYTHONPATH=$PWD python experiments/laws_sweep.py hf OUT.json
    PYTHONPATH=$PWD python experiments/laws_sweep.py handwritten OUT.json
    python experiments/laws_sweep.py compare BEFORE.json AFTER.json   # the models whose laws changed
"""
from __future__ import annotations

import copy
import importlib.util
import json
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def _load(name: str) -> Any:
    spec = importlib.util.spec_from_file_location(name, ROOT / "experiments" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(module)
    return module


def _groups(monitor: Any) -> dict[str, Any]:
    exact = [g for g in monitor.groups if g.expected_conserved]
    return {"laws": sum(g.count for g in exact), "groups": sorted(f"{g.name}:{g.count}" for g in exact)}


def hf_models(out_path: str) -> None:
    import torch_conslaw as tc

    argv, sys.argv = sys.argv, ["hf_sweep"]
    try:
        sweep = _load("hf_sweep")
    finally:
        sys.argv = argv
    results: dict[str, Any] = {}
    for name in sorted(sweep.BUILDERS, key=lambda n: n == "xglm"):  # XGLM changes the default dtype: last
        t = time.time()
        try:
            model, x = sweep.build(name)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                results[name] = _groups(tc.ConservationMonitor(model, x))
        except Exception as err:  # a builder this transformers version refuses: recorded, not fatal
            results[name] = {"error": f"{type(err).__name__}: {str(err)[:200]}"}
        results[name]["seconds"] = round(time.time() - t, 1)
        print(name, results[name].get("laws", results[name].get("error")), flush=True)
    Path(out_path).write_text(json.dumps(results, indent=0))


def handwritten_models(out_path: str) -> None:
    import torch

    import torch_conslaw as tc

    sys.path.insert(0, str(ROOT / "experiments"))
    adversarial, edge, handwritten = _load("adversarial_sweep"), _load("edge_case_sweep"), _load("handwritten_sweep")
    cases = [(f"adversarial:{n}", make, x) for n, (make, x) in adversarial.MODELS.items()]
    cases += [(f"edge:{n}", make, x) for n, (make, x) in edge.MODELS.items()]
    cases += [(f"handwritten:{n}", build, None) for n, build in handwritten.BUILDERS.items()]
    results: dict[str, Any] = {}
    for name, make, x in cases:
        t = time.time()
        try:
            torch.manual_seed(0)
            if x is None:
                model, x = make()[:2]
            else:
                model, x = make(), (x() if callable(x) else x)
            model, x = model.double(), adversarial._cast(x, torch.float64)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                monitor = tc.ConservationMonitor(model, x)
            row = _groups(monitor)
            exact = [g for g in monitor.groups if g.expected_conserved]
            moved = copy.deepcopy(model)
            adversarial._perturb(moved, True)
            row["worst"] = adversarial.residuals(model, x, exact, 0)[0] if exact else 0.0
            row["worst_moved"] = adversarial.residuals(moved, x, exact, 1)[0] if exact else 0.0
            results[name] = row
        except Exception as err:  # recorded, not fatal
            results[name] = {"error": f"{type(err).__name__}: {str(err)[:200]}"}
        results[name]["seconds"] = round(time.time() - t, 1)
        print(name, results[name].get("laws", results[name].get("error")), results[name].get("worst"), flush=True)
    Path(out_path).write_text(json.dumps(results, indent=0))


def compare(before_path: str, after_path: str) -> None:
    before, after = json.loads(Path(before_path).read_text()), json.loads(Path(after_path).read_text())
    print("| model | laws before | laws after | groups added | groups removed |")
    print("| --- | ---: | ---: | --- | --- |")
    for name in sorted(set(before) | set(after)):
        b, a = before.get(name, {}), after.get(name, {})
        if b.get("laws") == a.get("laws") and b.get("groups") == a.get("groups"):
            continue
        added = sorted(set(a.get("groups", [])) - set(b.get("groups", [])))
        removed = sorted(set(b.get("groups", [])) - set(a.get("groups", [])))
        print(f"| {name} | {b.get('laws', b.get('error'))} | {a.get('laws', a.get('error'))} | "
              f"{'<br>'.join(added)} | {'<br>'.join(removed)} |")
    worst = [max(r.get("worst", 0.0), r.get("worst_moved", 0.0)) for r in after.values() if "laws" in r]
    if any("worst" in r for r in after.values()):
        print(f"\nworst by-hand residual after, over {len(worst)} models: {max(worst):.1e}")


if __name__ == "__main__":
    mode = sys.argv[1]
    if mode == "compare":
        compare(sys.argv[2], sys.argv[3])
    else:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        {"hf": hf_models, "handwritten": handwritten_models}[mode](sys.argv[2])
