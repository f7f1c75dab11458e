"""Train (or load) each method per seed, then sweep the robustness protocols on the test split.

  python -m experiments.robustness --methods=euar,concat --seeds=3 --workdir=runs/robustness

Writes ``results.json`` (every metric, every seed), ``results.md`` (mean ± std over seeds) and one
PNG curve per protocol under ``--workdir``; prints the Markdown table. A seed whose training finished
earlier in the same workdir is not retrained: its best checkpoint is loaded (``--resume`` semantics).
``--vmap_seeds`` trains a method's fresh seeds together as one vmapped program (one compilation; each
seed equals its own run up to float rounding; ``--exact_seeds``: bit-identical, ``lax.map`` inside the
program; ``mmjax.train.fit_seeds``).

Every model trains with ``--config.train_corruption`` (default ``method``: each method's own paper
regime; ``fair`` or any spec gives every method the same corrupted training data, see
``mmjax.data.train_corruption``); the test protocols are then swept over those models.

``--matched=missing_rate,mix`` adds SAM-LML's protocol (App. A.5): per level one more model, trained
with ``train_corruption = "<protocol>:<level>"`` and validated on data corrupted at that level
(``<workdir>/<method>/seed<s>/matched_<protocol>/<level>``), reported as protocol
``matched_<protocol>``. With ``--noise_level=representation`` the noise protocols ``mix`` and
``laplace_erasing`` of ``--matched`` perturb SAM-LML's unimodal representations instead (eq. 35, App.
A.14: ``model.representation_noise = <level>`` in training, validation and test; valid and test
splits stay clean), reported as ``matched_<protocol>_representation``.

SAM-LML's Table 4 ablations are methods too: ``--methods=samlml,samlml:use_noise=False,...``
(``<method>:<model field>=<value>,...``, values as Python literals) trains each variant under its
own name.
"""

import dataclasses
import json
import os

import jax
from absl import app, flags, logging

from mmjax import experiment, robustness
from mmjax.methods.samlml import REPRESENTATION_PROTOCOLS
from mmjax.train import predict, split_metrics
from mmjax.train.sharding import is_main_process

_CONFIG = experiment.define_config_flag(
    os.path.join(os.path.dirname(__file__), "configs", "default.py"),
    "Base config; --methods replaces its method (and model defaults).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory.", required=True)
_COMPILATION_CACHE = experiment.define_compilation_cache_flag()
_DISTRIBUTED = experiment.define_distributed_flag()
_METHODS = flags.DEFINE_list("methods", ["euar", "concat"], "Methods to compare.")
_SEEDS = flags.DEFINE_integer("seeds", 3, "Training seeds per method (0 .. seeds-1).", lower_bound=1)
_VMAP_SEEDS = flags.DEFINE_bool(
    "vmap_seeds", False,
    "Train the seeds of a method that have not started yet as one vmapped program "
    "(mmjax.train.fit_seeds: compiled once; each seed equals its own run up to float rounding, "
    "which training amplifies); seeds that started earlier are resumed one by one.")
_EXACT_SEEDS = flags.DEFINE_bool(
    "exact_seeds", False,
    "With --vmap_seeds: run the seeds one after another inside the one program (lax.map) "
    "instead of batched, bit-identical to separate runs.")
_PROTOCOLS = flags.DEFINE_list(
    "protocols", ["missing_rate", "fixed_subsets", "sample_gaussian", "gaussian", "salt_pepper",
                  "mix"],
    "Protocols to sweep (see mmjax.robustness).")
_NOISE_MODALITIES = flags.DEFINE_list(
    "noise_modalities", [], "Modalities the noise protocols corrupt (default: all).")
_MATCHED = flags.DEFINE_list(
    "matched", [],
    "Protocols also run the SAM-LML way: one model per level, trained and validated at that level.")
_MATCHED_LEVELS = flags.DEFINE_list(
    "matched_levels", [], "Levels --matched trains at (default: each protocol's levels).")
_NOISE_LEVEL = flags.DEFINE_enum(
    "noise_level", "input", ["input", "representation"],
    "Where --matched=mix / laplace_erasing add noise: the input features (any method) or SAM-LML's "
    "unimodal representations U_m (eq. 35, App. A.14; methods with model.representation_noise).")
_PLOTS = flags.DEFINE_bool("plots", True, "Write PNG robustness curves (needs matplotlib).")


def _prepare(base):
  """Everything that can fail on bad flags, before any training: data, protocols, configs."""
  configs = {}
  for name in experiment.split_variants(_METHODS.value):
    configs[name] = experiment.variant_config(base, name, flag="--methods")
    experiment.check_config(configs[name])
  dataset = experiment.load_data(base)
  noise = _NOISE_MODALITIES.value or None
  if noise:
    unknown = sorted(set(noise) - set(dataset.modalities))
    if unknown:
      raise ValueError(f"--noise_modalities: unknown {unknown}; the data has {list(dataset.modalities)}")
  available = robustness.protocols(dataset.modalities, noise, base.noisy_view_fraction)
  chosen = robustness.select(_PROTOCOLS.value, available)
  matched = robustness.select(_MATCHED.value, available)
  if _MATCHED_LEVELS.value:
    try:
      levels = tuple(float(level) for level in _MATCHED_LEVELS.value)
    except ValueError:
      raise ValueError(f"--matched_levels: expected numbers, got {_MATCHED_LEVELS.value}") from None
    for p in matched:
      bad = [level for level in levels if level < 0 or (p.high is not None and level > p.high)]
      if bad:
        raise ValueError(f"--matched_levels: {bad} outside {p.name}'s range [0, {p.high}]")
    matched = [dataclasses.replace(p, levels=levels) for p in matched]
  tuple_levels = [p.name for p in matched if not p.numeric]
  if tuple_levels:
    raise ValueError(f"--matched: {tuple_levels} have no numeric levels to train at")
  if _NOISE_LEVEL.value == "representation":
    unsupported = [p.name for p in matched if p.name not in REPRESENTATION_PROTOCOLS]
    if unsupported or not matched:
      raise ValueError(f"--noise_level=representation: --matched must name noise protocols among "
                       f"{sorted(REPRESENTATION_PROTOCOLS)}, got {_MATCHED.value}")
    without = [n for n, c in configs.items() if "representation_noise" not in c.model]
    if without:
      raise ValueError(f"--noise_level=representation: {without} have no representation-level "
                       "noise (model.representation_noise; SAM-LML has it)")
  for name, config in configs.items():
    experiment.check_method(config, dataset)  # model and train-corruption errors surface now
  return dataset, chosen, matched, configs


