"""``attnpatch doctor --model DIR``: the user's own saved model, offline."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from attnpatch import doctor as doctor_module
from tests.hf.helpers import WORDS, save_tiny_tokenizer, tiny_model

# The tokenizer knows every word of the doctor's prompts, so they are distinct tokens.
PROMPT_WORDS = sorted({w for p in doctor_module.PROMPTS for w in p.replace(",", " ,").split()})


def doctor(*args, home):
    env = {k: v for k, v in os.environ.items() if k != "ATTNPATCH"}
    env.update(HF_HUB_OFFLINE="1", HF_HOME=str(home))  # no network; remote code (if run) lands here
    return subprocess.run(
        [sys.executable, "-m", "attnpatch", "doctor", *args], capture_output=True, text=True, env=env, timeout=600
    )


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    """A tiny random Llama and a right-padding tokenizer (like Qwen2's), saved as a user would."""
    directory = tmp_path_factory.mktemp("my-model")
    tiny_model("llama", "eager").save_pretrained(directory)
    save_tiny_tokenizer(str(directory), padding_side="right", words=WORDS[:4] + PROMPT_WORDS)
    return directory


@pytest.fixture(scope="module")
def report(saved_model, tmp_path_factory):
    return doctor("--model", str(saved_model), "--json", home=tmp_path_factory.mktemp("hf-home"))


def test_model_rows_without_and_with_attnpatch(report):
    assert report.returncode == 0, report.stderr
    data = json.loads(report.stdout)
    rows = {(row["case"], row["where"]): row for row in data["cases"]}
    assert data["versions"]["model"].endswith("(LlamaForCausalLM)")
    assert data["versions"]["tokenizer"].startswith("pads on the right")
    # Eager attention: pad queries average over pad keys without attnpatch; 0 with it.
    eager = rows["LlamaForCausalLM left-padded forward", "cpu/eager"]
    assert (eager["unpatched"], eager["patched"]) == ("wrong", "ok")
    # The right-padding tokenizer breaks batched generate(); attnpatch re-aligns it.
    for implementation in ("eager", "sdpa"):
        generate = rows["LlamaForCausalLM right-padded generate", f"cpu/{implementation}"]
        assert (generate["unpatched"], generate["patched"]) == ("wrong", "ok"), generate
    assert all(row["patched"] in ("ok", "-") for row in rows.values())
    flex = rows["LlamaForCausalLM right-padded generate", "cpu/flex_attention"]
    assert flex["unpatched"].startswith("skipped (compiles C++ kernels on CPU") and "--attn" in flex["unpatched"]


def test_table(saved_model, monkeypatch, capsys):
    monkeypatch.setattr(doctor_module, "IMPLEMENTATIONS", ("eager",))  # the JSON run covers the others
    assert doctor_module.main(["--model", str(saved_model)]) == 0
    out = capsys.readouterr().out
    assert f"model         {saved_model} (LlamaForCausalLM)" in out
    assert "tokenizer     pads on the right" in out
    line = next(line for line in out.splitlines() if line.startswith("LlamaForCausalLM right-padded generate"))
    assert re.search(r"cpu/eager\s+wrong\s+ok\s+# row\(s\) \[1\] decode differently than alone", line), line
    assert "attnpatch fixes every case that ran here" in out


REMOTE_CONFIG = {
    "model_type": "attnpatch-doctor-test",
    "architectures": ["MyModel"],
    "auto_map": {"AutoConfig": "configuration_my.MyConfig", "AutoModelForCausalLM": "modeling_my.MyModel"},
}


def test_refuses_code_from_the_checkpoint_unless_asked(tmp_path):
    model = tmp_path / "remote"
    model.mkdir()
    ran = tmp_path / "the checkpoint's code ran"
    (model / "config.json").write_text(json.dumps(REMOTE_CONFIG))
    (model / "configuration_my.py").write_text(
        f"open({str(ran)!r}, 'w').close()\n"
        "from transformers import PretrainedConfig\n"
        "class MyConfig(PretrainedConfig):\n    model_type = 'attnpatch-doctor-test'\n"
    )
    (model / "modeling_my.py").write_text("raise ImportError('not a real model')\n")

    refused = doctor("--model", str(model), home=tmp_path / "home")
    assert refused.returncode == 2
    assert "--trust-remote-code" in refused.stderr and "Traceback" not in refused.stderr
    assert not ran.exists()

    allowed = doctor("--model", str(model), "--trust-remote-code", home=tmp_path / "home")
    assert ran.exists()  # the flag lets the checkpoint's code run
    assert allowed.returncode == 2 and "Traceback" not in allowed.stderr  # it then fails to load, in one line


@pytest.mark.parametrize("kind", ["missing", "empty directory", "file"])
def test_a_path_that_is_not_a_model(kind, tmp_path):
    path = tmp_path / "nothing-here"
    if kind == "empty directory":
        path.mkdir()
    elif kind == "file":
        path.write_text("not a model")
    result = doctor("--model", str(path), home=tmp_path / "home")
    assert result.returncode == 2
    assert result.stderr.startswith("attnpatch doctor: ") and "Traceback" not in result.stderr
    assert str(path) in result.stderr
