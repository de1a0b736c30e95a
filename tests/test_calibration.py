"""recalibrate_batch_norm and compile's calibration_data: the statistics become the plain average
of the batches' own statistics (recomputed here from the layers' inputs), nothing else changes."""

import copy
import warnings

import pytest
import torch
from torch import nn

import facto_fx


def net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 5, 3), nn.BatchNorm2d(5))


def batches(n=3, size=4):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(size, 3, 10, 10, generator=g) * 2 + 1, torch.zeros(size)) for _ in range(n)]


def expected_statistics(model: nn.Module, data) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Each batch-norm's input, batch by batch, through a copy whose statistics are not used
    (train mode: each layer normalises with its batch's own statistics)."""
    reference = copy.deepcopy(model).train()
    seen = {i: [] for i, m in enumerate(reference) if isinstance(m, nn.BatchNorm2d)}
    for i in seen:
        reference[i].register_forward_pre_hook(lambda _m, args, i=i: seen[i].append(args[0].detach()))
    with torch.no_grad():
        for x, _ in data:
            reference(x)
    return [(torch.stack([x.mean((0, 2, 3)) for x in inputs]).mean(0),
             torch.stack([x.var((0, 2, 3), unbiased=True) for x in inputs]).mean(0)) for inputs in seen.values()]


def test_statistics_become_the_average_over_the_batches():
    model = net().eval()
    momenta = [m.momentum for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    weights = [p.clone() for p in model.parameters()]
    expected = expected_statistics(model, batches())
    assert facto_fx.recalibrate_batch_norm(model, batches(), progress=False) == 3
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    for m, (mean, var) in zip(norms, expected, strict=True):
        torch.testing.assert_close(m.running_mean, mean)
        torch.testing.assert_close(m.running_var, var)
    assert not model.training and [m.momentum for m in norms] == momenta
    assert all(torch.equal(p, w) and p.grad is None for p, w in zip(model.parameters(), weights, strict=True))


def test_no_batches_is_an_error_and_changes_nothing():
    model = net()
    with torch.no_grad():
        model[1].running_mean.fill_(3.0)
    with pytest.raises(ValueError, match="no batches"):
        facto_fx.recalibrate_batch_norm(model, [], progress=False)
    assert torch.equal(model[1].running_mean, torch.full((4,), 3.0))


def test_compile_recalibrates_on_calibration_data():
    model = net()
    expected = expected_statistics(model, batches())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # estimated statistics: nothing to warn about
        fmodel = facto_fx.compile(model, calibration_data=batches(), apply_ratio=1.0)
    torch.testing.assert_close(model[1].running_mean, expected[0][0])
    frozen = [b for name, b in fmodel.named_buffers() if name.endswith("running_var")]
    torch.testing.assert_close(frozen[0], expected[0][1])


def test_compile_warns_about_statistics_never_estimated():
    with pytest.warns(UserWarning, match=r"never estimated \(1, 4: mean 0, variance 1\).*recalibrate_batch_norm"):
        facto_fx.compile(net(), batch_norm="freeze")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        facto_fx.compile(net())  # the default, batch statistics: nothing is frozen
        facto_fx.compile(net(), batch_norm="train")
        facto_fx.compile(net().to("meta"), verify=False, batch_norm="freeze")  # no values to judge


def test_a_single_tensor_is_one_calibration_batch():
    x = batches(n=1)[0][0]
    model = net()
    expected = expected_statistics(model, [(x, None)])
    facto_fx.compile(model, calibration_data=x)
    torch.testing.assert_close(model[1].running_mean, expected[0][0])
    torch.testing.assert_close(model[1].running_var, expected[0][1])


def test_calibration_shows_no_progress_bar_unless_asked(capfd):
    facto_fx.compile(net(), calibration_data=batches())
    facto_fx.recalibrate_batch_norm(net(), batches())
    assert capfd.readouterr().err == ""
    facto_fx.recalibrate_batch_norm(net(), batches(), progress=True)
    assert "recalibrating batch-norm" in capfd.readouterr().err
