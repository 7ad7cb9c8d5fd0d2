"""The CALA loss and its neighbourhood statistics (paper 000, Zhou, Wu, Yang, AAAI 2025).

Heuristic-CALA trains with the class-attribute-aware logit-adjusted loss (eq. 5)

    l_CALA(x, y) = -log softmax(f(x) + tau1 u + tau2 v(x, .))[y],
    u(c) = log p_tr(c),    v(x, c) = log(p~_pr(c | N_K(x)) / p~_mx(c | N_K(x)))    (eq. 8)

where ``N_K(x) = {x} + the K nearest other train samples`` (cosine), ``M = K + 1`` members: the
paper's convention ``N_0(x) = {x}`` (section "Heuristic-CALA Framework", special cases), so a sample
always counts itself and one without a same-class neighbour still gets its true-class term.
``p_mx`` is the label distribution of the neighbourhood under the MixUp-augmented labels (plain labels
without MixUp), ``p_pr`` the mean softmax prediction of the members and ``~`` the smoothing with class
averages of appendix B.II (eq. A.11). The adjustment is added to the logits in training only;
test-time logits are plain ``f(x)``.

The functions here take the neighbourhood as given, ``(R, M)`` member rows; :func:`with_self` turns
the rows of a :class:`~longtail.stages.neighbours.NeighbourTable` (the K nearest *other* samples) into
``N_K(x)``.

Shapes: ``N`` train rows, ``C`` classes, ``M`` members, ``R`` rows of a chunk. Index tensors are
int64, statistics float32 on the device of the inputs (``(N, C)`` tables would not fit in float64 at
ImageNet scale); class-level priors are float64.

Two completions of the paper's text, stated where they are used:

* A class without MixUp label mass in the neighbourhood (``p~_mx(c) = 0``) has the ratio
  ``p_pr / p_mx`` infinite as printed. ``M`` members cannot resolve a probability below one member's
  share ``1 / M``: such a class is given ``p_mx = 1 / M`` and ``p_pr`` floored at ``1 / M`` too, so
  ``v(x, c) = max(0, log(M p~_pr(c)))``: 0 for a class that is neither present nor predicted (the
  usual case for most of ``C`` classes when ``K << C``, which keeps ``v`` sparse), and a positive
  term (a margin against ``c``, which the training makes the model lower around ``x``) for a class the
  model predicts in a neighbourhood where it has no label: the dark doves that the model calls crows
  when no crow is among their neighbours. With ``K = 0`` (``M = 1``) this is the paper's ALA form:
  every class but ``y_x`` gets ``v = 0`` (``q <= 1``).
* ``p_pr`` is floored at :data:`PROB_FLOOR` before its log (a float32 softmax can underflow to 0).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = [
    "PROB_FLOOR",
    "cala_adjustment",
    "cala_loss",
    "dynamic_la_adjustment",
    "neighbourhood_label_distribution",
    "neighbourhood_prediction",
    "smooth_with_class_averages",
    "with_self",
]

#: floor of ``p_pr`` before ``log`` (guards a softmax entry that underflowed to 0 in float32)
PROB_FLOOR = 1e-12
#: the adjustment is computed for this many (row, support class, neighbour) entries at a time
CHUNK_ENTRIES = 1 << 21


def with_self(neighbours: torch.Tensor) -> torch.Tensor:
    """``N_K(x)`` ``(N, K + 1)`` from the K nearest *other* rows ``(N, K)`` of every row (a neighbour
    table): each row's own index first (``N_0(x) = {x}``, paper 000, section "Heuristic-CALA
    Framework"), then its neighbours."""
    own = torch.arange(neighbours.shape[0], device=neighbours.device, dtype=neighbours.dtype)
    return torch.cat([own[:, None], neighbours], 1)


