"""The `alps_*` options: defaults, parsing (HfArgumentParser / TrlParser, CLI and YAML), validation."""

import dataclasses

import pytest
from transformers import HfArgumentParser
from trl import DPOConfig, SFTConfig, TrlParser

from alps_trl.trainers.config import (
    AlpsArguments,
    AlpsDPOConfig,
    AlpsGRPOConfig,
    AlpsSFTConfig,
    alps_arguments_of,
    planned_probe_steps,
)


def test_defaults_match_design():
    a = AlpsArguments()
    assert (a.alps_ratio, a.alps_task_model, a.alps_heads) == (0.1, None, None)
    assert (a.alps_metric, a.alps_strategy, a.alps_temperature, a.alps_seed) == ("pad", "top_k", 1.0, 0)
    assert (a.alps_probe_steps, a.alps_mode, a.alps_train_non_attention) == (None, "auto", True)
    assert (a.alps_restrict_o_proj, a.alps_trust_remote_code) == (False, False)


def test_every_field_has_help():
    for f in dataclasses.fields(AlpsArguments):
        assert f.metadata.get("help"), f"{f.name} has no help text"


CHOICE_FIELDS = [f for f in dataclasses.fields(AlpsArguments) if "choices" in f.metadata]


def test_choices_are_the_known_values():
    """The one list of each field's values is its metadata; the trainers' metrics, strategies and modes."""
    from alps_trl.localization.selection import STRATEGIES
    from alps_trl.localization.weights import FETCH_MODES
    from alps_trl.restriction import MODES
    from alps_trl.trainers.config import TRAINER_METRICS

    found = {f.name: tuple(f.metadata["choices"]) for f in CHOICE_FIELDS}
    expected = {"alps_metric": TRAINER_METRICS, "alps_strategy": STRATEGIES, "alps_mode": MODES}
    assert found == {**expected, "alps_fetch": FETCH_MODES}
    for f in CHOICE_FIELDS:
        # alps_fetch is optional: None (its default, nothing fetched) or one of its choices.
        assert f.default in f.metadata["choices"] or (f.name == "alps_fetch" and f.default is None), f.name


@pytest.mark.parametrize("field", CHOICE_FIELDS, ids=lambda f: f.name)
def test_validation_reads_the_choices(field):
    """A value outside a field's choices is refused with the field's name and every value it accepts."""
    for value in field.metadata["choices"]:
        AlpsArguments(**{field.name: value})
    with pytest.raises(ValueError) as err:
        AlpsArguments(**{field.name: "not-a-choice"})
    message = str(err.value)
    assert message.startswith(f"{field.name}='not-a-choice' is not known")
    assert all(str(c) in message for c in field.metadata["choices"])


@pytest.mark.parametrize("config", [AlpsSFTConfig, AlpsDPOConfig, AlpsGRPOConfig], ids=lambda c: c.__name__)
def test_help_lists_the_choices(config):
    """`--help` renders every help text (no stray % for argparse) and shows each field's choices."""
    help_text = " ".join(TrlParser(config).format_help().split())
    for f in CHOICE_FIELDS:
        assert f"--{f.name} {{{','.join(f.metadata['choices'])}}}" in help_text, f.name


@pytest.mark.parametrize("cls", [AlpsSFTConfig, AlpsDPOConfig])
def test_hf_argument_parser_reads_alps_flags(cls, tmp_path):
    parser = HfArgumentParser(cls)
    (args,) = parser.parse_args_into_dataclasses(
        ["--output_dir", str(tmp_path), "--bf16", "false", "--alps_ratio", "0.25", "--alps_mode", "delta",
         "--alps_probe_steps", "3", "--alps_train_non_attention", "false", "--alps_heads", "h.json"]
    )  # fmt: skip
    assert isinstance(args, cls)
    assert (args.alps_ratio, args.alps_mode, args.alps_probe_steps) == (0.25, "delta", 3)
    assert args.alps_train_non_attention is False and args.alps_heads == "h.json"


def test_trl_parser_yaml_then_cli_override(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"output_dir: {tmp_path}\nbf16: false\nalps_ratio: 0.2\nalps_metric: js\nbeta: 0.2\n")
    (args,) = TrlParser(AlpsDPOConfig).parse_args_and_config(["--config", str(recipe), "--alps_ratio", "0.3"])
    assert (args.alps_ratio, args.alps_metric, args.beta) == (0.3, "js", 0.2)


@pytest.mark.parametrize(
    ("field", "value", "needle"),
    [
        ("alps_ratio", 0.0, "alps_ratio"),
        ("alps_ratio", 1.5, "alps_ratio"),
        ("alps_metric", "l2", "alps_metric"),
        ("alps_strategy", "best", "alps_strategy"),
        ("alps_mode", "lora", "alps_mode"),
        ("alps_temperature", 0.0, "alps_temperature"),
        ("alps_probe_steps", -1, "alps_probe_steps"),
    ],
)
def test_invalid_values_name_the_field(field, value, needle, tmp_path):
    with pytest.raises(ValueError, match=needle):
        AlpsArguments(**{field: value})
    with pytest.raises(ValueError, match=needle):
        AlpsSFTConfig(output_dir=str(tmp_path), bf16=False, **{field: value})


def test_plain_trl_configs_get_default_alps_options(tmp_path):
    for cfg in (SFTConfig(output_dir=str(tmp_path), bf16=False), DPOConfig(output_dir=str(tmp_path), bf16=False)):
        assert alps_arguments_of(cfg) == AlpsArguments()
    own = AlpsSFTConfig(output_dir=str(tmp_path), bf16=False, alps_ratio=0.5)
    assert alps_arguments_of(own) is own


def test_probe_default_is_ten_percent_of_training_steps():
    assert planned_probe_steps(AlpsArguments(), 100) == 10
    assert planned_probe_steps(AlpsArguments(), 3) == 1
    assert planned_probe_steps(AlpsArguments(alps_probe_steps=7), 100) == 7
    assert planned_probe_steps(AlpsArguments(alps_probe_steps=0), 100) == 0


def test_configs_take_output_dir_positionally_like_trl():
    """`AlpsSFTConfig("out")` as `SFTConfig("out")` (TRL builds its default configs so): TRL's fields come first."""
    from alps_trl import AlpsDPOConfig, AlpsGRPOConfig, AlpsSFTConfig

    for cls in (AlpsSFTConfig, AlpsDPOConfig, AlpsGRPOConfig):
        config = cls("some/run", use_cpu=True, report_to="none")
        assert config.output_dir == "some/run" and config.alps_ratio == 0.1
        with pytest.raises(ValueError, match="alps_ratio"):
            cls("some/run", use_cpu=True, alps_ratio=1.5)
