"""xconv.convert / set_probes / revert on real architectures."""
from __future__ import annotations

import copy
import dataclasses
from collections import OrderedDict

import pytest
import segmentation_models_pytorch as smp
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import xconv
from xconv.memory import saved_tensor_bytes
from xconv._layer import _XConvMixin


def _models():
    yield "resnet18", torchvision.models.resnet18(num_classes=10), torch.randn(2, 3, 64, 64)
    yield "unet", smp.Unet("resnet18", encoder_weights=None, classes=3), torch.randn(2, 3, 64, 64)


@pytest.mark.parametrize("name, model, x", list(_models()), ids=["resnet18", "unet"])
def test_convert_keeps_state_dict_parameters_and_outputs(name, model, x):
    model.train()
    params_before = {k: id(p) for k, p in model.named_parameters()}
    state_before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        expected = model.eval()(x)
    model.train()
    converted = xconv.convert(model, probes=8)
    assert converted is model and model.training
    assert {k: id(p) for k, p in model.named_parameters()} == params_before
    state_after = model.state_dict()
    assert state_after.keys() == state_before.keys()
    assert all(torch.equal(state_after[k], state_before[k]) for k in state_before)
    n_convs = sum(isinstance(m, _XConvMixin) for m in model.modules())
    assert n_convs > 0 and not any(type(m) in (nn.Conv2d, nn.ReLU) for m in model.modules())
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), expected, rtol=0, atol=0)
    model.train()
    xconv.revert(model)
    assert not any(isinstance(m, (_XConvMixin, xconv.BitReLU)) for m in model.modules())
    assert {k: id(p) for k, p in model.named_parameters()} == params_before


