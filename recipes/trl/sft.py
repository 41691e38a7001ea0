"""Supervised fine-tuning with TRL: full, LoRA or QLoRA, on a chat dataset (`messages` rows).

`sft_plain.py` is a plain TRL script; `sft.py` is the same script with NSLoRA added (three lines:
`diff sft_plain.py sft.py`). Without `--nslora`, `sft.py` runs exactly like `sft_plain.py`.

    python recipes/trl/sft.py \
        --model_name_or_path Qwen/Qwen2.5-0.5B-Instruct --dataset_name data/ \
        --use_peft --lora_r 16 --lora_alpha 32 --lora_target_modules all-linear \
        --per_device_train_batch_size 2 --gradient_accumulation_steps 8 --learning_rate 2e-4 \
        --output_dir runs/qwen-sft \
        --nslora --nslora_probe_path data/probe.jsonl --nslora_system_prompt "You are a helpful assistant."

    # QLoRA: add --load_in_4bit --dtype bfloat16 (bitsandbytes NF4 base, LoRA adapters on top)
    # a YAML instead of flags: --config recipes/trl/llama3-8b-qlora-24gb.yaml
    # several GPUs: accelerate launch recipes/trl/sft.py ...  (or: nslora-trl sft ...)
"""

from datasets import load_dataset

from trl import ModelConfig, ScriptArguments, SFTConfig, SFTTrainer, TrlParser, get_peft_config, get_quantization_config

from nslora_plugin.integrations.trl import NSLoRAArguments, maybe_attach


if __name__ == "__main__":
    script_args, training_args, model_args, nslora_args = TrlParser((ScriptArguments, SFTConfig, ModelConfig, NSLoRAArguments)).parse_args_and_config()

    # Model: how to load it. With --load_in_4bit / --load_in_8bit the base weights are quantized by
    # bitsandbytes on load; SFTTrainer places the model (one GPU, or one copy per process).
    model_init_kwargs = dict(
        revision=model_args.model_revision,
        trust_remote_code=training_args.trust_remote_code,
        attn_implementation=model_args.attn_implementation,
        dtype=model_args.dtype,
    )
    quantization_config = get_quantization_config(model_args)
    if quantization_config is not None:
        model_init_kwargs["quantization_config"] = quantization_config
    training_args.model_init_kwargs = {**model_init_kwargs, **(training_args.model_init_kwargs or {})}

    # Data: a Hub dataset or a local folder / file, with a `messages` (or prompt/completion) column
    dataset = load_dataset(script_args.dataset_name, name=script_args.dataset_config)

    # Trainer: LoRA adapters when --use_peft, full fine-tuning otherwise
    trainer = SFTTrainer(
        model=model_args.model_name_or_path,
        args=training_args,
        train_dataset=dataset[script_args.dataset_train_split],
        eval_dataset=dataset[script_args.dataset_test_split] if training_args.eval_strategy != "no" else None,
        peft_config=get_peft_config(model_args),
    )
    maybe_attach(trainer, nslora_args)  # NSLoRA, if --nslora: probe every N steps, rewrite the prompt or keep training

    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)

    trainer.save_model(training_args.output_dir)
    trainer.accelerator.print(f"Model saved to {training_args.output_dir}")
    if training_args.push_to_hub:
        trainer.push_to_hub(dataset_name=script_args.dataset_name)
    if hasattr(trainer, "end"):  # transformers >= 5.18: finish trackers, close the process group
        trainer.end()
