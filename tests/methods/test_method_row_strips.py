"""RowStrips as a method of the pass: validated config, the model's names and statistics left as
they are, batch statistics kept outside strips, Facto trained inside them, reported, on the CLI,
and a lower peak than vanilla (measured from the allocator's events)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import facto_fx
from facto_fx import RowStrips
from facto_fx.cli import main as cli_main
from facto_fx.memory import peak_training_bytes


class Net(nn.Module):
    def __init__(self, batch_norm: bool = True) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 16, 3, padding=1)
        self.c2 = nn.Conv2d(16, 16, 3, padding=1)
        self.c3 = nn.Conv2d(16, 32, 3, stride=2, padding=1)
        self.bn = nn.BatchNorm2d(32) if batch_norm else nn.Identity()
        self.fc = nn.Linear(32, 10)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.c2(F.relu(self.c1(x)))), 2)
        x = F.relu(self.bn(self.c3(x)))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


@pytest.mark.parametrize("options,message", [
    ({"strips": 1}, "integer >= 2"),
    ({"strips": 2.0}, "integer >= 2"),
    ({"mode": "rows"}, "one of ('two_phase', 'overlap')"),
    ({"max_overhead": 0}, "number > 0"),
])
def test_bad_configs_name_the_argument(options, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        RowStrips(**options)
    with pytest.raises(ValueError, match="row_strips must be RowStrips"):
        facto_fx.FactoConfig(row_strips="overlap")


def test_names_state_dict_and_export_are_the_models_own():
    torch.manual_seed(0)
    model = Net(batch_norm=False)
    plain = facto_fx.compile(model, apply_ratio=0.0)
    split = facto_fx.compile(model, apply_ratio=0.0, row_strips=RowStrips(3))
    assert [n for n, _ in split.named_parameters()] == [n for n, _ in plain.named_parameters()]
    assert list(split.state_dict()) == list(plain.state_dict())
    assert set(facto_fx.export_dense(split).state_dict()) == set(model.state_dict())
    x = torch.randn(2, 3, 30, 26)
    twin = copy.deepcopy(split)
    assert twin.c1 is not split.c1 and torch.equal(twin(x), split(x))
    twin.c1.weight.data.add_(1.0)  # the copy's strips run the copy's layers
    assert not torch.equal(twin(x), split(x))


def test_batch_statistics_stay_outside_strips_and_update_once_per_step():
    torch.manual_seed(0)
    model = Net()
    reference = copy.deepcopy(model)
    split = facto_fx.compile(model, apply_ratio=0.0, batch_norm="train", row_strips=RowStrips(4))
    region = split.row_strips
    assert "c3" in region.geometry and "bn" not in region.geometry
    assert "BatchNorm2d" in split.meta["facto"].region_notes["row_strips"]
    x = torch.randn(4, 3, 32, 32)
    split.train(), reference.train()
    torch.testing.assert_close(split(x), reference(x), rtol=1e-5, atol=1e-6)
    split(x).sum().backward()
    reference(x).sum().backward()
    assert model.bn.num_batches_tracked.item() == reference.bn.num_batches_tracked.item() == 2
    torch.testing.assert_close(model.bn.running_mean, reference.bn.running_mean)
    torch.testing.assert_close(model.bn.running_var, reference.bn.running_var)


def test_facto_inside_strips_trains_merges_and_exports():
    torch.manual_seed(0)
    fmodel = facto_fx.compile(Net(batch_norm=False), apply_ratio=1.0, row_strips=RowStrips(2, "two_phase"))
    low_rank = [p for p in fmodel.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(low_rank, lr=0.05, momentum=0.9)
    facto_fx.attach(fmodel, optimizer, merge_every=2)
    x, y = torch.randn(8, 3, 20, 20), torch.randint(0, 10, (8,))
    for _ in range(3):
        optimizer.zero_grad()
        F.cross_entropy(fmodel(x), y).backward()
        optimizer.step()
    dense = facto_fx.export_dense(fmodel).eval()
    torch.testing.assert_close(dense(x), fmodel.eval()(x), rtol=1e-4, atol=1e-5)


class Dilated(nn.Module):
    """Facto convs of stride 2 and dilation 2, an odd kernel's padding, and a residual add."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 8, 3, padding=2, dilation=2)
        self.c3 = nn.Conv2d(8, 12, 5, stride=2, padding=2)
        self.c4 = nn.Conv2d(12, 12, 3, padding=1)
        self.fc = nn.Linear(12, 4)

    def forward(self, x):
        x = F.relu(self.c1(x))
        x = F.relu(self.c2(x)) + x
        x = F.relu(self.c3(x))
        x = F.relu(self.c4(x))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


