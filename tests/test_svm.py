"""Per-class SVMs with hard-negative mining (R-CNN / SPP-net) on synthetic features."""

from __future__ import annotations

import torch

from sppnet.engine.detect.svm import SVMConfig, feature_scale, fit_linear_svm, train_svms

K, F, N = 3, 12, 60


def synthetic(num_images=25, seed=0):
    """Per image: 2 ground-truth boxes (positives), windows near them (IoU >= 0.3, positive-looking),
    and background windows (IoU < 0.3). Class c lives in feature dimension c."""
    g = torch.Generator().manual_seed(seed)
    feats, overlaps, positives = [], [], []
    for i in range(num_images):
        x = torch.randn(N, F, generator=g) * 0.3
        x[:, K:] += 1.0  # a shared offset: the norm is not informative
        ov = torch.rand(N, K, generator=g) * 0.29  # background: IoU < 0.3 with everything
        pos = torch.full((N,), -1, dtype=torch.long)
        for j, c in enumerate([i % K, (i + 1) % K]):
            x[j, c] += 4.0
            ov[j, c] = 1.0
            pos[j] = c
            # near-duplicates of the object: IoU in [0.3, 0.7), look like the class, never negatives
            x[2 + 3 * j : 5 + 3 * j, c] += 3.5
            ov[2 + 3 * j : 5 + 3 * j, c] = 0.3 + 0.4 * torch.rand(3, generator=g)
        # hard background: a little of a class, still IoU < 0.3
        x[10:20, i % K] += 1.5
        feats.append(x)
        overlaps.append(ov)
        positives.append(pos)
    return feats, overlaps, positives


def test_hard_negative_mining_separates_and_mines_only_low_overlap():
    feats, overlaps, positives = synthetic()
    cfg = SVMConfig(C=1.0, retrain_limit=200, epochs=2)
    res = train_svms(len(feats), lambda i: feats[i], overlaps, positives, K, cfg)
    assert res.retrains > K  # the limit forced retrains during the passes
    for c in range(K):
        # every cached negative has IoU < 0.3 with the class's objects
        img, win = res.negatives[c].unbind(1)
        assert len(img) > 0
        assert all(float(overlaps[i][w, c]) < 0.3 for i, w in zip(img.tolist(), win.tolist()))
        assert res.positives[c] == sum(int((p == c).sum()) for p in positives)
        # perfect separation of positives from ALL negatives of the training set
        for i in range(len(feats)):
            s = res.feature_scale * feats[i] @ res.weight[c] + res.bias[c]
            assert bool((s[positives[i] == c] > 0).all())
            assert bool((s[overlaps[i][:, c] < 0.3] < 0).all())


def test_feature_scale_gives_mean_norm_20():
    feats, overlaps, positives = synthetic(num_images=6)
    res = train_svms(6, lambda i: feats[i], overlaps, positives, K, SVMConfig(C=1.0))
    norms = torch.cat([f.norm(dim=1) for f in feats])
    assert abs(float((norms * res.feature_scale).mean()) - 20.0) < 1e-4
    assert abs(feature_scale(torch.cat(feats)) - res.feature_scale) < 1e-5


def test_first_image_adds_all_its_negatives():
    """The SVMs start at zero, so every negative of image 0 scores 0 > -1 and is cached."""
    feats, overlaps, positives = synthetic(num_images=1)
    res = train_svms(1, lambda i: feats[i], overlaps, positives, K, SVMConfig(C=1.0, evict_threshold=-1e9))
    for c in range(K):
        assert len(res.negatives[c]) == int((overlaps[0][:, c] < 0.3).sum())


def test_resuming_after_an_epoch_gives_the_same_svms():
    feats, overlaps, positives = synthetic(num_images=12, seed=3)
    cfg = SVMConfig(C=0.1, retrain_limit=50, epochs=2)
    full = train_svms(12, lambda i: feats[i], overlaps, positives, K, cfg)
    saved = []
    train_svms(
        12,
        lambda i: feats[i],
        overlaps,
        positives,
        K,
        SVMConfig(C=0.1, retrain_limit=50, epochs=1),
        on_epoch=saved.append,
    )
    resumed = train_svms(12, lambda i: feats[i], overlaps, positives, K, cfg, state=saved[-1])
    torch.testing.assert_close(resumed.weight, full.weight)
    torch.testing.assert_close(resumed.bias, full.bias)
    assert [n.tolist() for n in resumed.negatives] == [n.tolist() for n in full.negatives]


def test_fit_linear_svm_weights_positives_and_handles_one_class():
    g = torch.Generator().manual_seed(1)
    x = torch.cat([torch.randn(30, 4, generator=g) + 2, torch.randn(30, 4, generator=g) - 2])
    y = torch.cat([torch.ones(30), -torch.ones(30)])
    w, b = fit_linear_svm(x, y, C=1.0, pos_weight=2.0, bias_multiplier=10.0)
    assert bool(((x @ w + b) * y > 0).all())
    w0, b0 = fit_linear_svm(x[:30], y[:30], C=1.0, pos_weight=2.0, bias_multiplier=10.0)
    assert float(w0.abs().sum()) == 0.0 and b0 == 1.0


def test_svm_positives_are_the_non_difficult_ground_truth_boxes():
    from sppnet.engine.detect.features import build_windows
    from sppnet.engine.detect.svm import svm_positives

    record = {
        "boxes": torch.tensor([[0.0, 0.0, 9.0, 9.0], [20.0, 20.0, 39.0, 29.0], [5.0, 5.0, 30.0, 30.0]]),
        "labels": torch.tensor([2, 0, 1]),
        "difficult": torch.tensor([False, True, False]),
        "width": 50,
        "height": 40,
    }
    w = build_windows([[0.0, 0.0, 9.0, 9.0], [1.0, 2.0, 30.0, 20.0]], record, 3)
    (pos,) = svm_positives([w])
    expected = [2 if k == 0 else 1 if k == 2 else -1 for k in range(len(w))]  # gt rows first; row 1 is difficult
    assert pos.tolist() == expected
