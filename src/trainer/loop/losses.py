"""Losses that need more than raw outputs. Each takes (outputs (B, width), targets) like the built-in ones, so
models always return raw outputs (logits, values, embeddings) and the loss applies what it needs (log-softmax,
softmax, normalisation, mining)."""

import math

import torch
import torch.nn.functional as F
from torch import nn

from trainer.errors import UserError, is_number


def class_weights_for(value: object, counts: list[int] | None, names: tuple[str, ...]) -> list[float] | None:
    """`loss.class_weights` as one weight per class: null (None), `auto` (inverse frequency: N / (K * n_k) for the
    n_k of the K classes' N training images, so a balanced split weighs 1 each; per label of multi-hot targets,
    from its positives) or a list of K numbers >= 0. `counts`: the training split's (ImageDataset.class_counts)."""
    if value is None:
        return None
    k = len(names)
    if value == "auto":
        if counts is None:
            raise UserError("loss.class_weights=auto: the task's targets have no classes to count (a regression); "
                            "use null")
        total = sum(counts)
        missing = [name for name, n in zip(names, counts) if n == 0]
        if missing:
            raise UserError(f"loss.class_weights=auto: class {missing[0]!r} has no training image, and its inverse "
                            "frequency is infinite; give the weights as a list (loss.class_weights=[...])")
        return [total / (k * n) for n in counts]
    if not isinstance(value, (list, tuple)) or not all(is_number(v) and math.isfinite(v) and v >= 0 for v in value):
        raise UserError(f"loss.class_weights={value!r}: must be null, auto, or a list of {k} numbers >= 0 (one per "
                        "class)")
    if len(value) != k:
        raise UserError(f"loss.class_weights={[float(v) for v in value]}: {len(value)} weights, but the data has {k} "
                        f"classes ({', '.join(names[:5])}{', ...' if k > 5 else ''}), one weight each")
    if not any(value):
        raise UserError(f"loss.class_weights={list(value)}: at least one weight must be > 0")
    return [float(v) for v in value]


class WeightedByClass:
    """A loss with `loss.class_weights`: the weights (a list, as the checkpoint records them) and their tensor,
    a buffer that moves with the loss to the device."""

    class_weights: list[float] | None

    def _set_weights(self: nn.Module, class_weights: list[float] | None) -> torch.Tensor | None:
        self.class_weights = None if class_weights is None else [float(w) for w in class_weights]
        return None if class_weights is None else torch.tensor(self.class_weights, dtype=torch.float32)


class CrossEntropy(WeightedByClass, nn.CrossEntropyLoss):
    """torch's CrossEntropyLoss, with `class_weights` (its `weight`: the weighted mean over the batch)."""

    def __init__(self, label_smoothing: float = 0.0, class_weights: list[float] | None = None) -> None:
        nn.CrossEntropyLoss.__init__(self, weight=None, label_smoothing=label_smoothing)
        self.register_buffer("weight", self._set_weights(class_weights))


class MultiMargin(WeightedByClass, nn.MultiMarginLoss):
    """torch's MultiMarginLoss (multi-class hinge), with `class_weights` (its `weight`)."""

    def __init__(self, p: int = 1, margin: float = 1.0, class_weights: list[float] | None = None) -> None:
        nn.MultiMarginLoss.__init__(self, p=p, margin=margin)
        self.register_buffer("weight", self._set_weights(class_weights))


class NLLOnLogSoftmax(WeightedByClass, nn.Module):
    """Negative log-likelihood of log_softmax(logits) (numerically the same as cross-entropy), with
    `class_weights` (torch's nll_loss `weight`: the weighted mean over the batch)."""

    def __init__(self, class_weights: list[float] | None = None) -> None:
        super().__init__()
        self.register_buffer("weight", self._set_weights(class_weights))

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.nll_loss(F.log_softmax(logits, dim=1), targets, weight=self.weight)


