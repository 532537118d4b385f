"""Metric learning: the model maps each image to an embedding, and images of a class lie close together."""

from __future__ import annotations

from typing import Any, Iterable, Sequence

import torch
import torch.distributed as td
import torch.nn.functional as F
from torch import nn

from trainer.errors import UserError, require_int
from trainer.tasks.base import Forward, SumMetrics, Task, embed_all

QUERY_CHUNK = 512  # queries compared with the whole reference at once: 512 x 55k distances, 110 MiB
MAX_PROJECTED = 1000  # validation embeddings sent to TensorBoard's projector


class Embedding(Task):
    """An `embedding_dim`-wide embedding per image, L2-normalised wherever distances are taken; trained with a
    loss on the distances within a batch (triplet, hinge_embedding, contrastive) against class targets. Evaluated
    by nearest neighbours: each validation or test image against the training split's embeddings (`knn_acc`, the
    1-NN accuracy, and `recall_at_<k>`, a same-class image among the k nearest). predict.py names the nearest
    classes by the distance to each class's mean embedding (`centroids`, stored in the checkpoint)."""

    name = "embedding"
    losses = ("triplet", "hinge_embedding", "contrastive")
    higher_is_better = ("knn_acc",)
    export_output = "float32 embeddings (batch, embedding_dim); L2-normalise them, then compare by distance"

    def __init__(self, embedding_dim: int = 64) -> None:
        self.embedding_dim = require_int("task.embedding_dim", embedding_dim, 1)
        self.centroids: torch.Tensor | None = None  # (classes, D), normalised, from the latest evaluation

    def output_size(self, num_targets: int) -> int:
        return self.embedding_dim

    def check_loss(self, loss_fn: nn.Module, data: Any, device: torch.device) -> None:
        super().check_loss(loss_fn, data, device)
        if data.train.batch_size < 2:
            raise UserError(f"dataset.batch_size={data.train.batch_size}: a batch must hold two images of a class "
                            f"for loss={type(loss_fn).__name__} to compare; use a batch of several per class")

    def fit(self, targets: torch.Tensor, loss_fn: nn.Module | None = None) -> None:
        if len(targets) and int(torch.bincount(targets).max()) < 2:
            raise UserError("task=embedding: no class has two training images, so no batch can hold a positive pair")

    def metrics(self, split: str, *, data: Any, device: torch.device, top_k: int | None, full: bool,
                extra: dict[str, Any] | None = None) -> EmbeddingMetrics:
        if split == "train":
            return EmbeddingMetrics(device)
        return EmbeddingMetrics(device, reference=data.train_eval, num_classes=data.num_classes, top_k=top_k,
                                on_reference=self._set_centroids, extra=extra)

    def _set_centroids(self, centroids: torch.Tensor) -> None:
        self.centroids = centroids.cpu()

    def predictions(self, outputs: torch.Tensor, names: Sequence[str], top: int) -> list[list[tuple[int, str, float]]]:
        if self.centroids is None:
            raise UserError("the checkpoint holds no class centroids (it was written before its first validation); "
                            "use a checkpoint written at an epoch's end, e.g. best.pt")
        e = F.normalize(outputs.float(), dim=1)  # (B, D)
        d = torch.cdist(e, F.normalize(self.centroids.to(e), dim=1))  # (B, classes)
        values, indices = d.topk(min(top, d.shape[1]), dim=1, largest=False)
        return [[(i, names[i], v) for v, i in zip(vs, ix)] for vs, ix in zip(values.tolist(), indices.tolist())]

    def value_text(self, value: float) -> str:
        return f"distance {value:.3f}"

    def state_dict(self) -> dict:
        return {"name": self.name, "embedding_dim": self.embedding_dim, "centroids": self.centroids}

    def load_fitted(self, state: dict | None, where: str) -> None:
        if state is not None:
            self.centroids = type(self).from_state(state, where).centroids

    @classmethod
    def from_state(cls, state: dict, where: str) -> Embedding:
        dim, centroids = state.get("embedding_dim"), state.get("centroids")
        if not (isinstance(dim, int) and dim >= 1 and (centroids is None or (
                isinstance(centroids, torch.Tensor) and centroids.ndim == 2 and centroids.shape[1] == dim and
                centroids.is_floating_point()))):
            raise UserError(f"{where}: its embedding task ({dim!r} wide, centroids "
                            f"{tuple(centroids.shape) if isinstance(centroids, torch.Tensor) else centroids!r}) is "
                            "not one this framework writes")
        task = cls(dim)
        task.centroids = centroids
        return task


