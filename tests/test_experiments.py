"""The absl launchers end to end (subprocesses, as a user runs them)."""

import json
import os
import re
import subprocess
import sys
import types
from pathlib import Path

import pytest

from tests.helpers.xla import TEST_XLA_FLAGS

REPO = Path(__file__).resolve().parents[1]


def run(module, *args, cwd=REPO, devices=1):
  env = dict(os.environ,
             XLA_FLAGS=f"--xla_force_host_platform_device_count={devices} {TEST_XLA_FLAGS}")
  return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, env=env,
                        capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("args,message", [
    (["--config.dataset=mmsa:/no/such/file.pkl"], "error: /no/such/file.pkl: no such file"),
    (["--config.method=nope"], "error: method: unknown 'nope'; available:"),
    (["--config.batch_size=0"], "error: config.batch_size: must be > 0"),
    (["--config.model.top_k=0"], "error: model.top_k: must be >= 1, got 0"),
    (["--config.dataset=imagenet:x"], "error: dataset spec 'imagenet:x': unknown source"),
    (["--no_such_flag=1"], "Unknown command line flag 'no_such_flag'"),
    (["--config=experiments/configs/nope.py"],
     "error: --config: no such file 'experiments/configs/nope.py' (relative to"),
    (["--config", "/no/such.py:euar"], "error: --config: no such file '/no/such.py'\n"),
    (["--config=experiments/configs/default.py:nope"],
     "error: flag --config=experiments/configs/default.py:nope: Error whilst parsing config file: "
     "method: unknown 'nope'"),
    (["--config.model.hiden=3"],
     "error: --config.model.hiden: unknown config field 'hiden'; Did you mean \"hidden\""),
    (["--config.model.hidden=0"], "error: model.hidden: must be a positive int"),
    (["--distributed"], "error: --distributed: jax.distributed.initialize() found no cluster"),
    (["--workdir={tmp}/file/run"], "error: [Errno 20] Not a directory"),
    (["--config.select_metric=nope"], "error: select_mode: give 'min' or 'max' for select_metric"),
    (["--config.batch_size=30", "--devices=4"],
     "error: batch_size: 30 is not divisible by the number of devices 4; use a multiple of 4"),
])
def test_train_launcher_fails_fast_with_one_line(tmp_path, args, message):
  (tmp_path / "file").touch()
  # "--devices=N" is the test's own: the launcher runs on N (host) devices.
  devices = [int(a.split("=")[1]) for a in args if a.startswith("--devices=")] or [1]
  args = [a.format(tmp=tmp_path) for a in args if not a.startswith("--devices=")]
  result = run("experiments.train", f"--workdir={tmp_path}", *args, devices=devices[0])
  assert result.returncode != 0
  assert message in result.stderr
  if message.startswith("error:"):
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
  assert "Traceback" not in result.stderr
  assert not (tmp_path / "checkpoints").exists()  # nothing trained


def test_compilation_cache_makes_a_second_launch_load_every_program(tmp_path):
  """The same run launched twice with one ``--compilation_cache``: the second compiles nothing
  (XLA's cache-hit / miss events, as the launcher reports them) and gives the same test metrics."""
  outputs = []
  for run_dir in ("a", "b"):
    result = run("experiments.train", "--config=experiments/configs/default.py:concat",
                 "--config.num_epochs=1", f"--workdir={tmp_path / run_dir}",
                 f"--compilation_cache={tmp_path / 'cache'}")
    assert result.returncode == 0, result.stderr
    outputs.append(result.stdout.strip().splitlines())
  first, second = (re.fullmatch(rf"compilation cache {tmp_path / 'cache'}: (\d+) programs loaded, "
                                r"(\d+) compiled and stored", lines[-1]).groups()
                   for lines in outputs)
  assert int(first[1]) > 0 and int(second[1]) == 0
  assert int(second[0]) == int(first[0]) + int(first[1])
  assert outputs[0][-2] == outputs[1][-2]  # "best epoch 1; test: ..."