@pytest.mark.parametrize("lossy_kernel", [2, 3])
@pytest.mark.parametrize(("rows", "strips", "mode"), [
    (40, 2, "two_phase"), (41, 3, "two_phase"), (37, 3, "overlap"), (40, 4, "overlap"), (23, 5, "two_phase"),
])
def test_facto_inside_strips_trains_on_the_unsplit_layers_gradients(rows, strips, mode, lossy_kernel):
    """A Facto conv pools its saved projection in k×k tiles; strips compute whole tiles on the
    rows the layer reads (no rows from a slice's own padding), so M's gradient, and every other,
    is the unsplit Facto model's whatever the strip boundaries (float64, to rounding)."""
    torch.manual_seed(0)
    model = Dilated().double()
    x = torch.randn(2, 3, rows, 19, dtype=torch.float64)
    options = {"apply_ratio": 1.0, "lossy_kernel": lossy_kernel, "example_inputs": (x,)}
    whole = facto_fx.compile(copy.deepcopy(model), **options)
    split = facto_fx.compile(copy.deepcopy(model), row_strips=RowStrips(strips, mode, max_overhead=4.0), **options)
    split.load_state_dict(whole.state_dict())
    assert {"c2", "c3", "c4"} <= set(split.row_strips.geometry)
    torch.testing.assert_close(split(x), whole(x), rtol=1e-10, atol=1e-12)
    whole(x).square().sum().backward()
    split(x).square().sum().backward()
    grads = {name: p.grad for name, p in whole.named_parameters() if p.grad is not None}
    assert {"c2.M", "c3.M", "c4.M"} <= set(grads)
    for name, p in split.named_parameters():
        torch.testing.assert_close(p.grad, grads.get(name), rtol=1e-10, atol=1e-12, msg=name)