class EmbeddingMetrics(SumMetrics):
    """The loss; with a `reference` loader (validation, test) also the 1-NN accuracy and recall@k of the split's
    embeddings against the reference's (the training split, read as evaluation reads it). `begin` embeds the
    reference (each rank its shard, gathered), so every evaluation measures the weights it evaluates; the counts
    are hits, summed over ranks. Keeps the first MAX_PROJECTED embeddings for the projector (`last_projected`)."""

    def __init__(self, device: torch.device, reference: Iterable | None = None, num_classes: int = 0,
                 top_k: int | None = None, on_reference: Any = None, extra: dict[str, Any] | None = None) -> None:
        self.reference, self.num_classes, self.on_reference = reference, num_classes, on_reference
        self.top_k = top_k if top_k is not None and top_k > 1 else None
        self.ref: tuple[torch.Tensor, torch.Tensor] | None = None  # (N, D) normalised, (N,) classes
        self.projected: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.last_projected: tuple[torch.Tensor, torch.Tensor] | None = None  # (n, D), (n,) CPU
        super().__init__(device, extra)

    def names(self, prefix: str) -> tuple[str, ...]:
        names = ["loss"]
        if self.reference is not None:
            names += ["knn_acc", *([f"recall_at_{self.top_k}"] if self.top_k else [])]
        return tuple(f"{prefix}/{n}" for n in [*names, *self.extra])

    def _zero_counts(self) -> dict[str, torch.Tensor]:
        return {"hits": torch.zeros(3, dtype=torch.int64, device=self.device)}  # 1-NN, within k, queries

    def begin(self, forward: Forward, limit_batches: int | None = None) -> None:
        if self.reference is None:
            return
        embeddings, classes = embed_all(forward, self.reference, limit_batches)  # this rank's shard
        if td.is_available() and td.is_initialized():  # every rank compares with the whole training split
            parts: list[Any] = [None] * td.get_world_size()
            td.all_gather_object(parts, (embeddings.cpu(), classes.cpu()))
            embeddings, classes = torch.cat([e for e, _ in parts]), torch.cat([c for _, c in parts])
        e = F.normalize(embeddings.to(self.device), dim=1)  # (N, D)
        classes = classes.to(self.device)
        self.ref = (e, classes)
        sums = torch.zeros(self.num_classes, e.shape[1], device=self.device).index_add_(0, classes, e)
        if self.on_reference is not None:
            self.on_reference(F.normalize(sums, dim=1))  # (classes, D): each class's mean direction
        self.projected, self.last_projected = [], None

    def _accumulate(self, outputs: torch.Tensor, targets: torch.Tensor) -> None:
        if self.ref is None:  # the training split's metrics: the loss alone, and nothing copied to the host
            return
        kept = sum(len(t) for _, t in self.projected)
        if kept < MAX_PROJECTED:
            self.projected.append((outputs[:MAX_PROJECTED - kept].cpu(), targets[:MAX_PROJECTED - kept].cpu()))
        ref, ref_classes = self.ref
        k = min(self.top_k or 1, len(ref))
        q = F.normalize(outputs, dim=1)
        for start in range(0, len(q), QUERY_CHUNK):
            chunk, truth = q[start:start + QUERY_CHUNK], targets[start:start + QUERY_CHUNK]
            nearest = (chunk @ ref.T).topk(k, dim=1).indices  # (c, k): largest cosine = smallest distance
            same = ref_classes[nearest] == truth[:, None]  # (c, k)
            self.counts["hits"] += torch.stack([same[:, 0].sum(), same.any(1).sum(),
                                                torch.tensor(len(chunk), device=self.device)])

    def _values(self, counts: dict[str, torch.Tensor], prefix: str) -> dict[str, float]:
        if self.projected:
            self.last_projected = (torch.cat([e for e, _ in self.projected]), torch.cat([t for _, t in self.projected]))
            self.projected = []
        if self.reference is None:
            return {}
        one, within, n = counts["hits"].tolist()
        nan = float("nan")
        return {f"{prefix}/knn_acc": one / n if n else nan,
                **({f"{prefix}/recall_at_{self.top_k}": within / n if n else nan} if self.top_k else {})}
