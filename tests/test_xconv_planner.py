"""The byte-budget planner: budgets kept as measured, error predictions against draws, bad budgets refused."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import xconv
from xconv.memory import saved_tensor_bytes


def small_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        nn.Conv2d(32, 32, 3, padding=1, padding_mode="reflect"), nn.ReLU(),
        nn.ConvTranspose2d(32, 8, 4, stride=2, padding=1),
    )


def loss_fn(net, batch):
    return net(batch).square().mean()


def saved(net, batch) -> int:
    return saved_tensor_bytes(loss_fn, net, batch, model=net).total_bytes


BATCH = torch.rand(8, 3, 32, 32)


@pytest.mark.parametrize("budget", [0.3, 0.45, 0.7, 1.0])
def test_plan_keeps_its_budget_as_measured(budget):
    net = xconv.convert(small_net(), batchnorm_bits=4, maxpool=True)
    plan = xconv.plan_storage(net, loss_fn, BATCH, budget=budget)
    plain = saved(xconv.revert(copy.deepcopy(net)), BATCH)
    assert plan.plain_bytes == plain
    planned = plan.apply(copy.deepcopy(net))
    measured = saved(planned, BATCH)
    assert measured <= plan.total_bytes <= budget * plain
    assert {layer.name for layer in plan.layers} == {"0", "4", "7", "9"}
    # Forward unchanged by the plan.
    torch.manual_seed(1)
    expected = xconv.revert(copy.deepcopy(net))(BATCH)
    torch.manual_seed(1)
    assert torch.equal(planned(BATCH), expected)


def test_more_budget_never_predicts_more_error():
    net = xconv.convert(small_net(), batchnorm_bits=8, maxpool=True)
    errors = [sum(layer.relative_error**2 for layer in xconv.plan_storage(net, loss_fn, BATCH, budget=b).layers)
              for b in (0.35, 0.45, 0.6, 1.0)]
    assert errors == sorted(errors, reverse=True) and errors[-1] == 0


@pytest.mark.parametrize("candidate, low, high", [
    (("quantized", 2), 0.7, 1.4),  # a prediction without draws: only the 12 draws here scatter
    (("sketch", 8), 0.3, 3.0),  # predicted from 4 draws of errors correlated across entries: wide scatter
])
def test_predicted_errors_match_draws(candidate, low, high):
    net = xconv.convert(small_net(), relu="bit")
    plan = xconv.plan_storage(net, loss_fn, BATCH, budget=1.0, candidates=(candidate,))
    planned = plan.apply(copy.deepcopy(net))
    exact_net = xconv.revert(copy.deepcopy(net))
    exact = torch.autograd.grad(loss_fn(exact_net, BATCH), [exact_net[i].weight for i in (0, 4, 7, 9)])
    draws = [torch.autograd.grad(loss_fn(planned, BATCH), [planned[i].weight for i in (0, 4, 7, 9)])
             for _ in range(12)]
    for j, layer in enumerate(l for l in plan.layers if l.storage == candidate[0]):
        index = int(layer.name)
        k = (0, 4, 7, 9).index(index)
        measured = torch.stack([(d[k] - exact[k]).square().sum() for d in draws]).mean() / exact[k].square().sum()
        assert low < measured / layer.relative_error**2 < high, layer


def test_plan_table_and_dict_name_every_layer():
    net = xconv.convert(small_net())
    plan = xconv.plan_storage(net, loss_fn, BATCH, budget_bytes=2_500_000)
    table, record = plan.table(), plan.to_dict()
    assert all(layer.name in table for layer in plan.layers)
    assert record["total_bytes"] == plan.total_bytes <= 2_500_000
    assert [entry["name"] for entry in record["layers"]] == [layer.name for layer in plan.layers]


@pytest.mark.parametrize("kwargs, message", [
    (dict(budget=0.0), "budget must be None or a fraction in"),
    (dict(budget=1.5), "budget must be None or a fraction in"),
    (dict(budget=True), "budget must be None or a fraction in"),
    (dict(), "give exactly one of"),
    (dict(budget=0.5, budget_bytes=100), "give exactly one of"),
    (dict(budget_bytes=-1), "budget_bytes must be an int > 0"),
    (dict(budget=0.001), "below the smallest storage"),
])
def test_bad_budgets_are_refused_in_one_line(kwargs, message):
    net = xconv.convert(small_net())
    with pytest.raises(ValueError, match=message) as err:
        xconv.plan_storage(net, loss_fn, BATCH, **kwargs)
    assert "\n" not in str(err.value)


def test_a_model_without_xconv_layers_is_refused():
    with pytest.raises(ValueError, match="no XConv layers"):
        xconv.plan_storage(small_net(), loss_fn, BATCH, budget=0.5)
