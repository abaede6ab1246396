"""Independent float64 references for the regularizer tests: explicit loops, direct formulas."""

from __future__ import annotations

import math

import torch


def gauss_sum(x, y, h, mults):
    sq = sum((float(a) - float(b)) ** 2 for a, b in zip(x, y, strict=True))
    return sum(math.exp(-sq / (c * h)) for c in mults)


def pair_sq_dists(z):
    """Squared distances over distinct unordered pairs of rows of z (list of floats)."""
    out = []
    for i in range(len(z)):
        for j in range(i + 1, len(z)):
            out.append(sum((float(a) - float(b)) ** 2 for a, b in zip(z[i], z[j], strict=True)))
    return out


def mmd_unbiased(x, y, h, mults):
    m, n = len(x), len(y)
    sxx = sum(gauss_sum(x[i], x[j], h, mults) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    syy = sum(gauss_sum(y[i], y[j], h, mults) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    sxy = sum(gauss_sum(x[i], y[j], h, mults) for i in range(m) for j in range(n)) / (m * n)
    return sxx + syy - 2 * sxy


def mmd_linear(x, y, h, mults):
    m2 = len(x) // 2
    tot = 0.0
    for i in range(m2):
        a, b = 2 * i, 2 * i + 1
        tot += (
            gauss_sum(x[a], x[b], h, mults)
            + gauss_sum(y[a], y[b], h, mults)
            - gauss_sum(x[a], y[b], h, mults)
            - gauss_sum(x[b], y[a], h, mults)
        )
    return tot / m2


def covariance(x):
    """Unbiased covariance by explicit sums (x: n x d float64 tensor)."""
    n, d = x.shape
    mu = [sum(float(x[i, k]) for i in range(n)) / n for k in range(d)]
    c = torch.zeros(d, d, dtype=torch.float64)
    for a in range(d):
        for b in range(d):
            c[a, b] = sum((float(x[i, a]) - mu[a]) * (float(x[i, b]) - mu[b]) for i in range(n)) / (n - 1)
    return c


def coral(xs, xt, scale=None):
    d = xs.shape[1]
    diff = covariance(xs) - covariance(xt)
    fro2 = sum(float(diff[a, b]) ** 2 for a in range(d) for b in range(d))
    return fro2 * (scale if scale is not None else 1.0 / (4 * d * d))


def sigmoid(v):
    return 1.0 / (1.0 + math.exp(-v))


def softmax_row(row):
    mx = max(row)
    e = [math.exp(v - mx) for v in row]
    s = sum(e)
    return [v / s for v in e]


def entropy_row(p):
    return -sum(v * math.log(v) for v in p if v > 0)
