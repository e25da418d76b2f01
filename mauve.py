"""
MAUVE (Pillutla et al. 2021) between two sets of text features, with numpy and scipy only, so this file can
be copied into another project on its own.

    import mauve
    score = mauve.compute_mauve(p_features, q_features)   # (n_p, d) model text, (n_q, d) human text -> float

Written to the reference package's algorithm and defaults (mauve-text 0.4.0): L2-normalise the rows, PCA
on q then p keeping the fewest components explaining 90% of the variance, k-means (k = n/10, best of 5
runs), cluster histograms, and the area under the divergence curve. Two deliberate differences, neither of
which moves the score beyond k-means' seed noise: k-means stops at a fixed point instead of always running
500 iterations (same result, much faster), and the area is integrated along the mixture-weight order
instead of after sorting the points, so exact ties (p == q) give 1 rather than whatever order the sort
picked. The features are the caller's: the reference uses gpt2-large's final-layer hidden state at each
text's last token (`evaluate.featurize` computes that from any model folder). Inputs that cannot give a
meaningful score are refused with a ValueError: non-finite features, fewer samples in either set than
clusters, sets of different dimensions.
"""
import numpy as np
import scipy.sparse


def compute_mauve(p_features, q_features, num_buckets="auto", pca_max_data=-1, kmeans_explained_var=0.9,
                  kmeans_num_redo=5, kmeans_max_iter=500, divergence_curve_discretization_size=25,
                  mauve_scaling_factor=5, seed=25):
    """MAUVE between feature sets p (n_p, d) and q (n_q, d), as mauve-text 0.4.0 computes it. -> float"""
    p, q = check_features(p_features, "p_features"), check_features(q_features, "q_features")
    if p.shape[1] != q.shape[1]:
        raise ValueError(f"p_features has {p.shape[1]} dimensions but q_features {q.shape[1]}")
    if num_buckets == "auto":  # the reference's heuristic: about 10 points per cluster
        num_buckets = max(2, int(round(min(len(p), len(q)) / 10)))
    elif isinstance(num_buckets, bool) or not isinstance(num_buckets, (int, np.integer)) or num_buckets < 1:
        raise ValueError(f'num_buckets must be an integer >= 1 or "auto", got {num_buckets!r}')
    if min(len(p), len(q)) < num_buckets:  # a histogram over k clusters needs at least k points of each set
        raise ValueError(f"MAUVE with {num_buckets} clusters needs at least {num_buckets} samples in each "
                         f"set, got {len(p)} in p_features and {len(q)} in q_features")
    p_hist, q_hist = quantize(p, q, num_buckets, pca_max_data, kmeans_explained_var, kmeans_num_redo,
                              kmeans_max_iter, seed)
    return mauve_from_histograms(p_hist, q_hist, divergence_curve_discretization_size, mauve_scaling_factor)


def check_features(x, name):
    """A (n, d) float64 array of finite numbers, else a ValueError naming the argument."""
    x = np.asarray(x, np.float64)
    if x.ndim != 2 or x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(f"{name} must be a non-empty (n, d) array, got shape {x.shape}")
    bad = ~np.isfinite(x).all(1)
    if bad.any():
        raise ValueError(f"{name} has non-finite values (NaN or inf) in {bad.sum()} of {len(x)} rows, "
                         f"first row {np.flatnonzero(bad)[0]}")
    return x


def quantize(p, q, k, pca_max_data, explained_var, num_redo, max_iter, seed):
    """Cluster p and q jointly; each set's histogram over the k clusters -> (k,), (k,)."""
    data = np.vstack([q, p])  # (n_q + n_p, d), q first as in the reference
    data = data / np.maximum(np.linalg.norm(data, axis=1, keepdims=True), 1e-300)  # L2 rows; zero rows stay 0
    fit = data
    if 0 < pca_max_data < len(data):
        fit = data[np.random.RandomState(seed + 5).choice(len(data), pca_max_data, replace=False)]
    axes = pca_axes(fit, explained_var)  # (d, m)
    x = ((data - fit.mean(0)) @ axes).astype(np.float32)  # (n, m); float32 like faiss: half the GEMM time
    labels = kmeans(x, k, num_redo, max_iter, seed)
    q_hist = np.bincount(labels[:len(q)], minlength=k) / len(q)
    p_hist = np.bincount(labels[len(q):], minlength=k) / len(p)
    return p_hist, q_hist


def pca_axes(x, explained_var):
    """Principal axes (d, m) of x (n, d): the fewest explaining `explained_var` of the variance
    (sklearn's PCA with the reference's argmax rule), from the smaller of the two Gram matrices."""
    xc = x - x.mean(0)
    n, d = xc.shape
    small = xc.T @ xc if n >= d else xc @ xc.T  # (d, d) or (n, n): same nonzero eigenvalues
    var, vecs = np.linalg.eigh(small)  # ascending
    var, vecs = var[::-1].clip(min=0), vecs[:, ::-1]
    if var.sum() == 0:  # every row the same point: nothing to explain, one (arbitrary) axis
        return np.eye(d, 1)
    m = int(np.argmax(np.cumsum(var) / var.sum() >= explained_var)) + 1
    if n >= d:
        return vecs[:, :m]
    return xc.T @ vecs[:, :m] / np.sqrt(var[:m])  # right singular vectors from the left ones


