"""Glue the launchers share: a full experiment config, data loading, method building, training.

Kept importable (and tested) so that ``experiments/*.py`` stay a dozen lines of flag handling.
"""

from __future__ import annotations

import ast
import functools
import json
import os
import re
import sys
from collections.abc import Callable

import ml_collections

from mmjax import data as data_lib
from mmjax import methods
from mmjax.train import (
    FitResult, TrainingInterrupted, check_workdir, default_train_config, fit, fit_seeds,
    train_corruption)
from mmjax.train.sharding import is_main_process, on_main_process


def get_config(method: str = "euar", dataset: str = "synthetic") -> ml_collections.ConfigDict:
  """Training defaults + ``method``'s model defaults + data options.

  Fields beyond :func:`mmjax.train.default_train_config`: ``method``, ``dataset`` (a
  :func:`mmjax.data.load_dataset` spec), ``data_seed`` (synthetic data / split seed),
  ``standardize`` (per-feature z-scoring fitted on train), ``task`` (``"auto"``, or the task the
  data must have: ``"regression"`` / ``"classification"``; sentiment-score files (``mmsa:``,
  ``sdk:``) are then binned into ``num_classes`` classes, 0 = the loader's default 3),
  ``num_classes`` (also the class count of ``npz:`` labels; refused for the other sources, whose
  classes are their own), ``model`` (the method's hyper-parameters).
  """
  config = default_train_config()
  config.method = method
  config.dataset = dataset
  config.data_seed = 0
  config.standardize = True
  config.task = "auto"
  config.num_classes = 0
  config.model = methods.default_model_config(method)
  return config


def parse_variant(variant: str, flag: str = "--methods") -> tuple[str, dict]:
  """``"samlml:hidden=64,use_mix=False"`` -> ``("samlml", {"hidden": 64, "use_mix": False})``.

  Values are Python literals (anything else stays a string). A comma starts a new field only
  before ``<name>=``, so string values may hold commas: ``"emmr:members=tf,ae,fusion=max"`` ->
  ``{"members": "tf,ae", "fusion": "max"}``. Errors name ``flag``.
  """
  method, _, fields = variant.partition(":")
  overrides = {}
  for item in filter(None, re.split(r",(?=\w+=)", fields)):
    name, sep, value = item.partition("=")
    if not sep:
      raise ValueError(f"{flag}: expected <field>=<value>, got {item!r} in {variant!r}")
    try:
      overrides[name] = ast.literal_eval(value)
    except (ValueError, SyntaxError):
      overrides[name] = value
  return method, overrides


def split_variants(items: list[str] | str) -> list[str]:
  """Method variants of a comma-separated flag: a comma followed by ``<field>=`` continues the
  variant before it, so ``"samlml,samlml:use_noise=False,use_de=False"`` is two variants."""
  text = items if isinstance(items, str) else ",".join(items)
  return [v for v in re.split(r",(?!\w+=)", text) if v]


def variant_config(base: ml_collections.ConfigDict, variant: str, flag: str = "--methods"
                   ) -> ml_collections.ConfigDict:
  """``base`` for the method variant ``variant`` (:func:`parse_variant`): another method takes
  its model defaults, the same method keeps ``base.model``; then the fields given are set (e.g.
  SAM-LML's Table 4 rows ``samlml:use_noise=False``). Unknown fields raise naming ``flag``."""
  method, overrides = parse_variant(variant, flag)
  config = base.copy_and_resolve_references()
  if method != config.method:
    config.method, config.model = method, get_config(method).model
  unknown = sorted(set(overrides) - set(config.model))
  if unknown:
    raise ValueError(f"{flag}: {variant!r} sets unknown model fields {unknown}; "
                     f"{method} has {sorted(config.model)}")
  config.model.update(overrides)
  return config


def check_config(config: ml_collections.ConfigDict) -> None:
  """Fails fast, naming the field, on values no run could use."""
  positive = ("batch_size", "eval_batch_size", "num_epochs", "learning_rate")
  for field in positive:
    if not config[field] > 0:
      raise ValueError(f"config.{field}: must be > 0, got {config[field]!r}")
  for field in ("patience", "weight_decay", "grad_clip_norm"):
    if config[field] < 0:
      raise ValueError(f"config.{field}: must be >= 0, got {config[field]!r}")
  if config.task not in ("auto", "regression", "classification"):
    raise ValueError(f"config.task: expected 'auto', 'regression' or 'classification', "
                     f"got {config.task!r}")
  if not isinstance(config.num_classes, int) or config.num_classes < 0 or config.num_classes == 1:
    raise ValueError(f"config.num_classes: expected 0 (the data's own classes) or a class count "
                     f">= 2, got {config.num_classes!r}")
  methods.default_model_config(config.method)  # unknown method -> ValueError listing the known ones
  hidden = config.model.get("hidden")
  if hidden is not None and (not isinstance(hidden, int) or hidden < 1):
    raise ValueError(f"model.hidden: must be a positive int (the model width), got {hidden!r}")


