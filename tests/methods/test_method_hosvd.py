"""HOSVD / SVD as methods of the pass: planned (Last(n), names, mixed with Facto), rewritten,
trained against dense autograd, reported (worst case on meta), compiled and exported."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import facto_fx
from facto_fx import HOSVD, SVD, Last
from facto_fx.layers import HOSVDConv2d, HOSVDLinear


class Small(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1, groups=2)
        self.c3 = nn.Conv2d(8, 16, 3, stride=2, padding=(1, 0), dilation=(1, 2))
        self.proj = nn.Conv2d(16, 16, 1)
        self.fc = nn.Linear(16 * 4 * 3, 5)

    def forward(self, x):
        x = F.relu(self.c1(x))
        x = F.relu(self.c2(x))
        x = F.max_pool2d(F.relu(self.c3(x)), 2)
        x = F.conv2d(x, self.proj.weight, self.proj.bias)  # functional: rewritten through call_args
        return self.fc(torch.flatten(x, 1))


def _pair():
    torch.manual_seed(0)
    model = Small()
    return model, copy.deepcopy(model)


def test_last_n_counts_convs_from_the_output_on_resnet18():
    model = torchvision.models.resnet18(num_classes=10)
    fmodel = facto_fx.compile(model, apply_ratio=0.0, methods={Last(4): HOSVD(0.8)}, verify=False)
    chosen = [d.layer for d in facto_fx.decisions(fmodel) if isinstance(d.method, HOSVD)]
    assert chosen == ["layer4.0.conv2", "layer4.0.downsample.0", "layer4.1.conv1", "layer4.1.conv2"]
    assert all(isinstance(fmodel.get_submodule(n), HOSVDConv2d) for n in chosen)


@pytest.mark.parametrize("method", [HOSVD(1.0), SVD(1.0)])
def test_lossless_eps_trains_exactly_like_dense_autograd(method):
    """At eps = 1 every gradient (weights of every form, biases, input) equals dense autograd's."""
    model, reference = _pair()
    fmodel = facto_fx.compile(model, apply_ratio=0.0, methods={"c*": method, "proj": method, "fc": method})
    assert isinstance(fmodel.get_submodule("fc"), HOSVDLinear)
    x = torch.randn(3, 3, 16, 16, dtype=torch.float64, requires_grad=True)
    fmodel.double(), reference.double()
    x_ref = x.detach().clone().requires_grad_(True)
    fmodel(x).square().sum().backward()
    reference(x_ref).square().sum().backward()
    fparams = dict(fmodel.named_parameters())
    for name, param in reference.named_parameters():
        torch.testing.assert_close(fparams[name].grad, param.grad, rtol=1e-8, atol=1e-10, msg=name)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-8, atol=1e-10)


def test_mixed_with_facto_and_exported():
    """Facto on the front by apply_ratio, HOSVD on the back by Last(n); a step, then a dense export."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.Flatten(),
        nn.Linear(8 * 8 * 8, 5),
    )
    fresh = copy.deepcopy(model)
    fmodel = facto_fx.compile(model, apply_ratio=1.0, methods={Last(2): HOSVD(0.9)})
    labels = {d.layer: d.method and d.method.label for d in facto_fx.decisions(fmodel)}
    assert [labels[n] for n in ("0", "2", "4", "6", "8")] == [None, "facto", "hosvd", "hosvd", "facto"]
    optimizer = torch.optim.SGD(fmodel.parameters(), lr=0.1)
    facto_fx.attach(fmodel, optimizer, merge_every=1)
    x = torch.randn(4, 3, 16, 16)
    before = fmodel.get_submodule("4").weight.detach().clone()
    F.cross_entropy(fmodel(x), torch.tensor([0, 1, 2, 3])).backward()
    optimizer.step()  # and a merge of the Facto layers
    assert not torch.equal(fmodel.get_submodule("4").weight, before)  # HOSVD trains W itself
    fresh.load_state_dict(facto_fx.export_dense(fmodel).state_dict())
    torch.testing.assert_close(fresh(x), fmodel(x), rtol=1e-4, atol=1e-5)


def test_analytic_report_gives_the_full_rank_worst_case():
    """The paper's inputs of resnet18's last 2 convs at batch 64, 224²: 6.125 MiB each, plus factors and the
    fp32 scale."""
    model = torchvision.models.resnet18().to("meta")
    fmodel = facto_fx.compile(model, apply_ratio=0.0, methods={Last(2): HOSVD(0.8)}, verify=False)
    x = torch.empty(64, 3, 224, 224, device="meta")
    rows = {r.layer: r for r in facto_fx.report(fmodel, x, analytic=True).rows}
    full = 64 * 512 * 7 * 7 + 64 * 64 + 512 * 512 + 7 * 7 + 7 * 7
    assert rows["layer4.1.conv2"].facto_own_bytes == full * 4 + 4
    assert rows["layer4.1.conv2"].decision == "hosvd"


@pytest.mark.parametrize("mode", ["hosvd", "svd"])
@pytest.mark.parametrize("shape", [(2, 8, 1, 1), (3, 8, 5, 4), (1, 6, 2, 2), (4, 3, 9, 9), (2, 5, 3, 1)])
def test_analytic_worst_case_is_what_a_full_rank_run_keeps(shape, mode):
    """Keeping every direction of a random input (eps 1.0), a real run saves exactly the analytic
    worst case: a mode's rank is capped by the product of the other modes' sizes (a batch of 2 of 1×1
    maps keeps 2 channel directions, not 8), which the estimate once ignored (a false
    FactoSavesLittleWarning for HOSVD on small maps)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(shape[1], shape[1], 1), nn.Conv2d(shape[1], 2, 1))
    method = HOSVD(1.0) if mode == "hosvd" else SVD(1.0)
    fmodel = facto_fx.compile(model, apply_ratio=0.0, methods={"1": method}, verify=False)
    x = torch.randn(shape)
    real = {r.layer: r for r in facto_fx.report(fmodel, x).rows}["1"].facto_own_bytes
    analytic = {r.layer: r for r in facto_fx.report(fmodel, x.to("meta"), analytic=True).rows}["1"].facto_own_bytes
    assert real == analytic


