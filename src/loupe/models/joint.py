"""The joint spatial and magnification attention-sampling model (Zhang et al., CVPRW 2021), as a plain module.

h(thumbnail) → attention network A → one distribution P over every cell of every magnification → k cells
drawn → their patches read (by a callback: the model never touches slides) → f → unbiased estimate of
Σ P f → g (dropout + linear). The exhaustive variant is the same module run with ``mode="exhaustive"``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from loupe.config import INFERENCE_MODES, JointConfig, ModelConfig
from loupe.models.adaptive import adaptive_slide
from loupe.models.attention import AttentionNetwork, attention_dropout, entropy_regulariser
from loupe.models.backbones import Backbone, create_backbone
from loupe.models.estimators import (
    exact_expectation,
    expectation_with_replacement,
    expectation_without_replacement,
    first_draws,
    gumbel_keys,
    proposal,
    sample_cells,
)
from loupe.models.interface import (
    InferenceSettings,
    PixelSource,
    SlideBatch,
    SlideClassifier,
    SlideOutput,
    magnification_of,
)

#: Reads the patches of cells: flat cell indices (B, n) → float patches (B, n, 3, p, p) in [0, 1].
PatchReader = Callable[[Tensor], Tensor]


#: Embeds the patches of cells: flat cell indices (B, n) → features (B, n, D).
CellEmbedder = Callable[[Tensor], Tensor]


def cell_embedder(model: SlideClassifier, embed: Callable[[Tensor], Tensor], read: PatchReader, batch: SlideBatch,
                  pixels: PixelSource) -> CellEmbedder:  # fmt: skip
    """Cells → features: read and embed, or, for a frozen patch network whose pixel source carries an embedding
    cache, the cached embeddings with only the missing cells read and embedded (one read, one forward)."""
    store = pixels.embeddings
    if store is None or not model.patch_network_frozen:
        return lambda cells: embed(read(cells))
    slides = batch.slides
    return lambda cells: store.features(slides, cells, lambda missing: embed(read(missing)))


def patch_reader(pixels: PixelSource, batch: SlideBatch, device: torch.device) -> PatchReader:
    """The batch's cells → patches on ``device`` (pinned first on a GPU, so that the copy overlaps compute)."""
    slides = batch.slides

    def read(cells: Tensor) -> Tensor:
        patches = pixels.cells(slides, cells)
        if device.type == "cuda":
            patches = patches.pin_memory()
        return patches.to(device, non_blocking=True)

    return read


def inference_settings(settings: JointConfig) -> InferenceSettings:
    """The inference a joint run's settings ask for (evaluate, predict, validation)."""
    return InferenceSettings(
        settings.inference, settings.inference_samples, settings.k, settings.adaptive_epsilon, settings.adaptive_budget
    )


#: The defaults of every setting the model shares with its settings section: one source for both.
_DEFAULTS, _MODEL_DEFAULTS = JointConfig(), ModelConfig()


