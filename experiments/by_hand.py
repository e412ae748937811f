"""The by-hand check shared by the sweeps (``hf_sweep_by_hand.py``, ``adversarial_sweep.py``).

For every law h_l of every group and every pulled-back cotangent q = ∂_θ⟨u, f⟩ (torch.func,
independent of the library's verifier): |⟨∇h_l, q_S⟩| / (‖∇h_l‖ max(‖q_S‖, 1e-3 ‖q‖)), S the
group's parameters (the floor: a linear law whose parameters get a zero gradient has only
rounding there). A law above 1e-10 in float64 is false.
"""
import torch


def group_residuals(groups, params, pulls):
    """(worst residual, {group name: its worst}) of ``groups`` at ``params`` against ``pulls``
    (dicts parameter name → pulled-back cotangent)."""
    worst, per = 0.0, {}
    for g in groups:
        names = list(dict.fromkeys(n for n in g.parameter_names if n in params))  # a group may name a parameter twice
        P = {k: v.clone().double().requires_grad_(k in names) for k, v in params.items()}
        h = g.values(P)
        w = 0.0
        for l in range(h.numel()):
            gr = torch.autograd.grad(h[l], [P[n] for n in names], retain_graph=True, allow_unused=True)
            gh = torch.cat([(z if z is not None else torch.zeros_like(P[n])).reshape(-1) for z, n in zip(gr, names)])
            if gh.norm() == 0:
                continue
            for q in pulls:
                gq = torch.cat([q[n].double().reshape(-1) for n in names])
                full = float(torch.cat([v.double().reshape(-1) for v in q.values()]).norm())
                den = float(gh.norm()) * max(float(gq.norm()), 1e-3 * full)
                if den == 0:
                    continue
                w = max(w, abs(float(gh @ gq)) / den)
        per[g.name] = w
        worst = max(worst, w)
    return worst, per
