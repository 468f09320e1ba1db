"""Composable configs (configs/): the plain loader, the Hydra app and LightningCLI, run as a user
runs them; the README's blocks marked as tested here are the files and commands used."""

import functools
import importlib.util
import re
import shlex
import subprocess
import sys
import time

import pytest
from omegaconf import OmegaConf

from lightning_parallel import HybridParallel, Layout
from lightning_parallel.config import ConfigError, compose, instantiate
from tests.harness import REPO
from tests.models import GPT_PLAN

CONFIG = REPO / "configs" / "train.yaml"
README_MARK = "<!-- tested by tests/test_configs.py -->"
NO_WORKER_STARTED = ("Initializing distributed", "HybridParallel layout")

needs_hydra = pytest.mark.skipif(importlib.util.find_spec("hydra") is None, reason='needs pip install -e ".[hydra]"')
needs_cli = pytest.mark.skipif(importlib.util.find_spec("jsonargparse") is None, reason='needs pip install -e ".[cli]"')

# configs/train.yaml as it was before it was split into groups: the main job must stay this run.
TODAYS_RUN = {
    "seed": 0,
    "model": {"vocab_size": 256, "seq_len": 64, "d_model": 64, "n_heads": 4, "n_layers": 4, "lr": 3.0e-3},
    "data": {"seq_len": 64, "batch_size": 16, "max_train_samples": 1920, "max_val_samples": 128},
    "trainer": {"accelerator": "cpu", "devices": 4, "num_nodes": 1, "max_steps": 100, "log_every_n_steps": 10,
                "enable_checkpointing": False, "logger": False,
                "callbacks": [{"_target_": "lightning_parallel.StepProgressBar"}]},
    "strategy": {"data_parallel": "auto", "tensor_parallel": 2, "pipeline_parallel": 2, "micro_batches": 4,
                 "schedule": "1f1b", "pipeline_split": "auto", "sharding": "none", "async_save": False,
                 "tensor_plan": GPT_PLAN},
}
TARGETS = {"model": "gpt.GPT", "data": "data.ByteDataModule", "trainer": "lightning.pytorch.Trainer",
           "strategy": "lightning_parallel.HybridParallel"}


def build_trainer(overrides):
    """The Trainer examples/train.py builds for these overrides, without training."""
    cfg = compose(CONFIG, overrides)
    return instantiate(cfg.trainer, "trainer", strategy=instantiate(cfg.strategy, "strategy"))


def run(command, timeout=300):
    """(exit code, output, seconds) of a command run from the repository root."""
    start = time.monotonic()
    proc = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    return proc.returncode, proc.stdout + proc.stderr, time.monotonic() - start


def readme_blocks():
    """The README's code blocks marked as tested here, in order."""
    text = (REPO / "README.md").read_text()
    return re.findall(re.escape(README_MARK) + r"\n```\w*\n(.*?)```", text, re.S)


def readme_command(script):
    """The README's tested command line that runs `script`, as argv for this Python."""
    for block in readme_blocks():
        for line in block.replace("\\\n", " ").splitlines():
            if line.startswith(f"python {script} "):
                return [sys.executable, *shlex.split(line)[1:]]
    raise AssertionError(f"README.md has no block marked {README_MARK!r} that runs {script}")


def losses_printed(output):
    curve = re.search(r"train_loss by step: (.*)", output).group(1)
    return [float(point.split(": ")[1]) for point in curve.split(", ")]


# ------------------------------------------------------------------ composing, in process


def test_default_composition_is_todays_run():
    composed = OmegaConf.to_container(compose(CONFIG), resolve=True)
    targets = {group: composed[group].pop("_target_") for group in TARGETS}
    assert targets == TARGETS
    assert composed == TODAYS_RUN


def test_group_choice_and_dotted_overrides():
    trainer = build_trainer(["strategy=dp", "strategy.tensor_parallel=2", "trainer.devices=4"])
    strategy = trainer.strategy
    assert isinstance(strategy, HybridParallel)
    assert (strategy.tensor_parallel, strategy.pipeline_parallel, strategy.sharding) == (2, 1, "full")
    assert strategy.layout == Layout(pp=1, dp=2, tp=2, dp_shard=2)