class JointAttentionSampler(SlideClassifier):
    """Thumbnail → where and at which magnification to look → k patches → class.

    Built from a run's settings by :meth:`from_settings`; the constructor's defaults are the settings' defaults.
    """

    def __init__(
        self,
        thumbnail_net: Backbone,
        patch_net: Backbone,
        attention: AttentionNetwork,
        n_classes: int,
        k: int = _DEFAULTS.k,
        replace: bool = _DEFAULTS.replace,
        uniform_mix: float = _DEFAULTS.uniform_mix,
        train_draws: int = _DEFAULTS.train_draws,
        novelty_epochs: int = _DEFAULTS.novelty_epochs,
        novelty: float = _DEFAULTS.novelty,
        magnification_aware: bool = _DEFAULTS.magnification_aware,
        attention_dropout: float = _DEFAULTS.attention_dropout,
        classifier_dropout: float = _MODEL_DEFAULTS.classifier_dropout,
        patch_chunk: int = 256,
        estimator: str = _DEFAULTS.estimator,
        entropy_alpha: float = _DEFAULTS.entropy_alpha,
        inference: InferenceSettings | None = None,
        freeze_patch_net: bool = _MODEL_DEFAULTS.freeze_patch_backbone,
    ) -> None:
        super().__init__()
        self.thumbnail_net = thumbnail_net
        self.patch_net = patch_net
        self.attention = attention
        self.k = k
        self.replace = replace
        self.uniform_mix = uniform_mix
        """Training draws come from (1 − ε)·P + ε·uniform, weighted by P/q (see ``estimators.proposal``)."""
        self.train_draws = train_draws
        """Independent draws of k cells per slide in a training step, each classified and scored on its own (the
        loss is their mean: the same objective as one draw, with less variance)."""
        self.novelty_epochs = novelty_epochs
        self.novelty = novelty
        """In the first ``novelty_epochs`` epochs: weight of the pull of the attention towards the drawn cells whose
        patches look least like the rest of the slide (see :func:`novelty_loss`)."""
        self.novelty_on = novelty_epochs > 0
        """In the first novelty_epochs epochs (set by :meth:`begin_epoch`)."""
        self.attention_dropout = attention_dropout
        self.patch_chunk = patch_chunk
        self.estimator = estimator
        """sampled: k cells per training step; exhaustive: every cell (the all-patches baseline)."""
        self.entropy_alpha = entropy_alpha
        self.inference = inference or InferenceSettings(_DEFAULTS.inference, _DEFAULTS.inference_samples, k)
        self.classifier = nn.Sequential(nn.Dropout(classifier_dropout), nn.Linear(patch_net.num_features, n_classes))
        self.magnification_maps: nn.ModuleList | None = None
        """One linear map per magnification after f (identity at the start), so that a pattern can mean something
        else at another scale: the pooled sum then still tells which magnification a feature came from."""
        if magnification_aware:
            d = patch_net.num_features
            self.magnification_maps = nn.ModuleList(_identity_linear(d) for _ in attention.heads)
        if freeze_patch_net:
            self.freeze("patch_net")

    @classmethod
    def from_settings(cls, model: ModelConfig, settings: JointConfig, n_classes: int) -> JointAttentionSampler:
        """The model of a run's ``model`` and ``joint`` settings: h and f are two separate networks, as in the paper;
        A is sized to h's feature map and the magnifications (one magnification: the single-magnification
        baseline)."""
        h = create_backbone(settings.thumbnail_backbone, settings.thumbnail_pretrained)
        f = create_backbone(model.patch_backbone, model.patch_pretrained)
        attention = AttentionNetwork(
            h.map_channels, len(model.magnifications), settings.normalisation, settings.balance_magnifications
        )
        return cls(
            h,
            f,
            attention,
            n_classes,
            k=settings.k,
            replace=settings.replace,
            uniform_mix=settings.uniform_mix,
            train_draws=settings.train_draws,
            novelty_epochs=settings.novelty_epochs,
            novelty=settings.novelty,
            magnification_aware=settings.magnification_aware,
            attention_dropout=settings.attention_dropout,
            classifier_dropout=model.classifier_dropout,
            estimator=settings.estimator,
            entropy_alpha=settings.entropy_alpha,
            inference=inference_settings(settings),
            freeze_patch_net=model.freeze_patch_backbone,
        )

    def patch_network(self) -> nn.Module:
        return self.patch_net

    def attend(
        self, thumbnails: Tensor, shapes: Sequence[tuple[int, int]], valid: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """Attention logits and probabilities (B, N) over all cells, from the thumbnails (B, 3, h, w)."""
        thumbnails = thumbnails.contiguous(memory_format=_memory_format(self.channels_last))
        return self.attention(self.thumbnail_net.feature_map(thumbnails), shapes, valid)

    def embed(self, patches: Tensor) -> Tensor:
        """f on patches (B, n, 3, p, p) → (B, n, D), batched in chunks so that memory stays bounded."""
        return embed_patches(
            self.patch_net, patches, self.patch_chunk, self.channels_last, frozen="patch_net" in self.frozen
        )

    def default_inference(self) -> InferenceSettings:
        return self.inference

    def at_magnification(self, features: Tensor, magnification: Tensor) -> Tensor:
        """Features (B, n, D) of cells at magnifications (B, n) through their magnification's map (if any)."""
        if self.magnification_maps is None:
            return features
        # Every map runs on every feature and the rows of its magnification are kept: each map is part of every
        # step's graph (DDP needs each parameter used in every step, or a costly unused-parameter search), at the
        # price of M small matrix products on a handful of features.
        out = torch.zeros_like(features)
        for j, linear in enumerate(self.magnification_maps):
            out = torch.where((magnification == j).unsqueeze(-1), linear(features), out)
        return out

    def begin_epoch(self, epoch: int) -> None:
        self.novelty_on = epoch < self.novelty_epochs

    def forward(
        self,
        batch: SlideBatch,
        pixels: PixelSource,
        inference: InferenceSettings | None = None,
        labels: Tensor | None = None,
    ) -> SlideOutput:
        """Training (``inference`` None: one draw of k cells, or every cell with the exhaustive estimator) or
        inference as ``inference`` says; with ``labels``, the loss CE + α·Σ P log P per slide."""
        device = batch.thumbnails.device
        thumbs = batch.thumbnails.to(_float_dtype(self.thumbnail_net)) / 255.0
        if inference is None:
            mode, samples, k = (
                ("exhaustive" if self.estimator == "exhaustive" else "sample"),
                self.train_draws,
                self.k,
            )
        else:
            mode, samples, k = inference.mode, inference.samples, inference.k or self.k
        read = patch_reader(pixels, batch, device)
        embed_cells = cell_embedder(self, self.embed, read, batch, pixels)
        if mode == "adaptive":
            assert inference is not None
            out = self.classify_adaptive(thumbs, batch, pixels, k, inference.epsilon, inference.budget)
        else:
            out = self.classify(thumbs, batch.shapes, read, batch.valid, mode, samples, k=k, embed_cells=embed_cells)
        if labels is not None:
            assert out.regulariser is not None
            if out.draw_logits is not None:  # several draws: the mean of their losses (not the loss of the mean)
                r, b, c = out.draw_logits.shape
                ce = F.cross_entropy(out.draw_logits.reshape(r * b, c), labels.repeat(r), reduction="none")
                ce = ce.view(r, b).mean(0)
            else:
                ce = F.cross_entropy(out.logits, labels, reduction="none")
            out.loss = ce + self.entropy_alpha * out.regulariser
            if out.auxiliary is not None:
                out.loss = out.loss + out.auxiliary
        return out

    def classify(
        self,
        thumbnails: Tensor,
        shapes: Sequence[tuple[int, int]],
        read_patches: PatchReader,
        valid: Tensor | None = None,
        mode: str = "sample",
        n_samples: int = 1,
        generator: torch.Generator | None = None,
        k: int | None = None,
        embed_cells: CellEmbedder | None = None,
    ) -> SlideOutput:
        """Classify a batch of images (float thumbnails in [0, 1]) whose grids all have ``shapes``.

        Modes: ``sample`` (``n_samples`` independent draws of ``k`` cells, default the model's, each classified on
        its own: ``logits`` are their mean, ``draw_logits`` each draw's; training uses it), ``mean`` (the
        estimator averaged over ``n_samples`` draws), ``topk`` (the k most attended cells, weights renormalised),
        ``exhaustive`` (f on every cell, exact Σ P f). ``regulariser`` is Σ P log P per image. ``embed_cells``
        (default: read, then f) turns cells into features (e.g. through an embedding cache).
        """
        if mode not in INFERENCE_MODES or mode == "adaptive":
            modes = [m for m in INFERENCE_MODES if m != "adaptive"]
            raise ValueError(f"mode must be one of {modes} (adaptive: classify_adaptive), got {mode!r}")
        k = self.k if k is None else k
        raw = embed_cells if embed_cells is not None else (lambda cells: self.embed(read_patches(cells)))

        def embed(cells: Tensor) -> Tensor:
            return self.at_magnification(raw(cells), magnification_of(cells, shapes))

        _, probs = self.attend(thumbnails, shapes, valid)
        regulariser = entropy_regulariser(probs)

        if mode == "exhaustive":
            cells, real = valid_cells(valid, probs.shape, probs.device)
            feats = embed(cells)
            weights = probs.gather(1, cells) * real.to(probs.dtype)
            logits = self.classifier(exact_expectation(weights, feats))
            return SlideOutput(logits, probs, cells, regulariser=regulariser)

        if mode == "topk":
            cells = torch.topk(probs.detach(), min(k, probs.shape[1]), dim=-1).indices
            p = probs.gather(1, cells)
            feats = embed(cells)
            pooled = (p.unsqueeze(-1) * feats).sum(1) / p.sum(1, keepdim=True).clamp_min(1e-12)
            return SlideOutput(self.classifier(pooled), probs, cells, regulariser=regulariser)

        draw_probs = probs
        if self.training and self.attention_dropout > 0:
            draw_probs = attention_dropout(probs, self.attention_dropout, k, generator)
        repeats = n_samples if mode == "mean" or self.training else 1
        # Exploration is for learning: inference draws from the attention itself.
        q = proposal(draw_probs, self.uniform_mix) if self.training and self.uniform_mix > 0 else None
        draws = [sample_cells(draw_probs if q is None else q, k, self.replace, generator) for _ in range(repeats)]
        cells = torch.cat(draws, dim=1)
        feats = embed(cells).split(k, dim=1)
        estimates = []
        for idx, f in zip(draws, feats, strict=True):
            p = draw_probs.gather(1, idx)
            q_s = None if q is None else q.gather(1, idx)
            if self.replace:
                estimates.append(expectation_with_replacement(p, f, q_s))
            else:
                n_alive = (draw_probs > 0).sum(-1, keepdim=True)
                p_valid = torch.arange(k, device=p.device).expand_as(p) < n_alive
                estimates.append(expectation_without_replacement(p, f, p_valid, q_s))
        auxiliary = None
        if self.training and self.novelty_on and self.novelty > 0:
            groups = magnification_of(cells, shapes)
            auxiliary = self.novelty * novelty_loss(probs.gather(1, cells), torch.cat(feats, dim=1), groups)
        if mode == "mean" or repeats == 1:
            logits = self.classifier(torch.stack(estimates).mean(0))
            spread = None
            if not self.training and repeats > 1:  # each draw classified on its own: the prediction's spread
                spread = draw_spread(self.classifier(torch.stack(estimates)))
            return SlideOutput(logits, probs, cells, regulariser=regulariser, auxiliary=auxiliary, spread=spread)
        draw_logits = self.classifier(torch.stack(estimates))  # (R, B, C)
        return SlideOutput(
            draw_logits.mean(0), probs, cells, regulariser=regulariser, draw_logits=draw_logits, auxiliary=auxiliary
        )

    def classify_adaptive(
        self,
        thumbnails: Tensor,
        batch: SlideBatch,
        pixels: PixelSource,
        k: int,
        epsilon: float,
        budget: int,
        generator: torch.Generator | None = None,
    ) -> SlideOutput:
        """Adaptive inference (:mod:`loupe.models.adaptive`): rounds of ``k`` cells drawn without replacement, never
        a cell twice in a slide, until the top class's Monte-Carlo standard error is under ``epsilon`` or
        ``budget`` patches are read. Round 1 is today's sampled inference without replacement (same random
        numbers, same cells, same estimate), so with ``budget < 2k`` the output is the ``sample`` mode's of a run
        with ``joint.replace: false``. A run trained with replacement draws without replacement here too (never a
        cell twice; the estimate of Σ P f is unbiased either way), so its one round is not its own ``sample``
        mode. ``spread`` is the standard deviation of the class probabilities over the rounds, ``patches_read``
        the distinct cells read."""
        _, probs = self.attend(thumbnails, batch.shapes, batch.valid)
        regulariser = entropy_regulariser(probs)
        keys = gumbel_keys(probs, generator)
        first = first_draws(torch.topk(keys, min(k, probs.shape[1]), dim=-1).indices, probs, k)
        feats = _slide_embedder(self, batch, pixels)(first)
        p = probs.gather(1, first)
        n_alive = (probs > 0).sum(-1, keepdim=True)
        p_valid = torch.arange(k, device=p.device).expand_as(p) < n_alive
        first_estimates = expectation_without_replacement(p, feats, p_valid)
        slides = []
        for b in range(len(batch)):
            embed_one = _one_slide(_slide_embedder(self, batch.select([b]), pixels))
            slides.append(
                adaptive_slide(
                    probs[b],
                    keys[b],
                    first[b],
                    feats[b],
                    first_estimates[b],
                    embed_one,
                    self.classifier,
                    k,
                    epsilon,
                    budget,
                )
            )
        logits = self.classifier(torch.stack([s.estimate for s in slides]))
        n = max(len(s.cells) for s in slides)
        cells = torch.stack([torch.cat([s.cells, s.cells[-1:].expand(n - len(s.cells))]) for s in slides])
        spread = None
        if any(len(s.round_logits) > 1 for s in slides):
            spread = torch.stack([draw_spread(s.round_logits.unsqueeze(1))[0] for s in slides])
        read = torch.tensor([s.patches_read for s in slides], dtype=torch.long)
        return SlideOutput(logits, probs, cells, regulariser=regulariser, spread=spread, patches_read=read)


def _slide_embedder(model: JointAttentionSampler, batch: SlideBatch, pixels: PixelSource) -> CellEmbedder:
    """Cells (B, n) of ``batch`` → features (B, n, D) after their magnification's map, as ``classify`` embeds."""
    read = patch_reader(pixels, batch, batch.thumbnails.device)
    raw = cell_embedder(model, model.embed, read, batch, pixels)
    return lambda cells: model.at_magnification(raw(cells), magnification_of(cells, batch.shapes))


def _one_slide(embed: CellEmbedder) -> Callable[[Tensor], Tensor]:
    """A one-slide batch's embedder as cells (n,) → features (n, D)."""
    return lambda cells: embed(cells.unsqueeze(0))[0]


def draw_spread(draw_logits: Tensor) -> Tensor:
    """(B, C) the population standard deviation over draws of the class probabilities of per-draw logits
    (R, B, C), in float32. Computed about the first draw (shifted data), so that identical draws give exactly 0
    (a mean over draws rounds: ``x - mean(x)`` of equal values need not be 0)."""
    d = torch.softmax(draw_logits.float(), -1)
    d = d - d[:1]
    return ((d * d).mean(0) - d.mean(0).square()).clamp_min(0.0).sqrt()


def _identity_linear(d: int) -> nn.Linear:
    linear = nn.Linear(d, d)
    with torch.no_grad():
        linear.weight.copy_(torch.eye(d))
        linear.bias.zero_()
    return linear


NOVELTY_SHARPNESS = 2.0
"""How strongly the novelty target favours the most unusual drawn cells (softmax of standardised novelty ×)."""


def novelty_loss(p_drawn: Tensor, features: Tensor, groups: Tensor) -> Tensor:
    """Cross-entropy (B,) from a target over the drawn cells to the attention renormalised over them.

    The target is a softmax of each drawn patch's distance from the mean feature of the slide's draws at the same
    magnification (``groups``, (B, n)), standardised within that magnification: cells that look unlike the bulk of
    the slide at their own scale (a lesion, a digit), whichever magnification shows them. It is a prior for the
    attention while it knows nothing, not part of the estimator (which it leaves unbiased).
    """
    log_p = torch.log(p_drawn.clamp_min(torch.finfo(p_drawn.dtype).tiny))
    log_p = log_p - torch.logsumexp(log_p, dim=1, keepdim=True)
    with torch.no_grad():
        f = features.detach().float()
        z = torch.zeros(f.shape[:2], dtype=f.dtype, device=f.device)
        for j in groups.unique().tolist():
            member = groups == j
            w = member.to(f.dtype)
            count = w.sum(1, keepdim=True).clamp_min(1.0)
            mean = (f * w.unsqueeze(-1)).sum(1, keepdim=True) / count.unsqueeze(-1)
            distance = (f - mean).norm(dim=-1)
            centre = (distance * w).sum(1, keepdim=True) / count
            spread = (((distance - centre) ** 2 * w).sum(1, keepdim=True) / count).sqrt().clamp_min(1e-6)
            z = torch.where(member, (distance - centre) / spread, z)
        target = torch.softmax(NOVELTY_SHARPNESS * z, dim=1).to(log_p.dtype)
    return -(target * log_p).sum(1)


def _float_dtype(net: nn.Module) -> torch.dtype:
    """The dtype of ``net``'s first floating parameter (float32 without one): what its inputs are cast to."""
    param = next((p for p in net.parameters() if p.is_floating_point()), None)
    return torch.float32 if param is None else param.dtype


def _memory_format(channels_last: bool) -> torch.memory_format:
    return torch.channels_last if channels_last else torch.contiguous_format


def embed_patches(
    net: nn.Module, patches: Tensor, chunk: int, channels_last: bool = False, frozen: bool = False
) -> Tensor:
    """``net`` on patches (B, n, 3, p, p) → (B, n, D), ``chunk`` patches per forward so that memory stays bounded.
    Inputs are cast to the net's own dtype (a frozen net may be held in half precision, a float64 run is all
    float64; under autocast the weights stay float32); a ``frozen`` net runs without autograd."""
    b, n = patches.shape[:2]
    flat = patches.flatten(0, 1).contiguous(memory_format=_memory_format(channels_last)).to(_float_dtype(net))
    with torch.no_grad() if frozen else nullcontext():
        return torch.cat([net(c) for c in flat.split(chunk)]).view(b, n, -1)


def valid_cells(
    valid: Tensor | None, shape: Sequence[int], device: torch.device | None = None
) -> tuple[Tensor, Tensor]:
    """Every valid cell of each row, in index order: (cells (B, n), real (B, n) bool), n = the most valid cells
    of any row; shorter rows are padded with their first valid cell (``real`` False), so that the all-cells
    modes never read a background or padding patch."""
    b, n_cells = shape
    if valid is None:
        cells = torch.arange(n_cells, device=device).expand(b, -1)
        return cells, torch.ones(b, n_cells, dtype=torch.bool, device=device)
    counts = valid.sum(-1)
    n = max(int(counts.max()), 1)
    order = torch.sort((~valid).to(torch.int8), dim=-1, stable=True).indices[:, :n]
    real = torch.arange(n, device=valid.device).expand(b, -1) < counts.unsqueeze(-1)
    return torch.where(real, order, order[:, :1]), real
