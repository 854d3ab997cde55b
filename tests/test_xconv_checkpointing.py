"""xconv.checkpoint_modules: exact gradients, BatchNorm statistics updated once, fewer saved bytes."""
from __future__ import annotations

import copy
import pickle
import warnings

import pytest
import segmentation_models_pytorch as smp
import torch
from torch import nn

import xconv
import xconv.checkpointing
from xconv.memory import saved_tensor_bytes

UNET_SEGMENTS = ["encoder.layer*", "decoder.blocks.*"]


def _block(channels: int, batchnorm: type = nn.BatchNorm2d) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1), batchnorm(channels), nn.ReLU(), nn.Dropout(0.3))


def _net() -> nn.Sequential:
    """Two blocks with dropout, one with torch's BatchNorm and one with xconv's SR-storage BatchNorm."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), _block(8), _block(8, xconv.XBatchNorm2d), nn.Conv2d(8, 2, 1))


def _step(net: nn.Module, x: torch.Tensor, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """One training forward + backward from a fixed RNG state; the output and the input gradient."""
    torch.manual_seed(seed)
    x = x.clone().requires_grad_()
    out = net(x)
    out.square().mean().backward()
    return out, x.grad


def _assert_same_training_state(a: nn.Module, b: nn.Module) -> None:
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p.grad, q.grad), name
    for (name, buffer), other in zip(a.named_buffers(), b.buffers()):
        assert torch.equal(buffer, other), name


def test_gradients_and_running_statistics_equal_the_unwrapped_models():
    plain = _net().train()
    checkpointed = xconv.checkpoint_modules(copy.deepcopy(plain), ["1", "2"])
    x = torch.randn(4, 3, 16, 16)
    for seed in (1, 2):  # two steps: the statistics move once per step, as without checkpointing
        out, grad = _step(plain, x, seed)
        out_ck, grad_ck = _step(checkpointed, x, seed)
        assert torch.equal(out, out_ck) and torch.equal(grad, grad_ck)  # the same dropout masks
        _assert_same_training_state(plain, checkpointed)
    assert checkpointed[1][1].num_batches_tracked == checkpointed[2][1].num_batches_tracked == 2


def test_state_dict_keys_repr_and_copies_are_kept():
    plain = _net()
    checkpointed = xconv.checkpoint_modules(copy.deepcopy(plain), "[12]")
    assert list(checkpointed.state_dict()) == list(plain.state_dict())
    checkpointed.load_state_dict(plain.state_dict())  # an unwrapped model's checkpoint loads
    assert "(1): CheckpointedSequential(" in repr(checkpointed)
    assert xconv.checkpointed_module_names(checkpointed) == ["1", "2"]
    for copied in (copy.deepcopy(checkpointed), pickle.loads(pickle.dumps(checkpointed))):  # torch.save(model)
        assert xconv.checkpointed_module_names(copied) == ["1", "2"]
    xconv.remove_checkpointing(checkpointed)
    assert type(checkpointed[1]) is nn.Sequential and xconv.checkpointed_module_names(checkpointed) == []


def test_a_segment_keeps_only_its_input():
    net, x = _net().train(), torch.randn(2, 3, 16, 16)
    plain = saved_tensor_bytes(lambda: net(x).sum(), model=net)
    xconv.checkpoint_modules(net, ["1", "2"])
    checkpointed = saved_tensor_bytes(lambda: net(x).sum(), model=net)
    activation = 2 * 8 * 16 * 16 * 4  # one float32 [2, 8, 16, 16] tensor: what enters each block
    assert checkpointed.by_module == {"0": x.numel() * 4, "1": activation, "2": activation, "3": activation}
    assert checkpointed.total_bytes < plain.total_bytes / 2


def test_unet_segments_save_bytes_and_keep_gradients():
    torch.manual_seed(0)
    plain = smp.Unet("resnet18", encoder_weights=None, classes=3).train()
    checkpointed = xconv.checkpoint_modules(copy.deepcopy(plain), UNET_SEGMENTS)
    assert len(xconv.checkpointed_module_names(checkpointed)) == 4 + 5
    x = torch.randn(2, 3, 64, 64)
    plain_bytes = saved_tensor_bytes(lambda: plain(x).sum(), model=plain).total_bytes
    checkpointed_bytes = saved_tensor_bytes(lambda: checkpointed(x).sum(), model=checkpointed).total_bytes
    assert checkpointed_bytes < 0.5 * plain_bytes
    out, grad = _step(plain, x)
    out_ck, grad_ck = _step(checkpointed, x)
    assert torch.equal(out, out_ck) and torch.equal(grad, grad_ck)
    _assert_same_training_state(plain, checkpointed)


def test_xconv_layers_inside_a_segment():
    converted = xconv.convert(_net().train(), probes=4)
    checkpointed = xconv.checkpoint_modules(copy.deepcopy(converted), ["1", "2"])
    assert isinstance(checkpointed[1][0], xconv.XConv2d)
    x = torch.randn(4, 3, 16, 16)
    out, grad = _step(converted, x)
    out_ck, grad_ck = _step(checkpointed, x)
    # The recomputation replays the RNG, so the probes are the same ones and so is the estimate.
    assert torch.equal(out, out_ck) and torch.equal(grad, grad_ck)
    _assert_same_training_state(converted, checkpointed)


def test_a_second_backward_through_a_kept_graph_recomputes_again():
    """retain_graph=True: each backward recomputes the segments, with the forward's probes and masks
    (and no repeated-seed warning: recomputations draw their forward's seed on purpose)."""
    converted = xconv.convert(_net().train(), probes=4)
    checkpointed = xconv.checkpoint_modules(copy.deepcopy(converted), ["1", "2"])
    x = torch.randn(4, 3, 16, 16)
    for net in (converted, checkpointed):
        torch.manual_seed(1)
        loss = net(x).square().mean()
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            loss.backward(retain_graph=True)
            loss.backward()
    _assert_same_training_state(converted, checkpointed)


def test_nested_patterns_checkpoint_the_outermost_module_only():
    net = xconv.checkpoint_modules(_net(), ["1", "1.*", "2.0"])
    assert xconv.checkpointed_module_names(net) == ["1", "2.0"]
    xconv.checkpoint_modules(net, "2")  # a segment inside a new one stops being one
    assert xconv.checkpointed_module_names(net) == ["1", "2"]
    xconv.checkpoint_modules(net, "1.0")  # inside a segment already
    assert xconv.checkpointed_module_names(net) == ["1", "2"]


def test_without_grad_the_module_runs_plainly(monkeypatch):
    net = xconv.checkpoint_modules(_net().eval(), ["1", "2"])
    monkeypatch.setattr(xconv.checkpointing, "checkpoint", lambda *a, **k: pytest.fail("checkpointed without grad"))
    with torch.no_grad():
        net(torch.randn(1, 3, 8, 8))


@pytest.mark.parametrize("include, error, message", [
    (["1", "nonexistent.*"], ValueError, r"^include: no module matches \['nonexistent\.\*'\]; the model's modules: 0, 1, 2, 3, 1\.0"),
    ([], TypeError, "^include must be a module-name pattern or a non-empty list of them, got"),
    ([1], TypeError, "^include must be"),
])
def test_bad_patterns_raise_one_line_before_changing_anything(include, error, message):
    net = _net()
    with pytest.raises(error, match=message) as raised:
        xconv.checkpoint_modules(net, include)
    assert "\n" not in str(raised.value)
    assert xconv.checkpointed_module_names(net) == []


def test_a_compiled_model_runs_its_segments_eagerly_with_statistics_updated_once(fixed_seeds):
    # A compiled segment would be checkpointed without its context_fn (statistics updated twice).
    # Fixed seeds: compiled convs would draw theirs with torch.randint and move the dropout masks.
    converted = xconv.convert(_net().train(), probes=4)
    checkpointed = xconv.checkpoint_modules(copy.deepcopy(converted), ["1", "2"])
    compiled = torch.compile(checkpointed, backend="aot_eager")
    x = torch.randn(4, 3, 16, 16)
    for seed in (1, 2):
        _step(converted, x, seed)
        _step(compiled, x, seed)
    assert checkpointed[1][1].num_batches_tracked == 2
    for buffer, other in zip(converted.buffers(), checkpointed.buffers()):
        torch.testing.assert_close(buffer, other)