@pytest.mark.parametrize(
    "option, layout",
    [("dp", Layout(pp=1, dp=4, tp=1, dp_shard=4)), ("tp", Layout(pp=1, dp=2, tp=2)),
     ("pp", Layout(pp=2, dp=2, tp=1)), ("3d", Layout(pp=2, dp=1, tp=2))],
)
def test_every_strategy_file_builds(option, layout):
    assert sorted(p.stem for p in (REPO / "configs" / "strategy").glob("*.yaml")) == ["3d", "dp", "pp", "tp"]
    assert build_trainer([f"strategy={option}", "trainer.devices=4"]).strategy.layout == layout


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["strategy.tensor_parallel=two"], r"^strategy\.tensor_parallel='two' is a str, but lightning_parallel\.HybridParallel "
         r"takes int for tensor_parallel\. Give a value of that type, e\.g\. strategy\.tensor_parallel=1 \(the default\)\.$"),
        (["strategy.tensor_parallel=2.0"], r"strategy\.tensor_parallel=2\.0 is a float, but .* takes int"),
        (["+strategy.sequence_parallel=maybe"], r"strategy\.sequence_parallel='maybe' is a str, .* takes bool"),
        (["+strategy.timeout=soon"], r"strategy\.timeout='soon' is a str, .* takes float or timedelta"),
        (["strategy.pipeline_parallel=-2"], r"^In strategy \(lightning_parallel\.HybridParallel\): pipeline_parallel must be "
         r">= 1, got -2\. Use 1"),
        (["strategy.schedule=fastest"], r"schedule='fastest': unknown pipeline schedule; choose one of gpipe, 1f1b, "),
        (["strategy.sharding=zero3"], r"sharding='zero3' is not one of \('none', 'full', 'hybrid'\)"),
        (["strategy.tensor_paralel=2"], r"^strategy\.tensor_paralel=2: the config has no key strategy\.tensor_paralel \(did "
         r"you mean strategy\.tensor_parallel\?\)\. Keys under strategy: _target_, data_parallel, .* To add a new key, "
         r"write \+strategy\.tensor_paralel=2\.$"),
        (["+strategy.tensor_paralel=2"], r"^strategy\.tensor_paralel=2: lightning_parallel\.HybridParallel takes no argument "
         r"tensor_paralel \(did you mean strategy\.tensor_parallel\?\)\. Its arguments: data_parallel, tensor_parallel, .*, "
         r"timeout, accelerator, .*precision_plugin\.$"),
        (["strategy=zero3"], r"^strategy=zero3: there is no .*configs/strategy/zero3\.yaml\. Choose one of: 3d, dp, pp, tp\.$"),
        (["trainer.devices=3"], r"^In trainer \(lightning\.pytorch\.Trainer\): The world size 3 .* not divisible by "
         r"tensor_parallel x pipeline_parallel = 2 x 2"),
        (["trainer.max_step=5"], r"no key trainer\.max_step \(did you mean trainer\.max_steps\?\)"),
        (["model.n_layers"], r"'model\.n_layers' is not an override: write key=value"),
    ],
)
def test_bad_configs_are_refused_with_the_key_and_the_fix(overrides, message):
    with pytest.raises(ConfigError, match=message):
        build_trainer(overrides)


# --------------------------------------------------------------- Hydra's override grammar

# Each form, and what it must have done to the composed config.
OVERRIDE_FORMS = {
    "group_option": (["strategy=dp"], lambda c: c["strategy"]["sharding"] == "full"),
    "dotted": (["trainer.max_steps=7"], lambda c: c["trainer"]["max_steps"] == 7),
    "add": (["+strategy.loss_parallel=true"], lambda c: c["strategy"]["loss_parallel"] is True),
    "force_add": (["++trainer.max_steps=9", "++trainer.max_epochs=2"],
                  lambda c: (c["trainer"]["max_steps"], c["trainer"]["max_epochs"]) == (9, 2)),
    "delete": (["~trainer.logger"], lambda c: "logger" not in c["trainer"]),
    "group_at_package": (["+model@teacher=gpt", "teacher.n_layers=8"],
                         lambda c: (c["teacher"]["n_layers"], c["model"]["n_layers"]) == (8, 4)),
    "experiment_override": (["+experiment=pp_small"],
                            lambda c: (c["strategy"]["pipeline_parallel"], c["model"]["n_layers"], c["trainer"]["devices"])
                            == (2, 2, 2)),
    "interpolation": (["model.seq_len=32", "trainer.max_steps=${data.batch_size}"],
                      lambda c: (c["data"]["seq_len"], c["trainer"]["max_steps"]) == (32, 16)),
}