class BCEOneVsRest(WeightedByClass, nn.Module):
    """One-vs-rest binary cross-entropy: each of the K logits is a sigmoid "is it this class?" against the one-hot
    target (a multi-label task's multi-hot targets as they are), averaged over the B x K outputs (torch's
    BCEWithLogitsLoss, numerically stable). `pos_weight`: the weight of a positive output against a negative;
    `class_weights`: the weight of each class's (label's) column, positives and negatives alike."""

    def __init__(self, pos_weight: float | None = None, class_weights: list[float] | None = None) -> None:
        super().__init__()
        if pos_weight is not None and not (is_number(pos_weight) and math.isfinite(pos_weight) and pos_weight > 0):
            raise UserError(f"loss.pos_weight={pos_weight!r}: must be null or a finite number > 0")
        self.pos_weight = pos_weight  # weight of the one positive output against the K - 1 negatives; null: 1
        self.register_buffer("weight", self._set_weights(class_weights))  # (K,), broadcast over the batch

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        # class indices (B,) as one-hot rows; a multi-label task's targets are multi-hot (B, K) already
        hot = targets if targets.ndim == 2 else F.one_hot(targets, logits.shape[1])
        one_hot = hot.to(logits.dtype)  # (B, K)
        pos = None if self.pos_weight is None else torch.tensor(self.pos_weight, device=logits.device)
        return F.binary_cross_entropy_with_logits(logits, one_hot, weight=self.weight, pos_weight=pos)


