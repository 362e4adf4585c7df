"""utils/finite: a diverging loss, NaN weights and NaN predictions are stopped with a message, never written."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from torch import nn

from sppnet.utils.finite import (
    NonFiniteError,
    check_finite_tensors,
    check_json_finite,
    find_non_finite,
    finite_or_raise,
    non_finite_tensors,
)


def test_divergence_is_caught_at_the_first_non_finite_step():
    # Issue 18: training at too high a learning rate went to NaN, saved the NaN model and printed `done`.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 1))
    x, y = torch.randn(64, 4) * 10, torch.randn(64, 1) * 10
    lr = 10.0
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    losses = []
    with pytest.raises(NonFiniteError) as info:
        for step in range(1, 200):
            loss = nn.functional.mse_loss(model(x), y)
            losses.append(loss.item())
            finite_or_raise("training loss", loss, step=step, lr=lr, hint="lower --lr")
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    first_bad = next(i for i, v in enumerate(losses, 1) if not math.isfinite(v))
    assert info.value.step == first_bad == len(losses) and info.value.lr == lr
    message = str(info.value)
    assert message.startswith("training loss is ") and f"at step {first_bad} with lr 10" in message
    assert message.endswith(": training diverged; lower --lr")
    # What the unguarded loop did next: go on updating until the weights are not finite
    # either. A checkpoint of them is refused, naming them.
    for _ in range(50):
        bad = [name for name, p in model.named_parameters() if not torch.isfinite(p).all()]
        if bad:
            break
        optimizer.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        optimizer.step()
    assert bad
    with pytest.raises(
        NonFiniteError, match=rf"model parameters hold NaN or inf at step {first_bad} with lr 10: {bad[0]}"
    ):
        check_finite_tensors(model, step=first_bad, lr=lr)


def test_finite_values_pass_through_unchanged():
    t = torch.tensor([1.0, -2.0])
    assert finite_or_raise("x", t) is t
    assert finite_or_raise("lr", 0.1) == 0.1 and finite_or_raise("n", 3) == 3
    assert finite_or_raise("labels", torch.tensor([1, 2])) is not None
    assert finite_or_raise("a", np.ones(3)) is not None
    check_finite_tensors(nn.Linear(3, 2))
    check_finite_tensors({"a": torch.zeros(2), "step": 5, "idx": torch.tensor([1])})


def test_messages_say_what_is_not_finite():
    with pytest.raises(NonFiniteError, match=r"^--ft-lr is nan; pass a positive number$"):
        finite_or_raise("--ft-lr", float("nan"), hint="pass a positive number")
    with pytest.raises(NonFiniteError, match=r"^bbox lambda is inf$"):
        finite_or_raise("bbox lambda", math.inf)
    with pytest.raises(
        NonFiniteError, match=r"scores is 2 NaN and 1 infinite of 5 values at step 3: training diverged"
    ):
        finite_or_raise("scores", torch.tensor([1.0, math.nan, math.inf, math.nan, 0.0]), step=3)
    with pytest.raises(NonFiniteError, match=r"loss is -inf with lr 0\.001: training diverged; lower the learning"):
        finite_or_raise("loss", np.float32(-np.inf), lr=1e-3)


def test_non_finite_tensors_counts_match_a_loop():
    rng = np.random.default_rng(0)
    state = {}
    for i in range(6):
        values = rng.standard_normal(rng.integers(1, 40))
        values[rng.random(values.shape) < 0.2] = rng.choice([np.nan, np.inf, -np.inf])
        state[f"t{i}"] = torch.from_numpy(values).float()
    state["ints"] = torch.arange(3)
    expected = []
    for name, t in state.items():
        if t.is_floating_point():
            count = sum(1 for v in t.tolist() if not math.isfinite(v))
            if count:
                expected.append((name, count, t.numel()))
    assert non_finite_tensors(state) == expected
    assert non_finite_tensors(list(state.items())) == expected


def test_check_finite_tensors_lists_the_tensors():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    with torch.no_grad():
        model[0].weight[1, 2] = math.nan
        model[1].running_var.fill_(math.inf)  # buffers are checked too
    with pytest.raises(NonFiniteError) as info:
        check_finite_tensors(model, "weights in run/model.safetensors", hint="this run diverged; retrain it")
    assert str(info.value) == (
        "weights in run/model.safetensors hold NaN or inf: 0.weight (1 of 12 values), "
        "1.running_var (all 4 values); this run diverged; retrain it"
    )
    many = {f"w{i}": torch.full((2,), math.nan) for i in range(8)}
    with pytest.raises(NonFiniteError, match=r"w4 \(all 2 values\) and 3 more tensors"):
        check_finite_tensors(many)


def test_nan_never_reaches_json():
    # Issue 18: `classify predict --json` printed a bare NaN, which is not JSON.
    entry = {"image": "cat.jpg", "top": [{"label": "cat", "p": 0.5}, {"label": "dog", "p": float("nan")}]}
    assert "NaN" in json.dumps(entry)  # what the standard library would write
    with pytest.raises(NonFiniteError, match=r"^predictions of cat\.jpg: top\[1\]\.p is not a finite number"):
        check_json_finite(entry, "predictions of cat.jpg")
    assert find_non_finite({"boxes": torch.tensor([[1.0, 2.0], [3.0, math.inf]])}) == "boxes[1, 1]"
    assert find_non_finite({"a": (1, 2.0, None, "x"), "b": np.zeros(3)}) is None
    assert find_non_finite(math.nan) == "value" and find_non_finite([np.float64(np.nan)]) == "[0]"
    ok = {"image": "a.jpg", "scores": [0.1, 0.9]}
    assert check_json_finite(ok, "x") is ok
