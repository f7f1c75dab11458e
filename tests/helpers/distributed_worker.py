"""One process of a data-parallel training run, for tests/test_distributed.py.

  python -m tests.helpers.distributed_worker OUT.npz EPOCHS [WORKDIR|- [RESUME [COORDINATOR
      NUM_PROCESSES PROCESS_ID]]]

Trains concat and EUAR for EPOCHS epochs on small synthetic data over every device of every process
(into ``WORKDIR/<method>`` through :func:`mmjax.experiment.train` unless WORKDIR is ``-``; RESUME
``1`` resumes there) and saves the final parameters (from process 0). Without the last three
arguments it runs as a single process. Prints ``[process i] <line>`` for every line it is given.
"""

import os
import sys

import jax
import numpy as np


def main(out, epochs, workdir="-", resume="0", coordinator=None, num_processes=1, process_id=0):
  if coordinator is not None:
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=int(num_processes),
                               process_id=int(process_id))
  from mmjax import data, experiment  # pylint: disable=g-import-not-at-top
  from mmjax.train import data_mesh  # pylint: disable=g-import-not-at-top

  dataset = data.standardize(data.make_synthetic(jax.random.key(0), 96, 32, 16, seq_len=6,
                                                 dims=4))
  params = {}
  for name in ("concat", "euar"):
    config = experiment.get_config(name)
    config.num_epochs, config.batch_size, config.progress = int(epochs), 16, False
    config.model.hidden = 16
    _, _, result = experiment.train(
        config, None if workdir == "-" else os.path.join(workdir, name), resume=resume == "1",
        dataset=dataset, log=lambda line: print(f"[process {jax.process_index()}] {line}"))
    leaves = jax.tree_util.tree_leaves_with_path(result.state.params)
    params.update({f"{name}/{jax.tree_util.keystr(p)}": np.asarray(v) for p, v in leaves})
    params[f"{name}/devices"] = np.asarray(data_mesh().size)
  if jax.process_index() == 0:
    np.savez(out, **params)


if __name__ == "__main__":
  main(*sys.argv[1:])