class MSE(nn.Module):
    """Mean squared error. Against class indices (classification): between softmax(logits) and the one-hot
    targets (a Brier score); against numbers (regression, float targets (B, D)): between the outputs and them."""

    def forward(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if targets.is_floating_point():
            return F.mse_loss(outputs, targets)
        probs = outputs.softmax(dim=1)  # (B, K)
        return F.mse_loss(probs, F.one_hot(targets, probs.shape[1]).to(probs.dtype))


MSEOnSoftmax = MSE  # its name before regression: user code may import it


def pairwise_distances(embeddings: torch.Tensor) -> torch.Tensor:
    """Euclidean distances between the L2-normalised rows of `embeddings` (B, D): (B, B), in [0, 2].
    From the Gram matrix, with the square root's argument kept >= 1e-12: the gradient of a zero distance (each
    row to itself) is zero, not NaN, as it would be through torch.cdist's square root of 0."""
    e = F.normalize(embeddings.float(), dim=1)
    return (2 - 2 * e @ e.T).clamp(min=1e-12).sqrt()


def _pairs(targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Masks (B, B) of the positive pairs (same class, not the same sample) and the negative pairs."""
    same = targets[:, None] == targets[None, :]
    eye = torch.eye(len(targets), dtype=torch.bool, device=targets.device)
    return same & ~eye, ~same


def _balanced_mean(per_pair: torch.Tensor, positive: torch.Tensor, negative: torch.Tensor) -> torch.Tensor:
    """The mean over positive pairs plus the mean over negative pairs: with 10 classes, 9 in 10 pairs are negative,
    and a plain mean would hardly pull same-class embeddings together."""
    total = per_pair.new_zeros(())
    for mask in (positive, negative):
        if mask.any():
            total = total + per_pair[mask].mean()
    return total


class MinedTripletLoss(nn.Module):
    """torch's TripletMarginLoss on triplets mined within each batch, on L2-normalised embeddings (B, D) with class
    targets (B,). `mining`: batch_hard (each anchor with its farthest positive and nearest negative, Hermans et al.
    2017) or semi_hard (each positive pair with the nearest negative farther than the positive, else the farthest
    negative, as FaceNet). Anchors without a positive in the batch give no triplet."""

    def __init__(self, margin: float = 0.2, mining: str = "semi_hard") -> None:
        super().__init__()
        if not (is_number(margin) and math.isfinite(margin) and margin > 0):
            raise UserError(f"loss.margin={margin!r}: must be a finite number > 0")
        if mining not in ("batch_hard", "semi_hard"):
            raise UserError(f"loss.mining={mining!r}: use batch_hard or semi_hard")
        self.mining, self.triplet = mining, nn.TripletMarginLoss(margin=margin, p=2)

    def forward(self, embeddings: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        e = F.normalize(embeddings.float(), dim=1)  # (B, D)
        with torch.no_grad():  # which triplets: no gradient through the choice
            d = pairwise_distances(e)  # (B, B)
            positive, negative = _pairs(targets)
            if self.mining == "batch_hard":
                anchors = (positive.any(1) & negative.any(1)).nonzero().squeeze(1)  # (A,)
                pos = d.masked_fill(~positive, -1).argmax(1)[anchors]  # the farthest positive
                neg = d.masked_fill(~negative, 3).argmin(1)[anchors]  # the nearest negative
            else:
                # Each anchor's negative distances sorted once; a binary search then finds, for every pair at once,
                # the first negative farther than its positive: (B, B) work, where a (pairs, B) table of the
                # candidates cost 70 ms a batch of 256 on one CPU thread.
                by_distance, order = d.masked_fill(~negative, 4.0).sort(dim=1, stable=True)  # (B, B), 4: no negative
                first_farther = torch.searchsorted(by_distance, d.contiguous(), right=True)  # (B, B) for each pair
                count = negative.sum(1, keepdim=True)  # (B, 1) negatives of each anchor
                farthest = order.gather(1, (count - 1).clamp(min=0))  # (B, 1)
                chosen = torch.where(first_farther < count, order.gather(1, first_farther.clamp(max=len(d) - 1)),
                                     farthest)  # (B, B): the negative of each (anchor, positive) pair
                anchors, pos = (positive & (count > 0)).nonzero(as_tuple=True)  # (P,) each
                neg = chosen[anchors, pos]
        if not len(anchors):
            return embeddings.sum() * 0  # no positive pair in the batch: nothing to learn from, a zero with a graph
        return self.triplet(e[anchors], e[pos], e[neg])


class PairwiseHingeEmbeddingLoss(nn.Module):
    """torch's HingeEmbeddingLoss on every pair of the batch: x the distance between the L2-normalised embeddings,
    y = 1 for a same-class pair (its distance is the loss), -1 otherwise (max(0, margin - distance)); positive and
    negative pairs weigh the same (see _balanced_mean)."""

    def __init__(self, margin: float = 1.0) -> None:
        super().__init__()
        if not (is_number(margin) and math.isfinite(margin) and margin > 0):
            raise UserError(f"loss.margin={margin!r}: must be a finite number > 0")
        self.hinge = nn.HingeEmbeddingLoss(margin=margin, reduction="none")

    def forward(self, embeddings: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        d = pairwise_distances(embeddings)  # (B, B)
        positive, negative = _pairs(targets)
        y = torch.where(positive, 1.0, -1.0)
        return _balanced_mean(self.hinge(d, y), positive, negative)


class ContrastiveLoss(nn.Module):
    """The contrastive loss of Hadsell, Chopra and LeCun (2006) on every pair of the batch: d² for a same-class
    pair, max(0, margin - d)² otherwise, d the distance between the L2-normalised embeddings; positive and
    negative pairs weigh the same."""

    def __init__(self, margin: float = 1.0) -> None:
        super().__init__()
        if not (is_number(margin) and math.isfinite(margin) and margin > 0):
            raise UserError(f"loss.margin={margin!r}: must be a finite number > 0")
        self.margin = margin

    def forward(self, embeddings: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        d = pairwise_distances(embeddings)  # (B, B)
        positive, negative = _pairs(targets)
        per_pair = torch.where(positive, d * d, (self.margin - d).clamp(min=0) ** 2)
        return _balanced_mean(per_pair, positive, negative)