def _started(workdir):
  """Whether an earlier run began in ``workdir`` (it wrote ``config.json``): then it is resumed
  (or reloaded, if finished); a fresh workdir starts fresh, without a "no checkpoint" line."""
  return os.path.exists(os.path.join(workdir, "config.json"))


def _predictor(method, state, config):
  return lambda split: predict(method, state, split, batch_size=config.eval_batch_size)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.WARNING)  # keep orbax's per-save INFO lines out of the output
  experiment.enable_compilation_cache(_COMPILATION_CACHE.value)
  if _DISTRIBUTED.value:
    experiment.initialize_distributed()
  base = _CONFIG.value
  dataset, chosen, matched, configs = experiment.exit_on_bad_input(_prepare)(base)
  train = experiment.exit_on_bad_input(experiment.train)  # e.g. a workdir run under another config
  per_method = {}
  for name, config in configs.items():
    runs = []
    workdirs = [os.path.join(_WORKDIR.value, name, f"seed{seed}") for seed in range(_SEEDS.value)]
    together = {}  # seed -> FitResult of the vmapped group
    fresh = [seed for seed, workdir in enumerate(workdirs) if not _started(workdir)]
    if _VMAP_SEEDS.value and len(fresh) > 1:
      method = experiment.build_method(config, dataset)
      results = experiment.exit_on_bad_input(experiment.train_seeds)(
          config, [workdirs[s] for s in fresh], fresh, dataset=dataset, method=method,
          log=lambda seed, line, n=name: experiment.say(f"[{n} s{seed}] {line}"),
          exact=_EXACT_SEEDS.value)
      together = dict(zip(fresh, results))
    for seed, workdir in enumerate(workdirs):
      config.seed = seed
      if seed in together:
        result = together[seed]
      else:
        method, _, result = train(config, workdir, resume=_started(workdir), dataset=dataset,
                                  log=lambda line, n=name, s=seed: experiment.say(f"[{n} s{s}] {line}"))
      key = jax.random.PRNGKey(1000 + seed)
      run = robustness.sweep(_predictor(method, result.state, config), dataset.splits["test"],
                             dataset.scoring, chosen, key, split_metrics)
      at_input = _NOISE_LEVEL.value == "input"
      for protocol in matched:
        label = f"matched_{protocol.name}" + ("" if at_input else "_representation")

        def fit_level(level, data, protocol=protocol, method=method, name=name, seed=seed,
                      label=label):
          level_dir = os.path.join(workdir, label, robustness.level_name(level))
          level_config = config.copy_and_resolve_references()
          level_config.validate_corrupted = False  # matched_sweep corrupts the valid split itself
          if at_input:
            level_config.train_corruption = robustness.matched_corruption(protocol, level)
          else:  # the noise lives in the model: train, validation and test alike
            level_config.model.representation_noise = float(level)
            level_config.model.representation_noise_type = REPRESENTATION_PROTOCOLS[protocol.name]
          level_method, _, fitted = train(
              level_config, level_dir, resume=_started(level_dir), dataset=data,
              method=method if at_input else None,
              log=lambda line: experiment.say(f"[{name} s{seed} {label}={level}] {line}"))
          return _predictor(level_method, fitted.state, config)
        run[label] = robustness.matched_sweep(fit_level, dataset, protocol, key, split_metrics,
                                              at_input=at_input)
      runs.append(run)
    per_method[name] = runs
  summary = {name: robustness.aggregate(runs) for name, runs in per_method.items()}
  os.makedirs(_WORKDIR.value, exist_ok=True)
  experiment.write_results(os.path.join(_WORKDIR.value, "results.json"), json.dumps(
      {"dataset": dataset.name, "seeds": _SEEDS.value, "per_seed": per_method,
       "summary": summary}, indent=1))
  gains = robustness.gain_table(summary, dataset.scoring)
  table = (gains + "\n" if gains else "") + robustness.markdown_table(summary, dataset.scoring)
  experiment.write_results(os.path.join(_WORKDIR.value, "results.md"),
                           f"# Robustness on {dataset.name} ({_SEEDS.value} seeds, mean ± std; "
                           f"train_corruption={base.train_corruption!r})\n\n{table}")
  experiment.say(table)
  if _PLOTS.value and is_main_process():
    suffix = "" if _NOISE_LEVEL.value == "input" else "_representation"
    curves = chosen + [dataclasses.replace(p, name=f"matched_{p.name}{suffix}") for p in matched]
    paths = robustness.plot_curves(summary, curves, dataset.scoring, _WORKDIR.value)
    experiment.say("curves: " + ", ".join(paths))
  if cache_line := experiment.compilation_cache_line():
    experiment.say(cache_line)


if __name__ == "__main__":
  app.run(main, flags_parser=experiment.parse_flags)
