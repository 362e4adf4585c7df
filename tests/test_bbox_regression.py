"""Ridge box regression on pool5 features."""

from __future__ import annotations

import pytest
import torch

from sppnet.engine.detect.bbox_regression import default_lambda, fit_ridge, train_box_regressors
from sppnet.ops import decode_boxes, encode_boxes


def test_ridge_recovers_a_known_linear_map():
    g = torch.Generator().manual_seed(0)
    w_true = torch.randn(8, 4, generator=g, dtype=torch.float64)
    b_true = torch.tensor([0.1, -0.2, 0.3, 5.0], dtype=torch.float64)
    x = torch.randn(500, 8, generator=g, dtype=torch.float64) + 3.0  # off-centre: the bias matters
    y = x @ w_true + b_true
    w, b = fit_ridge(x, y, lam=1e-6)
    torch.testing.assert_close(w, w_true, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(b, b_true, atol=1e-6, rtol=1e-6)


def brute_force_ridge(x, y, lam):
    """Normal equations with an explicit, unpenalised bias column."""
    xa = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], 1)
    reg = lam * torch.eye(xa.shape[1], dtype=x.dtype)
    reg[-1, -1] = 0
    sol = torch.linalg.solve(xa.T @ xa + reg, xa.T @ y)
    return sol[:-1], sol[-1]


@pytest.mark.parametrize("n, d", [(50, 6), (6, 50)])  # primal and dual forms
def test_ridge_matches_the_normal_equations(n, d):
    g = torch.Generator().manual_seed(n)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    y = torch.randn(n, 4, generator=g, dtype=torch.float64)
    w, b = fit_ridge(x, y, lam=3.0)
    w_ref, b_ref = brute_force_ridge(x, y, 3.0)
    torch.testing.assert_close(w, w_ref)
    torch.testing.assert_close(b, b_ref)


def test_regressors_move_windows_onto_their_objects():
    """Windows whose features encode their offset: regression recovers the object box."""
    g = torch.Generator().manual_seed(1)
    gt = torch.tensor([[40.0, 30.0, 119.0, 89.0]]).repeat(200, 1)
    jitter = torch.randn(200, 4, generator=g) * 6
    windows = gt + jitter
    deltas = encode_boxes(windows, gt)  # [200, 4]
    mixing = torch.randn(4, 16, generator=g)
    feats = deltas @ mixing + 0.01 * torch.randn(200, 16, generator=g)  # pool5-like, linear in the deltas
    weight, bias = train_box_regressors([feats, feats[:0]], [deltas, deltas[:0]], feature_scale=1.0, lam=1e-3)
    assert weight.shape == (2, 16, 4) and float(weight[1].abs().sum()) == 0.0  # empty class: identity
    pred = decode_boxes(windows, feats @ weight[0] + bias[0])
    assert float((pred - gt).abs().mean()) < 0.5 < float(jitter.abs().mean())


def test_default_lambda_scales_with_the_feature_width():
    assert default_lambda(12800) == 4000.0
    assert default_lambda(3200) == 16000.0
    with pytest.raises(ValueError):
        default_lambda(0)
    with pytest.raises(ValueError, match="lam"):
        fit_ridge(torch.zeros(3, 2), torch.zeros(3, 4), 0.0)


def test_regression_samples_are_the_windows_near_a_ground_truth_brute_force():
    from sppnet.engine.detect.bbox_regression import regression_samples
    from sppnet.engine.detect.features import build_windows

    g = torch.Generator().manual_seed(3)
    records, windows = [], []
    for i in range(4):
        gt = torch.tensor([[10.0, 12.0, 60.0, 70.0], [40.0, 5.0, 90.0, 45.0]])
        record = {
            "boxes": gt,
            "labels": torch.tensor([i % 3, 2]),
            "difficult": torch.tensor([False, i == 1]),
            "width": 100,
            "height": 80,
        }
        jitter = torch.randint(-12, 13, (30, 4), generator=g).float()
        props = (gt.repeat(15, 1) + jitter).clamp(0, 79)
        props[:, 2:] = torch.maximum(props[:, 2:], props[:, :2] + 1)
        records.append(record)
        windows.append(build_windows(props.numpy(), record, 3))
    feats = [torch.randn(len(w), 5, generator=g) for w in windows]

    x, y = regression_samples(windows, lambda i, idx: feats[i][idx], 3, 5, iou=0.6)
    for c in range(3):
        want_x, want_y = [], []
        for i, w in enumerate(windows):
            for j in range(len(w)):
                if float(w.max_overlap[j]) >= 0.6 and int(w.label[j]) == c:
                    want_x.append(feats[i][j])
                    want_y.append(encode_boxes(w.boxes[j : j + 1], w.gt_boxes[w.gt_index[j : j + 1]])[0])
        assert len(x[c]) == len(want_x) and y[c].shape == (len(want_x), 4)
        if want_x:
            torch.testing.assert_close(x[c], torch.stack(want_x))
            torch.testing.assert_close(y[c], torch.stack(want_y))
    assert sum(len(v) for v in x) > 0 and x[1].shape[1] == 5
