"""The HTML run report, looked at as a reader would (issue 16).

One real tiny run through TRL's SFTTrainer with `report: true` and the loopback fault server as
editor LLM gives the report every kind of event: a TextGrad edit accepted by the gate (step 2),
an editor fault (step 4, a reply that is not JSON), a candidate the gate rejects (step 6, the
editor proposes the prompt it already has), then a numerical check once the symbolic budget is
spent (step 8). The tests parse the page with the standard library's HTML parser, decode every
image, compare what the page says with the JSON it came from, and — where Chromium is installed —
take a headless screenshot of it.
"""

from __future__ import annotations

import base64
import io
import json
import shutil
import subprocess
import sys
from collections import Counter
from html.parser import HTMLParser
from importlib import metadata
from pathlib import Path

import pytest

from nslora_plugin import load_artifacts
from nslora_plugin.core.artifacts import NoArtifactsError
from nslora_plugin.apps.cli import main as cli
from nslora_plugin.core.data import make_word_problems
from nslora_plugin.integrations.trl import attach, save_artifacts
from nslora_plugin.apps.report import compare_report, sweep_report, try_write_report, write_report
from nslora_plugin.apps.report.plots import PLOTS_MISSING
from nslora_plugin.apps.report.run_page import SECTIONS
from nslora_plugin.apps.report.worddiff import word_diff

from fault_server import DEFAULT_IMPROVED, FaultSchedule, editor_config
from tiny import SYSTEM, sft_trainer, write_trl_workdir

REPO = Path(__file__).resolve().parents[1]
EVIDENCE = REPO / "recipes" / "results" / "evidence.json"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}


class Page(HTMLParser):
    """What a browser would build, checked strictly: every non-void tag closed in order."""

    def __init__(self, text: str) -> None:
        super().__init__(convert_charrefs=True)
        self.stack: list[str] = []
        self.errors: list[str] = []
        self.ids: set[str] = set()
        self.images: list[dict[str, str]] = []
        self.tags: Counter[str] = Counter()
        self.chunks: list[str] = []
        self.feed(text)
        self.close()

    def handle_starttag(self, tag: str, attrs: list) -> None:
        attributes = {k: v or "" for k, v in attrs}
        self.tags[tag] += 1
        if "id" in attributes:
            self.ids.add(attributes["id"])
        if tag == "img":
            self.images.append(attributes)
        if tag not in VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag: str) -> None:
        if tag in VOID:
            return
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"</{tag}> closes <{self.stack[-1] if self.stack else 'nothing'}>")
        else:
            self.stack.pop()

    def handle_data(self, data: str) -> None:
        self.chunks.append(data)

    @property
    def text(self) -> str:
        return " ".join(" ".join(self.chunks).split())


def parse(path: Path) -> Page:
    page = Page(path.read_text(encoding="utf-8"))
    assert page.errors == [] and page.stack == [], (page.errors[:5], page.stack)
    return page


def assert_png_with_pixels(data: bytes) -> tuple[int, int]:
    from PIL import Image

    assert data[:8] == PNG_MAGIC
    image = Image.open(io.BytesIO(data))
    image.load()
    rgb = image.convert("RGB")
    assert any(lo < hi for lo, hi in rgb.getextrema()), "the image is one colour"
    colours = rgb.getcolors(maxcolors=1 << 20) or []
    assert len(colours) > 16, f"only {len(colours)} colours: a blank or near-blank picture"
    white = max(count for count, colour in colours if min(colour) > 245) if any(
        min(c) > 245 for _, c in colours) else 0
    assert white < 0.99 * rgb.width * rgb.height, "almost every pixel is white"
    return rgb.size


def images(page: Page) -> list[bytes]:
    out = []
    for img in page.images:
        src = img["src"]
        assert src.startswith("data:image/png;base64,"), src[:40]  # embedded: nothing to fetch
        out.append(base64.b64decode(src.split(",", 1)[1], validate=True))
    return out


# ------------------------------------------------------------------------------ the run
@pytest.fixture(scope="module")
def run(tmp_path_factory, tokenizer, module_server):
    server = module_server
    server.reset()
    server.improved = DEFAULT_IMPROVED
    root = tmp_path_factory.mktemp("report")
    rows = make_word_problems(70, seed=11)
    trainer = sft_trainer(tokenizer, root / "run", rows[:64], max_steps=8, save_steps=4, batch_size=2)
    config = editor_config(server, check_every=2, probe_size=3, editor_batch_size=2,
                           editor_timeout=2.0, max_symbolic_rounds=3, monitor_window=2, report=True)
    # step 6: the editor proposes the prompt accepted at step 2, which the gate refuses
    schedule = FaultSchedule(server, {2: {"mode": "ok"}, 4: {"mode": "garbage"}, 6: {"mode": "ok"}})
    callback = attach(trainer, config, probe=rows[64:], plugins=[schedule])
    trainer.train()
    trainer.save_model(str(root / "final"))
    save_artifacts(callback, root / "final")
    return root


