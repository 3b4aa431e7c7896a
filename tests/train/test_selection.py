"""Which rows a dataset keeps (train/selection.py): the caption-hash holdout and the
cross-fitting folds (no Ray)."""

import numpy as np
import pytest


def test_cross_fitting_folds_leave_out_one_caption_hash_fold_of_the_training_rows():
    from align_ray.train.config import TrainConfig
    from align_ray.train.selection import caption_fold, selections

    texts = [f"caption {i}" for i in range(2000)]
    base = dict(data=["d"], output="o", val_fraction=0.2)
    (_, train), (_, val) = selections(TrainConfig(**base))
    held = val.mask(texts)
    folds = np.asarray([caption_fold(t, 2) for t in texts])
    # the folds cut every split alike (the holdout cuts bucket values, a fold their residue)
    assert 0.4 < folds.mean() < 0.6 and 0.4 < folds[held].mean() < 0.6
    for i in (0, 1):
        (_, tr), (_, va) = selections(TrainConfig(**base, folds=2, fold=i))
        m = tr.mask(texts)
        assert not (m & (folds == i)).any()                       # never sees its own fold
        assert (m == (train.mask(texts) & (folds != i))).all()    # and nothing else changes
        assert (va.mask(texts) == held).all()                     # round 1's validation rows
    with pytest.raises(ValueError, match="fold must be in"):
        TrainConfig(**base, folds=2, fold=2)