def test_robustness_launcher_writes_consistent_results(tmp_path):
  result = run("experiments.robustness", f"--workdir={tmp_path}", "--methods=euar,concat",
               "--seeds=2", "--protocols=missing_rate,fixed_subsets,gaussian",
               "--config.num_epochs=1", "--config.batch_size=64")
  assert result.returncode == 0, result.stderr[-2000:]
  results = json.loads((tmp_path / "results.json").read_text())
  for method in ("euar", "concat"):
    for seed_result in results["per_seed"][method]:
      clean = seed_result["missing_rate"]["0"]
      # Three views of the clean test set must agree exactly.
      assert seed_result["gaussian"]["0"] == clean
      assert seed_result["fixed_subsets"]["text+audio+vision"] == clean
      # Losing modalities costs accuracy on this data (text carries the most signal).
      assert seed_result["fixed_subsets"]["vision"]["mae"] > clean["mae"]
      # The "mean" pseudo-level averages the swept levels.
      levels = [v for k, v in seed_result["gaussian"].items() if k != "mean"]
      assert seed_result["gaussian"]["mean"]["mae"] == pytest.approx(
          sum(r["mae"] for r in levels) / len(levels))
      # fixed_subsets: the mean of the six incomplete subsets (EASE Table 3), full set excluded.
      subsets = [v for k, v in seed_result["fixed_subsets"].items()
                 if k not in ("mean", "text+audio+vision")]
      assert len(subsets) == 6
      assert seed_result["fixed_subsets"]["mean"]["mae"] == pytest.approx(
          sum(r["mae"] for r in subsets) / 6)
    # Seeds differ (different initialisations), and the summary is their mean.
    maes = [r["missing_rate"]["0"]["mae"] for r in results["per_seed"][method]]
    assert maes[0] != maes[1]
    mean, _ = results["summary"][method]["missing_rate"]["0"]["mae"]
    assert mean == pytest.approx(sum(maes) / 2)
  table = (tmp_path / "results.md").read_text()
  assert "### fixed_subsets" in table and "| text+audio | concat |" in table
  assert all((tmp_path / f"{p}.png").stat().st_size > 1000
             for p in ("missing_rate", "fixed_subsets", "gaussian"))
  # A second invocation loads the finished runs instead of retraining, and reproduces the results.
  again = run("experiments.robustness", f"--workdir={tmp_path}", "--methods=euar,concat",
              "--seeds=2", "--protocols=missing_rate,fixed_subsets,gaussian",
              "--config.num_epochs=1", "--config.batch_size=64", "--noplots")
  assert again.returncode == 0, again.stderr[-2000:]
  assert json.loads((tmp_path / "results.json").read_text())["per_seed"] == results["per_seed"]
  # --vmap_seeds --exact_seeds trains both seeds of each method as one program: the same results
  # bit for bit, each seed's folder as a separate run writes it.
  together_dir = tmp_path / "together"
  together = run("experiments.robustness", f"--workdir={together_dir}", "--methods=euar,concat",
                 "--seeds=2", "--protocols=missing_rate,fixed_subsets,gaussian",
                 "--config.num_epochs=1", "--config.batch_size=64", "--noplots", "--vmap_seeds",
                 "--exact_seeds")
  assert together.returncode == 0, together.stderr[-2000:]
  assert json.loads((together_dir / "results.json").read_text())["per_seed"] == results["per_seed"]
  assert json.loads((together_dir / "euar" / "seed1" / "config.json").read_text())["seed"] == 1


def test_robustness_launcher_matched_protocol(tmp_path):
  """``--matched``: one model per level under ``<seed>/matched_<protocol>/<level>``; concat's loss
  has no randomness, so its level-0 model is the clean model and both rows agree exactly."""
  result = run("experiments.robustness", f"--workdir={tmp_path}", "--methods=concat", "--seeds=1",
               "--protocols=missing_rate", "--matched=missing_rate", "--config.num_epochs=1",
               "--config.batch_size=64", "--noplots")
  assert result.returncode == 0, result.stderr[-2000:]
  run_ = json.loads((tmp_path / "results.json").read_text())["per_seed"]["concat"][0]
  matched = run_["matched_missing_rate"]
  assert list(matched) == ["0", "0.1", "0.2", "0.3", "0.4", "0.5", "0.6", "0.7", "mean"]
  assert matched["0"] == run_["missing_rate"]["0"]
  # Training at a non-zero missing rate gives another model than the clean one.
  assert matched["0.7"]["mae"] != run_["missing_rate"]["0.7"]["mae"]
  levels = sorted(p.name for p in (tmp_path / "concat" / "seed0" / "matched_missing_rate").iterdir())
  assert levels == ["0", "0.1", "0.2", "0.3", "0.4", "0.5", "0.6", "0.7"]
  bad = run("experiments.robustness", f"--workdir={tmp_path / 'bad'}", "--matched=fixed_subsets")
  assert bad.returncode != 0
  assert "error: --matched: ['fixed_subsets'] have no numeric levels" in bad.stderr