def test_converted_training_step_matches_exact_where_exact():
    """Input-side quantities stay exact: the loss and every bias gradient."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 3, padding=1))
    ref = nn.Sequential(*[m for m in model])  # same modules, converted below
    x = torch.randn(2, 3, 16, 16)
    loss_ref = ref(x).square().mean()
    loss_ref.backward()
    bias_grads = [m.bias.grad.clone() for m in ref if isinstance(m, nn.Conv2d)]
    model.zero_grad()
    xconv.convert(model, probes=4)
    loss = model(x).square().mean()
    loss.backward()
    torch.testing.assert_close(loss, loss_ref)
    for got, expected in zip([m.bias.grad for m in model if isinstance(m, _XConvMixin)], bias_grads):
        torch.testing.assert_close(got, expected)


class WeightStandardizedConv(nn.Conv2d):
    def forward(self, x):
        w = (self.weight - self.weight.mean()) / (self.weight.std() + 1e-5)
        return self._conv_forward(x, w, self.bias)


def test_subclass_overriding_forward_is_skipped_loudly():
    model = nn.Sequential(WeightStandardizedConv(3, 4, 3), nn.Conv2d(4, 4, 3))
    with pytest.warns(UserWarning, match=r"0 \(WeightStandardizedConv\)"):
        xconv.convert(model)
    assert type(model[0]) is WeightStandardizedConv and isinstance(model[1], xconv.XConv2d)


@pytest.mark.parametrize("parametrization", ["spectral_norm", "weight_norm"])
def test_parametrized_convs_are_skipped_loudly_and_the_model_still_runs(parametrization):
    """torch generates a parametrized conv's class to compute its weight; replacing the class would
    lose that (the weight attribute vanishes)."""
    conv = getattr(torch.nn.utils.parametrizations, parametrization)(nn.Conv2d(3, 4, 3, padding=1))
    model = nn.Sequential(conv, nn.ReLU(), nn.Conv2d(4, 4, 3))
    x = torch.randn(2, 3, 8, 8)
    model.eval()  # spectral_norm's power iteration moves in train mode
    expected = model(x)
    with pytest.warns(UserWarning, match=r"parametrized convs .*: 0 \(ParametrizedConv2d\)"):
        xconv.convert(model)
    assert model[0] is conv and isinstance(model[2], xconv.XConv2d)
    torch.testing.assert_close(model(x), expected, rtol=0, atol=0)
    model.train()
    model(x).sum().backward()
    assert all(p.grad is not None for p in conv.parameters())
    xconv.revert(model)
    assert model[0] is conv and type(model[2]) is nn.Conv2d


def test_errors_and_warnings_name_the_converted_layer():
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Sequential(nn.BatchNorm2d(4), nn.MaxPool2d(2)))
    xconv.convert(model, probes=4, min_pixels=0, batchnorm_bits=8, maxpool=True)
    x = torch.randn(2, 3, 8, 8, requires_grad=True)
    with pytest.raises(RuntimeError, match=r"^'1.1' \(XMaxPool2d\) does not support double backward"):
        torch.autograd.grad(model(x).sum(), x, create_graph=True)
    model[1][1] = nn.Identity()
    with pytest.raises(RuntimeError, match=r"^'1.0' \(XBatchNorm2d\) does not support double backward .*8-bit SR"):
        torch.autograd.grad(model(x).sum(), x, create_graph=True)
    model[1] = nn.Identity()
    with pytest.raises(RuntimeError, match=r"^'0' \(XConv2d, weight \[4, 3, 3, 3\], mode='independent'\) does not"):
        torch.autograd.grad(model(x).sum(), x, create_graph=True)
    assert "xconv_name" not in xconv.revert(model)[0].__dict__


def test_include_exclude_relu_flag_and_set_probes():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.LeakyReLU(0.1))
    xconv.convert(model, probes=4, relu="exact", exclude=["2"])
    assert isinstance(model[0], xconv.XConv2d) and type(model[2]) is nn.Conv2d
    assert type(model[1]) is nn.ReLU
    xconv.convert(model, probes=4, relu="bit", include=["1", "3"], exclude=None)  # relu and exclude were kept
    assert type(model[1]) is xconv.BitReLU and type(model[3]) is xconv.BitLeakyReLU
    assert model[3].negative_slope == 0.1
    xconv.set_probes(model, 0)
    assert model[0].probes == 0
    xconv.convert(model, probes=2, mode="orthogonal", include=None)  # converting again updates the options
    assert model[0].probes == 2 and model[0].sketch_config.mode == "orthogonal"


def _block():
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(4, 4, 3))


def test_convert_sets_every_option_and_reconvert_keeps_what_it_does_not_name():
    """Every field of ConvertOptions reaches the layers (contraction and per_sample included); converting
    again changes only what the call names; an options object applies all of its values."""
    first = dict(probes=5, mode="independent", distribution="rademacher", per_sample=True, contraction="probes",
                 deflation="dct", deflation_rank=2, bits=8, max_compression=64, min_pixels=4, batchnorm_bits=4,
                 maxpool=True)
    model = xconv.convert(_block(), **first)
    expected = xconv.SketchConfig(**{k: v for k, v in first.items() if k not in ("min_pixels", "batchnorm_bits", "maxpool")})
    for conv in (model[0], model[4]):
        assert conv.sketch_config == expected and conv.min_pixels == 4
    assert (type(model[1]), model[1].bits, type(model[2]), type(model[3])) == (
        xconv.XBatchNorm2d, 4, xconv.BitReLU, xconv.XMaxPool2d)

    xconv.convert(model, probes=7)
    assert model[0].sketch_config == dataclasses.replace(expected, probes=7) and model[0].min_pixels == 4
    assert (type(model[1]), model[1].bits, type(model[3])) == (xconv.XBatchNorm2d, 4, xconv.XMaxPool2d)

    xconv.convert(model, xconv.ConvertOptions(probes=3))  # an object: its defaults apply too
    assert model[0].sketch_config == xconv.SketchConfig(3) and model[0].min_pixels is None
    assert (type(model[1]), type(model[3])) == (nn.BatchNorm2d, nn.MaxPool2d)


def test_reconvert_keeps_relu_include_and_exclude_and_names_change_them():
    model = xconv.convert(_block(), relu="exact", exclude=["4"])
    assert (type(model[0]), type(model[2]), type(model[4])) == (xconv.XConv2d, nn.ReLU, nn.Conv2d)
    xconv.convert(model, probes=2)
    assert (type(model[2]), type(model[4]), model[0].probes) == (nn.ReLU, nn.Conv2d, 2)
    assert model.xconv_options == xconv.ConvertOptions(probes=2, relu="exact", exclude=["4"])
    xconv.convert(model, relu="bit")
    assert type(model[2]) is xconv.BitReLU and type(model[4]) is nn.Conv2d
    xconv.convert(model, relu="exact", exclude=None)  # named: back to torch's ReLU, layer 4 converted
    assert (type(model[2]), type(model[4])) == (nn.ReLU, xconv.XConv2d)
    xconv.revert(model)
    assert not hasattr(model, "xconv_options") and type(model[0]) is nn.Conv2d
    model = xconv.convert(_block(), include=["0"])
    xconv.convert(model, probes=3)
    assert type(model[4]) is nn.Conv2d and model[0].probes == 3


@pytest.mark.parametrize("order", ["submodule first", "parent first"])
def test_a_model_and_its_submodule_converted_apart_keep_each_others_options(order):
    def model():
        return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Sequential(nn.Conv2d(4, 4, 3), nn.ReLU(), nn.BatchNorm2d(4)),
                             nn.Conv2d(4, 4, 3))
    m = model()
    if order == "submodule first":
        xconv.convert(m[2], probes=4, relu="exact", batchnorm_bits=4)
        xconv.convert(m, probes=2)  # names probes only: the submodule's ReLU and BatchNorm stay as its call set them
        assert (type(m[1]), type(m[2][1]), type(m[2][2]), m[2][2].bits) == (xconv.BitReLU, nn.ReLU, xconv.XBatchNorm2d, 4)
        xconv.convert(m[2], probes=6)
        assert (type(m[2][1]), m[2][0].probes, m[0].probes) == (nn.ReLU, 6, 2)
    else:
        xconv.convert(m, probes=4, relu="exact", exclude=["3"])
        xconv.convert(m[2], probes=2)
        assert (type(m[2][1]), m[2][0].probes, m[0].probes) == (nn.ReLU, 2, 4)
        xconv.convert(m, probes=3)  # layer 3 stays excluded, the ReLUs exact
        assert (type(m[1]), type(m[2][1]), type(m[3]), m[2][0].probes) == (nn.ReLU, nn.ReLU, nn.Conv2d, 3)
    xconv.revert(m)
    assert not any(hasattr(module, "xconv_options") or hasattr(module, "xconv_selected") for module in m.modules())


def test_refused_reconvert_leaves_every_layer_as_it_was():
    model = xconv.convert(_block(), probes=8, deflation="pca", deflation_rank=4, batchnorm_bits=4)
    with pytest.raises(ValueError, match=r"deflation_rank must be in 1 .. probes - 1 = 1, got 4"):
        xconv.convert(model, probes=2, batchnorm_bits=8, maxpool=True)
    assert (model[1].bits, type(model[3]), model[0].probes, model[4].probes) == (4, nn.MaxPool2d, 8, 8)
    assert model.xconv_options.batchnorm_bits == 4


def test_options_are_one_typed_object_from_layer_to_convert():
    options = xconv.ConvertOptions(probes=4, mode="gaussian", contraction="decompress", include="0")
    assert (options.mode, options.include) == ("multi", ["0"])  # the alias and one pattern, made canonical
    assert options.sketch == xconv.SketchConfig(4, mode="multi", contraction="decompress")
    assert xconv.ConvertOptions(**options.to_dict()) == options
    assert xconv.XConv2d(3, 4, 3, sketch=options.sketch).sketch_config == options.sketch
    with pytest.raises(TypeError, match=r"^give the estimator options as sketch=SketchConfig\(...\) or by name, not both"):
        xconv.XConv2d(3, 4, 3, sketch=options.sketch, distribution="rademacher")
    assert xconv.XConv2d(3, 4, 3).sketch_config == xconv.SketchConfig(8)
    model = xconv.convert(_block(), options)
    assert isinstance(model[0], xconv.XConv2d) and type(model[4]) is nn.Conv2d
    assert model[0].sketch_config == options.sketch


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(relu=True), ValueError, r"^relu must be one of \('bit', 'exact'\), got True$"),
    (dict(relu=None), ValueError, r"^relu must be one of \('bit', 'exact'\), got None$"),
    (dict(mode="bogus"), ValueError, r"^mode must be one of \('independent', 'multi', 'orthogonal', 'gaussian'\)"),
    (dict(contraction="fast"), ValueError, r"^contraction must be one of \('auto', 'probes', 'decompress'\)"),
    (dict(include=[""]), ValueError, r"^include must be None, a module-name pattern or a list of them"),
    (dict(batchnorm_bits=3), ValueError, r"^batchnorm_bits must be"),
    (dict(maxpool="yes"), TypeError, r"^maxpool must be a bool"),
    (dict(min_pixels=-1), ValueError, r"^min_pixels must be None or an int >= 0"),
    (dict(probes=-1), ValueError, r"^probes must be >= 0"),
    (dict(storage="quantized"), TypeError, r"^bits must be one of 2, 4, 8, 16; got None"),
])
def test_bad_options_are_refused_in_one_line_naming_the_option(kwargs, error, message):
    with pytest.raises(error, match=message) as raised:
        xconv.ConvertOptions(**kwargs)
    assert "\n" not in str(raised.value)
    model = _block()
    with pytest.raises(error, match=message):
        xconv.convert(model, **kwargs)
    assert type(model[0]) is nn.Conv2d  # refused before anything was replaced


def test_unknown_options_and_a_positional_probe_count_are_refused():
    with pytest.raises(TypeError, match=r"^prbes: no such option; the options of xconv.convert: probes, mode"):
        xconv.convert(_block(), prbes=4)
    with pytest.raises(TypeError, match=r"^options must be a ConvertOptions or None, got 8"):
        xconv.convert(_block(), 8)


def test_reconverting_into_an_impossible_combination_is_refused_and_changes_nothing():
    model = xconv.convert(_block(), per_sample=True)
    with pytest.raises(ValueError, match=r"^per_sample=True needs mode='independent', got mode='multi'"):
        xconv.convert(model, mode="multi")
    assert model[0].sketch_config.mode == "independent" and model[4].sketch_config.mode == "independent"


def test_include_that_selects_nothing_raises_before_replacing():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())
    with pytest.raises(ValueError, match=r"include: no conv or ReLU matches \['conv\*'\]; the model's convs: 0"):
        xconv.convert(model, include="conv*")
    with pytest.raises(ValueError, match=r"include: no conv matches \['1'\]"):
        xconv.convert(model, include="1", relu="exact")
    with pytest.raises(ValueError, match=r"exclude: no module matches \['head'\]; the model's convs: 0"):
        xconv.convert(model, exclude=["0", "head"])
    assert type(model[0]) is nn.Conv2d and type(model[1]) is nn.ReLU


def test_convert_transposed_and_a_bare_conv():
    layer = xconv.convert(nn.ConvTranspose2d(4, 2, 4, stride=2, padding=1), probes=2, mode="orthogonal")
    assert isinstance(layer, xconv.XConvTranspose2d) and layer.sketch_config.mode == "orthogonal"


def test_convert_rejects_bad_options_before_touching_the_model():
    model = nn.Sequential(nn.Conv2d(3, 4, 3))
    with pytest.raises(ValueError, match="mode must be one of"):
        xconv.convert(model, mode="fast")
    assert type(model[0]) is nn.Conv2d


def test_include_exclude_accept_one_pattern_as_a_string():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Conv2d(4, 4, 3))
    xconv.convert(model, include="0", relu="exact")
    assert isinstance(model[0], xconv.XConv2d) and type(model[1]) is nn.Conv2d
    xconv.convert(model, include=None, exclude="0", relu="exact")
    assert isinstance(model[1], xconv.XConv2d)


def test_set_probes_validates_even_without_xconv_layers():
    with pytest.raises(ValueError, match="probes must be >= 0"):
        xconv.set_probes(nn.Sequential(nn.Conv2d(3, 4, 3)), -1)


def test_batchnorm_and_maxpool_storage_convert_and_revert():
    torch.manual_seed(0)
    plain = torchvision.models.resnet18(num_classes=5)
    model = xconv.convert(copy.deepcopy(plain), storage="quantized", bits=8, batchnorm_bits=4, maxpool=True)
    assert isinstance(model.bn1, xconv.XBatchNorm2d) and model.bn1.bits == 4
    assert isinstance(model.maxpool, xconv.XMaxPool2d)
    assert model.state_dict().keys() == plain.state_dict().keys()
    x = torch.randn(2, 3, 32, 32)
    for mode in ("train", "eval"):
        getattr(model, mode)(), getattr(plain, mode)()
        assert torch.equal(model(x.requires_grad_()), plain(x))
    for key, value in plain.state_dict().items():  # running statistics updated alike
        assert torch.equal(model.state_dict()[key], value), key
    xconv.convert(model, batchnorm_bits=None, maxpool=False)
    assert type(model.bn1) is nn.BatchNorm2d and type(model.maxpool) is nn.MaxPool2d
    xconv.convert(model, batchnorm_bits=8, maxpool=True)
    xconv.revert(model)
    assert {type(m) for m in model.modules()} == {type(m) for m in plain.modules()}
    assert not hasattr(model.bn1, "bits")


@pytest.mark.parametrize("kwargs, message", [
    (dict(batchnorm_bits=3), "batchnorm_bits must be one of None, 2, 4, 8, 16"),
    (dict(maxpool="yes"), "maxpool must be a bool"),
])
def test_bad_batchnorm_and_maxpool_options(kwargs, message):
    with pytest.raises((TypeError, ValueError), match=message):
        xconv.convert(nn.Sequential(nn.Conv2d(1, 1, 1)), **kwargs)


def _identities(model):
    """``name -> id`` of every module under all its names (sharing included)."""
    return {name: id(m) for name, m in model.named_modules(remove_duplicate=False)}


def _same_sharing(a, b) -> bool:
    """Whether two models have modules shared between the same names."""
    ids_a, ids_b = _identities(a), _identities(b)
    return ids_a.keys() == ids_b.keys() and all(
        (ids_a[n] == ids_a[m]) == (ids_b[n] == ids_b[m]) for n in ids_a for m in ids_a)


def test_a_module_used_twice_is_converted_at_both_places_and_stays_shared():
    conv, relu = nn.Conv2d(4, 4, 3, padding=1), nn.ReLU()
    model = nn.Sequential(conv, relu, conv, relu)
    plain = copy.deepcopy(model)  # deepcopy keeps the sharing
    keys, params = list(model.state_dict()), {k: id(p) for k, p in model.named_parameters()}
    xconv.convert(model)
    assert type(model[0]) is xconv.XConv2d and model[2] is model[0]
    assert type(model[1]) is xconv.BitReLU and model[3] is model[1]
    assert _same_sharing(model, plain)
    assert list(model.state_dict()) == keys and {k: id(p) for k, p in model.named_parameters()} == params
    x = torch.randn(2, 4, 8, 8, requires_grad=True)
    assert torch.equal(model(x), plain(x))
    xconv.revert(model)
    assert type(model[0]) is nn.Conv2d and model[2] is model[0]
    assert type(model[1]) is nn.ReLU and model[3] is model[1]
    assert list(model.state_dict()) == keys


def test_modules_shared_between_two_parents_and_a_shared_block():
    conv, bn, pool = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4), nn.MaxPool2d(2)
    block = nn.Sequential(nn.Conv2d(4, 4, 1), nn.LeakyReLU(0.1))  # a container reached as "a.4" and "b.4"
    model = nn.Sequential(OrderedDict(
        a=nn.Sequential(conv, bn, nn.ReLU(), pool, block), b=nn.Sequential(conv, bn, nn.ReLU(), pool, block)))
    plain = copy.deepcopy(model)
    keys = list(model.state_dict())
    xconv.convert(model, batchnorm_bits=8, maxpool=True)
    for i, cls in enumerate((xconv.XConv2d, xconv.XBatchNorm2d, xconv.BitReLU, xconv.XMaxPool2d)):
        assert type(model.a[i]) is cls and type(model.b[i]) is cls, i
    assert model.a[2] is not model.b[2]  # two ReLU objects stay two
    assert type(model.a[4][0]) is xconv.XConv2d and type(model.a[4][1]) is xconv.BitLeakyReLU
    assert _same_sharing(model, plain) and list(model.state_dict()) == keys
    x = torch.randn(2, 4, 16, 16, requires_grad=True)
    assert torch.equal(model(x), plain(x))
    xconv.convert(model, batchnorm_bits=None, maxpool=False)  # back to torch's BatchNorm and max-pool, still shared
    assert type(model.a[1]) is nn.BatchNorm2d and type(model.a[3]) is nn.MaxPool2d
    xconv.revert(model)
    assert _same_sharing(model, plain) and list(model.state_dict()) == keys
    assert [type(m) for m in model.modules()] == [type(m) for m in plain.modules()]


@pytest.mark.parametrize("selection", [dict(exclude="2"), dict(include="2"), dict(include=["1", "2"])])
def test_a_shared_module_is_converted_only_if_all_its_names_are_selected(selection):
    conv = nn.Conv2d(4, 4, 3, padding=1)
    model = nn.Sequential(conv, nn.ReLU(), conv)
    with pytest.warns(UserWarning, match=r"select only some of their names: 0 / 2"):
        xconv.convert(model, **selection)
    assert type(model[0]) is nn.Conv2d and model[2] is model[0]
    xconv.convert(model, include=["0", "2"], exclude=None)
    assert type(model[0]) is xconv.XConv2d and model[2] is model[0]


class FunctionalReLUBlock(nn.Module):
    """A conv followed by ``F.relu`` in ``forward``, as torchvision's GoogLeNet/Inception blocks do."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)

    def forward(self, x):
        return F.relu(self.conv(x))


