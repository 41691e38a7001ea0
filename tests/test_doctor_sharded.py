"""`nslora doctor` per rank for sharded runs (--gpus, --shard, --accelerate-config), and the sharded
recipes (recipes/accelerate/*.yaml, the 70B FSDP + QLoRA recipes) parse. Arithmetic and parsing
only: nothing trains, nothing is downloaded."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from nslora_plugin.apps.tools.doctor import (GiB, PRESETS, TrainSettings, estimate, format_table,
                                        main as doctor_main, resolve_model,
                                        settings_from_accelerate_config, settings_from_trl_config)

REPO = Path(__file__).resolve().parents[1]
ACCEL = REPO / "recipes" / "accelerate"
TRL_70B = REPO / "recipes" / "trl" / "llama3-70b-qlora-fsdp.yaml"
TRL_8B = REPO / "recipes" / "trl" / "llama3-8b-qlora-24gb.yaml"
AXOLOTL_70B = REPO / "recipes" / "axolotl" / "llama3-70b-qlora-fsdp.yaml"


def _settings_70b(**over) -> TrainSettings:
    _, kw = settings_from_trl_config(TRL_70B)
    kw.update(settings_from_accelerate_config(ACCEL / "fsdp2-qlora.yaml"))
    kw.update({"lm_head": "full", **over})  # not the installed TRL's default: a fixed upper bound
    return TrainSettings(**kw)


def test_70b_preset_matches_the_published_size():
    assert abs(PRESETS["llama-3-70b"].num_params / 1e9 - 70.55) / 70.55 < 0.01
    assert resolve_model("meta-llama/Llama-3.1-70B-Instruct").name == "llama-3-70b"
    assert resolve_model("meta-llama/Llama-3.1-8B-Instruct").name == "llama-3-8b"


def test_sharded_terms_are_one_nth_and_the_rest_stays_whole():
    shape = PRESETS["llama-3-70b"]
    one = estimate(shape, _settings_70b(num_ranks=1, shard="none", probe_size=None))
    eight = estimate(shape, _settings_70b(num_ranks=8, shard="fsdp", probe_size=None))
    for row in ("base weights", "LoRA adapter", "gradients", "optimizer states"):
        assert eight.row(row) == pytest.approx(one.row(row) / 8), row
    for row in ("activations", "logits + loss", "probe KV cache", "probe reference-NLL logits"):
        assert eight.row(row) == pytest.approx(one.row(row)), row
    # sharded forwards hold the largest unit (lm_head, 2 GiB in bf16) and two decoder layers whole
    assert 2.0 * GiB < eight.row("all-gathered layers") < 4.0 * GiB
    with pytest.raises(KeyError):
        one.row("all-gathered layers")
    # ZeRO-3 partitions the same terms
    z3 = estimate(shape, _settings_70b(num_ranks=8, shard="zero3", probe_size=None))
    assert z3.row("base weights") == pytest.approx(eight.row("base weights"))


def test_70b_qlora_over_8_ranks_fits_80gb_and_one_24gb_card_does_not():
    shape = PRESETS["llama-3-70b"]
    eight = estimate(shape, _settings_70b(gpu_gib=80.0))
    assert eight.settings.num_ranks == 8 and eight.settings.shard == "fsdp"
    assert eight.settings.gradient_checkpointing  # FSDP's activation checkpointing, read from the config
    assert eight.fits and 10 * GiB < eight.total < 30 * GiB
    one = estimate(shape, _settings_70b(num_ranks=1, shard="none", gpu_gib=24.0))
    assert not one.fits and one.row("base weights") > 35 * GiB
    assert eight.total < one.total / 2
    table = format_table(eight)
    assert "per rank: 8 ranks (FSDP" in table and "fits in 80 GiB per GPU" in table
    assert "all-gathered layers" in table
    # DDP over 8 ranks: everything replicated, no better than one GPU for the weights
    ddp = estimate(shape, _settings_70b(shard="none", gpu_gib=24.0))
    assert ddp.row("base weights") == pytest.approx(one.row("base weights")) and not ddp.fits
    assert "shard the model" in format_table(ddp)


def test_4_x_24gb_fits_and_probe_rows_split_across_ranks():
    shape = PRESETS["llama-3-70b"]
    four = estimate(shape, _settings_70b(num_ranks=4, gpu_gib=24.0))
    assert four.fits, format_table(four)
    # 64 probe rows / 16 ranks = 4 rows each: half the KV cache of batch 8
    sixteen = estimate(shape, _settings_70b(num_ranks=16))
    eight = estimate(shape, _settings_70b(num_ranks=8))
    assert sixteen.row("probe KV cache") == pytest.approx(eight.row("probe KV cache") / 2)
    assert _settings_70b(num_ranks=16).probe_rows_per_rank() == 4
    assert _settings_70b(num_ranks=2).probe_rows_per_rank() == 8  # capped by probe_batch_size


def test_offload_moves_the_shards_off_the_gpu(tmp_path):
    cfg = (ACCEL / "fsdp2-qlora.yaml").read_text().replace("fsdp_offload_params: false",
                                                           "fsdp_offload_params: true")
    path = tmp_path / "offload.yaml"
    path.write_text(cfg)
    kw = settings_from_accelerate_config(path)
    assert kw["offload_params"] and kw["offload_optimizer"]
    shape = PRESETS["llama-3-70b"]
    est = estimate(shape, _settings_70b(offload_params=True, offload_optimizer=True))
    assert est.row("base weights") == 0 and est.row("optimizer states") == 0
    assert est.row("all-gathered layers") > 0


def test_accelerate_configs_map_to_ranks_and_sharding():
    assert settings_from_accelerate_config(ACCEL / "fsdp2.yaml") == {
        "num_ranks": 8, "shard": "fsdp", "offload_params": False, "offload_optimizer": False,
        "gradient_checkpointing": True}
    z3 = settings_from_accelerate_config(ACCEL / "deepspeed_zero3.yaml")
    assert z3["shard"] == "zero3" and z3["num_ranks"] == 8 and not z3["offload_params"]
    assert "gradient_checkpointing" not in z3  # ZeRO-3 leaves checkpointing to the Trainer
    assert settings_from_accelerate_config(ACCEL / "ddp.yaml") == {"num_ranks": 8, "shard": "none"}


@pytest.mark.parametrize("argv, needle", [
    (["--gpus", "0"], "--gpus"),
    (["--gpus", "-2", "--shard", "fsdp"], "--gpus"),
    (["--shard", "fsdp"], "--gpus"),
    (["--gpus", "8", "--probe-size", "0"], "--probe-size"),
    (["--accelerate-config", "no/such/file.yaml"], "--accelerate-config"),
])
def test_bad_values_are_refused_naming_the_flag(argv, needle, capsys):
    assert doctor_main(["--model", "llama-3-70b", "--load-in-4bit", *argv]) == 2
    out = capsys.readouterr().out
    assert "error" in out and needle in out


def test_cli_per_rank_table_and_json(capsys):
    base = ["--config", str(TRL_70B), "--accelerate-config", str(ACCEL / "fsdp2-qlora.yaml"),
            "--lm-head", "full"]
    assert doctor_main([*base, "--gpu-gib", "80"]) == 0
    out = capsys.readouterr().out
    assert "per rank: 8 ranks" in out and "fits in 80 GiB per GPU" in out
    assert doctor_main([*base, "--gpus", "4", "--gpu-gib", "24", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["per_rank"] and data["num_ranks"] == 4 and data["shard"] == "fsdp" and data["fits"]
    # flags win over the accelerate config; one rank of a 70B model in 4-bit does not fit 24 GB
    assert doctor_main([*base, "--gpus", "1", "--shard", "none", "--gpu-gib", "24"]) == 1
    assert "DOES NOT FIT" in capsys.readouterr().out


def test_single_gpu_output_is_unchanged_without_sharding_flags(capsys):
    """No per-rank line, no gathered-layers row, no new JSON keys: the one-GPU doctor as before."""
    assert doctor_main(["--config", str(TRL_8B), "--lm-head", "full"]) == 0
    out = capsys.readouterr().out
    assert "per rank" not in out and "all-gathered" not in out and "per GPU" not in out
    assert "fits in 24 GiB (" in out
    assert doctor_main(["--model", "llama-3-8b", "--load-in-4bit", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert "per_rank" not in data and "num_ranks" not in data["settings"]


# ------------------------------------------------------------------------------ the recipes parse
def _accelerate_launch_args(name: str):
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser

    args = launch_command_parser().parse_args(["--config_file", str(ACCEL / name), "train.py"])
    return _validate_launch_command(args)[0]


@pytest.mark.parametrize("name", ["fsdp2.yaml", "fsdp2-qlora.yaml"])
def test_fsdp2_configs_go_through_accelerate_launch(name, monkeypatch):
    """What `accelerate launch --config_file` does with them: the launcher's env, then the plugin."""
    from accelerate.utils import FullyShardedDataParallelPlugin
    from accelerate.utils.launch import prepare_multi_gpu_env

    args = _accelerate_launch_args(name)
    assert args.use_fsdp and args.num_processes == 8
    env = prepare_multi_gpu_env(args)  # raises if cpu_ram_efficient_loading lacks sync_module_states
    for key, value in env.items():
        if key.startswith("FSDP_"):
            monkeypatch.setenv(key, value)
    plugin = FullyShardedDataParallelPlugin()
    assert plugin.fsdp_version == 2 and plugin.reshard_after_forward is True
    assert "FULL_STATE_DICT" in str(plugin.state_dict_type)  # save_model writes a normal adapter
    assert plugin.activation_checkpointing and plugin.cpu_ram_efficient_loading