def prepare(config: ml_collections.ConfigDict) -> tuple[data_lib.Dataset, methods.Method]:
  """Checks the config, loads the data and builds the method: everything that can fail on bad
  input happens here, before any training."""
  check_config(config)
  dataset = load_data(config)
  return dataset, check_method(config, dataset)


def _bad_input_exit(message: str) -> None:
  sys.stderr.write(f"error: {' '.join(message.split())}\n")  # one line
  sys.exit(2)


def exit_on_bad_input(step: Callable[..., object]) -> Callable[..., object]:
  """Runs ``step``; a ``ValueError`` or ``OSError`` (a missing file, a workdir that cannot be
  written) becomes one ``error:`` line and exit 2; a run stopped by SIGTERM / SIGINT
  (:class:`~mmjax.train.TrainingInterrupted`, its state saved) one line saying how to resume and
  exit ``128 + signal``."""

  @functools.wraps(step)
  def wrapped(*args, **kwargs):
    try:
      return step(*args, **kwargs)
    except (ValueError, OSError) as e:  # OSError: e.g. a workdir under a file, or unwritable
      _bad_input_exit(str(e))
    except TrainingInterrupted as e:  # saved; the line says how to resume
      sys.stderr.write(f"{e}\n")
      sys.exit(128 + e.signum)

  return wrapped


def define_config_flag(default: str, help_text: str):
  """``config_flags.DEFINE_config_file("config", default, help_text)`` for the launchers: an
  unknown ``--config.<field>`` (ml_collections checks the overrides while the flag is defined) ends
  in one ``error:`` line with ml_collections' close match, exit code 2."""
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  try:
    return config_flags.DEFINE_config_file("config", default, help_text)
  except (AttributeError, KeyError) as e:
    inner = e
    while inner.args and isinstance(inner.args[0], BaseException):
      inner = inner.args[0]
    text = str(inner.args[0]) if inner.args else str(inner)  # "'name'" [+ "\nDid you mean ...?"]
    name, _, hint = text.partition("\n")
    name = name.strip("'\"")
    given = [a.split("=")[0] for a in sys.argv[1:]
             if a.startswith("--config.") and a.split("=")[0].split(".")[-1] == name]
    _bad_input_exit(f"{given[0] if given else '--config'}: unknown config field {name!r}"
                    + (f"; {hint.strip()}" if hint.strip() else ""))


# XLA's persistent compilation cache of the launchers (``--compilation_cache``; "" turns it off).
DEFAULT_COMPILATION_CACHE = os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "mmjax", "xla")
_compilation_cache = {"dir": None, "cache_hits": 0, "cache_misses": 0}  # this process's


def define_compilation_cache_flag():
  """``--compilation_cache``: where the launchers keep compiled programs across runs."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  return flags.DEFINE_string(
      "compilation_cache", DEFAULT_COMPILATION_CACHE,
      "XLA's persistent compilation cache: a later run with the same shapes and config loads its "
      "compiled steps from here instead of compiling them. '' turns it off.")


def enable_compilation_cache(path: str) -> None:
  """Turns on JAX's persistent compilation cache in ``path`` (``~`` expanded; ``""``: off) for
  every program, however fast it compiles, and counts its hits and misses for
  :func:`compilation_cache_line`. Call before the first compilation of the process."""
  if not path:
    return
  import jax  # pylint: disable=g-import-not-at-top
  path = os.path.expanduser(path)
  jax.config.update("jax_compilation_cache_dir", path)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  if _compilation_cache["dir"] is None:  # one listener per process
    jax.monitoring.register_event_listener(_count_cache_event)
  _compilation_cache["dir"] = path


def _count_cache_event(name: str, **kwargs) -> None:
  del kwargs
  if name in ("/jax/compilation_cache/cache_hits", "/jax/compilation_cache/cache_misses"):
    _compilation_cache[name.rsplit("/", 1)[1]] += 1


def compilation_cache_line() -> str | None:
  """``compilation cache <dir>: H programs loaded, M compiled and stored`` since
  :func:`enable_compilation_cache`, or ``None`` when the cache is off."""
  if _compilation_cache["dir"] is None:
    return None
  return (f"compilation cache {_compilation_cache['dir']}: {_compilation_cache['cache_hits']} "
          f"programs loaded, {_compilation_cache['cache_misses']} compiled and stored")


def say(line: str) -> None:
  """``print`` on process 0 only: a launcher's lines appear once however many processes run it."""
  on_main_process(print)(line)