def test_robustness_launcher_representation_noise_and_variants(tmp_path):
  """SAM-LML's Table 6 protocol (``--noise_level=representation``): per level one model with
  ``model.representation_noise = <level>``, clean valid / test splits; method variants
  (``samlml:<field>=<value>,...``) train under their own names."""
  small = "samlml:hidden=8,num_heads=2,supervise_intra=False,supervise_inter=False"  # fast compile
  result = run("experiments.robustness", f"--workdir={tmp_path}", f"--methods={small}",
               "--seeds=1", "--protocols=mix", "--matched=mix", "--matched_levels=0,0.5",
               "--noise_level=representation", "--config.num_epochs=1",
               "--config.batch_size=64", "--noplots")
  assert result.returncode == 0, result.stderr[-2000:]
  run_ = json.loads((tmp_path / "results.json").read_text())["per_seed"][small][0]
  matched = run_["matched_mix_representation"]
  assert list(matched) == ["0", "0.5", "mean"]
  assert matched["0"] == run_["mix"]["0"]  # NR 0 is the clean model, trained the same way
  assert matched["0.5"] != run_["mix"]["0.5"]  # input-level vs representation-level noise
  level_dir = tmp_path / small / "seed0" / "matched_mix_representation"
  saved = json.loads((level_dir / "0.5" / "config.json").read_text())["model"]
  assert saved["representation_noise"] == 0.5 and saved["hidden"] == 8
  for args, message in [
      (["--methods=concat", "--matched=mix", "--noise_level=representation"],
       "error: --noise_level=representation: ['concat'] have no representation-level noise"),
      (["--methods=samlml", "--matched=missing_rate", "--noise_level=representation"],
       "error: --noise_level=representation: --matched must name noise protocols"),
      (["--methods=samlml:hiden=8"], "error: --methods: 'samlml:hiden=8' sets unknown model fields"),
      (["--matched=mix", "--matched_levels=0,1.5"], "error: --matched_levels: [1.5] outside mix"),
  ]:
    bad = run("experiments.robustness", f"--workdir={tmp_path / 'bad'}", *args)
    assert bad.returncode != 0 and message in bad.stderr, bad.stderr[-1000:]
    assert "Traceback" not in bad.stderr


def test_split_variants():
  from mmjax.experiment import split_variants, variant_config, get_config
  assert split_variants(["samlml", "samlml:use_noise=False", "use_de=False", "euar"]) == [
      "samlml", "samlml:use_noise=False,use_de=False", "euar"]
  config = variant_config(get_config("samlml"), "samlml:supervise_intra=False,rho=3")
  assert (config.model.supervise_intra, config.model.rho, config.model.hidden) == (False, 3, 120)
  # A member list inside a comma-separated --methods list: "+" separates the members.
  assert split_variants("emmr:members=tf+ae,emmr:fusion=max") == ["emmr:members=tf+ae",
                                                                   "emmr:fusion=max"]
  from mmjax.methods.emmr import parse_members  # pylint: disable=g-import-not-at-top
  assert parse_members("tf+ae") == parse_members("tf,ae") == ("tf", "ae")


@pytest.mark.parametrize("method,batch_size,learning_rate,num_epochs", [
    ("euar", 16, 1e-3, 100), ("ease", 64, 1e-3, 200), ("concat", 16, 1e-3, 100),
    ("samlml", 48, 1e-5, 100), ("emmr", 32, 1e-3, 20)])
def test_paper_configs_carry_the_papers_settings(method, batch_size, learning_rate, num_epochs):
  from experiments.configs import default, paper  # pylint: disable=g-import-not-at-top
  config = paper.get_config(f"{method},synthetic:classification")
  assert (config.method, config.dataset) == (method, "synthetic:classification")
  assert (config.batch_size, config.learning_rate, config.num_epochs) == (
      batch_size, learning_rate, num_epochs)
  assert config.validate_corrupted == (method == "emmr")  # EMMR validates at its training ratio
  # Model defaults are the papers' weights; EMMR's preset is eq. 14 and the authors' choices.
  expected = default.get_config(method).model
  if method == "emmr":
    expected.update(lambda_semantic=0.0, teacher_input="corrupted", backward_members="tf")
  assert config.model == expected


@pytest.mark.parametrize("column, task, batch_size, learning_rate, model", [
    ("mosei", "regression", 64, 1e-5, dict(hidden=180, alpha_p=0.1, alpha_de=0.5, gamma1=1.0)),
    ("urfunny", "classification", 64, 1e-6,
     dict(hidden=150, rho=6, gamma1=0.3, alpha_p=1e-5, alpha_mix=0.1, alpha_c=1e-5)),
    ("mustard", "classification", 48, 5e-6,
     dict(hidden=48, rho=7, gamma=1.0, gamma1=0.8, alpha=1e-4, alpha_mix=1e-5, alpha_c=0.05)),
])
def test_samlml_table7_columns(column, task, batch_size, learning_rate, model):
  from experiments.configs import paper  # pylint: disable=g-import-not-at-top
  from mmjax import experiment  # pylint: disable=g-import-not-at-top
  config = paper.get_config(f"samlml/{column},synthetic")
  assert (config.task, config.batch_size, config.learning_rate, config.weight_decay) == (
      task, batch_size, learning_rate, 0.01)
  assert {k: config.model[k] for k in model} == model
  if task == "classification":  # BCE columns refuse a regression dataset, naming the field
    with pytest.raises(ValueError, match="config.task: the config expects a classification"):
      experiment.load_data(config)
  with pytest.raises(ValueError, match="unknown SAM-LML Table 7 column"):
    paper.get_config("samlml/imdb")


