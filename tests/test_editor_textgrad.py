"""TextGrad without its sharp edges, the three editor backends, symbolic constraints and question
edits (issue 3).

Rounds run through a real `NeurosymbolicLoop` (tiny model, real tokenizer, probe → router →
editor → gate → artifacts) without a trainer, against the loopback `FaultServer`, which records
every request body it receives.
"""

from __future__ import annotations

import json
import logging
import os

import pytest

from nslora_plugin import NSLoRAConfig
from nslora_plugin.core.data import make_word_problems
from nslora_plugin.builtins.editors.constraint import (ConstraintEditor, constraint_statements,
                                                    violated_constraints)
from nslora_plugin.builtins.editors.clients import OpenAICompatibleClient
from nslora_plugin.builtins.editors.textgrad import TAGS, control_tokens, question_problem
from nslora_plugin.builtins.rewards import BuiltinRewards
from nslora_plugin.core.records import ProbeExample, ProbeResult

from fault_server import editor_config, round_loop
from tiny import FORMAT_INSTRUCTION, SYSTEM

KEY_ENV = "NSLORA_TEST_EDITOR_KEY"


@pytest.fixture(scope="module")
def rows():
    return make_word_problems(8, seed=7)


def edits(loop):
    return [c for c in loop.prompt_history[1:]]


# ------------------------------------------------------------------------------------------------
# sharp edges
# ------------------------------------------------------------------------------------------------


def test_logs_under_run_folder_global_engine_untouched(tmp_path, monkeypatch, tokenizer, rows, server):
    from nslora_plugin.builtins.editors.textgrad_env import import_textgrad

    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    tg = import_textgrad()

    class UserEngine(tg.EngineLM):  # a user's own global backward engine
        model_string = "user-engine"
        calls = 0

        def generate(self, *args, **kwargs):
            UserEngine.calls += 1
            raise AssertionError("the user's global engine must not be used")

        __call__ = generate

    user_engine = UserEngine()
    tg.set_backward_engine(user_engine, override=True)
    try:
        loop, model = round_loop(tokenizer, tmp_path / "run", editor_config(server), rows)
        loop.check(1, model)
        assert tg.SingletonBackwardEngine().get_engine() is user_engine
    finally:
        tg.SingletonBackwardEngine().engine = None
    assert UserEngine.calls == 0
    assert [c.editor for c in edits(loop)] == ["textgrad"] and edits(loop)[0].accepted
    assert list(cwd.iterdir()) == []  # nothing written to the working directory
    logs = list((tmp_path / "run" / "editor_logs").glob("*.jsonl"))
    assert logs and "TextualGradientDescent" in "".join(p.read_text() for p in logs)


def test_sampling_settings_sent_and_usage_from_server(tmp_path, tokenizer, rows, server):
    cfg = editor_config(server, editor_temperature=0.3, editor_max_tokens=40, editor_cache=False)
    loop, model = round_loop(tokenizer, tmp_path / "run", cfg, rows)
    loop.check(1, model)
    bodies = server.chat_bodies()
    assert len(bodies) == 3 * 3 + 1  # 3B+1: the student's replies are reused, not regenerated
    assert all(b["temperature"] == 0.3 and b["max_tokens"] == 40 and b["model"] == server.model
               for b in bodies)
    usage = loop.usage()
    assert usage["calls"] == 10 and usage["prompt_tokens"] == 1000 and usage["completion_tokens"] == 100
    assert usage["estimated_calls"] == 0
    state = json.loads((tmp_path / "run" / "state.json").read_text())
    assert state["usage"]["calls"] == 10 and state["usage"]["last_round"]["calls"] == 10
    edit = next(d for d in map(json.loads, (tmp_path / "run" / "decisions.jsonl").open())
                if d["kind"] == "edit")
    assert edit["meta"]["usage"]["calls"] == 10 and edit["meta"]["usage"]["tokens"] == 1100

    server.reset(usage=False)  # a server without usage fields: tokens are estimated
    loop.check(2, model)
    usage = loop.usage()
    assert usage["estimated_calls"] == 10 and usage["prompt_tokens"] > 1000