@functools.cache
def train_script():
    """examples/train.py as a module (it composes in `config_from_command_line`)."""
    spec = importlib.util.spec_from_file_location("examples_train", REPO / "examples" / "train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def composed_by_train_py(words):
    """What examples/train.py composes from these overrides, resolved, as plain containers."""
    return OmegaConf.to_container(train_script().config_from_command_line(words), resolve=True)


@pytest.mark.parametrize("form", list(OVERRIDE_FORMS))
def test_each_override_form_composes_the_same_under_both_scripts(form):
    words, effect = OVERRIDE_FORMS[form]
    plain = composed_by_train_py(words)
    assert effect(plain), plain
    code, output, _ = run([sys.executable, "examples/train_hydra.py", "--cfg", "job", "--resolve", *words])
    assert code == 0, output[-3000:]
    assert OmegaConf.to_container(OmegaConf.create(output)) == plain


def test_hydra_flags_given_to_the_plain_script_reach_the_hydra_app():
    words = ["+experiment=pp_small", "model.seq_len=32"]
    code, output, _ = run([sys.executable, "examples/train.py", "--cfg", "job", "--resolve", *words])
    assert code == 0, output[-3000:]
    assert OmegaConf.to_container(OmegaConf.create(output)) == composed_by_train_py(words)


def test_make_demo_passes_every_form_through():
    words = ["+model@teacher=gpt", "~trainer.logger", "trainer.max_steps=${data.batch_size}", "strategy=dp"]
    code, output, _ = run(["make", "--no-print-directory", "demo",
                           "ARGS=--cfg job --resolve " + " ".join(shlex.quote(w) for w in words)])
    assert code == 0, output[-3000:]
    printed = output.split("\n", 1)[1]  # after make's echo of the command
    assert OmegaConf.to_container(OmegaConf.create(printed)) == composed_by_train_py(words)


@pytest.mark.parametrize("words, message", [
    (["~strategy.micro_batch"], r"^~strategy\.micro_batch: the config has no key strategy\.micro_batch \(did you mean "
                                r"strategy\.micro_batches\?\)\. Keys under strategy: .*, tensor_plan\.$"),
    (["+experiment=pp_big"], r"^experiment=pp_big: there is no .*configs/experiment/pp_big\.yaml\. Choose one of: pp_small\.$"),
    (["strategy=dp,tp"], r"Ambiguous value for argument 'strategy=dp,tp'.*add --multirun"),
])
def test_hydra_grammar_mistakes_are_refused_naming_the_override(words, message):
    with pytest.raises(ConfigError, match=re.compile(message, re.S)):
        compose(CONFIG, words)


# ------------------------------------------------------------------- the plain script


def test_readme_yaml_block_is_the_3d_strategy_file():
    assert (REPO / "configs" / "strategy" / "3d.yaml").read_text() in readme_blocks()


def test_readme_train_command_trains_with_a_group_option():
    command = readme_command("examples/train.py")
    assert "strategy=dp" in command
    code, output, _ = run(command)
    assert code == 0, output[-3000:]
    assert "HybridParallel layout pp=1 x dp=2 x tp=1 on 2 processes" in output
    assert "`Trainer.fit` stopped: `max_steps=20` reached." in output
    losses = losses_printed(output)
    assert losses[-1] < losses[0] - 0.5, losses


def test_readme_error_block_is_what_the_script_prints():
    (block,) = [b for b in readme_blocks() if b.startswith("$ python ")]
    command_line, expected = block.strip().splitlines()
    code, output, seconds = run([sys.executable, *shlex.split(command_line.removeprefix("$ python "))])
    assert code == 1 and output.strip().splitlines()[-1] == expected, output[-3000:]
    assert not any(marker in output for marker in NO_WORKER_STARTED), output[-3000:]
    assert seconds < 60


def test_script_lists_the_keys_for_an_unknown_key():
    code, output, _ = run([sys.executable, "examples/train.py", "strategy=pp", "strategy.micro_batch=8"])
    assert code == 1, output[-3000:]
    assert "ConfigError: strategy.micro_batch=8: the config has no key strategy.micro_batch (did you mean " \
           "strategy.micro_batches?)" in output
    assert not any(marker in output for marker in NO_WORKER_STARTED), output[-3000:]


# -------------------------------------------------------------------------------- Hydra


@needs_hydra
def test_hydra_single_run(tmp_path):
    command = [sys.executable, "examples/train_hydra.py", "strategy=pp", "trainer.devices=2", "trainer.max_steps=3",
               "model.n_layers=2", f"hydra.run.dir={tmp_path}"]
    code, output, _ = run(command)
    assert code == 0, output[-3000:]
    assert "HybridParallel layout pp=2 x dp=1 x tp=1 on 2 processes" in output
    assert "`Trainer.fit` stopped: `max_steps=3` reached." in output
    saved = OmegaConf.load(tmp_path / ".hydra" / "config.yaml")
    assert (saved.strategy.pipeline_parallel, saved.model.n_layers) == (2, 2)


@needs_hydra
@pytest.mark.parametrize("word, message", [
    ("strategy.tensor_parallel=two", "ConfigError: strategy.tensor_parallel='two' is a str"),  # a type
    ("strategy.micro_batch=8", "Could not override 'strategy.micro_batch'"),  # a key: Hydra's own words
    ("strategy.schedule=fastest", "ConfigError: In strategy (lightning_parallel.HybridParallel): schedule='fastest'"),
])
def test_hydra_refuses_a_bad_config_before_any_worker(tmp_path, word, message):
    code, output, _ = run([sys.executable, "examples/train_hydra.py", word, f"hydra.run.dir={tmp_path}"])
    assert code == 1
    assert message in output, output[-3000:]
    assert not any(marker in output for marker in NO_WORKER_STARTED), output[-3000:]


@needs_hydra
def test_readme_hydra_multirun_sweeps_two_layouts(tmp_path):
    command = readme_command("examples/train.py --multirun")
    assert "--multirun" in command and "strategy=dp,tp" in command
    code, output, _ = run([*command, f"hydra.sweep.dir={tmp_path}"], timeout=600)
    assert code == 0, output[-3000:]
    assert "HybridParallel layout pp=1 x dp=2 x tp=1 on 2 processes" in output
    assert "HybridParallel layout pp=1 x dp=1 x tp=2 on 2 processes" in output
    assert output.count("`Trainer.fit` stopped: `max_steps=20` reached.") == 2, output[-3000:]
    jobs = [OmegaConf.load(tmp_path / job / ".hydra" / "config.yaml") for job in ("0", "1")]
    assert [job.strategy.tensor_parallel for job in jobs] == [1, 2]


# ------------------------------------------------------------------------- LightningCLI


@needs_cli
def test_readme_lightning_cli_fits_with_tensor_parallel(tmp_path):
    command = readme_command("examples/cli.py")
    assert "--trainer.strategy.tensor_parallel=2" in command
    code, output, _ = run([*command, f"--trainer.default_root_dir={tmp_path}"])
    assert code == 0, output[-3000:]
    assert "HybridParallel layout pp=1 x dp=1 x tp=2 on 2 processes" in output
    assert "`Trainer.fit` stopped: `max_steps=20` reached." in output
    (saved,) = tmp_path.glob("lightning_logs/version_0/config.yaml")
    strategy = OmegaConf.load(saved).trainer.strategy
    assert (strategy.class_path, strategy.init_args.tensor_parallel) == ("lightning_parallel.HybridParallel", 2)


@needs_cli
def test_lightning_cli_refuses_a_wrong_type_before_any_process(tmp_path):
    command = [*readme_command("examples/cli.py"), "--trainer.strategy.tensor_parallel=two",
               f"--trainer.default_root_dir={tmp_path}"]
    code, output, seconds = run(command)
    assert code == 2, output[-3000:]
    assert re.search(r'Parser key "tensor_parallel":\s+Expected a <class \'int\'>\. Got value: two', output), output[-3000:]
    assert not any(marker in output for marker in NO_WORKER_STARTED), output[-3000:]
    assert seconds < 60
