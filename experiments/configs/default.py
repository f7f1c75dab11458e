"""Default experiment config: ``--config=experiments/configs/default.py:<method>[,<dataset>]``.

  python -m experiments.train --config=experiments/configs/default.py:euar --workdir=runs/euar
  python -m experiments.train --config=experiments/configs/default.py:concat,synthetic:classification \
      --config.num_epochs=20 --workdir=runs/concat

Every field can be overridden with ``--config.<field>=...`` (e.g. ``--config.model.num_experts=16``).
"""

from mmjax.experiment import get_config as _get_config


def get_config(arg: str | None = None):
  method, _, dataset = (arg or "euar").partition(",")
  return _get_config(method, dataset or "synthetic")