class Pooled(nn.Module):
    """Every op that saves a map mean-pooled by the lossy kernel: Facto convs (stride 2, dilation 2,
    5×5), frozen batch-norm as modules and as a functional call, and a scale, with a residual."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.c2, self.b2 = nn.Conv2d(8, 8, 3, padding=2, dilation=2), nn.BatchNorm2d(8)
        self.s = nn.Parameter(torch.tensor(1.5))
        self.c3 = nn.Conv2d(8, 12, 5, stride=2, padding=2)
        self.gamma, self.beta = nn.Parameter(torch.rand(12) + 0.5), nn.Parameter(torch.randn(12))
        self.register_buffer("mean", torch.randn(12))
        self.register_buffer("var", torch.rand(12) + 0.5)
        self.c4, self.b4 = nn.Conv2d(12, 12, 3, padding=1), nn.BatchNorm2d(12)
        self.fc = nn.Linear(12, 4)
        for bn in (self.b1, self.b2, self.b4):  # statistics and affine terms away from the identity
            bn.running_mean.normal_(), bn.running_var.uniform_(0.5, 1.5)
            nn.init.uniform_(bn.weight, 0.5, 1.5), nn.init.normal_(bn.bias)

    def forward(self, x):
        x = F.relu(self.b1(self.c1(x)))
        x = F.relu(self.b2(self.c2(x))) + x * self.s
        x = F.relu(F.batch_norm(self.c3(x), self.mean, self.var, self.gamma, self.beta, False))
        x = F.max_pool2d(x, 3, 1, 1)
        x = F.relu(self.b4(self.c4(x)))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


@pytest.mark.parametrize(("rows", "width", "strips", "mode", "lossy_kernel"), [
    (41, 19, 2, "two_phase", 2), (40, 17, 3, "overlap", 2), (37, 21, 4, "two_phase", 3),
    (45, 16, 5, "overlap", 3), (23, 9, 3, "two_phase", 2),
])
def test_every_op_saving_a_pooled_map_trains_on_the_unsplit_gradient(rows, width, strips, mode, lossy_kernel):
    """Frozen batch-norm (its γ) and scale (its s) train from their input mean-pooled in k×k tiles,
    as a Facto conv's M does: strips compute whole tiles of each, so every gradient is the unsplit
    Facto model's (float64, to rounding), with M away from zero. The pooled maps are kept uncoded
    (store_bits=None): codes drawn per strip would round them apart from the whole map's."""
    torch.manual_seed(0)
    model = Pooled().double()
    x = torch.randn(2, 3, rows, width, dtype=torch.float64)
    options = {"apply_ratio": 1.0, "lossy_kernel": lossy_kernel, "example_inputs": (x,), "batch_norm": "freeze",
               "store_bits": None}
    whole = facto_fx.compile(copy.deepcopy(model), **options)
    split = facto_fx.compile(copy.deepcopy(model), row_strips=RowStrips(strips, mode, max_overhead=4.0), **options)
    with torch.no_grad():
        for name, p in whole.named_parameters():
            if name.endswith(".M"):
                p.normal_(std=1e-2)
    split.load_state_dict(whole.state_dict())
    pooled = {n for n, g in split.row_strips.geometry.items() if g.tile == lossy_kernel}
    assert {"b1", "c2", "b2", "mul", "c3", "batch_norm", "c4", "b4"} <= pooled
    torch.testing.assert_close(split(x), whole(x), rtol=1e-10, atol=1e-12)
    whole(x).square().sum().backward()
    split(x).square().sum().backward()
    grads = {name: p.grad for name, p in whole.named_parameters() if p.grad is not None}
    assert {"b1.weight", "b2.weight", "s", "gamma", "b4.weight", "c2.M"} <= set(grads)
    for name, p in split.named_parameters():
        torch.testing.assert_close(p.grad, grads.get(name), rtol=1e-10, atol=1e-12, msg=name)


def test_report_labels_the_region_and_its_layers():
    torch.manual_seed(0)
    fmodel = facto_fx.compile(Net(batch_norm=False), apply_ratio=0.0, row_strips=RowStrips(2))
    table = facto_fx.report(fmodel, torch.randn(2, 3, 32, 32), peak=True)
    labels = {r.layer: r.decision for r in table.rows}
    assert labels["c1"] == "rowstrips" and labels["row_strips"] == "-"
    assert "run in 2 strips (two_phase)" in table.notes["row_strips"]
    assert table.facto_peak < table.vanilla_peak


def test_strips_lower_the_peak_of_a_training_step():
    """Measured from the allocator's events: the chain's maps no longer live all at once."""
    torch.manual_seed(0)
    model = Net(batch_norm=False)
    x = torch.randn(4, 3, 96, 96)
    vanilla = facto_fx.compile(model, apply_ratio=0.0)
    split = facto_fx.compile(model, apply_ratio=0.0, row_strips=RowStrips(4))
    ratio = peak_training_bytes(split, (x,)) / peak_training_bytes(vanilla, (x,))
    assert ratio < 0.6, ratio


def test_cli_report_takes_rowstrips(capsys):
    assert cli_main(["report", "--model", "resnet18", "--method", "rowstrips", "--strips", "3",
                     "--strip-mode", "two_phase", "--apply-ratio", "0", "--image-size", "64"]) == 0
    out = capsys.readouterr().out
    assert "row strips from the input (3 strips, two_phase)" in out and "row_strips" in out


def test_the_facto_backend_refuses_strips_with_what_to_do():
    backend = torch.compile(Net(batch_norm=False), backend=facto_fx.facto_backend,
                            options={"row_strips": RowStrips(2)})
    with pytest.raises(Exception, match="RowStrips cannot run inside a compiled graph.*facto_fx.compile"):
        backend(torch.randn(2, 3, 16, 16))