@pytest.mark.parametrize("num_classes, expected", [(0, None), (2, 2)])
def test_classification_config_bins_score_files(monkeypatch, num_classes, expected):
  """``config.task="classification"`` asks the MOSI-style loaders for binned classes (EMMR's
  3-class MOSI / 2-class setting); other sources are left alone."""
  from mmjax import experiment  # pylint: disable=g-import-not-at-top
  calls = []
  monkeypatch.setattr(experiment.data_lib, "load_dataset",
                      lambda spec, **kwargs: calls.append((spec, kwargs)) or _FakeDataset())
  config = experiment.get_config("emmr", "mmsa:/data/aligned_50.pkl")
  config.update(task="classification", num_classes=num_classes, standardize=False)
  experiment.load_data(config)
  config.dataset = "multiview:/data/x.mat"
  if num_classes:  # a .mat file has its own classes: refused, never ignored
    with pytest.raises(ValueError, match="config.num_classes: 'multiview' data has its own"):
      experiment.load_data(config)
  else:
    experiment.load_data(config)
  assert calls == [("mmsa:/data/aligned_50.pkl", {"task": "classification", "num_classes": expected})
                   ] + ([] if num_classes else [("multiview:/data/x.mat", {"seed": 0})])


class _FakeDataset:
  task = "classification"
  splits = {split: types.SimpleNamespace(batch_size=1) for split in ("train", "valid", "test")}


PAPER_CONFIGS = ("euar", "ease", "concat", "late_fusion", "late_fusion_joint", "emmr",
                 "samlml/mosi", "samlml/mosei", "samlml/urfunny", "samlml/mustard")
# One compiled train step costs 10-40 s at the paper widths (EMMR d = 300, SAM-LML d = 120-180); these
# configs also run one (SAM-LML: the UR-FUNNY column, d = 150 with 5 heads); the others build and
# initialise (config checks, parameter shapes) and are stepped at small widths in their own tests.
STEPPED = ("euar", "concat", "late_fusion", "late_fusion_joint", "samlml/urfunny")


@pytest.mark.parametrize("name", PAPER_CONFIGS)
def test_every_paper_config_builds_and_trains_a_step(name):
  """Each paper preset (every SAM-LML Table 7 column) builds and initialises its model on data of
  its task; those of ``STEPPED`` run one train step of every stage with their own train-time
  corruption: finite loss, parameters move."""
  import dataclasses  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  from experiments.configs import paper  # pylint: disable=g-import-not-at-top
  from mmjax import experiment  # pylint: disable=g-import-not-at-top
  from mmjax.data import make_synthetic, standardize  # pylint: disable=g-import-not-at-top
  from mmjax.methods import Stage  # pylint: disable=g-import-not-at-top
  from mmjax.train import init_state, make_optimizer, make_train_step, train_corruption  # pylint: disable=g-import-not-at-top
  config = paper.get_config(name)
  task = config.task if config.task != "auto" else "regression"
  num_classes = 2 if name in ("samlml/urfunny", "samlml/mustard") else 3
  dataset = standardize(make_synthetic(jax.random.key(0), n_train=8, n_valid=4, n_test=4,
                                       seq_len=3, dims=4, task=task, num_classes=num_classes))
  method = experiment.check_method(config, dataset)
  optimizer = make_optimizer(config)
  state = init_state(method, dataset, config, optimizer)
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(state.params))
  if name not in STEPPED:
    return
  batch = dataset.splits["train"]
  for stage in method.stages or (Stage("train", method.loss),):
    trainable = stage.trainable(state.params) if stage.trainable else None
    step = jax.jit(make_train_step(dataclasses.replace(method, loss=stage.loss), optimizer,
                                   trainable, train_corruption(method, dataset, config)))
    new_state, metrics = step(state, batch)
    assert np.isfinite(float(metrics["loss"])), (name, stage.name)
    moved = optax.tree.norm(jax.tree.map(lambda a, b: a - b, new_state.params, state.params))
    assert float(moved) > 0, (name, stage.name)
