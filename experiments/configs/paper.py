"""The papers' training settings: ``--config=experiments/configs/paper.py:<method>[,<dataset>]``.

  python -m experiments.train --config=experiments/configs/paper.py:ease,mmsa:/data/MOSI/aligned_50.pkl \
      --workdir=runs/ease_mosi

* ``euar`` (papers/000 supplement): batch 16, 100 epochs, Adam; alpha/beta/lambda = 1e-3/1e-5/1e-3, N = 8, k = 3
  (the model defaults). The learning rate is not given; 1e-3.
* ``ease`` (papers/004 App. A.3): batch 64, Adam lr 1e-5, 200 epochs; lambda_1/2/3 = 0.5/0.2/0.5, beta_1 = 0.02
  (the model defaults). Table 4 ablations: ``--config.model.use_{ucmi,ucsa,mipc,uada,anchor,cons,asym}=False``.
* ``concat`` / ``late_fusion``: the EUAR settings.

Early stopping keeps its default patience (10); pass ``--config.patience=0`` to train every epoch.
"""

from mmjax.experiment import get_config as _get_config

PAPER_SETTINGS = {
    "euar": dict(batch_size=16, num_epochs=100, learning_rate=1e-3),
    "concat": dict(batch_size=16, num_epochs=100, learning_rate=1e-3),
    "late_fusion": dict(batch_size=16, num_epochs=100, learning_rate=1e-3),
    "ease": dict(batch_size=64, num_epochs=200, learning_rate=1e-5),
}


def get_config(arg: str | None = None):
  method, _, dataset = (arg or "euar").partition(",")
  config = _get_config(method, dataset or "synthetic")
  config.update(PAPER_SETTINGS.get(method, {}))
  return config