def test_cli_train_runs_through_the_switch_with_strips(tmp_path, capsys):
    code = cli_main(["train", "--model", "cifar_vgg11_bn", "--method", "rowstrips", "--strips", "2", "--epochs", "2",
                     "--frt-epochs", "1", "--limit-batches", "2", "--batch-size", "8", "--no-progress", "--no-plots",
                     "--switch", "fixed", "--out", str(tmp_path / "run")])
    out = capsys.readouterr().out
    assert code == 0 and "row strips from the input (2 strips, two_phase)" in out
    assert cli_main(["train", "--method", "rowstrips", "--strips", "1"]) == 2
    assert "strips" in capsys.readouterr().err


@pytest.mark.parametrize("method", [facto_fx.HOSVD(1.0), facto_fx.ErrorBounded(1e-12)])
def test_lossless_settings_of_other_methods_inside_strips_keep_dense_gradients(method):
    """HOSVD keeping all energy and ErrorBounded at a bound below float64 rounding are exact, so
    inside strips (decomposing or coding each strip's maps) they must give dense autograd's
    gradients; their lossy settings still run there, on each strip's own maps."""
    torch.manual_seed(0)
    model = Net(batch_norm=False).double()
    reference = copy.deepcopy(model)
    x = torch.randn(2, 3, 40, 36, dtype=torch.float64)
    fmodel = facto_fx.compile(model, apply_ratio=0.0, methods={"c2": method, "c3": method},
                              row_strips=RowStrips(3, max_overhead=4.0), example_inputs=(x,))
    assert "c2" in fmodel.row_strips.geometry
    fmodel(x).sum().backward()
    reference(x).sum().backward()
    trained = [(name, p, q) for (name, p), q in zip(model.named_parameters(), reference.parameters(), strict=True)
               if p.grad is not None]  # HOSVD fine-tunes: what it leaves untrained has no gradient
    assert {"c2.weight", "c3.weight"} <= {name for name, _, _ in trained}
    for name, p, q in trained:
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-7, atol=1e-10, msg=name)


def test_an_adaptive_error_bound_ends_the_chain_with_its_reason():
    fmodel = facto_fx.compile(Net(batch_norm=False), apply_ratio=0.0, row_strips=RowStrips(2),
                              methods={"c2": facto_fx.ErrorBounded(adaptive=True)})
    assert list(fmodel.row_strips.geometry) == ["c1", "relu"]
    assert "adaptive bound" in fmodel.meta["facto"].region_notes["row_strips"]


def test_review_findings_dead_nodes_hooks_and_unbatched_maps():
    class Dead(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.c1, self.c2 = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1)

        def forward(self, x):
            y = self.c1(x)
            torch.relu(y)  # unused
            return self.c2(y).mean((-2, -1))

    x = torch.randn(3, 20, 20)
    model = Dead()
    fmodel = facto_fx.compile(model, apply_ratio=0.0, row_strips=RowStrips(2, max_overhead=4.0))
    torch.testing.assert_close(fmodel(x), model(x))  # unbatched: strips run it as a batch of one
    sn = nn.Sequential(nn.utils.parametrizations.spectral_norm(nn.Conv2d(3, 4, 3, padding=1)), nn.ReLU(),
                       nn.AdaptiveAvgPool2d(1))
    found = facto_fx.compile(sn, apply_ratio=0.0, row_strips=RowStrips(2), verify=False)
    assert "parametrizations" in found.meta["facto"].region_notes["rowstrips"]  # nothing to split


class Shifted(nn.Module):
    """Tensors the chain reads as attributes: a block's buffer and one of the model's own, and an
    in-place ReLU inside a block the chain reads a buffer of."""

    def __init__(self) -> None:
        super().__init__()
        self.block = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(inplace=True))
        self.block.register_buffer("scale", torch.rand(1, 8, 1, 1) + 0.5)
        self.register_buffer("shift", torch.randn(1, 8, 1, 1))
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        x = self.block(x) * self.block.scale + self.shift
        return self.fc(F.adaptive_avg_pool2d(F.relu(x), 1).flatten(1))


