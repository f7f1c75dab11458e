"""Data layer: batch schema, datasets, loaders, synthetic generator, batching, corruption protocols."""

from mmjax.data.batch import Batch
from mmjax.data.dataset import SPLITS, Dataset
