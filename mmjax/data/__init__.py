"""Data layer: batch schema, datasets, loaders, synthetic generator, batching, corruption protocols.

See ``docs/datasets.md`` (formats), ``docs/synthetic.md`` (the embedded default data) and
``docs/protocols.md`` (corruption protocols, the named protocol table of
:mod:`mmjax.data.protocols` and train-time corruption, :mod:`mmjax.data.train_corruption`).
"""

from mmjax.data.batch import Batch
from mmjax.data.batching import (
    STD_FLOOR, FeatureStats, apply_standardizer, check_batch_size, fit_standardizer,
    iterate_batches, num_batches, standardize)
from mmjax.data.corruption import (
    drop_modalities, drop_one_modality, gaussian_noise, keep_modalities, laplace_noise,
    laplace_or_erasing, mask_time_steps, mix_noise, modality_subsets, noisy_views, random_erasing,
    salt_pepper_noise, samplewise_gaussian_noise, samplewise_salt_pepper_noise)
from mmjax.data.dataset import SCORINGS, SPLITS, Dataset
from mmjax.data.protocols import Protocol
from mmjax.data.train_corruption import (
    FAIR_RECIPE, TRAIN_CORRUPTION_STREAM, TrainCorruption, parse_train_corruption)
from mmjax.data.loaders import (
    LOADERS, load_dataset, load_mmsa_pickle, load_multiview_mat, load_npz, load_sdk_pickle)
from mmjax.data.synthetic import (
    CLASS_BINS, DEFAULT_MODALITIES, ModalitySpec, make_synthetic, sentiment_to_class)