@pytest.mark.parametrize("convert", ["double", "to_float64", "load_state_dict_assign"])
def test_tensors_the_chain_reads_follow_the_model_after_conversion(convert):
    torch.manual_seed(0)
    model = Shifted()
    split = facto_fx.compile(copy.deepcopy(model), apply_ratio=0.0, row_strips=RowStrips(3))
    assert any(n.op == "call_module" and n.target == "row_strips" for n in split.graph.nodes)
    if convert == "double":
        model, split = model.double(), split.double()
    elif convert == "to_float64":
        model, split = model.to(torch.float64), split.to(torch.float64)
    else:
        for m in (model, split):
            m.load_state_dict({k: v.clone() for k, v in m.state_dict().items()}, assign=True)
    with torch.no_grad():  # in place, on the tensors the models hold now
        for m in (model, split):
            m.shift.add_(1.0)
            m.block.scale.mul_(2.0)
    x = torch.randn(2, 3, 17, 11, dtype=model.shift.dtype)
    torch.testing.assert_close(split(x), model(x), rtol=1e-6, atol=1e-6)
    assert model.block[1].inplace  # the model keeps its in-place ReLU; the chain runs its own copy


def test_batch_statistics_with_pooled_maps_end_the_chain():
    """batch_norm='lossy' batch-norm trains on batch statistics too: it ends a chain, like torch's,
    and the user is told how to let strips cross it."""
    with pytest.warns(UserWarning, match=r"row strips end at a batch-norm: bn: .*batch_norm='freeze'"):
        split = facto_fx.compile(Net(), apply_ratio=1.0, batch_norm="lossy", row_strips=RowStrips(4))
    assert "c3" in split.row_strips.geometry and "bn" not in split.row_strips.geometry
    assert split.bn.batch_statistics


def test_facto_tiles_do_not_cut_segments_shorter():
    """Whole tiles add halo rows; segments are still cut where strips without them would be, so a
    Facto model holds no more whole maps at cuts than the same model split without Facto."""
    model = torchvision.models.resnet18(num_classes=10)
    x = torch.randn(2, 3, 96, 96)
    ends = {}
    for ratio in (0.0, 1.0):
        with pytest.warns(UserWarning, match="never estimated"):
            fmodel = facto_fx.compile(copy.deepcopy(model), apply_ratio=ratio, row_strips=RowStrips(4),
                                      batch_norm="freeze", example_inputs=(x,))
        ends[ratio] = [(s.end.name, len(s.strips)) for s in fmodel.row_strips.segments(x)]
    assert any(isinstance(m, facto_fx.layers.FactoConv2d) and m.lossy_kernel == 2 for m in fmodel.modules())
    assert ends[1.0] == ends[0.0] and sum(n > 0 for _, n in ends[1.0]) >= 2


@pytest.mark.parametrize("store_bits", [4, None])
def test_frozen_batch_norm_in_strips_keeps_its_codes(store_bits):
    """A frozen batch-norm that keeps x̂ whole (lossy kernel 1) runs as torch's in the strips, unless
    it keeps x̂ as codes (store_bits): then it stays Facto's, and the strips keep its codes."""
    torch.manual_seed(0)
    split = facto_fx.compile(Net(), apply_ratio=1.0, lossy_kernel=1, batch_norm="freeze", store_bits=store_bits,
                             row_strips=RowStrips(2), calibration_data=[torch.randn(2, 3, 32, 32)])
    chain = split.row_strips.chain
    assert "bn" in split.row_strips.geometry
    bn_calls = [n for n in chain.graph.nodes if n.op == "call_function" and n.target is F.batch_norm]
    modules = [chain.get_submodule(n.target) for n in chain.graph.nodes if n.op == "call_module"]
    bn_layers = [m for m in modules if isinstance(m, facto_fx.layers.FactoBatchNorm)]
    assert (len(bn_calls), [m.bits for m in bn_layers]) == ((0, [4]) if store_bits else (1, []))
    split(torch.randn(2, 3, 32, 32)).sum().backward()