def test_the_run_has_every_kind_of_event(run):
    """The fixture is what the other tests rely on: check it once, plainly."""
    arts = load_artifacts(run / "run")
    what = {"route": lambda d: d["action"], "edit": lambda d: d["accepted"], "fault": lambda d: d["where"]}
    kinds = [(d["kind"], what[d["kind"]](d)) for d in arts.decisions if d["kind"] in what]
    assert ("route", "symbolic") in kinds and ("route", "numerical") in kinds
    assert ("edit", True) in kinds and ("edit", False) in kinds and ("fault", "textgrad") in kinds
    assert arts.system_prompt == DEFAULT_IMPROVED
    assert arts.versions["torch"] == metadata.version("torch")  # recorded at train begin


def test_report_true_writes_the_page_at_train_end_and_it_travels(run):
    for folder in (run / "run" / "nslora", run / "final" / "nslora"):
        page = parse(folder / "report.html")
        assert {i for i, _ in SECTIONS} <= page.ids
    assert "step 8" in parse(run / "run" / "nslora" / "report.html").text  # written after the last check


def test_every_section_says_what_the_artifacts_hold(run, tmp_path):
    out = write_report(run / "run", tmp_path / "report.html")
    page = parse(out)
    arts = load_artifacts(run / "run")
    assert page.tags["section"] == len(SECTIONS) and {i for i, _ in SECTIONS} <= page.ids
    text = page.text
    # timeline and router: every check with its reason, every labelled failure with its p_symbolic
    routes = [d for d in arts.decisions if d["kind"] == "route"]
    for d in routes:
        assert " ".join(d["reason"].split()) in text
        for label in d["labels"]:
            assert label["example_id"] in text and f"{label['p_symbolic']:.3f}" in text
    # prompt history: each candidate with its editor, verdict and the gate's reason
    candidates = arts.prompt_history[1:]
    assert {f"candidate-{i}" for i in range(1, len(candidates) + 1)} <= page.ids
    for c in candidates:
        assert " ".join(c["reason"].split()) in text
    html = out.read_text()
    assert "candidate is identical to the current prompt" in text  # the refused one
    # the accepted TextGrad edit as a word diff against the initial prompt
    added = set(DEFAULT_IMPROVED.split()) - set(SYSTEM.split())
    assert any(f"<ins>{w}" in html or f" {w}" in html for w in added)
    assert "<ins>" in html and "<del>" in html
    # editor usage, its fault, prompts-as-data, versions and config
    usage = arts.summary["editor_usage"]
    assert usage["calls"] > 0 and f"LLM calls answered {usage['calls']}" in text
    fault = next(d for d in arts.decisions if d["kind"] == "fault")
    assert " ".join(fault["message"].split()) in text
    assert f"{len(arts.augmented_rows)} rows added to training" in text
    for package in ("torch", "transformers", "trl", "peft"):
        assert f"{package} {metadata.version(package)}" in text
    assert f"check_every 2" in text and "editor_api_key_env OPENAI_API_KEY" in text


def test_every_image_is_a_png_with_pixels(run):
    page = parse(run / "run" / "nslora" / "report.html")
    pictures = images(page)
    assert len(pictures) == 2  # the timeline, the router
    sizes = [assert_png_with_pixels(p) for p in pictures]
    assert sizes[0][0] >= 1000 and sizes[0][1] >= 900  # four readable panels
    assert all(img.get("alt") for img in page.images)


def test_text_from_the_artifacts_is_escaped(run, tmp_path):
    """Model output and editor replies can hold anything: it must reach the page as text."""
    folder = tmp_path / "nslora"
    shutil.copytree(run / "run" / "nslora", folder)
    evil = "<script>alert('x')</script> & <b>bold</b> </table></section>"
    with (folder / "prompt_history.jsonl").open("a") as fh:
        fh.write(json.dumps({"version": None, "step": 8, "editor": "<i>ed</i>", "prompt": evil,
                             "accepted": False, "reward_before": 0.0, "reward_after": 0.0,
                             "reason": "<img src=x onerror=alert(1)>", "components_after": {}}) + "\n")
    with (folder / "decisions.jsonl").open("a") as fh:
        fh.write(json.dumps({"kind": "fault", "step": 8, "where": "</td>", "message": evil, "count": 1}) + "\n")
    out = write_report(folder, tmp_path / "r.html")
    html = out.read_text()
    page = parse(out)  # still balanced
    assert "<script>" not in html and "&lt;script&gt;" in html
    assert len(page.images) == 2 and "onerror" not in "".join(i["src"] for i in page.images)
    assert evil.split()[0] in page.text


