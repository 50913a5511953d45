"""How good a frozen image representation is: a linear probe and a weighted k-nearest-neighbour
classifier on its features (the protocols of SimCLR sec. 4 / appendix B.6 and of Wu et al. 2018).

Both read only features and labels: the features come from the candidate's encoder through the
seam, the labels, the splits and every number here are the grader's.

- **Linear probe**: multinomial logistic regression (scikit-learn's L-BFGS, L2 strength ``C``)
  on the training features, standardised with the training mean and deviation; accuracy on the
  test features. The encoder is not fine-tuned.
- **Weighted kNN**: each test feature's ``k`` most cosine-similar training features vote for
  their labels with weight ``exp(similarity / t)``; accuracy of the top vote.
"""

from __future__ import annotations

import math
import torch
import torch.nn.functional as F

PROBE_C = 1.0  # inverse L2 strength of the logistic regression (scikit-learn's default)
PROBE_ITERS = 1000
KNN_K = 20
KNN_T = 0.1  # vote temperature (Wu et al. 2018: 0.07 on ImageNet; 0.1 here on 128-d features)


def linear_probe(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor,
                 c: float = PROBE_C) -> torch.Tensor:
    """Fit on (train_x (N, D), train_y (N,)), predict test_x (M, D) -> predicted classes (M,)."""
    from sklearn.linear_model import LogisticRegression

    a, b = train_x.double().numpy(), test_x.double().numpy()
    mu, sd = a.mean(0), a.std(0) + 1e-8  # a constant feature stays 0 after standardising
    clf = LogisticRegression(C=c, max_iter=PROBE_ITERS)
    clf.fit((a - mu) / sd, train_y.numpy())
    return torch.from_numpy(clf.predict((b - mu) / sd)).long()


def knn_predict(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, n_classes: int,
                k: int = KNN_K, t: float = KNN_T, chunk: int = 1000) -> torch.Tensor:
    """Weighted kNN (cosine similarity, votes ``exp(s / t)``) -> predicted classes (M,). Ties
    between vote totals go to the lower class index."""
    a = F.normalize(train_x.float(), dim=1)
    out = []
    for i in range(0, len(test_x), chunk):
        s = F.normalize(test_x[i:i + chunk].float(), dim=1) @ a.T  # (m, N)
        top = s.topk(min(k, len(a)), dim=1)
        votes = torch.zeros(len(s), n_classes).scatter_add_(1, train_y[top.indices], torch.exp(top.values / t))
        out.append(votes.argmax(1))
    return torch.cat(out)


def feature_spread(x: torch.Tensor) -> float:
    """Mean over dimensions of the standard deviation across items of the unit-normalised
    features (0: every item maps to one direction, a collapsed representation)."""
    return float(F.normalize(x.float(), dim=1).std(0).mean())


def effective_rank(x: torch.Tensor) -> float:
    """exp(entropy of the normalised singular values) of the centred features (Roy & Vetterli
    2007): how many directions the representation really uses (1: collapsed to a line)."""
    s = torch.linalg.svdvals(x.double() - x.double().mean(0))
    p = s / s.sum().clamp(min=1e-12)
    return math.exp(-float((p * torch.log(p.clamp(min=1e-12))).sum()))