def test_saved_bytes_report_names_what_convert_cannot_reach():
    model = xconv.convert(nn.Sequential(FunctionalReLUBlock(), nn.Conv2d(8, 4, 3, padding=1), nn.ReLU(),
                                        nn.BatchNorm2d(4)), probes=4)
    report = saved_tensor_bytes(lambda: model(torch.randn(2, 3, 16, 16)).square().sum(), model=model)
    relu_output, loss_input = 2 * 8 * 16 * 16 * 4, 2 * 4 * 16 * 16 * 4  # fp32 [2, 8, 16, 16] and [2, 4, 16, 16]
    assert report.by_module["0"] == relu_output and report.by_module["<outside>"] == loss_input
    assert report.status["0"] == "unconvertible" and report.holder["0"] == "FunctionalReLUBlock ops in forward"
    assert report.status["0.conv"] == report.status["1"] == report.status["2"] == "converted"
    assert report.status["3"] == "convertible"  # a BatchNorm without batchnorm_bits
    by_status = report.bytes_by_status()
    assert by_status["unconvertible"] == relu_output + loss_input and sum(by_status.values()) == report.total_bytes
    assert by_status["convertible"] == report.by_module["3"] > loss_input  # the BatchNorm input and statistics
    assert [row[0] for row in report.unconverted()] == ["0", "3", "<outside>"]
    assert f"FunctionalReLUBlock ops in forward (unconvertible): {relu_output / 2**20:.2f} MiB" in report.summary()
    with pytest.raises(ValueError, match="model=model"):
        saved_tensor_bytes(lambda: model(torch.randn(2, 3, 16, 16)).sum()).summary()