def test_optimizer_prompt_is_identical_across_runs(tmp_path, tokenizer, rows, server):
    """Gradients reach the optimizer in batch order, whatever order the concurrent calls end in."""
    prompts = []
    for run in ("a", "b"):
        server.reset(jitter=0.15)
        loop, model = round_loop(tokenizer, tmp_path / run,
                                 editor_config(server, editor_cache=False, editor_batch_size=4,
                                               probe_size=4), rows)
        loop.check(1, model)
        assert server.max_inflight > 1
        prompts.append(server.optimizer_prompts())
    assert len(prompts[0]) == 1 and prompts[0] == prompts[1]
    text = prompts[0][0]
    assert text.count("</FEEDBACK>") == 4
    # one gradient per example, in example-id order (the batch order)
    ids = sorted(loop.examples)[:4]
    positions = [text.index(loop.examples[i].question) for i in ids]
    assert positions == sorted(positions)
    assert logging.getLogger("textgrad").propagate is False  # its chatter stays in its own file
    # the optimizer sees the whole prompt, not only its first and last 10 words
    assert f"<VARIABLE> {SYSTEM} </VARIABLE>" in text


def test_cache_under_run_folder_keyed_on_what_changes_an_answer(tmp_path, tokenizer, rows, server):
    loop, model = round_loop(tokenizer, tmp_path / "run", editor_config(server), rows)
    loop.check(1, model)
    first = len(server.requests)
    assert first == 10 and len(list((tmp_path / "run" / "editor_cache").rglob("*.json"))) == 10

    # the same round again (same prompt, same replies): answered from the cache; each run ends
    # before the next starts on the same folder (the folder's lock allows one run at a time)
    loop.close()
    loop2, model2 = round_loop(tokenizer, tmp_path / "run", editor_config(server), rows)
    loop2.check(1, model2)
    assert len(server.requests) == first and loop2.usage()["cached_calls"] == 10
    assert loop2.usage()["calls"] == 0

    # another temperature is another answer
    loop2.close()
    loop3, model3 = round_loop(tokenizer, tmp_path / "run", editor_config(server, editor_temperature=0.5), rows)
    loop3.check(1, model3)
    assert len(server.requests) == 2 * first

    # off: nothing stored
    loop4, model4 = round_loop(tokenizer, tmp_path / "off", editor_config(server, editor_cache=False), rows)
    loop4.check(1, model4)
    assert not (tmp_path / "off" / "editor_cache").exists()
    # nor copied into checkpoints (the folder is run-local)
    from nslora_plugin.core.artifacts import _NOT_COPIED
    assert "editor_cache" in _NOT_COPIED and "editor_logs" in _NOT_COPIED


def test_cache_key_covers_model_endpoint_messages_and_sampling(monkeypatch):
    monkeypatch.setenv(KEY_ENV, "sk-one")
    base = dict(editor_base_url="http://127.0.0.1:9/v1", editor_model="m", editor_api_key_env=KEY_ENV)
    key = OpenAICompatibleClient(NSLoRAConfig(**base))._cache_key([{"role": "user", "content": "x"}])
    variants = [dict(editor_model="m2"), dict(editor_base_url="http://127.0.0.1:10/v1"),
                dict(editor_temperature=0.7), dict(editor_max_tokens=99)]
    for change in variants:
        client = OpenAICompatibleClient(NSLoRAConfig(**{**base, **change}))
        assert client._cache_key([{"role": "user", "content": "x"}]) != key, change
    same = OpenAICompatibleClient(NSLoRAConfig(**base))
    assert same._cache_key([{"role": "user", "content": "y"}]) != key
    monkeypatch.setenv(KEY_ENV, "sk-two")  # the key is not part of it
    assert OpenAICompatibleClient(NSLoRAConfig(**base))._cache_key([{"role": "user", "content": "x"}]) == key


