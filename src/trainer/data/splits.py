"""Which training images validate, test and train: the seeded hold-out, stratified k-fold, and class counts.

Everything here depends on `split_seed` and the labels only, never on the run's seed: every run of a sweep (every
seed, every fold's model) tests on the same images, and the folds of one `split_seed` partition the same pool.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from trainer.errors import UserError, require_int, shown

SAMPLERS = ("shuffle", "balanced")  # dataset.sampler: how each epoch's training order is drawn


@dataclass(frozen=True)
class Folds:
    """k-fold cross-validation: the training pool (what the test split leaves) in `folds` stratified parts; fold
    `fold` validates, the others train. None for a dataset without folds."""

    folds: int
    fold: int

    @staticmethod
    def of(folds: int | None, fold: int) -> Folds | None:
        """`dataset.folds`, `dataset.fold`, checked: None without folds."""
        if folds is None:
            if fold != 0:
                raise UserError(f"dataset.fold={shown(fold)}: needs dataset.folds (the number of folds, >= 2)")
            return None
        require_int("dataset.folds", folds, 2)
        if not isinstance(fold, int) or isinstance(fold, bool) or not 0 <= fold < folds:
            raise UserError(f"dataset.fold={shown(fold)}: must be an integer in 0..{folds - 1} for "
                            f"dataset.folds={folds}")
        return Folds(folds, fold)


def split_size(key: str, value: object, pool: int) -> int:
    """A split size given as a count (int >= 0) or a fraction (float in [0, 1)) of `pool` images, as a count."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0 or (
            isinstance(value, float) and value >= 1):
        raise UserError(f"dataset.{key}={shown(value)}: must be a count (an integer >= 0) or a fraction in [0, 1)")
    return int(value * pool) if isinstance(value, float) else value


def split_indices(labels: torch.Tensor, *, hold_test: bool, hold_val: bool, val_size: int | float,
                  test_size: int | float, split_seed: int,
                  folds: Folds | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(train, val, test) positions into the training images whose targets are `labels` (N,) or (N, D).

    One seeded permutation of the pool: test first (`hold_test`: the source has no test split of its own), then,
    without folds, val (`hold_val`), then train. With folds, the rest after test is cut into stratified folds (each
    class shared out evenly, in the permutation's order; targets that are not class indices: plain seeded parts)."""
    pool = len(labels)
    n_test = split_size("test_size", test_size, pool) if hold_test else 0
    n_val = split_size("val_size", val_size, pool) if hold_val and folds is None else 0
    if n_test + n_val >= pool:
        held = f"dataset.val_size={val_size}" + (f", dataset.test_size={test_size}" if n_test else "")
        raise UserError(f"{held}: holds out {n_val + n_test} images, which must be smaller than the {pool} "
                        "training images")
    perm = torch.randperm(pool, generator=torch.Generator().manual_seed(split_seed))
    test_idx, val_idx, train_idx = perm[:n_test], perm[n_test:n_test + n_val], perm[n_test + n_val:]
    if folds is None:
        return train_idx, val_idx, test_idx
    rest = train_idx
    if len(rest) < folds.folds:
        raise UserError(f"dataset.folds={folds.folds}: {len(rest)} training images cannot fill {folds.folds} folds")
    order = rest
    if labels.ndim == 1 and not labels.is_floating_point():  # class indices: stratified
        # stable: within a class, the seeded permutation's order; consecutive positions go to consecutive folds, so
        # each class is shared out evenly over the folds (sizes differ by at most one per class)
        order = rest[torch.argsort(labels[rest], stable=True)]
    part = torch.arange(len(order)) % folds.folds  # (n,) the fold of each position of `order`
    val, train = order[part == folds.fold], order[part != folds.fold]
    return train.sort().values, val.sort().values, test_idx


def class_counts(labels: torch.Tensor, num_classes: int) -> list[int] | None:
    """Images per class of class-index labels (N,), or positives per label of multi-hot targets (N, K); None for
    values (a regression has no classes)."""
    if labels.ndim == 1 and not labels.is_floating_point():
        return torch.bincount(labels, minlength=num_classes).tolist()
    if labels.ndim == 2 and labels.shape[1] == num_classes and bool(((labels == 0) | (labels == 1)).all()):
        return labels.sum(dim=0).to(torch.int64).tolist()
    return None


def balanced_weights(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Per-image sampling weights (N,) float64 that give every class present the same total: 1 / its count."""
    counts = torch.bincount(labels, minlength=num_classes).to(torch.float64)
    return 1.0 / counts[labels]
