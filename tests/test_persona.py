"""Personas are a config group: validation, metrics in the persona's own words, runs that remember
their persona, a user's persona from a config dir outside the repo, and no persona baked into code.

    python -m pytest tests/test_persona.py -q
    python -m pytest tests/test_persona.py -q -m "not slow"     # the fast checks only
"""

from __future__ import annotations

import ast
import io
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from conftest import REPO_ROOT, compose, smoke_overrides
from lyra.errors import UserError
from lyra.generation import Reply

FIXTURE = REPO_ROOT / "tests" / "fixtures" / "lyra_en"
EXAMPLES = REPO_ROOT / "examples"
EN_FILES = [f"persona.train_file={FIXTURE / 'train.jsonl'}", f"persona.eval_file={FIXTURE / 'eval.jsonl'}",
            f"persona.probes_file={FIXTURE / 'probes.jsonl'}"]  # until lyra_en's own corpus is shipped


# ---------------------------------------------------------------- validation

def _persona(**changes):
    persona = {"name": "Mara", "user_address": "Captain", "system_prompt": "You are Mara.", "language": "en",
               "train_file": str(FIXTURE / "train.jsonl"), "eval_file": None,
               "probes_file": str(FIXTURE / "probes.jsonl")}
    persona.update(changes)
    return OmegaConf.create({key: value for key, value in persona.items() if value != "<absent>"})


@pytest.mark.parametrize("changes, line", [
    ({"language": "<absent>"}, "persona.language: missing from the persona file"),
    ({"user_address": "<absent>"}, "persona.user_address: missing from the persona file"),
    ({"language": "fr"}, "persona.language: must be one of zh-TW, en, got 'fr'"),
    ({"name": ""}, "persona.name: must be a non-empty string, got ''"),
    ({"train_file": "no/such.jsonl"}, f"persona.train_file: file not found: {Path('no/such.jsonl').resolve()}"),
    ({"probes_file": None}, "persona.probes_file: must be a path (relative to where you launch), got None"),
    ({"bot_label": 3}, "persona.bot_label: must be a string or null, got 3"),
])
def test_bad_persona_is_one_line_naming_the_key(changes, line):
    from lyra.config import validate_persona

    validate_persona(_persona())  # the unchanged persona passes (eval_file null = no eval split)
    with pytest.raises(UserError) as error:
        validate_persona(_persona(**changes))
    assert str(error.value).startswith(line)