def test_real_report_counts_the_kept_codes():
    model, _ = _pair()
    fmodel = facto_fx.compile(model, apply_ratio=0.0, methods={"c3": HOSVD(0.5)})
    x = torch.randn(8, 3, 16, 16)
    row = {r.layer: r for r in facto_fx.report(fmodel, x).rows}["c3"]
    assert 0 < row.facto_own_bytes < 8 * 8 * 16 * 16 * 4  # less than the input it replaces


def test_frozen_weights_are_refused():
    model, _ = _pair()
    model.c3.weight.requires_grad_(False)
    with pytest.raises(ValueError, match="HOSVD refuses 'c3'.*frozen"):
        facto_fx.compile(model, methods={"c3": HOSVD()})


def test_eps_is_validated():
    for bad in (0, 1.5, "0.8", True):
        with pytest.raises(ValueError, match=r"eps must be a number in \(0, 1\]"):
            HOSVD(bad)


def test_torch_compile_fullgraph_matches_eager():
    model, _ = _pair()
    fmodel = facto_fx.compile(model, apply_ratio=0.0, methods={Last(2): HOSVD(0.9), "fc": SVD(0.9)}, store_bits=None)
    x = torch.randn(4, 3, 16, 16)
    compiled = torch.compile(fmodel, fullgraph=True, backend="aot_eager")
    eager_params = {n: p for n, p in fmodel.named_parameters()}
    out = compiled(x)
    out.square().sum().backward()
    grads = {n: p.grad.clone() for n, p in eager_params.items() if p.grad is not None}
    fmodel.zero_grad()
    expected = fmodel(x)
    expected.square().sum().backward()
    torch.testing.assert_close(out, expected)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, eager_params[name].grad, rtol=1e-4, atol=1e-5, msg=name)


def _chain():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                         nn.Flatten(), nn.Linear(8 * 8 * 8, 5))


def test_the_facto_backend_gives_the_fx_pass_gradients():
    """Data-dependent ranks under backend="facto" need dynamo to capture dynamic output shapes."""
    options = {"apply_ratio": 0.0, "methods": {Last(1): HOSVD(0.5)}}
    fx_model, dynamo_model, dense = _chain(), _chain(), _chain()
    x = torch.randn(4, 3, 8, 8)
    fmodel = facto_fx.compile(fx_model, **options)
    fmodel(x).sum().backward()
    torch._dynamo.reset()
    with torch._dynamo.config.patch(capture_dynamic_output_shape_ops=True):
        torch.compile(dynamo_model, backend="facto", options=options)(x).sum().backward()
    dense(x).sum().backward()
    torch.testing.assert_close(dynamo_model[2].weight.grad, fmodel.get_submodule("2").weight.grad)
    assert not torch.allclose(dynamo_model[2].weight.grad, dense[2].weight.grad)  # eps 0.5: not the dense one
    torch._dynamo.reset()
    with pytest.raises(Exception, match="capture_dynamic_output_shape_ops = True"):
        torch.compile(_chain(), backend="facto", options=options)(x)


def test_rank_table_lists_every_decomposed_layer_and_its_eps():
    """Kept energy is measured against the input itself: at least eps for every mode at every eps."""
    model, _ = _pair()
    fmodel = facto_fx.compile(model, apply_ratio=0.0, methods={"c3": HOSVD(0.85), "fc": SVD(0.9)})
    x = torch.randn(6, 3, 16, 16)
    table = facto_fx.rank_table(fmodel, x, eps=(0.5, 0.99))
    assert [row.layer for row in table.rows] == ["c3", "fc"]
    c3, fc = table.rows
    assert c3.shape == (6, 8, 16, 16) and fc.shape == (6, 16 * 4 * 3)
    assert sorted(c3.ranks) == [0.5, 0.85, 0.99] and sorted(fc.ranks) == [0.5, 0.9, 0.99]
    for row in table.rows:
        for eps, kept in row.kept.items():
            assert all(k >= eps - 1e-6 for k in kept)
            assert all(1 <= r <= size for r, size in zip(row.ranks[eps], row.shape, strict=False))
        assert all(a <= b for a, b in zip(row.ranks[0.5], row.ranks[0.99], strict=True))  # more eps, more rank
    assert "c3 (hosvd, input 6x8x16x16)" in str(table)


def test_real_reports_name_the_ranks_each_layer_kept():
    model, _ = _pair()
    fmodel = facto_fx.compile(model, apply_ratio=0.0, methods={"c3": HOSVD(0.5)}, store_bits=None)
    x = torch.randn(8, 3, 16, 16)
    report = facto_fx.report(fmodel, x)
    expected = "x".join(map(str, facto_fx.rank_table(fmodel, x, eps=(0.5,)).rows[0].ranks[0.5]))
    assert report.notes == {"c3": f"hosvd eps 0.5: ranks {expected} of 8x8x16x16"}
    assert f"c3: hosvd eps 0.5: ranks {expected}" in str(report)
    assert "full-rank worst case" in facto_fx.report(fmodel, x, analytic=True).notes["c3"]
