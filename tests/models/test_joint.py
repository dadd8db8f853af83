"""The joint model: modes, cells read through the callback, validity, gradients, exhaustive sum, summaries."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from loupe.config import Config, JointConfig, ModelConfig
from loupe.models import (
    AttentionNetwork,
    Backbone,
    JointAttentionSampler,
    SlideBatch,
    build_model,
    create_backbone,
    magnification_totals,
    split_by_magnification,
)

#: The paper's model: one draw from P itself per step, without loupe's discovery aids (the defaults switch them on).
PAPER = {"uniform_mix": 0.0, "train_draws": 1, "novelty": 0.0, "novelty_epochs": 0, "magnification_aware": False}

SHAPES = ((1, 1), (2, 2), (3, 4))  # 1 + 4 + 12 = 17 cells
N_CELLS = 17
PATCH = 8


class RecordingReader:
    """A patch reader that remembers which cells were asked for and paints each patch by its cell index."""

    def __init__(self) -> None:
        self.calls: list[Tensor] = []

    def __call__(self, cells: Tensor) -> Tensor:
        self.calls.append(cells.clone())
        b, n = cells.shape
        gen = torch.Generator().manual_seed(0)
        # The same patch for a cell on every call, with a brightness and colour of its own.
        level = torch.rand(N_CELLS, 3, 1, 1, generator=gen)
        table = (0.7 * level + 0.3 * torch.rand(N_CELLS, 3, PATCH, PATCH, generator=gen)).clamp(0, 1)
        return table[cells.reshape(-1)].reshape(b, n, 3, PATCH, PATCH)


class Probe(nn.Module):
    """A one-layer stride-4 backbone whose features vary strongly with the input (unlike a fresh deep CNN)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 4, stride=4)
        nn.init.normal_(self.conv.weight, std=0.5)

    def forward_features(self, x: Tensor) -> Tensor:
        return torch.tanh(self.conv(x))