def test_bad_persona_file_from_a_config_dir_stops_before_loading(tmp_path):
    """The CLI: one stderr line and exit 2, before any tokenizer or model is touched."""
    persona_dir = tmp_path / "my_conf" / "persona"
    persona_dir.mkdir(parents=True)
    (persona_dir / "bad.yaml").write_text("name: Bad\nuser_address: Boss\nsystem_prompt: You are Bad.\n"
                                          "train_file: chats.jsonl\neval_file: null\nprobes_file: probes.jsonl\n")
    result = subprocess.run([sys.executable, "-m", "lyra.train", "--config-dir", "my_conf", "persona=bad",
                             "experiment=smoke", "logger=none", "hydra.run.dir=run"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr  # (bitsandbytes may print an unrelated import notice here)
    assert [line for line in result.stderr.splitlines() if line.startswith("lyra")] == [
        "lyra: error: persona.language: missing from the persona file (every persona sets name, user_address, "
        "system_prompt, language, train_file, eval_file, probes_file)"]


def test_every_shipped_persona_has_every_key():
    from lyra.config import PERSONA_FILE_KEYS, PERSONA_TEXT_KEYS

    for name in ("lyra", "lyra_en"):
        persona = compose([f"persona={name}"]).persona
        assert set(persona) >= {*PERSONA_TEXT_KEYS, "language", *PERSONA_FILE_KEYS, "user_label", "bot_label"}
        assert all(Path(persona[key]).name.startswith(name) for key in PERSONA_FILE_KEYS)


def test_data_files_follow_the_persona_unless_overridden():
    cfg = compose(["persona=lyra_en"])
    assert cfg.data.train_file.endswith("lyra_en_train.jsonl") and cfg.data.eval_file.endswith("lyra_en_eval.jsonl")
    assert cfg.data.system_prompt.startswith("You are Lyra")
    cfg = compose(["persona=lyra_en", "data=jsonl", "data.train_file=mine.jsonl"])
    assert (cfg.data.train_file, cfg.data.eval_file) == ("mine.jsonl", None)
    assert cfg.data.system_prompt == cfg.persona.system_prompt


# ---------------------------------------------------------------- metrics in the persona's words

def test_language_checks():
    from lyra.persona import is_english, is_traditional_chinese

    assert is_english("Yes, Master! Lyra will fetch the tea.") and is_english("Café au lait, Master? Lyra can make it.")
    assert not is_english("好的，主人") and not is_english("...") and not is_english("Да, хозяин")
    assert is_traditional_chinese("好的，主人，萊拉去泡茶。") and is_traditional_chinese("主人的 Wi-Fi 密碼在這裡")
    assert not is_traditional_chinese("我们今天去哪里？") and not is_traditional_chinese("Yes, Master!")


def test_english_persona_metrics_count_master_and_lyra_and_skip_the_zh_check():
    from lyra.persona import persona_metrics

    persona = {"name": "Lyra", "user_address": "Master", "language": "en"}
    replies = [Reply(text="Good morning, Master! Lyra made tea.", raw="Good morning, Master! Lyra made tea.",
                     ended_by_eos=True),
               Reply(text="Of course, Master.", raw="Of course, Master.", ended_by_eos=True),
               Reply(text="好的，主人", raw="好的，主人", ended_by_eos=False),
               Reply(text="master lyra", raw="master lyra", ended_by_eos=True)]  # the words are case-sensitive
    metrics = persona_metrics(replies, persona)
    assert list(metrics) == ["think_leak_rate", "eos_rate", "address_rate", "self_name_rate", "language_rate",
                             "avg_reply_chars"]  # no simplified_rate for an English persona
    assert (metrics["address_rate"], metrics["self_name_rate"], metrics["language_rate"]) == (0.5, 0.25, 0.75)


def test_transcript_labels_default_from_the_name():
    from lyra.chat import transcript_labels

    cfg = compose(["run_dir=x"], config_name="chat")
    assert transcript_labels(cfg, OmegaConf.create({"name": "Mara"})) == ("You: ", "Mara: ")
    labelled = OmegaConf.create({"name": "Mara", "user_label": "Captain: ", "bot_label": "M> "})
    assert transcript_labels(cfg, labelled) == ("Captain: ", "M> ")
    cfg = compose(["run_dir=x", "bot_label=Bot: "], config_name="chat")
    assert transcript_labels(cfg, labelled) == ("Captain: ", "Bot: ")  # the command line wins


def test_run_without_persona_falls_back_to_the_default_with_a_note(tmp_path, caplog):
    from lyra.runs import run_persona

    cfg = OmegaConf.create({"data": {"system_prompt": "an old run's own prompt"}})
    with caplog.at_level("WARNING", logger="lyra.runs"):
        persona = run_persona(cfg, tmp_path)
    assert persona.language == "zh-TW" and Path(persona.probes_file).is_file()
    assert persona.system_prompt == "an old run's own prompt"
    assert "has no persona" in caplog.text


# The shipped zh-TW corpus's own datasheet checks (lyra/data/corpus.py: "she calls herself 萊拉", no
# "好的，主人" template) are rules about that corpus's text, like the corpus itself; nothing else may name her.
LITERAL_ALLOWED = {Path("lyra/data/corpus.py")}


def test_no_persona_literal_in_code_paths():
    literal = re.compile(r"主人|萊拉|Lyra")
    found = []
    for path in sorted([*(REPO_ROOT / "lyra").rglob("*.py"), *(REPO_ROOT / "lyra" / "conf").rglob("*.yaml")]):
        relative = path.relative_to(REPO_ROOT)
        if relative in LITERAL_ALLOWED or relative.parts[:3] == ("lyra", "conf", "persona"):
            continue
        found += [f"{relative}:{number}: {line.strip()}"
                  for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1)
                  if literal.search(line)]
    assert found == []


def test_compare_ranks_a_sweep_by_address_rate(tmp_path, capsys):
    from lyra import compare

    for job, rate in (("0", 0.25), ("1", 0.75), ("2", 0.5)):
        (tmp_path / job).mkdir()
        (tmp_path / job / "metrics.json").write_text(json.dumps({"address_rate": rate, "eval_loss": 1.0}))
    assert compare.main([str(tmp_path), "--metric", "address_rate"]) == 0  # direction auto: maximize
    rows = capsys.readouterr().out.splitlines()
    assert rows[0].split()[:4] == ["#", "run", "status", "overrides"] and "address_rate" in rows[0]
    assert [row.split()[1] for row in rows[2:5]] == ["1", "2", "0"]
    assert compare.default_direction("think_leak_rate") == "minimize" == compare.default_direction("eval_loss")


def test_a_failing_job_closes_its_run_as_failed():
    from lyra.tracking import closed_on_failure

    class Run:
        summary: dict = {}
        exit_code = None

        def finish(self, exit_code=0):
            self.exit_code = exit_code

    run = Run()
    with pytest.raises(RuntimeError), closed_on_failure(run):
        raise RuntimeError("out of memory")
    assert run.exit_code == 1 and run.summary["status"] == "failed" and "out of memory" in run.summary["error"]


# ---------------------------------------------------------------- end to end

@pytest.mark.slow
def test_lyra_en_trains_and_evaluate_counts_master_and_lyra(tmp_path, monkeypatch, capsys):
    """persona=lyra_en through training, then lyra.evaluate reads the persona back from the run."""
    import lyra.generation
    from lyra.evaluate import evaluate
    from lyra.train import train

    run_dir = tmp_path / "run"
    metrics = train(compose(smoke_overrides(run_dir, "persona=lyra_en", *EN_FILES)))
    assert {"address_rate", "self_name_rate", "language_rate"} <= set(metrics) and "simplified_rate" not in metrics
    saved = OmegaConf.load(run_dir / "resolved_config.yaml")
    assert (saved.persona.name, saved.persona.user_address, saved.persona.language) == ("Lyra", "Master", "en")

    def scripted(prompts, model, tokenizer, batch_size, **generation):  # the tiny model speaks noise
        texts = ["Yes, Master! Lyra is here.", "Of course, Master.", "好的，主人"]
        return [Reply(text=text, raw=text, ended_by_eos=True) for text in texts[:len(prompts)]]

    monkeypatch.setattr(lyra.generation, "generate_in_batches", scripted)
    results = evaluate(compose([f"run_dir={run_dir}", "eval.generation.max_new_tokens=4"], config_name="evaluate"))
    assert results["persona"] == {"name": "Lyra", "user_address": "Master", "language": "en"}
    assert results["num_probes"] == 3  # the run's persona probes file: the fixture's three
    assert (results["address_rate"], results["self_name_rate"]) == (pytest.approx(2 / 3), pytest.approx(1 / 3))
    assert results["language_rate"] == pytest.approx(2 / 3) and "simplified_rate" not in results
    assert "simplified_rate" not in capsys.readouterr().out


@pytest.mark.slow
def test_example_persona_trains_from_outside_the_repo_and_chats_and_serves_under_its_name(tmp_path):
    from lyra.chat import chat
    from lyra.runs import load_run

    project = tmp_path / "mybot"  # the README's three steps, in a directory of the user's own
    shutil.copytree(EXAMPLES, project)
    result = subprocess.run([sys.executable, "-m", "lyra.train", "--config-dir", "my_conf", "persona=mara",
                             "experiment=smoke", "logger=none", "hydra.run.dir=run"],
                            cwd=project, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((project / "run" / "metrics.json").read_text())
    assert "address_rate" in metrics and "simplified_rate" not in metrics

    run = load_run(project / "run")
    assert run.persona.name == "Mara" and run.system_prompt.startswith("You are Mara")
    assert Path(run.persona.probes_file) == project / "data" / "mara_probes.jsonl"  # resolved against the launch dir

    stdout, stderr = io.StringIO(), io.StringIO()
    cfg = compose([f"run_dir={project / 'run'}", "generation=greedy", "generation.max_new_tokens=4"],
                  config_name="chat")
    chat(cfg, stdin=io.StringIO("Ahoy!\nexit\n"), stdout=stdout, stderr=stderr, run=run)
    assert stdout.getvalue().startswith("Captain: Ahoy!\nMara: ")
    assert "Mara is ready" in stderr.getvalue()

    gr = pytest.importorskip("gradio")
    from lyra.web import WebChat, build_page, check_web_config, page_title

    web_cfg = compose([f"run_dir={project / 'run'}", "server_port=null"], config_name="web")
    web_chat = WebChat(run, OmegaConf.to_container(web_cfg.generation, resolve=True), check_web_config(web_cfg))
    page = build_page(web_chat, page_title(run.persona, web_cfg.title), gr)
    header = next(block for block in page.blocks.values() if getattr(block, "elem_id", None) == "lyra-header")
    assert page.title == "Mara · lyra" and header.value.startswith("# Mara\n")


def test_think_filter_is_a_no_op_for_templates_without_think_tags(tokenizer):
    from types import SimpleNamespace

    from lyra.generation import ThinkFilter, uses_think_tags

    assert uses_think_tags(tokenizer)  # Qwen3
    chatml = SimpleNamespace(chat_template="{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}"
                                           "<|im_end|>\n{% endfor %}")
    assert not uses_think_tags(chatml)  # SmolLM2-style ChatML: a literal "<think>" is just text
    think = ThinkFilter(enabled=False)
    raw = "  Use <think> tags like <this>, Master </thi"
    assert "".join(think.feed(chunk) for chunk in (raw[:9], raw[9:20], raw[20:])) + think.finish() == raw.strip()