def test_deepspeed_and_ddp_configs_go_through_accelerate_launch():
    z3 = _accelerate_launch_args("deepspeed_zero3.yaml")
    assert z3.use_deepspeed and int(z3.zero_stage) == 3
    assert str(z3.zero3_init_flag).lower() == "true" and str(z3.zero3_save_16bit_model).lower() == "true"
    ddp = _accelerate_launch_args("ddp.yaml")
    assert ddp.multi_gpu and not ddp.use_fsdp and not ddp.use_deepspeed


def test_trl_70b_recipe_parses_with_nslora_on():
    from nslora_plugin.integrations.trl import cli as trl_cli

    parsed = trl_cli.make_parser().parse_args_and_config(
        ["--config", str(TRL_70B), "--use_cpu", "--bf16", "false"])
    training_args, model_args, nslora_args = parsed[1], parsed[2], parsed[-1]
    assert model_args.load_in_4bit and model_args.use_peft
    # FSDP + QLoRA: the 4-bit storage dtype equals the model dtype
    assert model_args.bnb_4bit_quant_storage == "bfloat16" == model_args.dtype
    assert training_args.gradient_checkpointing is False  # FSDP's activation checkpointing instead
    assert training_args.optim != "paged_adamw_8bit"
    assert training_args.packing is False and training_args.dataloader_num_workers == 0
    cfg = nslora_args.to_config()
    assert cfg is not None and cfg.probe_size == 64 and cfg.answer_format and cfg.system_prompt


def test_axolotl_70b_recipe_validates(tmp_path, monkeypatch):
    import yaml

    from nslora_plugin.integrations.axolotl.args import NSLoRAArgs

    monkeypatch.chdir(tmp_path)
    (tmp_path / "data" / "nslora").mkdir(parents=True)
    (tmp_path / "data" / "nslora" / "probe.jsonl").write_text('{"question": "q", "answer": "a"}\n')
    raw = yaml.safe_load(AXOLOTL_70B.read_text())
    assert raw["plugins"] == ["nslora_plugin.integrations.axolotl.NSLoRAPlugin"]
    assert raw["adapter"] == "qlora" and raw["load_in_4bit"] is True
    assert raw["fsdp_version"] == 2 and raw["fsdp_config"]["state_dict_type"] == "FULL_STATE_DICT"
    assert raw["fsdp_config"]["activation_checkpointing"] is True and raw["gradient_checkpointing"] is False
    assert raw["sample_packing"] is False and raw["dataloader_num_workers"] == 0
    out = NSLoRAArgs(**raw).model_dump(exclude_none=True)
    assert out["nslora"] is True and out["nslora_probe_path"].endswith("probe.jsonl")
    assert out["nslora_probe_size"] == 64
