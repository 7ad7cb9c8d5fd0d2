"""Meta-CALA's 42 training characteristics (paper 000, appendix C.I, Table A-1).

The adjustment network of Meta-CALA estimates the CCPD ratio ``v(x, c)`` of every train row from
42 "neighborhood-related training characteristics" ``ζ_i`` extracted from the current classifier
(meta-learning specification §2.3). With ``a_i = f(x_i)`` the **unadjusted** logits of the head at
its current parameters, ``q_i = softmax(a_i)``, ``N_K(x_i)`` the K nearest train rows of ``x_i``
(cosine, self excluded: the cached :class:`~longtail.stages.neighbours.NeighbourTable`) and ``h_i``
the head's input (the standardised feature):

======  ==========================================  ==========================================
ζ       Table A-1                                    implemented as
======  ==========================================  ==========================================
1       ``ℓ_i``                                      ``CE(a_i, y_i) = -log q_{i,y_i}`` [R: the
                                                     plain CE; the CALA loss would feed the
                                                     network its own output]
2       ``a_{i,y_i}``                                the logit of the true class
3       ``g_i = ‖y_i − q_i‖``                        ``‖e_{y_i} − q_i‖₂`` [R: the norm bars are
                                                     lost in the text]
4       ``q_{i,y_i}``                                the probability of the true class
5       ``z_i = −Σ_c q_ic log q_ic``                 the entropy (natural log, ``0 log 0 = 0``)
6       ``γ_i = q_{i,y_i} − max_{c≠y_i} q_ic``       the probability margin
7-12    ``(1/K) Σ_{j∈N_K(x_i)} ζ_{j,1..6}``          each neighbour with **its own** label
13-18   ``ζ_{i,1..6} − ζ_{i,7..12}``                 the sample minus its neighbourhood
19      ``|N_{K,y_i}(x_i)| / K``                     share of neighbours with label ``y_i``
                                                     [R: cardinality bars lost]
20      ``max_{c≠y_i} |N_{K,c}(x_i)| / K``           largest share of one other class [R]
21      ``cos(h_i, h̄_{N_K(x_i)})``                   cosine similarity of ``h_i`` and the mean
                                                     neighbour feature [R/C: "cosine distance"
                                                     in the text, an affine change]
22-42   ``ζ_{i,k}^t − ζ_{i,k}^{t−1}``, k = 1..21     the change since the row's previous visit
                                                     (appendix C.I, "sequence extension"); 0 on
                                                     the first visit [D]
======  ==========================================  ==========================================

ζ19-21 depend only on the features and the table, which are frozen: they are computed once
(:func:`static_characteristics`), so ζ40-42 are identically 0. ζ7-12 are computed **exactly** at the
current parameters by running the head, without gradient, on the ``n·K`` neighbour rows of the
batch (specification §2.3; the released code's in-batch neighbourhoods are a different, batch-dependent
estimator, not copied). That forward pass costs ``K`` times the batch's own; ``cached`` trades it for
staleness (the specification's documented option): every row's ζ1-6 are kept in an ``(N, 6)`` table,
filled at the first call and refreshed whenever the row is in a batch, and ζ7-12 are means of the
table's rows, so a neighbour's values are up to an epoch old. Everything is vectorised in torch on the
device of the features: no per-sample Python loop; the ``(N, 21)`` memory of previous values (and the
``(N, 6)`` table) are the only O(N) state.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

__all__ = ["NUM_CHARACTERISTICS", "NAMES", "TrainingCharacteristics", "basic_characteristics",
           "static_characteristics"]

#: the characteristics per row: 21 of Table A-1 and their 21 sequence differences
NUM_CHARACTERISTICS = 42
_BASIC = ("loss", "true_logit", "grad_norm", "true_prob", "entropy", "margin")
#: the column names, in order (diagnostics and tests)
NAMES: tuple[str, ...] = (
    *_BASIC, *(f"nb_{b}" for b in _BASIC), *(f"rel_{b}" for b in _BASIC),
    "same_label_share", "other_label_share", "nb_cosine",
    *(f"delta_{b}" for b in (*_BASIC, *(f"nb_{b}" for b in _BASIC), *(f"rel_{b}" for b in _BASIC),
                             "same_label_share", "other_label_share", "nb_cosine")),
)
#: rows per chunk of :func:`static_characteristics` (bounds its ``(R, K, K)`` and ``(R, D)`` temporaries)
#: and of the first fill of the cached table
STATIC_CHUNK = 8192


def basic_characteristics(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """ζ1-ζ6 (Table A-1) of rows with ``logits`` ``(R, C)`` and ``labels`` ``(R,)``: ``(R, 6)``
    float32, columns loss, true-class logit, ``‖e_y − q‖₂``, true-class probability, entropy,
    margin ``q_y − max_{c≠y} q_c``. Log-space throughout (``log_softmax``), so the loss and the
    entropy stay finite for any finite logits."""
    a = logits.float()
    logq = torch.log_softmax(a, dim=1)
    q = logq.exp()
    own = labels[:, None]
    loss = -logq.gather(1, own).squeeze(1)
    true_logit = a.gather(1, own).squeeze(1)
    q_y = q.gather(1, own).squeeze(1)
    onehot = torch.zeros_like(q).scatter_(1, own, 1.0)
    grad_norm = torch.linalg.vector_norm(onehot - q, dim=1)
    entropy = -(q * logq).sum(1)  # q = 0 only where exp underflowed; logq is finite there
    if q.shape[1] > 1:
        other = q.masked_fill(onehot.bool(), float("-inf")).amax(1)
    else:  # one class: no competitor (margin q_y - 0)
        other = torch.zeros_like(q_y)
    return torch.stack([loss, true_logit, grad_norm, q_y, entropy, q_y - other], dim=1)


def static_characteristics(features: torch.Tensor, labels: torch.Tensor, neighbours: torch.Tensor,
                           chunk: int = STATIC_CHUNK) -> torch.Tensor:
    """ζ19-ζ21 of every row, ``(N, 3)`` float32: the share of the K neighbours with the row's own
    label, the largest share of any single other label, and ``cos(h_i, mean_{j∈N_K(x_i)} h_j)``.

    Args:
        features: ``(N, D)`` the head's inputs ``h`` (standardised features).
        labels: ``(N,)`` int64 train labels.
        neighbours: ``(N, K)`` int64 rows of the neighbourhoods (self excluded).
        chunk: rows at a time (the label counts are an ``(R, K, K)`` comparison, no ``(N, C)`` table).
    """
    n, k = neighbours.shape
    out = torch.empty(n, 3, dtype=torch.float32, device=features.device)
    for start in range(0, n, chunk):
        nb = neighbours[start:start + chunk]
        lab = labels[nb]  # (R, K)
        own = labels[start:start + chunk, None]
        same = (lab == own).float().mean(1)
        # |N_{K, y_j}(x_i)| for every neighbour j, its own-label entries masked: the max is ζ20 * K
        counts = (lab[:, :, None] == lab[:, None, :]).sum(2).float()
        other = counts.masked_fill(lab == own, 0.0).amax(1) / k  # k >= 1 (a table has K >= 1)
        hbar = F.embedding_bag(nb, features.float(), mode="mean")  # fused gather-and-mean, (R, D)
        h = features[start:start + chunk].float()
        # the norms' product is floored at 1e-12 (F.cosine_similarity's eps): a zero vector has cosine 0
        cos = F.cosine_similarity(h, hbar, dim=1, eps=1e-12)
        out[start:start + chunk] = torch.stack([same, other, cos], dim=1)
    return out


class TrainingCharacteristics:
    """The 42 characteristics of train rows at the head's current parameters, with the memory of
    each row's previous values for the sequence block (ζ22-ζ42).

    Args:
        features: ``(N, D)`` the head's inputs ``h`` of the train rows (standardised), on the fit's device.
        labels: ``(N,)`` int64 train labels on the same device.
        neighbours: ``(N, K)`` int64 neighbour rows on the same device (self excluded).
        cached: ζ7-12 from a table of every row's last ζ1-6 instead of the head on the neighbours.
    """

    def __init__(self, features: torch.Tensor, labels: torch.Tensor, neighbours: torch.Tensor,
                 cached: bool = False):
        if neighbours.dim() != 2 or neighbours.shape[0] != features.shape[0] or neighbours.shape[1] < 1:
            raise ValueError(f"neighbours {tuple(neighbours.shape)} is not (N = {features.shape[0]}, K >= 1)")
        self.features = features
        self.labels = labels
        self.neighbours = neighbours
        self.cached = bool(cached)
        self.static = static_characteristics(features, labels, neighbours)
        self.reset()

    def reset(self) -> None:
        """Forget every row's previous values (a new fit): the next visit of each row is a first one."""
        n = self.features.shape[0]
        self.previous = torch.zeros(n, 21, dtype=torch.float32, device=self.features.device)
        self.visited = torch.zeros(n, dtype=torch.bool, device=self.features.device)
        self.table: torch.Tensor | None = None  # (N, 6) ζ1-6 of every row when cached, filled at first use

    @torch.no_grad()
    def __call__(self, head: Callable[[torch.Tensor], torch.Tensor], rows: torch.Tensor,
                 update: bool = True) -> torch.Tensor:
        """ζ ``(n, 42)`` float32 of the train rows ``rows`` ``(n,)`` (distinct rows), ``head``
        mapping ``(B, D)`` inputs to ``(B, C)`` logits at the current parameters (called without
        gradient, on the batch and on its ``n·K`` neighbour rows, or with ``cached`` on the batch and,
        at the first call, on every row). With ``update`` the rows' ζ1-ζ21 become their "previous"
        values (specification §2.4, line 6a); a cached table is refreshed at the rows either way."""
        nb = self.neighbours[rows]  # (n, K)
        n, k = nb.shape
        own = basic_characteristics(head(self.features[rows]), self.labels[rows])
        if self.cached:
            if self.table is None:
                self.table = torch.cat([basic_characteristics(head(self.features[i:i + STATIC_CHUNK]),
                                                              self.labels[i:i + STATIC_CHUNK])
                                        for i in range(0, self.features.shape[0], STATIC_CHUNK)])
            self.table[rows] = own
            around = self.table[nb].mean(1)
        else:
            flat = nb.reshape(-1)
            around = basic_characteristics(head(self.features[flat]), self.labels[flat]).view(n, k, 6).mean(1)
        current = torch.cat([own, around, own - around, self.static[rows]], dim=1)  # (n, 21)
        seen = self.visited[rows, None]
        delta = torch.where(seen, current - self.previous[rows], torch.zeros_like(current))
        if update:
            self.previous[rows] = current
            self.visited[rows] = True
        return torch.cat([current, delta], dim=1)