@pytest.mark.parametrize("mode", ["notags_once", "notags"])
def test_missing_tags_get_one_repair_then_the_old_prompt_stays(mode, tmp_path, tokenizer, rows, server, caplog):
    server.reset(mode=mode)
    loop, model = round_loop(tokenizer, tmp_path / "run",
                             editor_config(server, editor_batch_size=1, editor_cache=False), rows)
    with caplog.at_level("WARNING", logger="nslora"):
        loop.check(1, model)
    assert len(server.requests) == 3 + 1 + 1  # 3B+1 and one repair request
    repair = server.chat_bodies()[-1]["messages"][-1]["content"]
    assert "did not contain the improved text" in repair and TAGS[0] in repair
    if mode == "notags_once":
        (edit,) = edits(loop)
        assert edit.accepted and loop.prompt == server.improved
    else:
        assert edits(loop) == [] and loop.prompt == SYSTEM
        assert loop.faults["textgrad:EditorNoTags"] == 1
        assert any("EditorNoTags" in r.getMessage() and "IMPROVED_VARIABLE" in r.getMessage()
                   for r in caplog.records)


def test_independent_calls_run_concurrently_within_a_bound(tmp_path, tokenizer, rows, server):
    server.reset(latency=0.2)
    cfg = editor_config(server, editor_batch_size=4, probe_size=4, editor_concurrency=2,
                        editor_cache=False)
    loop, model = round_loop(tokenizer, tmp_path / "run", cfg, rows)
    loop.check(1, model)
    assert len(server.requests) == 3 * 4 + 1
    assert server.max_inflight == 2
    # 4 examples x 3 sequential calls on 2 workers, then 1 update: 7 latencies, not 13
    assert loop.usage()["last_round"]["seconds"] < 2.5  # sequential would take 13 x 0.2 = 2.6 s at least


def test_candidate_checks_helpers():
    assert control_tokens("Be nice.<|im_start|>system") == ["<|im_start|>"]
    assert control_tokens("plain <b>text</b>") == []
    assert control_tokens("x <|custom_turn|> y") == ["<|custom_turn|>"]
    q = "Ann has 3 apples and gets 4 more. How many apples does Ann have?"
    assert question_problem(q, q) == "identical to the original"
    assert "drops numbers" in question_problem(q, "Ann has some apples. How many?")
    assert "chat-template" in question_problem(q, q + " <|im_end|>")
    assert question_problem(q, q + " Answer with a number.") is None


# ------------------------------------------------------------------------------------------------
# symbolic constraints
# ------------------------------------------------------------------------------------------------


def test_length_and_json_rewards():
    cfg = NSLoRAConfig(max_reply_chars=10, reply_json=True)
    ex = ProbeExample(id="a", question="q", reference="r", answer="4")
    score = BuiltinRewards().nslora_score_probe
    assert score(ex, '{"a": 4}', cfg) == {"correctness": 1.0, "length": 1.0, "json": 1.0}
    assert score(ex, "The answer is 4", cfg) == {"correctness": 1.0, "length": 0.0, "json": 0.0}


def test_constraint_editor_states_each_violated_constraint():
    cfg = NSLoRAConfig(answer_format=r"^Answer: (\d+)$", format_instruction=FORMAT_INSTRUCTION,
                       reply_json=True, max_reply_chars=50)
    statements = constraint_statements(cfg)
    assert set(statements) == {"format", "json", "length"}
    failures = [ProbeResult("a", "x", {"format": 0.0, "json": 0.0, "length": 1.0}, 1 / 3, 1.0),
                ProbeResult("b", "x", {"format": 1.0, "json": 0.0, "length": 1.0}, 2 / 3, 1.0)]
    assert violated_constraints(failures, cfg) == {"format": 1, "json": 2}
    proposal = ConstraintEditor().nslora_propose_edit(prompt=SYSTEM, failures=failures, config=cfg, tried=())
    lines = proposal.prompt.splitlines()
    assert lines == [SYSTEM, statements["format"], statements["json"]]
    assert proposal.meta["constraints"] == {"format": 1, "json": 2}
    # stated already: nothing more to say
    again = ConstraintEditor().nslora_propose_edit(prompt=proposal.prompt, failures=failures,
                                                   config=cfg, tried=())
    assert again is None


