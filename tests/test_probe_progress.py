"""The probe pre-step shows a progress bar like the trainer's own, and none with disable_tqdm."""

import pytest
from trainer_helpers import sft_config, sft_dataset, tiny_model, tiny_tokenizer

from alps_trl.trainers.sft import AlpsSFTTrainer


@pytest.mark.parametrize("disable_tqdm", [False, True])
def test_probe_progress_bar_follows_disable_tqdm(tmp_path, capfd, disable_tqdm):
    capfd.readouterr()
    trainer = AlpsSFTTrainer(  # the constructor runs the probe
        model=tiny_model("llama"),
        args=sft_config(str(tmp_path), alps_probe_steps=3, disable_tqdm=disable_tqdm),
        train_dataset=sft_dataset(),
        processing_class=tiny_tokenizer(),
    )
    assert trainer.head_source == "probe"
    err = capfd.readouterr().err
    if disable_tqdm:
        assert "ALPS probe" not in err
    else:
        assert "ALPS probe: 100%" in err and "3/3" in err and "loss=" in err, err