def test_without_matplotlib_the_page_is_still_written(run, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now fails
    out = write_report(run / "run", tmp_path / "plain.html")
    page = parse(out)
    assert page.images == [] and {i for i, _ in SECTIONS} <= page.ids
    assert page.text.count(PLOTS_MISSING) == 2


def test_a_checkpoint_mid_run_gets_a_report_that_says_so(run, tmp_path):
    out = write_report(run / "run" / "checkpoint-4", tmp_path / "ckpt.html")
    text = parse(out).text
    assert "had not finished" in text and "go up to step 4" in text
    assert "checkpoint-4/trainer_state.json" in text  # the training loss came from there
    assert "step 8" not in text


def test_word_diff_marks_words_and_escapes():
    import html
    import re

    def side(diff: str, drop: str) -> str:  # one side of the diff, as the reader sees it
        return html.unescape(re.sub(r"</?(ins|del)>", "", re.sub(rf"<{drop}>.*?</{drop}>", "", diff, flags=re.S)))

    pairs = [("Be brief.", "Be very brief."), ("a b c", "a x c"), ("x < y", "x > y & z"),
             ("You are a helpful assistant.", DEFAULT_IMPROVED), ("line one\nline two", "line one\n\nline 2")]
    for old, new in pairs:
        diff = word_diff(old, new)
        assert side(diff, "del") == new and side(diff, "ins") == old
        assert "<" not in re.sub(r"</?(ins|del)>", "", diff)  # everything else is escaped
    assert word_diff("a b c", "a x c") == "a <del>b</del><ins>x</ins> c"  # words, not characters
    assert word_diff("same", "same") == "same"


def test_the_demo_ends_by_printing_the_reports_path(tmp_path, tokenizer, capsys):
    from nslora_plugin.apps.harness.demo import build_parser, run_demo

    work = write_trl_workdir(tmp_path, tokenizer)
    run_demo(build_parser().parse_args([
        "--model", str(work / "tiny"), "--output-dir", str(tmp_path / "run"), "--no-editor-llm",
        "--max-steps", "2", "--train-size", "16", "--probe-size", "4", "--eval-size", "4",
        "--batch-size", "4", "--no-reference"]))
    out = capsys.readouterr().out.replace("\n", "")  # the console may wrap a long path
    report = tmp_path / "run" / "nslora" / "report.html"
    assert f"report: {report}" in out
    page = parse(report)
    assert {i for i, _ in SECTIONS} <= page.ids
    assert "held-out after" in page.text  # the demo's own held-out split, next to the probe
    card = (tmp_path / "run" / "final" / "README.md").read_text()
    assert "| held-out accuracy (n=4) |" in card


# ------------------------------------------------------------------------------ the CLI
def test_cli_report_takes_the_run_folder_a_checkpoint_or_the_final_folder(run, capsys):
    for folder, written in ((run / "run", run / "run" / "nslora" / "report.html"),
                            (run / "run" / "checkpoint-8", run / "run" / "checkpoint-8" / "nslora" / "report.html"),
                            (run / "final", run / "final" / "nslora" / "report.html")):
        written.unlink(missing_ok=True)
        assert cli(["report", str(folder)]) == 0
        assert f"report: {written.resolve()}" in capsys.readouterr().out
        parse(written)


def test_a_run_folder_without_its_own_copy_uses_its_latest_checkpoint(run, tmp_path):
    for step in (4, 8):
        shutil.copytree(run / "run" / f"checkpoint-{step}" / "nslora", tmp_path / f"checkpoint-{step}" / "nslora")
    assert load_artifacts(tmp_path).root == tmp_path / "checkpoint-8" / "nslora"


@pytest.mark.parametrize("command", ["show", "report"])
def test_show_and_report_say_what_a_folder_without_artifacts_holds(run, tmp_path, capsys, command):
    adapter = tmp_path / "adapter-only"
    adapter.mkdir()
    shutil.copy(run / "final" / "adapter_config.json", adapter)
    empty = tmp_path / "empty"
    empty.mkdir()
    for folder, words in ((adapter, "adapter_config.json"), (empty, "the folder is empty"),
                          (tmp_path / "missing", "does not exist")):
        assert cli([command, str(folder)]) == 2
        err = capsys.readouterr().err
        assert f"No NSLoRA artifacts under {str(folder)!r}" in err
        assert "prompt.json" in err and "checkpoint-*/nslora/" in err and words in err, err
    with pytest.raises(NoArtifactsError):
        load_artifacts(empty)
    assert not (adapter / "nslora").exists()  # nothing written where nothing was found


def test_version_flag_and_command(capsys):
    from nslora_plugin import __version__

    with pytest.raises(SystemExit) as stop:
        cli(["--version"])
    assert stop.value.code == 0 and capsys.readouterr().out.strip() == f"nslora {__version__}"
    assert cli(["version"]) == 0 and capsys.readouterr().out.strip() == __version__


def test_a_report_failure_at_train_end_is_a_warning(tmp_path, caplog):
    with caplog.at_level("WARNING", logger="nslora"):
        assert try_write_report(tmp_path / "nothing-here") is None
    assert "could not write the run report" in caplog.text


# ------------------------------------------------------------------------------ compare / sweep
def _sweep_from(result: dict) -> dict:
    """A sweep result of sweep.py's shape, built from the committed compare evidence at two mixes."""
    from nslora_plugin.apps.harness.sweep import arm_interval

    points = []
    for share in (0.0, 1.0):
        arms = {}
        for arm, a in result["arms"].items():
            mean, lo, hi = arm_interval(result, arm, 200)
            arms[arm] = {"accuracy": round(mean, 4), "accuracy_sd": a["held_out"].get("accuracy_sd", 0.0),
                         "interval95": [round(lo, 4), round(hi, 4)],
                         "per_seed": a["held_out"].get("accuracy_per_seed", [a["held_out"]["accuracy"]])}
        points.append({"style_share": share, "arms": arms, "verdict": result["verdict"], "result": result})
    return {"command": result["command"], "mixes": [0.0, 1.0], "arms": list(result["arms"]), "points": points}


def test_compare_page_puts_the_arms_side_by_side(tmp_path, capsys):
    result = json.loads(EVIDENCE.read_text())
    page = parse(compare_report(result, tmp_path / "compare.html", sweep=_sweep_from(result)))
    assert {"arms", "sweep", "setup"} <= page.ids
    pictures = images(page)
    assert len(pictures) == 2
    for p in pictures:
        assert_png_with_pixels(p)
    for arm, a in result["arms"].items():
        assert arm in page.text and f"{a['held_out']['accuracy']:.3f}" in page.text
    # the verdict's first line names what the committed results say: the winner or the tied arms
    verdict = result["verdict"]
    top = (f"highest held-out accuracy: {verdict['winner']} ({verdict['winner_accuracy']:.3f})"
           if verdict.get("winner") else
           f"highest held-out accuracy: a tie between {', '.join(verdict['tied'])}")
    assert top in page.text
    assert f"{verdict['margin_points']:+.1f} points" in page.text
    # the CLI renders a committed results file the same way
    copy = tmp_path / "evidence.json"
    shutil.copy(EVIDENCE, copy)
    assert cli(["report", str(copy)]) == 0
    assert "evidence.html" in capsys.readouterr().out
    parse(tmp_path / "evidence.html")


def test_sweep_page_has_the_sweep_and_each_mix(tmp_path):
    sweep = _sweep_from(json.loads(EVIDENCE.read_text()))
    page = parse(sweep_report(sweep, tmp_path / "sweep.html"))
    assert {"sweep", "mix-0", "mix-1", "setup"} <= page.ids
    assert len(images(page)) == 3  # the sweep, then each mix's bars
    for p in images(page):
        assert_png_with_pixels(p)


# ------------------------------------------------------------------------------ a real browser
def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(_chromium() is None, reason="Chromium is not installed (Debian: apt-get install "
                                                "chromium); the screenshot check needs a real browser")
def test_chromium_renders_the_report_offline(run, tmp_path):
    page = run / "run" / "nslora" / "report.html"
    shot = tmp_path / "shot.png"
    done = subprocess.run(
        [_chromium(), "--headless", "--disable-gpu", "--no-sandbox", "--hide-scrollbars",
         "--disable-dev-shm-usage", f"--user-data-dir={tmp_path / 'profile'}",
         "--proxy-server=http://127.0.0.1:9", "--proxy-bypass-list=<-loopback>",  # no network at all
         f"--screenshot={shot}", "--window-size=1280,2000", page.resolve().as_uri()],
        capture_output=True, text=True, timeout=180)
    assert shot.is_file(), done.stderr[-2000:]
    width, height = assert_png_with_pixels(shot.read_bytes())
    assert (width, height) == (1280, 2000)
    from PIL import Image

    rgb = Image.open(shot).convert("RGB")
    colours = rgb.getcolors(maxcolors=1 << 22) or []
    assert len(colours) > 200  # text, tables and the embedded plots, not an error page
    inked = sum(n for n, colour in colours if min(colour) < 200)
    assert inked > 0.02 * width * height, "the page is nearly blank"