def test_constraints_reach_textgrad_and_the_gate(tmp_path, tokenizer, rows, server):
    cfg = editor_config(server, reply_json=True, max_reply_chars=5, editor_batch_size=1)
    loop, model = round_loop(tokenizer, tmp_path / "run", cfg, rows)
    loop.check(1, model)
    statements = constraint_statements(cfg)
    (update,) = server.optimizer_prompts()
    for text in statements.values():
        assert f"The text must tell the assistant: {text}" in update
    critique = server.chat_bodies()[0]["messages"][0]["content"]
    assert all(f"Required form of every reply: {t}" in critique for t in statements.values())

    # the deterministic editor states each violated constraint; its candidate is gated and logged
    ccfg = cfg.replace(editor="constraint")
    cloop, cmodel = round_loop(tokenizer, tmp_path / "constraint", ccfg, rows)
    decision = cloop.check(1, cmodel)
    assert decision.action == "symbolic"
    violated = violated_constraints(cloop.reports[-2].failures, ccfg)
    assert "format" in violated
    (edit,) = edits(cloop)
    assert edit.editor == "constraint" and edit.reward_before is not None
    for component, text in statements.items():
        assert (text in edit.prompt) == (component in violated)
    history = [json.loads(x) for x in (tmp_path / "constraint" / "prompt_history.jsonl").open()]
    assert history[-1]["prompt"] == edit.prompt


# ------------------------------------------------------------------------------------------------
# question edits
# ------------------------------------------------------------------------------------------------


def test_question_edits_enter_training_data_only_when_the_model_still_answers(tmp_path, tokenizer,
                                                                             rows, server):
    cfg = editor_config(server, edit_questions=True, editor_batch_size=2, probe_size=2,
                        editor_cache=False)
    # the tiny model cannot answer the rewritten questions: no row enters the training data
    loop, model = round_loop(tokenizer, tmp_path / "real", cfg, rows)
    loop.check(1, model)
    assert len(server.requests) == 5 * 2 + 1  # 3B+1, plus a gradient and an update per question
    decisions = [json.loads(x) for x in (tmp_path / "real" / "decisions.jsonl").open()]
    (q,) = [d for d in decisions if d["kind"] == "question_edits"]
    assert q["rows"] == 0 and len(q["verdicts"]) == 2
    assert all("misses the reference answer" in v for v in q["verdicts"].values())
    assert not any(r["source"].startswith("question_edit") for r in loop.augmented)

    # a model that answers them (scripted replier): the rewrites become training rows, checked
    # under the prompt that was just accepted
    server.reset()
    loop2, model2 = round_loop(tokenizer, tmp_path / "scripted", cfg, rows)
    asked = []

    def replier(system_prompt, question):
        asked.append(system_prompt)
        ex = next(e for e in loop2.examples.values() if question.startswith(e.question))
        return f"Let me see.\nAnswer: {ex.answer}" if question != ex.question else "no idea"

    loop2.generate_one = replier
    loop2.check(1, model2)
    assert asked and set(asked) == {loop2.prompt} and loop2.prompt_version == 1
    rows_q = [r for r in loop2.augmented if r["source"] == "question_edit"]
    assert len(rows_q) == 2
    for row in rows_q:
        ex = loop2.examples[row["example_id"]]
        assert row["messages"][0]["content"] == ex.question + " Give the result as a number."
        assert row["messages"][1]["content"] == ex.reference and row["original_question"] == ex.question
    saved = [json.loads(x) for x in (tmp_path / "scripted" / "augmented.jsonl").open()]
    assert sum(r["source"] == "question_edit" for r in saved) == 2


# ------------------------------------------------------------------------------------------------
# backends
# ------------------------------------------------------------------------------------------------


