"""The papers' training settings: ``--config=experiments/configs/paper.py:<method>[,<dataset>]``.

  python -m experiments.train --config=experiments/configs/paper.py:ease,mmsa:/data/MOSI/aligned_50.pkl \
      --workdir=runs/ease_mosi

* ``euar`` (papers/000 supplement): batch 16, 100 epochs, Adam; alpha/beta/lambda = 1e-3/1e-5/1e-3, N = 8, k = 3,
  the KL summed over dimensions as eq. 4 writes it (``model.kl_reduction="sum"``), the load balancing at eq. 7's
  scale (``model.balance_scale="euar"``) — the model defaults (docs/euar.md). The learning rate is not given; 1e-3.
  Fig. 4 ablation: ``--config.model.num_experts=2`` (k clamped to 2).
* ``ease`` (papers/004 App. A.3): batch 64, Adam, 200 epochs; lambda_1/2/3 = 0.5/0.2/0.5, beta_1 = 0.02 (the
  model defaults, among them mmjax's two fixes: ``L_uada`` with normalised kernels and ``L_ucmi`` averaged over the
  feature dimensions — ``--config.model.uada_normalize=False --config.model.ucmi_reduction=sum`` for eq. 4-7 as
  written, docs/ease.md); trained with the LNLN corruption (per-sample masking rate ~ U(0, 1), half the samples clean,
  ``train_corruption="method"``). Learning rate 1e-3, not the paper's 1e-5: that is the rate of its pre-trained
  BERT backbone, while mmjax's encoders train from scratch (``--config.learning_rate=1e-5`` for the literal value).
  Table 4 ablations: ``--config.model.use_{ucmi,ucsa,mipc,uada,anchor,cons,asym}=False``; "w/o ALL" =
  ``use_ucmi=False,use_ucsa=False,use_mipc=False``.
* ``concat`` / ``late_fusion`` / ``late_fusion_joint``: the EUAR settings.
* ``emmr`` (papers/002 Table 7): batch 32, 20 epochs, Adam lr 1e-3; d = 300, dropout 0.3, lambda_1 = lambda_2 = 0.1
  (the model defaults; stage 1, the full-modality network, ``--config.model.pretrain_epochs``, default 20), and the
  paper-literal choices where mmjax's defaults differ (docs/emmr.md): eq. 14 without mmjax's view loss
  (``lambda_semantic=0``), the frozen teacher fed the missing-modality input (``teacher_input="corrupted"``, §3.2 and
  the authors' code), ``L_backward`` on the TF decoder only (``backward_members="tf"``, the authors' code); model
  selection on the valid split corrupted like the training batches (``validate_corrupted``: the paper trains,
  validates and tests at one missing ratio). A
  classification task (3-class MOSI-style or 2-class IEMOCAP-style labels), e.g. ``paper.py:emmr,synthetic:classification``.
  Tables 2-3 ablations: ``--config.model.members=tf`` (backbone only) / ``tf,ae`` / ``tf,mmin``,
  ``--config.model.fusion=max|average``, ``--config.model.use_forward=False`` / ``use_backward=False``.
* ``samlml[/<column>]`` (papers/003 Table 7, App. A.5): AdamW (PyTorch's default weight decay 0.01; the paper
  gives none), batch / lr / model hyper-parameters of the column ``mosi`` (default), ``mosei``, ``urfunny`` or
  ``mustard``. MOSI/MOSEI train with MSE (``config.task="regression"``), UR-FUNNY/MUStARD with BCE: a 2-class
  classification dataset, whose softmax cross-entropy equals BCE on the logit difference
  (``config.task="classification"``; a dataset of the other task is refused). Epochs are not given: 100.
  Table 7 gives no head count: 4 heads (the model default), 5 for UR-FUNNY's d = 150 (4 does not divide it; 30 per
  head as MOSI's 120 / 4). Table 4 ablations: ``--config.model.use_{noise,de,mix,var,con}=False``,
  ``--config.model.supervise_intra=False`` / ``supervise_inter=False`` (unsupervised intra-/inter-modal attention).

Early stopping keeps its default patience (10); pass ``--config.patience=0`` to train every epoch.
"""

from mmjax.experiment import get_config as _get_config

PAPER_SETTINGS = {
    "euar": dict(batch_size=16, num_epochs=100, learning_rate=1e-3),
    "concat": dict(batch_size=16, num_epochs=100, learning_rate=1e-3),
    "late_fusion": dict(batch_size=16, num_epochs=100, learning_rate=1e-3),
    "late_fusion_joint": dict(batch_size=16, num_epochs=100, learning_rate=1e-3),
    "ease": dict(batch_size=64, num_epochs=200, learning_rate=1e-3),
    "emmr": dict(batch_size=32, num_epochs=20, learning_rate=1e-3, task="classification",
                 validate_corrupted=True),
    "samlml": dict(num_epochs=100, weight_decay=0.01),
}

# Model fields where the paper's choice is not mmjax's default (the defaults stay documented options).
PAPER_MODELS = {
    "emmr": dict(lambda_semantic=0.0, teacher_input="corrupted", backward_members="tf"),
}

# SAM-LML Table 7, one column per dataset: (training settings, model hyper-parameters).
SAMLML_TABLE7 = {
    "mosi": (dict(task="regression", batch_size=48, learning_rate=1e-5),
             dict(hidden=120, rho=5, beta=0.1, gamma=0.5, gamma1=1.0, alpha_p=1.0, alpha_de=0.01,
                  alpha=0.005, alpha_mix=0.01, alpha_c=0.005)),
    "mosei": (dict(task="regression", batch_size=64, learning_rate=1e-5),
              dict(hidden=180, rho=5, beta=0.1, gamma=0.5, gamma1=1.0, alpha_p=0.1, alpha_de=0.5,
                   alpha=0.005, alpha_mix=0.01, alpha_c=0.005)),
    "urfunny": (dict(task="classification", batch_size=64, learning_rate=1e-6),
                dict(hidden=150, num_heads=5, rho=6, beta=0.1, gamma=0.5, gamma1=0.3, alpha_p=1e-5,
                     alpha_de=1e-4, alpha=1e-4, alpha_mix=0.1, alpha_c=1e-5)),
    "mustard": (dict(task="classification", batch_size=48, learning_rate=5e-6),
                dict(hidden=48, rho=7, beta=0.1, gamma=1.0, gamma1=0.8, alpha_p=0.05,
                     alpha_de=0.01, alpha=1e-4, alpha_mix=1e-5, alpha_c=0.05)),
}


def get_config(arg: str | None = None):
  method, _, dataset = (arg or "euar").partition(",")
  method, _, column = method.partition("/")
  config = _get_config(method, dataset or "synthetic")
  config.update(PAPER_SETTINGS.get(method, {}))
  config.model.update(PAPER_MODELS.get(method, {}))
  if method == "samlml":
    if (column or "mosi") not in SAMLML_TABLE7:
      raise ValueError(f"config: unknown SAM-LML Table 7 column {column!r}; "
                       f"available: {sorted(SAMLML_TABLE7)}")
    train, model = SAMLML_TABLE7[column or "mosi"]
    config.update(train)
    config.model.update(model)
  elif column:
    raise ValueError(f"config: {method!r} has no per-dataset paper columns (got {column!r})")
  return config
