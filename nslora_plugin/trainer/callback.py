"""`NSLoRACallback`: the loop as a transformers `TrainerCallback`, usable from any Trainer subclass
(TRL's SFTTrainer, Axolotl's and LLaMA-Factory's trainers).

What it hooks, and why there:
- on_train_begin: builds the loop, wraps the train dataloader's `collate_fn` (so accepted prompts
  and augmented rows reach the batches), adds a forward hook that reads each micro-batch loss
  (callbacks never see it), takes the baseline probe.
- on_pre_optimizer_step: gradient norm of the trainable (LoRA) parameters, after clipping — exact
  below `max_grad_norm`, which is where the saturation threshold lives.
- on_step_end: closes the step in the monitor and runs a check when one is due; a new prompt
  version goes to TensorBoard / W&B as text with a word diff (`prompt_log.py`).
- on_log: adds `nslora/*` metrics to the trainer's own logs, so `report_to` carries them.
- on_save / on_train_end: artifacts into `checkpoint-N/nslora` and `<output_dir>/nslora`, the
  NSLoRA section of the model card next to them (`card.py`), and at the end the trainer's log
  history (`train_log.jsonl`) and, with `report: true`, `report.html`.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Sequence

from transformers import TrainerCallback

from nslora_plugin.core.artifacts import ARTIFACT_DIR
from nslora_plugin.core.config import NSLoRAConfig
from nslora_plugin.core.data import load_probe_examples
from nslora_plugin.core.loop import NeurosymbolicLoop
from nslora_plugin.core.monitor import trainable_grad_norm

log = logging.getLogger("nslora")


def length_limit(args: Any) -> int | None:
    """The trainer's own cap on a training row's tokens, under its framework's name (TRL's
    `max_length`, Axolotl's `max_seq_length` or `sequence_len`): rows whose prompt an edit made
    longer are truncated to it again."""
    for name in ("max_length", "max_seq_length", "sequence_len"):
        value = getattr(args, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


class NSLoRACallback(TrainerCallback):
    def __init__(self, config: NSLoRAConfig | dict | str | None = None, *, probe: Any = None,
                 tokenizer: Any = None, plugins: Sequence[Any] = (), console: Any = None,
                 max_length: int | None = None, pool: Any = None) -> None:
        config = as_config(config)
        self.config: NSLoRAConfig = config
        self.probe_source = probe if probe is not None else config.probe_path
        self.pool_source = pool if pool is not None else config.pool_path
        from nslora_plugin.trainer.preflight import check_data_files, check_output_dir

        check_data_files({"probe_path": self.probe_source, "pool_path": self.pool_source})
        check_output_dir(config.output_dir)
        self.tokenizer = tokenizer
        self.plugins = list(plugins)
        self.console = console
        self.max_length = max_length
        self.loop: NeurosymbolicLoop | None = None
        self.summary: dict[str, Any] = {}
        self._hook_handle: Any = None
        self._pending_losses: list[Any] = []
        self._prompt_log: Any = None
        self._trainer_callbacks: list[Any] = []

    # ---------------------------------------------------------------- events
    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None,
                       processing_class: Any = None, train_dataloader: Any = None, **kwargs: Any) -> None:
        if not self.config.enabled:
            return
        self._trainer_callbacks = _move_first(self)
        tokenizer = self.tokenizer or processing_class or kwargs.get("tokenizer")
        if tokenizer is None:
            raise ValueError("NSLoRACallback needs the tokenizer: pass tokenizer=... or use a Trainer "
                             "with processing_class set")
        tokenizer = getattr(tokenizer, "tokenizer", tokenizer)  # a processor wraps the tokenizer
        if self.probe_source is None:
            raise ValueError("NSLoRA needs probe examples: set probe_path in the NSLoRA config or pass "
                             "probe=... (rows with messages, question/answer or prompt/completion)")
        probe = load_probe_examples(self.probe_source, limit=self.config.probe_size,
                                    seed=self.config.seed)
        pool = load_probe_examples(self.pool_source, id_prefix="pool-") \
            if self.pool_source is not None else []
        output = Path(self.config.output_dir or Path(args.output_dir) / ARTIFACT_DIR)
        if self.config.output_dir is None:  # NSLoRA's folder is under the trainer's output_dir
            from nslora_plugin.trainer.preflight import check_output_dir

            check_output_dir(output, trainer=True)
        max_length = self.max_length or length_limit(args)
        train_rows = read_train_rows(self.config, tokenizer, train_dataloader)
        self.loop = NeurosymbolicLoop(self.config, tokenizer, probe, pool=pool, output_dir=output,
                                      max_length=max_length, train_rows=train_rows,
                                      plugins=self.plugins, is_main_process=state.is_world_process_zero,
                                      console=self.console)
        warn_cpu_precision(args)
        if state.is_world_process_zero:
            from nslora_plugin.core.loop import cadence_problem

            problem = cadence_problem(self.config, getattr(state, "max_steps", None))
            if problem:
                log.warning("NSLoRA: %s", problem)
        self._join_ranks(model)
        if getattr(args, "dataloader_num_workers", 0):
            log.warning("NSLoRA: dataloader_num_workers=%s — collation runs in worker processes that "
                        "do not see prompt edits; set it to 0 for edits to reach training",
                        args.dataloader_num_workers)
        resumed_step = None
        if state.global_step > 0:  # resumed: the trainer restored its state before this event
            resumed_step = state.global_step
            saved = Path(args.output_dir) / f"checkpoint-{state.global_step}" / ARTIFACT_DIR
            if (saved / "state.json").is_file():
                self.loop.restore(saved)
            else:
                log.warning("NSLoRA: resuming at step %s but %s has no NSLoRA state; starting the "
                            "loop afresh from the initial prompt", state.global_step, saved)
        if state.is_world_process_zero:
            from nslora_plugin.trainer.prompt_log import PromptLog

            self._prompt_log = PromptLog(getattr(args, "report_to", None), self.loop.prompt_version)
        if train_dataloader is not None:
            wrap_collate_fn(train_dataloader,
                            lambda base: self.loop.wrap_collator(base, max_length=max_length))
        self._hook_handle = model.register_forward_hook(self._capture_loss)
        self._with_ranks(lambda: self._start(model, resumed_step, state.is_world_process_zero), model)

    def _start(self, model: Any, resumed_step: int | None, is_main: bool) -> None:
        self.loop.start(model, resumed_step=resumed_step)
        if is_main:  # what the run was trained with, for the report and card
            self.loop.write_versions(fresh=resumed_step is None)

    def _join_ranks(self, model: Any) -> None:
        """Detect the world and the model's sharding; refuse what is not supported, naming the
        setting to change (`ranks.sharding_problem`)."""
        from nslora_plugin.core.ranks import Ranks, sharding_problem

        ranks = Ranks.detect(model)
        problem = sharding_problem(ranks)
        if problem:
            raise RuntimeError(f"NSLoRA: {problem}")
        self.loop.use_ranks(ranks)
        if ranks.several and ranks.is_main:
            log.info("NSLoRA: %d ranks%s; each probes its share of the %d probe rows", ranks.world_size,
                     f" ({ranks.sharding} sharded parameters)" if ranks.sharding else "",
                     len(self.loop.examples))

    def _capture_loss(self, module: Any, inputs: Any, output: Any) -> None:
        if not module.training:
            return
        loss = output.get("loss") if isinstance(output, dict) else getattr(output, "loss", None)
        if loss is not None and getattr(loss, "numel", lambda: 0)() == 1:
            self._pending_losses.append(loss.detach())

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, model: Any = None,
                              **kwargs: Any) -> None:
        if self.loop is not None and model is not None:
            self.loop.record_grad_norm(trainable_grad_norm(model))

    def on_step_end(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        if self.loop is None:
            return
        for loss in self._pending_losses:
            self.loop.record_micro_loss(float(loss))
        self._pending_losses.clear()
        # batches trained on so far: a checkpoint's collator state goes back to the next one
        self.loop.note_trained_batches(
            state.global_step * max(int(getattr(args, "gradient_accumulation_steps", 1) or 1), 1))
        if self.loop.check_due(state.global_step):
            self._with_ranks(lambda: self.loop.after_step(state.global_step, model), model)
        else:
            self.loop.after_step(state.global_step, model)
        self._log_prompts(state)

    def _log_prompts(self, state: Any) -> None:
        """The prompt versions the `report_to` loggers have not had yet (`prompt_log.py`)."""
        if self._prompt_log is not None:
            self._prompt_log.flush(self.loop.prompt_history, self.loop.prompt_version,
                                   self._trainer_callbacks, state.global_step)

    def _with_ranks(self, work: Any, model: Any) -> Any:
        """Run `work` (a start, a due check, the end) on every rank together (`ranks.py`): rank 0
        does it, sending the probe rows to every rank to answer their share; the others serve
        those requests, then adopt rank 0's prompt, augmented rows and router state, so every
        rank trains on the same prompt from the same step."""
        from nslora_plugin.core.ranks import run_together

        loop = self.loop
        return run_together(loop.evaluator, model, work, loop.shared_state, loop.adopt_shared_state)

    def on_log(self, args: Any, state: Any, control: Any, logs: dict | None = None, **kwargs: Any) -> None:
        if self.loop is None or logs is None or not state.is_world_process_zero:
            return
        logs.update(self.loop.metrics())

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.loop is None or not state.is_world_process_zero:
            return
        checkpoint = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if checkpoint.is_dir():
            _publish(self, checkpoint, self.loop.save_checkpoint(checkpoint))
        else:
            self.loop.save()

    def on_train_end(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        if self.loop is None:
            return
        if self._hook_handle is not None:
            self._hook_handle.remove()
            self._hook_handle = None
        self._log_prompts(state)
        self.summary = self._with_ranks(lambda: self.loop.finish(model, state.global_step), model)
        if self.config.prompt_in_template:  # what `trainer.save_model()` writes from now on
            from nslora_plugin.trainer.template import set_tokenizer_prompt

            set_tokenizer_prompt(self.loop.tokenizer, self.loop.prompt)
        if state.is_world_process_zero:
            self.loop.after_train(state.log_history)
            # `trainer.save_model(output_dir)` after training keeps the card section (PEFT
            # updates an existing card in place)
            _publish(self, args.output_dir, self.loop.copy_artifacts(args.output_dir))
            # the run's last line: what the run folder lacks, and where the complete record is
            self.loop.say_where_the_record_is()


def _publish(callback: NSLoRACallback, folder: str | Path, artifacts: Path) -> None:
    """What travels with a saved model folder besides the records: the card section and, unless
    switched off, the prompt in the saved chat template."""
    from nslora_plugin.trainer.card import write_card_section

    write_card_section(folder, artifacts)
    if callback.config.prompt_in_template and callback.loop is not None:
        from nslora_plugin.trainer.template import write_prompt_into_template

        write_prompt_into_template(folder, callback.loop.prompt)


def _move_first(callback: NSLoRACallback) -> list[Any]:
    """Put `callback` first in the trainer's callback list. Its `on_log` adds the `nslora/*`
    metrics to the log dict, and the `report_to` callbacks (TensorBoard, W&B, ...) only see what
    is in it when their own `on_log` runs; a callback passed as `Trainer(callbacks=[...])` — the
    way LLaMA-Factory and plain scripts add it — comes after them. A callback never receives the
    trainer, so the handler is found as the caller of this event (`CallbackHandler.call_event`).
    Moving an element from position k to 0 while the handler iterates keeps the iteration exact:
    the callbacks after k keep their positions. Returns the trainer's callback list ([] when no
    handler called this event)."""
    import sys

    from transformers.trainer_callback import CallbackHandler

    frame = sys._getframe(1)
    while frame is not None and not isinstance(frame.f_locals.get("self"), CallbackHandler):
        frame = frame.f_back
    if frame is None:
        return []
    callbacks = frame.f_locals["self"].callbacks
    if callbacks and callbacks[0] is not callback and any(c is callback for c in callbacks):
        index = next(i for i, c in enumerate(callbacks) if c is callback)
        callbacks.insert(0, callbacks.pop(index))
    return callbacks


def as_config(config: NSLoRAConfig | dict | str | Path | None) -> NSLoRAConfig:
    """An `NSLoRAConfig` from itself, a dict, a YAML path, or None (the defaults)."""
    if isinstance(config, NSLoRAConfig):
        return config
    if isinstance(config, (str, Path)):
        return NSLoRAConfig.from_yaml(config)
    return NSLoRAConfig.from_dict(config or {})


_precision_warned = False


def warn_cpu_precision(args: Any) -> None:
    """Warn once per process when the trainer's precision makes CPU steps emulated and slow
    (the user's config is theirs to change; `precision.cpu_precision_problem` says why)."""
    global _precision_warned
    from nslora_plugin.trainer.precision import cpu_precision_problem

    problem = cpu_precision_problem(args)
    if problem and not _precision_warned:
        _precision_warned = True
        log.warning("NSLoRA: %s", problem)


def read_train_rows(config: NSLoRAConfig, tokenizer: Any, dataloader: Any) -> Any:
    """The system messages the rows of the train dataloader's dataset carry (`row_prompts.py`):
    the tokenized rows the framework built (TRL's, Axolotl's — packed or not — and LLaMA-Factory's
    alike), read before the first batch. None without a dataloader; a dataset that cannot be read
    ahead of training (an iterable one) is refused when `system_prompt` is unset, since the
    initial prompt would be a guess."""
    from nslora_plugin.core.row_prompts import SETTING, read_row_prompts

    if dataloader is None:
        if config.system_prompt is None:
            log.warning("NSLoRA: no train dataloader to read the rows' system message from; the "
                        "initial prompt is the chat template's default — set %s if the rows carry "
                        "another", SETTING)
        return None
    dataset = _inner_dataloader(dataloader).dataset
    rows = read_row_prompts(tokenizer, dataset, seed=config.seed)
    if rows is None:
        if config.system_prompt is None:
            from nslora_plugin.core.config import NSLoRAConfigError

            raise NSLoRAConfigError(
                f"NSLoRA cannot read the training rows ahead of training ({type(dataset).__name__} "
                "without input_ids or messages rows, or an iterable dataset), so it cannot tell the "
                f"system message they carry: set {SETTING} to it.", key="system_prompt")
        log.warning("NSLoRA: the training rows cannot be read ahead of training (%s); whether they "
                    "carry system_prompt is seen in the collator's counts only (no_span)",
                    type(dataset).__name__)
    return rows


def _inner_dataloader(dataloader: Any) -> Any:
    inner = dataloader
    while getattr(inner, "base_dataloader", None) is not None and inner.base_dataloader is not inner:
        inner = inner.base_dataloader
    return inner


def wrap_collate_fn(dataloader: Any, wrap: Any) -> Any:
    """Wrap the collate function of the DataLoader that actually iterates. accelerate's
    `DataLoaderShard` / `DataLoaderDispatcher` delegate to `base_dataloader`, so an attribute set
    on the adapter would never be read."""
    inner = dataloader
    while getattr(inner, "base_dataloader", None) is not None and inner.base_dataloader is not inner:
        inner = inner.base_dataloader
    wrapped = wrap(inner.collate_fn)
    inner.collate_fn = wrapped
    return wrapped


def attach(trainer: Any, config: NSLoRAConfig | dict | str | None = None, *, probe: Any = None,
           plugins: Sequence[Any] = (), console: Any = None, pool: Any = None) -> NSLoRACallback:
    """Add NSLoRA to an already-built `transformers.Trainer` (TRL's `SFTTrainer`, Axolotl's and
    LLaMA-Factory's trainers alike) and return its callback.

    The callback is put first in the trainer's callback list so that the `nslora/*` metrics it
    adds to each log reach the `report_to` integrations. If `probe` is None and the config has no
    `probe_path`, the trainer's raw eval dataset is used when it still has text columns. `pool`
    (or `pool_path`): labelled rows prompts-as-data may train on instead of the probe's.
    """
    cfg = as_config(config)
    if probe is None and cfg.probe_path is None:
        probe = _raw_eval_rows(trainer)
    callback = NSLoRACallback(cfg, probe=probe, tokenizer=getattr(trainer, "processing_class", None),
                              plugins=plugins, console=console, pool=pool)
    trainer.callback_handler.callbacks.insert(0, callback)
    _keep_card_section(trainer, callback)
    return callback


def _keep_card_section(trainer: Any, callback: NSLoRACallback) -> None:
    """TRL's `create_model_card` rewrites `<output_dir>/README.md` from scratch (at every
    checkpoint and in `push_to_hub`, just before the upload); put the NSLoRA section back each
    time, so the card pushed to the Hub carries the prompt."""
    original = getattr(trainer, "create_model_card", None)
    if original is None or getattr(original, "_nslora_card", False):
        return

    def create_model_card(*args: Any, **kwargs: Any) -> Any:
        result = original(*args, **kwargs)
        if callback.loop is not None and callback.loop.is_main:
            from nslora_plugin.trainer.card import write_card_section

            write_card_section(trainer.args.output_dir, callback.loop.artifacts_root)
        return result

    create_model_card._nslora_card = True  # type: ignore[attr-defined]
    trainer.create_model_card = create_model_card


def save_artifacts(callback: NSLoRACallback, folder: str | Path) -> Path:
    """Copy the run's artifacts next to an adapter saved elsewhere (`trainer.save_model(folder)`)."""
    if callback.loop is None:
        raise RuntimeError("NSLoRA has not run yet: call trainer.train() first")
    dest = callback.loop.copy_artifacts(folder)
    _publish(callback, folder, dest)
    return dest


def _raw_eval_rows(trainer: Any) -> Any:
    data = getattr(trainer, "eval_dataset", None)
    if data is None or not hasattr(data, "column_names"):
        return None
    columns = set(data.column_names)
    if {"messages"} <= columns or {"question", "answer"} <= columns or {"prompt", "completion"} <= columns:
        return data
    return None