def test_litellm_backend_against_a_real_endpoint(tmp_path, monkeypatch, tokenizer, rows, server):
    monkeypatch.setenv(KEY_ENV, "sk-litellm-test-key-123")
    monkeypatch.chdir(tmp_path)
    cfg = editor_config(server, editor_backend="litellm", editor_model=f"openai/{server.model}",
                        editor_api_key_env=KEY_ENV, editor_batch_size=1, editor_temperature=0.2,
                        editor_cache=False)
    loop, model = round_loop(tokenizer, tmp_path / "run", cfg, rows)
    assert loop.editor_availability().llm_ready
    loop.check(1, model)
    assert [c.editor for c in edits(loop)] == ["textgrad"]
    bodies = server.chat_bodies()
    assert len(bodies) == 1 + 4  # the health check's one-token call, then 3B+1
    assert bodies[0]["max_tokens"] == 1
    assert all(b["temperature"] == 0.2 and b["max_tokens"] == 48 and b["model"] == server.model
               for b in bodies[1:])
    assert {r["auth"] for r in server.requests} == {"Bearer sk-litellm-test-key-123"}
    assert loop.usage()["calls"] == 4 and loop.usage()["prompt_tokens"] == 400

    server.reset(mode="5xx")  # errors come back translated, with the key removed
    loop.check(2, model)
    (kind,) = [k for k in loop.faults if k.startswith("textgrad:")]
    assert kind == "textgrad:EditorHTTPError"
    fault = [json.loads(x) for x in (tmp_path / "run" / "decisions.jsonl").open()][-2]
    assert "HTTP 500" in fault["message"] and "sk-litellm" not in fault["message"]
    assert sorted(os.listdir(tmp_path)) == ["run"]

    # down at start: one clear startup fault, the run goes on without the LLM editor
    from nslora_plugin.apps.tools.serve import free_port

    dead = cfg.replace(editor_base_url=f"http://127.0.0.1:{free_port()}/v1")
    down, _ = round_loop(tokenizer, tmp_path / "down", dead, rows, model=model)
    assert not down.editor_availability().llm_ready
    assert down.editor_availability().reason.startswith("editor endpoint unreachable (EditorUnreachable")


def test_local_backend_runs_in_process(tmp_path, tokenizer, rows, default_model_dir):
    cfg = editor_config(None, editor_backend="local", editor_model=str(default_model_dir),
                        editor_batch_size=1, probe_size=1, editor_max_tokens=12)
    loop, model = round_loop(tokenizer, tmp_path / "run", cfg, rows)
    assert loop.editor_availability().llm_ready
    loop.check(1, model)
    usage = loop.usage()
    # 3B+1 calls and no repair: the update reply starts inside the opening tag; exact token counts
    assert usage["calls"] == 4 and usage["estimated_calls"] == 0 and usage["failed_calls"] == 0
    assert usage["prompt_tokens"] > 100 and 0 < usage["completion_tokens"] <= 12 * usage["calls"]
    # so the 135M editor's candidate reaches the gate
    (edit,) = edits(loop)
    assert edit.editor == "textgrad" and edit.prompt and "textgrad:EditorNoTags" not in loop.faults


def test_local_backend_missing_model_fails_fast(tmp_path, tokenizer, rows):
    from nslora_plugin.core.data import load_probe_examples
    from nslora_plugin.core.loop import NeurosymbolicLoop

    cfg = NSLoRAConfig(system_prompt=SYSTEM, editor_backend="local",
                       editor_model=str(tmp_path / "nope"), on_editor_down="fail")
    loop = NeurosymbolicLoop(cfg, tokenizer, load_probe_examples(rows), output_dir=tmp_path / "run")
    with pytest.raises(RuntimeError, match=r"editor model unavailable .*does not exist.*on_editor_down"):
        loop.start(None)
    loop = NeurosymbolicLoop(cfg.replace(on_editor_down="numerical", editor_backend="litellm",
                                         editor_model=None),
                             tokenizer, load_probe_examples(rows), output_dir=tmp_path / "run2")
    loop.start_editors()
    assert not loop.editor_availability().llm_ready and "editor_model is not set" in loop.editor_availability().reason


# ------------------------------------------------------------------------------------------------
# structured output and lenient parsing (issue 13): a usable candidate from small and local models
# ------------------------------------------------------------------------------------------------


def test_lenient_parse_finds_the_candidate_in_every_shape_small_models_write():
    from nslora_plugin.builtins.editors.structured import as_tagged, parse_candidate

    cases = {
        "<IMPROVED_VARIABLE>Be brief.</IMPROVED_VARIABLE>": ("Be brief.", "tags"),
        '{"improved_variable": "Be brief."}': ("Be brief.", "json"),
        'Sure:\n```json\n{"Improved_Variable": "Be brief."}\n```': ("Be brief.", "json"),
        'Here it is {"prompt": "Be brief."} done': ("Be brief.", "json"),
        '{"improved_variable": "<IMPROVED_VARIABLE>Be brief.</IMPROVED_VARIABLE>"}': ("Be brief.", "tags"),
        "< improved_variable >Be brief.</ Improved-Variable>": ("Be brief.", "lenient"),
        "<Improved Variable>\n```\nBe brief.\n```": ("Be brief.", "lenient"),
        '<IMPROVED_VARIABLE>"Be brief."</IMPROVED_VARIABLE>': ("Be brief.", "tags"),
        "I would make the prompt clearer.": (None, "none"),
        '{"a": "x", "b": "y"}': (None, "none"),  # two fields: which one is meant is a guess
        "<IMPROVED_VARIABLE>  </IMPROVED_VARIABLE>": (None, "none"),
    }
    for reply, expected in cases.items():
        assert parse_candidate(reply) == expected, reply
    assert as_tagged('{"improved_variable": "Be brief."}') == (TAGS[0] + "Be brief." + TAGS[1], "json")
    assert as_tagged("no candidate") == ("no candidate", "none")


