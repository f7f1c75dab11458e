"""Train one method: ``python -m experiments.train --config=experiments/configs/default.py:euar``.

Writes ``config.json``, ``metrics.jsonl``, checkpoints and ``test_metrics.json`` under ``--workdir``;
``--resume`` continues a killed run from its latest checkpoint.
"""

import json
import os

from absl import app, flags, logging

from mmjax import experiment
from mmjax.train import evaluate

_CONFIG = experiment.define_config_flag(
    os.path.join(os.path.dirname(__file__), "configs", "default.py"),
    "Experiment config file (and :method[,dataset]).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory.", required=True)
_RESUME = flags.DEFINE_bool("resume", False, "Continue from the latest checkpoint in --workdir.")
_COMPILATION_CACHE = experiment.define_compilation_cache_flag()
_DISTRIBUTED = experiment.define_distributed_flag()


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.WARNING)  # keep orbax's per-save INFO lines out of the output
  experiment.enable_compilation_cache(_COMPILATION_CACHE.value)
  if _DISTRIBUTED.value:
    experiment.initialize_distributed()
  config = _CONFIG.value
  dataset, method = experiment.exit_on_bad_input(experiment.prepare)(config)
  _, _, result = experiment.exit_on_bad_input(experiment.train)(
      config, _WORKDIR.value, resume=_RESUME.value, dataset=dataset, method=method)
  test = evaluate(method, result.state, dataset.splits["test"], dataset.scoring,
                  batch_size=config.eval_batch_size)
  experiment.say(f"best epoch {result.best_epoch}; test: "
                 + " ".join(f"{k}={v:.4f}" for k, v in test.items()))
  experiment.write_results(os.path.join(_WORKDIR.value, "test_metrics.json"),
                           json.dumps(test, indent=1))
  if cache_line := experiment.compilation_cache_line():
    experiment.say(cache_line)


if __name__ == "__main__":
  app.run(main, flags_parser=experiment.parse_flags)