def cala_loss(logits: torch.Tensor, labels: torch.Tensor, adjustment: torch.Tensor, *,
              partner_labels: torch.Tensor | None = None, lam: float = 1.0) -> torch.Tensor:
    """Eq. 5 on a (MixUp-augmented) batch: cross-entropy of ``logits + adjustment``.

    Args:
        logits: ``(B, C)`` scores ``f`` of the (mixed) samples.
        labels: ``(B,)`` the first labels ``y_a`` of the mixed pairs (the sample's own label).
        adjustment: ``(B, C)`` or ``(C,)``: ``tau1 u(c) + tau2 v(x, c)`` (:func:`cala_adjustment`).
        partner_labels: ``(B,)`` the second labels ``y_b`` when the batch was mixed (Algorithm A-1,
            step 4); ``None`` for an unmixed batch.
        lam: the MixUp weight of ``y_a``; the loss is ``lam l(y_a) + (1 - lam) l(y_b)`` (the MixUp
            criterion of Zhang et al. 2018 applied to ``l_CALA``).
    """
    logp = torch.log_softmax(logits + adjustment.to(logits.dtype), dim=1)
    nll = -logp.gather(1, labels[:, None])
    if partner_labels is not None and lam < 1.0:
        nll = lam * nll - (1.0 - lam) * logp.gather(1, partner_labels[:, None])
    return nll.mean()


def dynamic_la_adjustment(pred_prior: torch.Tensor, tau: float) -> torch.Tensor:
    """Dynamic-LA (appendix D.VII): ``tau log p_pr(c)``, ``(C,)`` float64, where ``p_pr`` are the
    class proportions of the model's predictions on the train set (the K = infinity case of
    Heuristic-CALA with ``tau1 = tau2 = tau``, section "Heuristic-CALA Framework")."""
    p = pred_prior.to(torch.float64).clamp_min(PROB_FLOOR)  # guards log 0 for a class never predicted
    return float(tau) * torch.log(p)


def neighbourhood_label_distribution(neighbours: torch.Tensor, labels: torch.Tensor, num_classes: int, *,
                                     partner_labels: torch.Tensor | None = None,
                                     lam: torch.Tensor | None = None) -> torch.Tensor:
    """``p_mx(c | N_K(x))`` ``(R, C)``: the mean MixUp label of the neighbours (eq. 7-8).

    A train sample ``j`` mixed with a partner of label ``y'_j`` at weight ``lam_j`` carries the label
    ``m_j = lam_j e(y_j) + (1 - lam_j) e(y'_j)`` (Zhang et al. 2018); ``p_mx(. | N_K(x))`` is the mean
    of ``m_j`` over ``j`` in ``N_K(x)``. Each row sums to 1. Without ``partner_labels``/``lam`` the
    labels are plain (``lam = 1``).

    Args:
        neighbours: ``(R, K)`` train rows of the neighbourhoods.
        labels: ``(N,)`` train labels.
        partner_labels, lam: ``(N,)`` each: the MixUp partner's label and the weight of the own label.
    """
    k = neighbours.shape[1]
    own = labels[neighbours]
    if lam is None or partner_labels is None:
        return _class_sums(own, torch.full(own.shape, 1.0 / k, device=own.device), num_classes)  # k >= 1
    w = lam[neighbours].float()
    return _class_sums(own, w / k, num_classes) + _class_sums(partner_labels[neighbours], (1.0 - w) / k, num_classes)


def _class_sums(classes: torch.Tensor, weights: torch.Tensor, num_classes: int,
                scatter: bool | None = None) -> torch.Tensor:
    """``out[r, c] = sum_k weights[r, k] [classes[r, k] = c]``, ``(R, C)`` float32, in a fixed order
    on every device: ``scatter_add_`` on the CPU; on an accelerator, whose scatter-add sums in an
    arbitrary order (atomics), a weighted ``embedding_bag`` over the rows of the identity (its
    forward reduces each bag in order). ``scatter`` forces one or the other (tests)."""
    if scatter if scatter is not None else classes.device.type == "cpu":
        out = torch.zeros(classes.shape[0], num_classes, dtype=torch.float32, device=classes.device)
        return out.scatter_add_(1, classes, weights.float())
    eye = torch.eye(num_classes, dtype=torch.float32, device=classes.device)
    return F.embedding_bag(classes, eye, per_sample_weights=weights.float(), mode="sum")