def _optimizer_bodies(server):
    return [b for b in server.chat_bodies() if TAGS[0] in str(b["messages"])
            and "did not contain" not in str(b["messages"][-1]["content"])
            and "gradient (feedback) engine" not in str(b["messages"])]


def test_update_call_asks_a_schema_server_for_json_and_its_reply_is_used(tmp_path, tokenizer, rows, server):
    # a server that implements response_format (vLLM, OpenAI) answers with the object even when
    # the model would have forgotten the tags: no repair call is needed
    server.reset(mode="notags", response_format="honour")
    loop, model = round_loop(tokenizer, tmp_path / "run",
                             editor_config(server, editor_batch_size=1, editor_cache=False), rows)
    loop.check(1, model)
    assert len(server.requests) == 3 + 1  # 3B+1, no repair
    (update,) = _optimizer_bodies(server)
    assert update["response_format"]["type"] == "json_schema"
    assert update["response_format"]["json_schema"]["schema"]["required"] == ["improved_variable"]
    others = [b for b in server.chat_bodies() if b is not update]
    assert others and all("response_format" not in b for b in others)  # critiques stay free text
    (edit,) = edits(loop)
    assert edit.editor == "textgrad" and edit.prompt == server.improved
    assert "textgrad:EditorNoTags" not in loop.faults


def test_a_server_that_refuses_response_format_gets_plain_calls_for_the_rest_of_the_run(
        tmp_path, tokenizer, rows, server):
    server.reset(response_format="refuse")
    loop, model = round_loop(tokenizer, tmp_path / "run",
                             editor_config(server, editor_batch_size=1, editor_cache=False,
                                           gate_tie_break="reject"), rows)
    loop.check(1, model)
    loop.check(2, model)
    with_schema = [b for b in server.chat_bodies() if "response_format" in b]
    assert len(with_schema) == 1  # refused once (HTTP 400), then never sent again
    assert len(server.requests) == 2 * (3 + 1) + 1  # two rounds of 3B+1, one refused call
    assert [c.editor for c in edits(loop)] == ["textgrad", "textgrad"]  # both rounds got a candidate
    assert not any(k.startswith("textgrad:") for k in loop.faults)


def test_structured_output_off_sends_textgrads_plain_request(tmp_path, tokenizer, rows, server):
    server.reset(response_format="honour")
    loop, model = round_loop(tokenizer, tmp_path / "run",
                             editor_config(server, editor_batch_size=1, editor_cache=False,
                                           editor_structured_output="off"), rows)
    loop.check(1, model)
    assert server.requests and not any("response_format" in b for b in server.chat_bodies())
    (edit,) = edits(loop)
    assert edit.prompt == server.improved  # parsed from the tags, as TextGrad does


def test_local_backend_starts_the_update_reply_with_the_opening_tag(tokenizer, default_model_dir):
    from nslora_plugin.builtins.editors.clients import LocalModelClient

    cfg = NSLoRAConfig(editor_backend="local", editor_model=str(default_model_dir),
                       editor_max_tokens=6, editor_cache=False)
    client = LocalModelClient(cfg)
    plain = client.chat("Rewrite: be brief.", "You improve texts.")
    forced = client.chat("Rewrite: be brief.", "You improve texts.", structured=True)
    assert forced.startswith(TAGS[0]) and len(forced) > len(TAGS[0])
    assert not plain.startswith(TAGS[0])
    off = LocalModelClient(cfg.replace(editor_structured_output="off"))
    assert not off.chat("Rewrite: be brief.", "You improve texts.", structured=True).startswith(TAGS[0])
