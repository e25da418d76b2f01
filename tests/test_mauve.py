"""mauve.py against hand computations, and evaluate.py's mauve command."""
import json
import math

import numpy as np
import pytest

import evaluate
import mauve


# ----------------------------------------------------------------------------- MAUVE
def hand_mauve(p, q, size=25, c=5):
    """The reference's definition, written out with plain floats: curve points, sort, trapezoids."""
    def kl(a, r):
        return sum(ai * math.log(ai / ri) for ai, ri in zip(a, r) if ai > 0)
    pts = [(1.0, 0.0), (0.0, 1.0)]
    for i in range(size):
        w = 1e-6 + i * (1 - 2e-6) / (size - 1)
        r = [w * pi + (1 - w) * qi for pi, qi in zip(p, q)]
        pts.append((math.exp(-c * kl(q, r)), math.exp(-c * kl(p, r))))

    def area(points):
        points = sorted(points)
        return sum((x1 - x0) * (y0 + y1) / 2 for (x0, y0), (x1, y1) in zip(points, points[1:]))
    return 0.5 * (area(pts) + area([(y, x) for x, y in pts]))


def test_mauve_area_matches_a_hand_computation():
    for p, q in [([0.5, 0.3, 0.2, 0.0], [0.1, 0.2, 0.3, 0.4]), ([0.25] * 4, [0.7, 0.1, 0.1, 0.1]),
                 ([0.9, 0.1, 0.0], [0.0, 0.5, 0.5])]:
        assert mauve.mauve_from_histograms(p, q) == pytest.approx(hand_mauve(p, q), abs=1e-9)


def test_mauve_identical_features_give_one():
    x = np.random.default_rng(0).normal(size=(300, 16))
    assert mauve.compute_mauve(x, x) == pytest.approx(1.0, abs=1e-12)
    assert mauve.mauve_from_histograms([0.2, 0.8], [0.2, 0.8]) == pytest.approx(1.0, abs=1e-12)


def test_mauve_disjoint_gives_the_grid_value_not_zero():
    grid = mauve.mauve_from_histograms([0.5, 0.5, 0, 0], [0, 0, 0.3, 0.7])
    assert grid == pytest.approx(hand_mauve([1, 0], [0, 1]), abs=1e-12)
    assert grid == pytest.approx(0.0040720962619612, abs=1e-12)
    rng = np.random.default_rng(1)  # two far-apart point clouds: k-means separates them completely
    p, q = rng.normal(size=(40, 8)) * 0.01 + 5, rng.normal(size=(40, 8)) * 0.01 - 5
    p[:, 1], q[:, 1] = 5, 5  # not antipodal after L2 normalisation, still far apart
    assert mauve.compute_mauve(p, q, num_buckets=2) == pytest.approx(grid, abs=1e-12)


def test_kmeans_recovers_separated_blobs():
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(5, 3)) * 10
    truth = rng.integers(0, 5, size=400)
    x = (centres[truth] + rng.normal(size=(400, 3)) * 0.1).astype(np.float32)
    labels = mauve.kmeans(x, 5, num_redo=3, seed=0)
    assert len({(t, l) for t, l in zip(truth, labels)}) == 5  # a bijection between clusters and blobs
    few = np.repeat(np.eye(3, dtype=np.float32), 10, axis=0)  # 3 distinct points, 4 clusters: one stays empty
    labels = mauve.kmeans(few, 4, num_redo=2, seed=0).reshape(3, 10)
    assert (labels == labels[:, :1]).all() and len(set(labels[:, 0])) == 3


@pytest.mark.parametrize("n,d", [(200, 20), (15, 40)])
def test_pca_axes_span_the_top_principal_subspace(n, d):
    x = np.random.default_rng(0).normal(size=(n, d)) * np.linspace(3, 0.1, d)
    axes = mauve.pca_axes(x, 0.9)
    _, s, vt = np.linalg.svd(x - x.mean(0), full_matrices=False)
    m = int(np.argmax(np.cumsum(s ** 2) / np.sum(s ** 2) >= 0.9)) + 1
    assert axes.shape == (d, m)
    np.testing.assert_allclose(axes @ axes.T, vt[:m].T @ vt[:m], atol=1e-8)


def test_mauve_cli_prints_one_json_line(tmp_path, capsys):
    rng = np.random.default_rng(0)
    np.save(tmp_path / "p.npy", rng.normal(size=(60, 8)))
    np.save(tmp_path / "q.npy", rng.normal(size=(50, 8)) + 0.5)
    evaluate.main(["mauve", "--p", str(tmp_path / "p.npy"), "--q", str(tmp_path / "q.npy"),
                   "--out", str(tmp_path / "m.mauve.json")])
    result = json.loads(capsys.readouterr().out)
    assert 0 < result["mauve"] < 1 and result["n_p"] == 60 and result["n_q"] == 50
    assert json.load(open(tmp_path / "m.mauve.json"))["mauve"] == result["mauve"]