def _model(
    k: int = 3,
    replace: bool = False,
    attention_dropout: float = 0.0,
    normalisation: str = "sigmoid",
    backbone: str = "probe",
):
    torch.manual_seed(0)
    if backbone == "probe":
        h = Backbone(Probe(), 8, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
        f = Backbone(Probe(), 8, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    else:
        h = create_backbone(backbone)
        f = create_backbone(backbone)
    a = AttentionNetwork(h.num_features, len(SHAPES), normalisation)
    return JointAttentionSampler(
        h, f, a, n_classes=4, k=k, replace=replace, attention_dropout=attention_dropout, **PAPER
    )


def _thumbs(b: int = 2) -> Tensor:
    return torch.rand(b, 3, 32, 48, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize(
    "mode, n_samples, expected_reads",
    [("sample", 1, 3), ("mean", 4, 12), ("topk", 1, 3), ("exhaustive", 1, N_CELLS)],
)
@pytest.mark.parametrize("replace", [False, True])
def test_each_mode_returns_logits_and_reads_the_expected_cells(mode, n_samples, expected_reads, replace):
    model = _model(k=3, replace=replace).eval()
    reader = RecordingReader()
    out = model.classify(_thumbs(), SHAPES, reader, mode=mode, n_samples=n_samples)
    assert out.logits.shape == (2, 4)
    assert torch.all(torch.isfinite(out.logits))
    assert out.attention.shape == (2, N_CELLS)
    assert out.regulariser.shape == (2,)
    assert len(reader.calls) == 1
    assert reader.calls[0].shape == (2, expected_reads)
    assert torch.equal(out.cells, reader.calls[0])
    if mode == "exhaustive":
        assert torch.equal(out.cells[0], torch.arange(N_CELLS))
    if mode in ("sample", "topk") and not replace:
        for row in out.cells:
            assert len(set(row.tolist())) == 3  # without replacement: distinct cells


def test_unknown_mode_is_rejected():
    with pytest.raises(ValueError, match="mode"):
        _model().eval().classify(_thumbs(), SHAPES, RecordingReader(), mode="all")


def test_topk_reads_the_k_most_attended_cells():
    model = _model(k=4).eval()
    with torch.no_grad():
        for head in model.attention.heads:
            head.weight.normal_(std=1.0)  # spread the attention so that the top cells are clear
    reader = RecordingReader()
    out = model.classify(_thumbs(), SHAPES, reader, mode="topk")
    expected = torch.topk(out.attention, 4, dim=-1).indices
    for got, want in zip(reader.calls[0], expected, strict=True):
        assert set(got.tolist()) == set(want.tolist())
    # The pooled feature is the attention-weighted mean of the k patches' embeddings.
    with torch.no_grad():
        feats = model.embed(reader(expected))
        p = out.attention.gather(1, expected)
        pooled = (p.unsqueeze(-1) * feats).sum(1) / p.sum(1, keepdim=True)
        torch.testing.assert_close(out.logits, model.classifier(pooled))


@pytest.mark.parametrize("replace", [False, True])
@pytest.mark.parametrize("dropout", [0.0, 0.5])
def test_sampled_cells_are_never_invalid(replace, dropout):
    model = _model(k=5, replace=replace, attention_dropout=dropout).train()
    valid = torch.zeros(3, N_CELLS, dtype=torch.bool)
    valid[0, [0, 3, 8, 9, 16]] = True
    valid[1, [2, 5]] = True  # fewer valid cells than k
    valid[2, 5:] = True
    reader = RecordingReader()
    gen = torch.Generator().manual_seed(0)
    for _ in range(2):
        with torch.no_grad():
            out = model.classify(_thumbs(3), SHAPES, reader, valid=valid, mode="mean", n_samples=3, generator=gen)
        assert torch.all(out.attention[~valid] == 0)
        assert torch.all(torch.isfinite(out.logits))
    for cells in reader.calls:
        assert torch.all(valid.gather(1, cells))


def test_a_training_step_sends_gradients_to_every_part():
    model = _model(k=3, attention_dropout=0.2, backbone="tiny").train()
    out = model.classify(
        _thumbs(), SHAPES, RecordingReader(), mode="sample", generator=torch.Generator().manual_seed(0)
    )
    loss = torch.nn.functional.cross_entropy(out.logits, torch.tensor([0, 3])) + 0.01 * out.regulariser.mean()
    loss.backward()
    parts = {
        "attention": model.attention,
        "thumbnail_net": model.thumbnail_net,
        "patch_net": model.patch_net,
        "classifier": model.classifier,
    }
    for name, module in parts.items():
        grads = [p.grad for p in module.parameters() if p.requires_grad]
        assert grads and all(g is not None for g in grads), name
        assert sum(float(g.abs().sum()) for g in grads) > 0, name


@pytest.mark.parametrize("normalisation", ["sigmoid", "softmax"])
def test_exhaustive_equals_classifier_of_the_exact_attention_weighted_sum(normalisation):
    model = _model(normalisation=normalisation).eval()
    with torch.no_grad():
        for head in model.attention.heads:
            head.weight.normal_(std=1.0)
    reader = RecordingReader()
    valid = torch.ones(2, N_CELLS, dtype=torch.bool)
    valid[1, :5] = False
    out = model.classify(_thumbs(), SHAPES, reader, valid=valid, mode="exhaustive")
    with torch.no_grad():
        cells = torch.arange(N_CELLS).expand(2, -1)
        patches = reader(cells)
        f = torch.stack([model.patch_net(patches[b]) for b in range(2)])  # (2, N, D), one image at a time
        _, probs = model.attention(model.thumbnail_net.feature_map(_thumbs()), SHAPES, valid)
        pooled = torch.stack([(probs[b].unsqueeze(-1) * f[b]).sum(0) for b in range(2)])
        logits = pooled @ model.classifier[1].weight.T + model.classifier[1].bias
    torch.testing.assert_close(out.logits, logits, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out.attention, probs)


@pytest.mark.parametrize("replace", [False, True])
def test_mean_mode_averages_sample_draws_and_approaches_the_exhaustive_value(replace):
    model = _model(k=4, replace=replace, normalisation="softmax").eval()
    n = 200
    with torch.no_grad():
        exact = model.classify(_thumbs(1), SHAPES, RecordingReader(), mode="exhaustive").logits
        many = model.classify(
            _thumbs(1),
            SHAPES,
            RecordingReader(),
            mode="mean",
            n_samples=n,
            generator=torch.Generator().manual_seed(0),
        ).logits
        gen = torch.Generator().manual_seed(0)  # the same random stream, one draw of k at a time
        singles = torch.cat(
            [
                model.classify(_thumbs(1), SHAPES, RecordingReader(), mode="sample", generator=gen).logits
                for _ in range(n)
            ]
        )
    # g is linear in eval mode, so the mean mode's logits are the mean of the single draws' logits...
    torch.testing.assert_close(many, singles.mean(0, keepdim=True), rtol=1e-4, atol=1e-5)
    # ... and the estimator is unbiased: within 4 standard errors of the exact value.
    standard_error = singles.std(0) / n**0.5
    assert float(singles.std(0).max()) > 0
    assert torch.all((many[0] - exact[0]).abs() <= 4 * standard_error + 1e-6)


def test_magnification_totals_and_attention_maps():
    model = _model().eval()
    with torch.no_grad():
        out = model.classify(_thumbs(), SHAPES, RecordingReader(), mode="topk")
    totals = magnification_totals(out.attention, SHAPES)
    assert totals.shape == (2, 3)
    torch.testing.assert_close(totals.sum(-1), torch.ones(2))
    maps = split_by_magnification(out.attention, SHAPES)
    assert [tuple(m.shape) for m in maps] == [(2, 1, 1), (2, 2, 2), (2, 3, 4)]
    for j, m in enumerate(maps):
        torch.testing.assert_close(m.sum(dim=(1, 2)), totals[:, j])
    # Row-major: cell (row 1, col 2) of the 3x4 grid is flat index 1 + 4 + 1 * 4 + 2.
    assert float(maps[2][0, 1, 2]) == float(out.attention[0, 11])
    assert float(maps[1][1, 1, 0]) == float(out.attention[1, 3])


def test_build_model_follows_the_config():
    cfg = Config(
        model=ModelConfig(magnifications=["2.0", "0.5"]),
        joint=JointConfig(k=7, replace=True, normalisation="softmax", attention_dropout=0.1),
    )
    model = build_model(cfg, n_classes=3)
    assert isinstance(model, JointAttentionSampler)
    assert model.k == 7 and model.replace is True and model.attention_dropout == 0.1
    assert len(model.attention.heads) == 2 and model.attention.normalisation == "softmax"
    assert model.classifier[1].out_features == 3
    assert model.thumbnail_net is not model.patch_net


def test_exhaustive_reads_only_valid_cells():
    model = _model().eval()
    valid = torch.zeros(2, N_CELLS, dtype=torch.bool)
    valid[0, [1, 4, 7]] = True
    valid[1, [0, 2, 5, 9, 11]] = True
    reader = RecordingReader()
    with torch.no_grad():
        out = model.classify(_thumbs(), SHAPES, reader, valid=valid, mode="exhaustive")
    (cells,) = reader.calls
    assert cells.shape == (2, 5)  # the most valid cells of any image, not all N_CELLS
    assert cells[0].tolist() == [1, 4, 7, 1, 1]  # padded with the first valid cell, weighted 0
    assert cells[1].tolist() == [0, 2, 5, 9, 11]
    with torch.no_grad():  # the same as the sum over every cell: padding and background carry no weight
        full = model.classify(_thumbs(), SHAPES, RecordingReader(), valid=None, mode="exhaustive")
        probs = out.attention
        f_all = model.patch_net(RecordingReader()(torch.arange(N_CELLS).expand(2, -1)).flatten(0, 1)).view(
            2, N_CELLS, -1
        )
        pooled = torch.einsum("bn,bnd->bd", probs, f_all)
        expected = pooled @ model.classifier[1].weight.T + model.classifier[1].bias
    torch.testing.assert_close(out.logits, expected, rtol=1e-4, atol=1e-5)
    assert full.cells.shape == (2, N_CELLS)


class CellPixels:
    """A pixel source over :class:`RecordingReader`'s table (the interface's ``cells``; no whole images)."""

    def __init__(self) -> None:
        self.reader = RecordingReader()
        self.slides: list[list[int]] = []

    embeddings = None  # the pixel source interface: no cached embeddings

    def cells(self, slides, cells: Tensor) -> Tensor:
        self.slides.append(list(slides))
        return self.reader(cells)

    def whole(self, slide, valid):
        raise AssertionError("the joint model reads cells only")


def _batch(b: int = 2) -> SlideBatch:
    thumbs = (_thumbs(b) * 255).to(torch.uint8)
    valid = torch.ones(b, N_CELLS, dtype=torch.bool)
    return SlideBatch(thumbs, valid, torch.tensor([0, 3][:b]), torch.tensor([7, 9][:b]), SHAPES)


def test_the_interface_forward_reads_through_the_pixel_source_and_returns_the_loss():
    from loupe.models import InferenceSettings

    model = _model(k=3).eval()
    model.entropy_alpha = 0.5
    pixels = CellPixels()
    batch = _batch()
    with torch.no_grad():
        out = model(batch, pixels, InferenceSettings("topk", 1, 2), labels=batch.labels)
    assert pixels.slides == [[7, 9]]  # the batch's catalog indices reach the source
    assert out.cells.shape == (2, 2)  # k from the settings, not the model's 3
    expected = torch.nn.functional.cross_entropy(out.logits, batch.labels, reduction="none") + 0.5 * out.regulariser
    torch.testing.assert_close(out.loss, expected)
    with torch.no_grad():  # training forward: one draw of the model's k
        train_out = model(batch, CellPixels())
    assert train_out.cells.shape == (2, 3) and train_out.loss is None


def _concentrated(model: JointAttentionSampler, b: int) -> None:
    """Make the attention put 99% of its mass on cell 0 of every image."""
    probs = torch.full((b, N_CELLS), 0.01 / (N_CELLS - 1))
    probs[:, 0] = 0.99
    model.attend = lambda *args, **kwargs: (probs.log(), probs)  # type: ignore[method-assign]


@pytest.mark.parametrize("replace", [False, True])
def test_uniform_mix_reads_cells_the_attention_ignores_in_training_only(replace):
    model = _model(k=4, replace=replace)
    model.uniform_mix = 1.0
    _concentrated(model, 64)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        trained = model.train().classify(_thumbs(64), SHAPES, RecordingReader(), mode="sample", generator=gen)
        inferred = model.eval().classify(_thumbs(64), SHAPES, RecordingReader(), mode="sample", generator=gen)
    # Uniform draws: cell 0 is one cell in 17; from the attention it is nearly every draw (or the first, without).
    assert (trained.cells == 0).float().mean() < 0.2
    first = inferred.cells[:, 0] if not replace else inferred.cells
    assert (first == 0).float().mean() > 0.9


def test_train_draws_score_several_independent_draws_in_training_only():
    model = _model(k=3)
    model.train_draws = 4
    batch = _batch()
    torch.manual_seed(0)
    out = model.train()(batch, CellPixels(), labels=batch.labels)
    assert out.cells.shape == (2, 12)
    assert out.draw_logits is not None and out.draw_logits.shape == (4, 2, 4)
    ce = torch.stack(
        [torch.nn.functional.cross_entropy(d, batch.labels, reduction="none") for d in out.draw_logits]
    )  # each draw scored on its own: the loss is the mean of the draws' losses, not the loss of the mean
    torch.testing.assert_close(out.loss, ce.mean(0) + model.entropy_alpha * out.regulariser)
    torch.testing.assert_close(out.logits, out.draw_logits.mean(0))
    model.train_draws = 1
    assert model.train()(batch, CellPixels(), labels=batch.labels).draw_logits is None
    model.train_draws = 4
    with torch.no_grad():  # inference reads what its settings say
        assert model.eval()(batch, CellPixels(), model.default_inference()).cells.shape[1] == 3 * 8


def test_novelty_loss_pulls_the_attention_towards_the_unusual_drawn_cell():
    from loupe.models.joint import novelty_loss

    features = torch.zeros(1, 6, 4)
    features[0, :, 0] = torch.tensor([0.1, -0.1, 0.05, 0.0, -0.05, 0.0])  # background, nearly alike
    features[0, 3] = torch.tensor([3.0, 2.0, -1.0, 0.5])  # one patch unlike the rest
    one_magnification = torch.zeros(1, 6, dtype=torch.long)
    logits = torch.zeros(1, 6, requires_grad=True)
    loss = novelty_loss(torch.softmax(logits, -1), features, one_magnification)
    loss.sum().backward()
    assert logits.grad is not None
    assert int(logits.grad[0].argmin()) == 3  # gradient descent raises the unusual cell's attention most
    assert (logits.grad[0, [0, 1, 2, 4, 5]] > 0).all()
    with torch.no_grad():  # attention already on the unusual cell: a lower loss than uniform attention
        focused = torch.full((1, 6), 0.02)
        focused[0, 3] = 0.9
        assert novelty_loss(focused, features, one_magnification) < loss


def test_novelty_is_judged_within_each_magnification():
    from loupe.models.joint import novelty_loss

    # Cells 0-2 at one magnification, all far from cells 3-5 (another scale looks different, and is not news);
    # within each magnification one cell stands out: 1 a little, 4 a lot.
    features = torch.zeros(1, 6, 2)
    features[0, :3, 0] = 10.0
    features[0, 1, 1] = 0.5
    features[0, 4, 1] = 3.0
    groups = torch.tensor([[0, 0, 0, 1, 1, 1]])
    logits = torch.zeros(1, 6, requires_grad=True)
    novelty_loss(torch.softmax(logits, -1), features, groups).sum().backward()
    assert logits.grad is not None
    pulled = (-logits.grad[0]).argsort(descending=True)[:2].tolist()
    assert sorted(pulled) == [1, 4]  # the odd one out of each magnification, not a whole magnification


def test_novelty_acts_only_in_the_first_novelty_epochs():
    model = _model(k=3)
    model.novelty, model.train_draws, model.novelty_epochs = 1.0, 2, 1
    batch = _batch()
    model.begin_epoch(0)
    assert model.train()(batch, CellPixels(), labels=batch.labels).auxiliary is not None
    model.begin_epoch(1)
    assert model.train()(batch, CellPixels(), labels=batch.labels).auxiliary is None


def test_magnification_maps_start_as_identity_and_apply_to_their_own_magnification():
    from loupe.models.joint import magnification_of

    plain = _model(k=3)
    torch.manual_seed(0)
    h = Backbone(Probe(), 8, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    f = Backbone(Probe(), 8, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    aware = JointAttentionSampler(
        h, f, AttentionNetwork(8, len(SHAPES)), n_classes=4, k=3, **(PAPER | {"magnification_aware": True})
    )
    aware.load_state_dict(plain.state_dict(), strict=False)
    assert aware.magnification_maps is not None and len(aware.magnification_maps) == len(SHAPES)
    aware.eval(), plain.eval()
    with torch.no_grad():  # identity at the start: the same logits as without the maps
        a = aware.classify(_thumbs(), SHAPES, RecordingReader(), mode="exhaustive").logits
        b = plain.classify(_thumbs(), SHAPES, RecordingReader(), mode="exhaustive").logits
        torch.testing.assert_close(a, b)
    cells = torch.tensor([[0, 1, 4, 5, 16]])
    assert magnification_of(cells, SHAPES).tolist() == [[0, 1, 1, 2, 2]]  # 1 + 4 + 12 cells
    with torch.no_grad():
        aware.magnification_maps[1].weight.zero_()  # the second magnification's features are now silenced
        feats = aware.at_magnification(torch.ones(1, 5, 8), magnification_of(cells, SHAPES))
    assert feats[0, 1:3].abs().sum() == 0 and (feats[0, [0, 3, 4]] == 1).all()


def test_the_config_builds_the_discovery_settings_into_the_model():
    model = build_model(Config(joint=JointConfig(train_draws=3, uniform_mix=0.25, novelty=0.5, novelty_epochs=2)), 2)
    assert isinstance(model, JointAttentionSampler)
    assert (model.train_draws, model.uniform_mix, model.novelty, model.novelty_epochs) == (3, 0.25, 0.5, 2)
    assert model.magnification_maps is not None
    model.begin_epoch(2)
    assert not model.novelty_on