def neighbourhood_prediction(neighbours: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
    """``p_pr(c | N_K(x)) = sum_{x' in N_K(x)} q_{x', c} / K`` ``(R, C)`` (text after eq. 8), ``q``
    the softmax predictions ``(N, C)``; a fused gather-and-mean (no ``(R, K, C)`` intermediate)."""
    return F.embedding_bag(neighbours, probs, mode="mean")


def smooth_with_class_averages(values: torch.Tensor, neighbours: torch.Tensor, labels: torch.Tensor,
                               own_class_values: torch.Tensor, smoothing: float) -> torch.Tensor:
    """Eq. A.11: ``p~(c | N_K(x)) = a pbar_c(x) + (1 - a) p(c | N_K(x))``, ``a = smoothing``.

    ``pbar_c(x)`` is "the average value of p(y = c | x' in N_K(x)) for all samples in N_{K,c}(x)", the
    neighbours of ``x`` with label ``c``. Reconstruction (the printed notation conditions on the
    neighbourhood of ``x`` while averaging over samples ``x'``): the value of a neighbour ``x'`` is
    its own neighbourhood estimate for its class, ``s(x') = p(y = y_{x'} | N_K(x'))``, so
    ``pbar_c(x)`` is the mean of ``s`` over the class-``c`` neighbours: the class average inside the
    neighbourhood, which damps a border or outlier sample towards its neighbours of the same class.
    Classes with no neighbour (``N_{K,c}(x)`` empty) have no class average and keep ``p``.

    Args:
        values: ``(R, C)`` the unsmoothed ``p(c | N_K(x))`` of the ``R`` rows.
        neighbours: ``(R, K)`` their neighbourhoods; ``labels`` ``(N,)`` the train labels.
        own_class_values: ``(N,)`` ``s(x')`` for every train row.
        smoothing: ``a`` in ``[0, 1]`` (0.05 in the paper).
    """
    lab = labels[neighbours]
    c = values.shape[1]
    sums = _class_sums(lab, own_class_values[neighbours], c).to(values.dtype)
    counts = _class_sums(lab, torch.ones(lab.shape, device=lab.device), c).to(values.dtype)
    present = counts > 0
    avg = sums / counts.clamp_min(1.0)  # clamp guards the classes absent from the neighbourhood (masked below)
    return torch.where(present, smoothing * avg + (1.0 - smoothing) * values, values)


def cala_adjustment(neighbours: torch.Tensor | None, labels: torch.Tensor, probs: torch.Tensor,
                    log_prior: torch.Tensor, *, tau1: float, tau2: float, smoothing: float,
                    partner_labels: torch.Tensor | None = None, lam: torch.Tensor | None = None,
                    chunk_entries: int = CHUNK_ENTRIES) -> torch.Tensor:
    """The logit adjustment ``tau1 u(c) + tau2 v(x, c)`` of every train row, ``(N, C)`` float32.

    ``u = log p_tr`` (eq. 5), ``v = log(p~_pr / p~_mx)`` (eq. 8, smoothed by eq. A.11) on the classes
    with MixUp label mass in the neighbourhood, ``v = max(0, log(M p~_pr))`` on the others (module
    docstring: one member's share ``1 / M`` is the resolution of an ``M``-member estimate).

    The neighbourhood's label classes (the members' labels and their partners' labels, at most
    ``S = 2M`` of the ``C``) are the support where eq. 8 is evaluated (all ``C`` classes when
    ``C <= 2M``): ``p_pr`` by a fused gather-and-mean of the members' predictions ``(R, C)``, the label
    masses, counts and class averages by ``(R, S, M)`` indicator products, instead of the ``(R, C)``
    tables of the definitions (``2M << C`` at ImageNet scale). The values equal
    :func:`neighbourhood_label_distribution` and :func:`smooth_with_class_averages` read at the
    support (a class listed twice gets the same value twice).

    Args:
        neighbours: ``(N, M)`` member rows of every row's neighbourhood ``N_K(x)`` (self included:
            :func:`with_self` of a neighbour table), or ``None`` for ``K = 0``: ``N_0(x) = {x}``
            with its plain label (``p_mx(y_x | x) = 1``) and its own prediction. Then
            ``v(x, y_x) = log q_{x, y_x}`` and ``v(x, c) = 0`` otherwise: the true class is adjusted
            by ``tau1 log p_tr(y_x) + tau2 log p_pr(y_x | x)``, the paper's ALA form (section
            "Heuristic-CALA Framework", second special case).
        labels: ``(N,)`` train labels; ``probs``: ``(N, C)`` softmax predictions ``q`` of the rows.
        log_prior: ``(C,)`` ``log p_tr``.
        partner_labels, lam: ``(N,)`` MixUp partners and weights (:func:`neighbourhood_label_distribution`).
        chunk_entries: bounds the ``(rows, support, M)`` temporaries of a chunk.
    """
    n, c = probs.shape
    u = (float(tau1) * log_prior.to(torch.float64)).to(torch.float32)
    out = u.expand(n, c).clone()
    if float(tau2) == 0.0:
        return out
    if neighbours is None:  # K = 0: v(x, y_x) = log q_{x, y_x}, the only class of N_0(x)
        own = labels[:, None]
        v = torch.log(probs.gather(1, own).float().clamp_min(PROB_FLOOR))
        return out.scatter_(1, own, u[own] + float(tau2) * v)
    k = neighbours.shape[1]
    mixed = lam is not None and partner_labels is not None
    if smoothing > 0:
        # s(x') = p(y_x' | N_K(x')) of every row first (the class averages of eq. A.11 read them at
        # the members): only the own-class column, so (N, M) gathers
        own = labels[:, None]
        s_pr = probs[neighbours, own.expand_as(neighbours)].float().mean(1)
        if mixed:
            w = lam[neighbours].float()
            s_mx = (w * (labels[neighbours] == own) + (1.0 - w) * (partner_labels[neighbours] == own)).mean(1)
        else:
            s_mx = (labels[neighbours] == own).float().mean(1)
    step = max(1, int(chunk_entries) // (max(c, min(c, (2 if mixed else 1) * k) * k)))
    log_m = math.log(k)  # log M: one member's share 1 / M is the resolution of the estimate
    for start in range(0, n, step):
        nb = neighbours[start:start + step]  # (R, M)
        y_nb = labels[nb]
        if c <= (2 if mixed else 1) * k:  # few classes: every class is the support (S = C)
            support = torch.arange(c, device=nb.device).expand(nb.shape[0], c)
        else:
            support = torch.cat([y_nb, partner_labels[nb]], 1) if mixed else y_nb  # (R, S) classes
        p_all = neighbourhood_prediction(nb, probs).float()  # (R, C) p_pr of every class
        # classes without label mass: v = max(0, log(M p_pr)) (module docstring); eq. 8 overwrites the support
        v_absent = (torch.log(p_all.clamp_min(PROB_FLOOR)) + log_m).clamp_min(0.0)
        out[start:start + step] += float(tau2) * v_absent
        p_pr = p_all.gather(1, support)
        # per-class sums over the members as one batched product with the (R, S, M) indicator
        # "member m has label support[s]": its MixUp weight, s_pr, s_mx and 1 (a count)
        is_own = (support[:, :, None] == y_nb[:, None, :]).float()
        w = lam[nb].float() if mixed else torch.ones(nb.shape, device=nb.device)
        cols = [w] + ([s_pr[nb], s_mx[nb], torch.ones_like(w)] if smoothing > 0 else [])
        agg = torch.bmm(is_own, torch.stack(cols, 2))  # (R, S, 1 or 4)
        p_mx = agg[:, :, 0]
        if mixed:
            is_partner = (support[:, :, None] == partner_labels[nb][:, None, :]).float()
            p_mx = p_mx + torch.bmm(is_partner, (1.0 - w)[:, :, None]).squeeze(2)
        p_mx = p_mx / k
        if smoothing > 0:  # eq. A.11: class averages of s over the class-c members, where there are some
            count = agg[:, :, 3]
            present = count > 0
            denom = count.clamp_min(1.0)  # clamp guards the classes without a member (masked below)
            p_pr = torch.where(present, smoothing * agg[:, :, 1] / denom + (1.0 - smoothing) * p_pr, p_pr)
            p_mx = torch.where(present, smoothing * agg[:, :, 2] / denom + (1.0 - smoothing) * p_mx, p_mx)
        # a support class can have no mass (a partner of weight 0): the absent-class rule there
        log_pr = torch.log(p_pr.clamp_min(PROB_FLOOR))
        v = torch.where(p_mx > 0, log_pr - torch.log(p_mx.clamp_min(PROB_FLOOR)), (log_pr + log_m).clamp_min(0.0))
        out[start:start + step].scatter_(1, support, u[support] + float(tau2) * v)
    return out