def write_results(path: str, text: str) -> None:
  """Writes ``text`` to ``path`` from process 0 only (the others hold the same results)."""
  if is_main_process():
    with open(path, "w") as f:
      f.write(text)


def define_distributed_flag():
  """``--distributed``: join a multi-process run (:func:`initialize_distributed`)."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  return flags.DEFINE_bool(
      "distributed", False, "Call jax.distributed.initialize() (multi-host; reads the cluster "
      "env). Every process trains on the same global batches; process 0 alone writes the logs, "
      "metrics and results.")


def initialize_distributed() -> None:
  """``jax.distributed.initialize()`` for ``--distributed``; no cluster found is one ``error:``
  line, exit code 2."""
  import jax  # pylint: disable=g-import-not-at-top
  try:
    jax.distributed.initialize()
  except (ValueError, RuntimeError) as e:
    _bad_input_exit(f"--distributed: jax.distributed.initialize() found no cluster to join ({e}); "
                    "run it under a cluster scheduler (SLURM, Cloud TPU, ...) or set "
                    "JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID")


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing (``app.run(main, flags_parser=parse_flags)``) with every flag error as one
  ``error:`` line, exit code 2: a failing config file (e.g. an unknown method) names the flag and
  the cause, not a traceback; a ``--config`` file that does not exist is named as such."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  args = argv[1:]
  for i, arg in enumerate(args):  # --config=FILE[:...] or --config FILE[:...]
    value = arg[len("--config="):] if arg.startswith("--config=") else (
        args[i + 1] if arg == "--config" and i + 1 < len(args) else None)
    if value is not None:
      path = value.partition(":")[0]
      if not os.path.isfile(path):
        _bad_input_exit(f"--config: no such file {path!r}" + (
            "" if os.path.isabs(path) else f" (relative to {os.getcwd()})"))
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    cause = e  # the root of the chain: e.g. the ValueError a config file raised
    while cause.__cause__ is not None or cause.__context__ is not None:
      cause = cause.__cause__ or cause.__context__
    head = str(e).splitlines()[0].rstrip(":")
    detail = "" if cause is e else " ".join(str(cause).split())
    _bad_input_exit(f"{head}: {detail}" if detail and detail not in head else head)


# Sources whose labels are sentiment scores that the loader can bin into classes.
SCORE_SOURCES = ("mmsa", "sdk")


def load_data(config: ml_collections.ConfigDict) -> data_lib.Dataset:
  """The dataset named by ``config.dataset``, standardised on its train split if asked."""
  source = config.dataset.partition(":")[0]
  kwargs = {"seed": config.data_seed} if source in ("synthetic", "multiview") else {}
  if source in SCORE_SOURCES and config.task == "classification":
    kwargs.update(task="classification", num_classes=config.num_classes or None)
  elif source == "npz" and config.num_classes:
    kwargs.update(task="classification", num_classes=config.num_classes)
  elif config.num_classes and source in SCORE_SOURCES:  # never ignored silently
    raise ValueError(f"config.num_classes: binning {source} scores into {config.num_classes} "
                     "classes needs config.task=classification")
  elif config.num_classes:
    raise ValueError(f"config.num_classes: {source!r} data has its own classes, leave it 0 "
                     f"(it applies to mmsa / sdk score files and npz labels), got "
                     f"{config.num_classes}")
  dataset = data_lib.load_dataset(config.dataset, **kwargs)
  if config.task not in ("auto", dataset.task):
    raise ValueError(f"config.task: the config expects a {config.task} dataset, but "
                     f"{config.dataset!r} is {dataset.task}")
  for split in ("valid", "test"):  # model selection and the reported metrics need samples
    if dataset.splits[split].batch_size == 0:
      raise ValueError(f"dataset: {config.dataset!r} has no {split} samples; the launchers "
                       f"select on 'valid' and report on 'test', so give both some rows")
  return data_lib.standardize(dataset) if config.standardize else dataset


def build_method(config: ml_collections.ConfigDict, dataset: data_lib.Dataset) -> methods.Method:
  """``config.method`` with ``config.model`` for ``dataset``, computing in
  ``config.compute_dtype``."""
  method = methods.build(config.method, config.model, methods.TaskSpec.from_dataset(dataset))
  return methods.mixed_precision(method, config.get("compute_dtype", "float32"))


def check_method(config: ml_collections.ConfigDict, dataset: data_lib.Dataset) -> methods.Method:
  """Builds the method and parses ``config.train_corruption`` for it: both fail here, naming the
  field, rather than after compilation."""
  method = build_method(config, dataset)
  train_corruption(method, dataset, config)
  return method


def train(config: ml_collections.ConfigDict, workdir: str | None, *, resume: bool = False,
          dataset: data_lib.Dataset | None = None, method: methods.Method | None = None,
          log=print) -> tuple[methods.Method, data_lib.Dataset, FitResult]:
  """Trains ``method`` (default: built from ``config``) on ``dataset`` (default: loaded from
  ``config``); writes ``config.json`` to ``workdir``."""
  check_config(config)
  if dataset is None:
    dataset = load_data(config)
  if method is None:
    method = build_method(config, dataset)
  if workdir is not None:
    _start_workdir(config, workdir, resume, method)
  return method, dataset, fit(method, dataset, config, workdir=workdir, resume=resume, log=log)


def train_seeds(config: ml_collections.ConfigDict, workdirs: list[str], seeds: list[int], *,
                dataset: data_lib.Dataset, method: methods.Method,
                log: Callable[[int, str], None], exact: bool = False) -> list[FitResult]:
  """:func:`train` of each of ``seeds`` into its fresh folder of ``workdirs`` (``config.json``
  with that seed), trained together as one program (:func:`mmjax.train.fit_seeds`: vmapped, or
  with ``exact`` mapped, bit-identical to separate runs)."""
  check_config(config)
  for seed, workdir in zip(seeds, workdirs):
    seed_config = config.copy_and_resolve_references()
    seed_config.seed = seed
    _start_workdir(seed_config, workdir, False, method)
  return fit_seeds(method, dataset, config, seeds, workdirs=workdirs, exact=exact, log=log)


def _start_workdir(config: ml_collections.ConfigDict, workdir: str, resume: bool,
                   method: methods.Method) -> None:
  """Checks ``workdir`` for this run (a resumed one: against its saved config) and writes
  ``config.json`` there."""
  saved = os.path.join(workdir, "config.json")
  if resume and os.path.exists(saved):
    with open(saved) as f:
      check_resume_config(json.load(f), config, saved)
  check_workdir(method, workdir, resume, log=lambda _: None)  # before config.json is written
  os.makedirs(workdir, exist_ok=True)
  if is_main_process():
    with open(saved, "w") as f:
      f.write(config.to_json(indent=1))


# Fields a resumed run may change: they extend or show the run, never alter its epochs so far.
# (epoch_mode, scan_chunk and async_checkpoint choose how the same steps are run and saved.)
RESUMABLE_FIELDS = ("num_epochs", "patience", "progress", "epoch_mode", "scan_chunk",
                    "async_checkpoint")


def check_resume_config(saved: dict, config: ml_collections.ConfigDict, where: str) -> None:
  """Refuses to resume the run whose config is ``saved`` (``where``: its file) under ``config``
  when a field other than :data:`RESUMABLE_FIELDS` differs, naming each such field with its saved
  and new values: a changed learning rate, seed, data option or model field would continue the
  old run as another one (or fail inside orbax)."""
  flatten = lambda d, prefix="": {
      k2: v2 for k, v in d.items()
      for k2, v2 in (flatten(v, f"{prefix}{k}.").items() if isinstance(v, dict)
                     else [(f"{prefix}{k}", v)])}
  old, new = flatten(saved), flatten(json.loads(config.to_json()))
  absent = "(absent)"
  changed = [k for k in sorted(old.keys() | new.keys())
             if k not in RESUMABLE_FIELDS and old.get(k, absent) != new.get(k, absent)]
  if changed:
    diffs = ", ".join(f"{k} {old.get(k, absent)!r} -> {new.get(k, absent)!r}" for k in changed[:6])
    more = f" and {len(changed) - 6} more" if len(changed) > 6 else ""
    raise ValueError(
        f"resume: the config differs from the run's ({where}) in {diffs}{more}; only "
        f"{', '.join(RESUMABLE_FIELDS)} may change on resume: restore those values, or train "
        "into a new workdir")
