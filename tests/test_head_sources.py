"""The head sources as one ordered table, and the DPO reference choice as a pure function of the arguments."""

import pytest
from datasets import Dataset, IterableDataset
from trainer_helpers import tiny_model

from alps_trl.trainers.config import AlpsArguments, AlpsDPOConfig
from alps_trl.trainers.dpo import REFERENCE_KINDS, choose_reference
from alps_trl.trainers.head_sources import HEAD_SOURCES, head_source_for


@pytest.mark.parametrize(
    ("options", "given", "expected"),
    [
        ({}, True, "argument"),
        ({"alps_heads": "h.json", "alps_task_model": "t"}, True, "argument"),
        ({"alps_heads": "h.json", "alps_task_model": "t"}, False, "alps_heads"),
        ({"alps_task_model": "t", "alps_strategy": "random"}, False, "alps_task_model"),
        ({"alps_strategy": "random", "alps_metric": "importance"}, False, "random"),
        ({"alps_strategy": "layer_consistent"}, False, "layer_consistent"),
        ({"alps_metric": "importance"}, False, "importance"),
        ({}, False, "probe"),
        ({"alps_metric": "kl"}, False, "probe"),
    ],
    ids=str,
)
def test_first_applying_source_wins(options, given, expected):
    assert head_source_for(AlpsArguments(**options), given).name == expected


def test_the_table_ends_in_a_source_that_always_applies_and_names_are_unique():
    names = [s.name for s in HEAD_SOURCES]
    assert len(set(names)) == len(names) and "checkpoint" not in names
    assert HEAD_SOURCES[-1].applies(AlpsArguments(), False)


def _data(iterable: bool = False):
    rows = [{"prompt": "a", "chosen": "b", "rejected": "c"}]
    return IterableDataset.from_generator(lambda: iter(rows)) if iterable else Dataset.from_list(rows)


MODEL = object()  # a module is only passed through; "name" stands for a model TRL loads by name


@pytest.mark.parametrize(
    ("args", "model", "ref_model", "train", "eval_", "expected"),
    [
        (dict(), MODEL, "ref", _data(), None, "user"),
        (dict(precompute_ref_log_probs=True), MODEL, None, _data(), None, "precomputed"),
        (dict(alps_train_non_attention=False), MODEL, None, _data(), None, "parameter-free"),
        (dict(alps_train_non_attention=False), "name", None, _data(), None, "precomputed"),
        (dict(alps_train_non_attention=False), "name", None, _data(True), None, "copy"),
        (dict(), MODEL, None, _data(), None, "precomputed"),
        (dict(), MODEL, None, _data(), {"a": _data(True)}, "copy"),
        (dict(), MODEL, None, _data(True), None, "copy"),
        (dict(), MODEL, None, None, None, "copy"),
    ],
    ids=str,
)
def test_dpo_reference_choice(tmp_path, args, model, ref_model, train, eval_, expected):
    config = AlpsDPOConfig(str(tmp_path), report_to="none", bf16=False, **args)
    model = tiny_model() if model is MODEL else model
    assert choose_reference(config, model, ref_model, train, eval_) == expected
    assert expected in REFERENCE_KINDS


def test_dpo_reference_choice_refuses_sync_ref_model(tmp_path):
    config = AlpsDPOConfig(str(tmp_path), report_to="none", bf16=False, sync_ref_model=True)
    with pytest.raises(ValueError, match="sync_ref_model"):
        choose_reference(config, tiny_model(), None, _data())
