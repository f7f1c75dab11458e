"""Generic training: state, sharded steps, the epoch loop with early stopping, checkpoints, and
seeds trained as one vmapped program."""

from mmjax.train.checkpoint import Checkpointer
from mmjax.train.loop import (
    FitResult, TrainingDiverged, TrainingInterrupted, check_workdir, default_train_config,
    evaluate, fit, init_state, make_optimizer, predict, split_metrics, train_corruption)
from mmjax.train.seeds import fit_seeds
from mmjax.train.sharding import data_mesh, put_batch
from mmjax.train.state import TrainState
from mmjax.train.steps import (
    compile_epoch, compile_steps, make_epoch, make_eval_step, make_train_step, mask_optimizer)