def kmeans(x, k, num_redo=5, max_iter=500, seed=25):
    """Lloyd's k-means on x (n, m) float32, best of num_redo runs by the objective -> labels (n,).
    Started like faiss (the reference's backend): k distinct rows drawn at random. A run stops when no
    assignment changes: that is a fixed point, so it equals faiss running all max_iter iterations.
    An emptied cluster is moved onto the point farthest from its centroid (faiss splits a big one)."""
    n = len(x)
    if k > n:
        raise ValueError(f"{k} clusters for {n} points")
    rng = np.random.default_rng(seed + 2)
    x_sq = np.einsum("ij,ij->i", x, x)  # (n,)
    best_obj, best_labels = np.inf, None
    for _ in range(num_redo):
        centroids = x[rng.choice(n, size=k, replace=False)]  # (k, m)
        labels, dist = assign(x, x_sq, centroids)
        for _ in range(max_iter):
            centroids = update_centroids(x, labels, dist, k)
            new_labels, dist = assign(x, x_sq, centroids)
            if np.array_equal(new_labels, labels):
                break
            labels = new_labels
        if dist.sum() < best_obj:
            best_obj, best_labels = dist.sum(), labels
    return best_labels


def assign(x, x_sq, centroids, chunk=1 << 24):
    """Nearest centroid of every row -> labels (n,), squared distances (n,).
    ||x - c||^2 = ||x||^2 - 2 x.c + ||c||^2: one GEMM per chunk of rows, the (n, k) matrix never whole."""
    c_sq = np.einsum("ij,ij->i", centroids, centroids)  # (k,)
    rows = max(1, chunk // len(centroids))
    labels, dist = np.empty(len(x), np.int64), np.empty(len(x), np.float32)
    for s in range(0, len(x), rows):
        d = x[s:s + rows] @ centroids.T  # (rows, k)
        d *= -2
        d += c_sq  # ||x||^2 left out: the same argmin, added back below
        labels[s:s + rows] = d.argmin(1)
        dist[s:s + rows] = np.take_along_axis(d, labels[s:s + rows, None], 1)[:, 0]
    dist += x_sq
    return labels, np.maximum(dist, 0)


def update_centroids(x, labels, dist, k):
    """Mean of each cluster's rows (a sparse one-hot (k, n) @ x), empty clusters re-seeded far away."""
    n = len(x)
    onehot = scipy.sparse.csr_matrix((np.ones(n, np.float32), (labels, np.arange(n))), shape=(k, n))
    counts = np.bincount(labels, minlength=k)  # (k,)
    centroids = np.asarray(onehot @ x) / np.maximum(counts, 1)[:, None].astype(np.float32)  # (k, m)
    empty = np.flatnonzero(counts == 0)
    if len(empty):
        centroids[empty] = x[np.argsort(-dist)[:len(empty)]]
    return centroids


def mauve_from_histograms(p_hist, q_hist, size=25, scaling=5):
    p_hist, q_hist = np.asarray(p_hist, np.float64), np.asarray(q_hist, np.float64)
    return mauve_area(divergence_curve(p_hist, q_hist, size, scaling))


def kl_rows(a, r):
    """KL(a || r_i) for each row r_i of r: (k,), (m, k) -> (m,). Terms with a = 0 are 0."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(a > 0, a * np.log(a / r), 0.0).sum(1)


def divergence_curve(p, q, size=25, scaling=5):
    """The points (exp(-c KL(q|r)), exp(-c KL(p|r))) for r = w p + (1 - w) q, w on the reference's grid
    of `size` weights in (0, 1), in increasing w, between the end points (1, 0) (w = 0) and (0, 1) (w = 1).
    -> (size + 2, 2)"""
    w = np.linspace(1e-6, 1 - 1e-6, size)[:, None]  # (size, 1)
    r = w * p + (1 - w) * q  # (size, k), > 0 wherever p or q is
    inner = np.exp(-scaling * np.stack([kl_rows(q, r), kl_rows(p, r)], 1))  # (size, 2)
    return np.vstack([[1.0, 0.0], inner, [0.0, 1.0]])


def mauve_area(curve):
    """Area under the divergence curve, as the reference's mean of its areas w.r.t. x and w.r.t. y, but
    with trapezoids taken along the curve (increasing w: x falls, y rises) instead of after sorting by x.
    On a monotone curve that is the same polygon; with exact ties (p == q puts every inner point at
    (1, 1)) sorting may visit (1, 0) after (1, 1) and cut the corner, giving 0.5 for identical inputs."""
    x, y = curve[:, 0], curve[:, 1]
    area_x = -np.sum(np.diff(x) * (y[1:] + y[:-1]) / 2)  # x decreases along the curve
    area_y = np.sum(np.diff(y) * (x[1:] + x[:-1]) / 2)
    return float(0.5 * (area_x + area_y))
