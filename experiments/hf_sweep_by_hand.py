"""By-hand check of every law the monitor tracks on the tiny models of ``hf_sweep.py`` (fifth sweep).

For each model: ConservationMonitor in float64 (and float32), then for every tracked group and
every law h_l of it, with torch.func (independent of the library's verifier): for 3 random
output cotangents u, |⟨∇h_l(θ), ∂_θf(θ, x)ᵀu⟩| / (‖∇h_l‖ max(‖(∂_θfᵀu)_S‖, 1e-3 ‖∂_θfᵀu‖)), S the group's
parameters (the floor: a linear law whose parameters get a zero gradient has only rounding there),
at the model's θ and at a θ with every 1-D parameter moved by a random 10 % (seed 11, not the
monitor's). The groups only the float32 monitor tracks are checked the same way, on the
float64 model. f: every floating tensor of the model's output (a
cache object such as DynamicCache is not an output that a loss reads: skipped, as the monitor does). Prints ``CHECK {json}``:

    PYTHONPATH=. nice -n 19 timeout 300 python experiments/hf_sweep_by_hand.py NAME
"""
import copy, json, math, sys, time, traceback, warnings
import torch
from torch.func import functional_call, vjp
sys.path.insert(0, "experiments")
import hf_sweep
from by_hand import group_residuals
import torch_conslaw as tc


def flat(o, out):
    if isinstance(o, torch.Tensor):
        if o.is_floating_point(): out.append(o.reshape(-1))
    elif isinstance(o, dict):
        for v in o.values(): flat(v, out)
    elif isinstance(o, (list, tuple)):
        for v in o: flat(v, out)
    return out


def residuals(model, x, groups, seed):
    x = dict(x)
    params = {k: v.detach() for k, v in model.named_parameters()}
    def f(p):
        return torch.cat(flat(functional_call(model, p, (), x), []))
    def pulls_of(seed):
        gen = torch.Generator().manual_seed(seed)
        try:
            out, pull = vjp(f, params)
            return [pull(torch.randn(out.shape, generator=gen, dtype=out.dtype))[0] for _ in range(3)]
        except RuntimeError as e:  # an autograd.Function without setup_context (RecurrentGemma), or a forward
            # that moves its own module with .to() (Switch Transformers' router): plain autograd
            if "setup_context" not in str(e) and "mutating directly with `.data`" not in str(e): raise
            P = {k: v.clone().requires_grad_() for k, v in params.items()}
            out = f(P)
            return [dict(zip(P, torch.autograd.grad(out, list(P.values()), torch.randn(out.shape, generator=gen, dtype=out.dtype),
                                                    retain_graph=True, allow_unused=True, materialize_grads=True))) for _ in range(3)]
    try:
        pulls = pulls_of(seed)
    except RuntimeError:  # RWKV writes the state it returns in place: its state is not an output
        x = dict(x, use_cache=False)
        pulls = pulls_of(seed)
    if not all(bool(torch.isfinite(v).all()) for q in pulls for v in q.values()):
        return math.inf, {g.name: math.inf for g in groups}  # NaN / inf gradient: nothing can hold
    return group_residuals(groups, params, pulls)


class lifted_float32:
    """Within: ``torch.float32`` is float64 and ``Tensor.float`` is ``double``, so that a float64
    model's own casts to float32 (Cohere's LayerNorm, DeBERTa's, Siglip's softmax) keep float64:
    the laws only the float32 monitor tracks are checked at float64 rounding too."""
    def __enter__(self):
        self.saved = torch.float32, torch.Tensor.float
        torch.float32 = torch.float64
        torch.Tensor.float = lambda t, *a, **k: t.double()
    def __exit__(self, *exc):
        torch.float32, torch.Tensor.float = self.saved


def main(name):
    res = {"name": name}
    m, x = hf_sweep.build(name)
    res["D"] = sum(p.numel() for p in m.parameters() if p.requires_grad)
    for dt in ("float64", "float32"):
        t = time.time()
        mm = m if dt == "float64" else copy.deepcopy(m).float()
        xx = x if dt == "float64" else {k: (v.float() if v.is_floating_point() else v) for k, v in x.items()}
        try:
            with warnings.catch_warnings(record=True) as w:
                warnings.simplefilter("always")
                mon = tc.ConservationMonitor(mm, xx)
            res[f"laws_{dt}"] = sum(g.count for g in mon.groups)
            res[f"groups_{dt}"] = [(g.name, g.kind, g.count, bool(getattr(g, "approximate", False)), getattr(g, "loss", None)) for g in mon.groups]
            res[f"warn_{dt}"] = sorted({str(ww.message)[:400] for ww in w})
            if dt == "float64":
                groups = mon.groups
            else:
                groups32 = mon.groups
        except Exception:
            traceback.print_exc(); res[f"error_{dt}"] = traceback.format_exc().splitlines()[-1][:400]
            if dt == "float64": groups = []
            else: groups32 = []
        res[f"t_{dt}"] = round(time.time() - t, 1)
    # by hand, float64, at θ and at a perturbed θ
    # the float32 monitor's groups are checked too, on the float64 model (same θ up to rounding)
    names64 = {g.name for g in groups}
    extra = [g for g in groups32 if g.name not in names64]
    res["float32_only"] = [g.name for g in extra]
    groups = list(groups) + extra
    exact = [g for g in groups if not getattr(g, "approximate", False) and getattr(g, "loss", None) is None]
    res["unchecked"] = [g.name for g in groups if g not in exact]
    if exact:
        theta = [p.detach().clone() for p in m.parameters()]
        res["res_theta"], per0 = residuals(m, x, exact, 0)
        gen = torch.Generator().manual_seed(11)
        with torch.no_grad():
            for p in m.parameters():
                if p.dim() == 1 and p.is_floating_point():
                    p.add_(0.1 * (1 + p.abs()) * torch.randn(p.shape, generator=gen, dtype=p.dtype))
        res["res_perturbed"], per1 = residuals(m, x, exact, 1)
        res["res64_theta"] = max([per0[k] for k in per0 if k in names64], default=0.0)  # the float64 monitor's groups alone
        res["res64_perturbed"] = max([per1[k] for k in per1 if k in names64], default=0.0)
        res["bad"] = {k: (per0[k], per1[k]) for k in per0 if max(per0[k], per1[k]) > 1e-10}
        if res["bad"]:  # again with the model's casts to float32 lifted
            bad = [g for g in exact if g.name in res["bad"]]
            with torch.no_grad():
                for p, v in zip(m.parameters(), theta):
                    p.copy_(v)
            with lifted_float32():
                a0, _ = residuals(m, x, bad, 0)
                gen = torch.Generator().manual_seed(11)
                with torch.no_grad():
                    for p in m.parameters():
                        if p.dim() == 1 and p.is_floating_point():
                            p.add_(0.1 * (1 + p.abs()) * torch.randn(p.shape, generator=gen, dtype=p.dtype))
                a1, _ = residuals(m, x, bad, 1)
            res["bad_lifted"] = (a0, a1)
    print("CHECK", json.dumps(res), flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
