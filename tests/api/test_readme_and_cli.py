"""The README's commands, and ``tokenreward serve`` as a real process: flags, environment,
refusals."""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from tests.support import free_port
from tokenreward_service.bench.runner import spawn_server
from tokenreward_service.cli import build_parser
from tokenreward_service.config import Settings

README = Path(__file__).resolve().parents[2] / "README.md"


def _code_blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README.read_text(), flags=re.S)


def test_quick_start_is_make_serve_and_make_test() -> None:
    quick = _code_blocks("bash")[0]
    commands = [line.split("#")[0].strip() for line in quick.splitlines() if line.strip()]
    assert commands == ["make serve", "make test"]
    ci = (README.parent / ".ci" / "run").read_text()
    assert any(line.split("#")[0].strip() == "make test" for line in ci.splitlines())


def test_readme_curl_example_runs_against_tokenreward_serve(llama_dir: Path) -> None:
    (example,) = [block for block in _code_blocks("bash") if block.startswith("curl")]
    with spawn_server(["--model", str(llama_dir)]) as server:
        url = server.url
        command = example.replace("http://127.0.0.1:8000", url)
        assert command != example
        out = subprocess.run(
            ["bash", "-c", command], capture_output=True, text=True, check=True, timeout=60
        )
    data = httpx.Response(200, content=out.stdout.encode()).json()
    (result,) = data["results"]
    assert result["id"] == "a1"
    assert len(result["token_rewards"]) == 2
    assert len(result["prefix_scores"]) == 2
    assert sum(result["token_rewards"]) == pytest.approx(
        result["score"] - result["prompt_score"], abs=1e-6
    )
    assert data["model"]["revision"].startswith("sha256:")
    # The documented response has the same keys as the real one.
    documented = httpx.Response(200, content=_code_blocks("json")[0].encode()).json()
    assert documented.keys() == data.keys()
    assert documented["results"][0].keys() == result.keys()


def test_every_setting_is_a_flag() -> None:
    help_text = build_parser().parse_args(["serve"]).__dict__
    assert help_text == {"command": "serve"}  # flags left out do not override the environment
    actions = {
        a.dest for a in build_parser()._subparsers._group_actions[0].choices["serve"]._actions
    }  # type: ignore[union-attr]
    assert set(Settings.model_fields) <= actions


def test_settings_come_from_environment_and_flags_win(
    model_dir: Callable[..., Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TOKENREWARD_MAX_BATCH_TOKENS", "999")
    monkeypatch.setenv("TOKENREWARD_API_KEYS", "k-12345678, k-87654321")
    monkeypatch.setenv("TOKENREWARD_SUFFIX_IDS", "2,1")
    settings = Settings()
    assert settings.max_batch_tokens == 999
    assert settings.api_keys == ["k-12345678", "k-87654321"]
    assert settings.suffix_ids == [2, 1]
    assert Settings(max_batch_tokens=5).max_batch_tokens == 5
    with pytest.raises(ValueError, match="device"):
        Settings(device="tpu")


def test_serve_process_reads_flags_and_environment(model_dir: Callable[..., Path]) -> None:
    folder = model_dir("gpt2", seed=3)
    env = {"TOKENREWARD_MAX_LENGTH": "64", "TOKENREWARD_API_KEYS": "key-abcdefgh"}
    with spawn_server(
        ["--model", str(folder), "--suffix-ids", "2"], env=env, api_key="key-abcdefgh"
    ) as server:
        url = server.url
        headers = {"Authorization": "Bearer key-abcdefgh"}
        info = httpx.get(f"{url}/v1/model", headers=headers).json()
        assert info["architecture"] == "GPT2ForSequenceClassification"
        assert info["max_length"] == 64
        assert info["suffix_ids"] == [2]
        assert info["random_weights"] is False
        assert httpx.get(f"{url}/v1/model").status_code == 401


def test_serve_without_a_model_serves_the_embedded_demo_rm() -> None:
    with spawn_server([]) as server:
        url = server.url
        info = httpx.get(f"{url}/v1/model").json()
        body = {"items": [{"prompt": "", "response": "I love this so much"}]}
        result = httpx.post(f"{url}/v1/rewards", json=body).json()["results"][0]
    assert info["id"] == "tokenreward-demo-sentiment"
    assert info["random_weights"] is False
    assert info["suffix_ids"] == [2]
    love = result["response_tokens"].index(" love")
    assert result["token_rewards"][love] == max(result["token_rewards"])


def test_without_the_demo_rm_the_fallback_says_its_weights_are_random(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from tokenreward_service import app

    monkeypatch.setattr(app, "DEMO_MODEL", Path("/nonexistent"))
    model = app.load_model(Settings(device="cpu"))
    assert model.spec.random_weights is True
    assert "RANDOM WEIGHTS" in model.spec.id
    assert "RANDOM WEIGHTS" in caplog.text


def test_serve_refuses_a_bidirectional_model_and_exits(model_dir: Callable[..., Path]) -> None:
    port = free_port()
    proc = subprocess.run(
        [
            str(Path(sys.executable).parent / "tokenreward"),
            "serve",
            "--model",
            str(model_dir("bert")),
            "--port",
            str(port),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0
    assert "not causal" in proc.stdout + proc.stderr


def test_create_app_loads_the_named_model_in_its_lifespan(llama_dir: Path) -> None:
    from tests.support import LiveServer

    settings = Settings(model=str(llama_dir), device="cpu", max_length=100)
    with LiveServer(settings) as server:
        info = httpx.get(f"{server.url}/v1/model").json()
        assert httpx.get(f"{server.url}/readyz").status_code == 200
    assert info["max_length"] == 100
    assert info["architecture"] == "LlamaForSequenceClassification"


def test_the_readme_lists_every_metric_the_service_exports() -> None:
    from prometheus_client import CollectorRegistry

    from tokenreward_service.metrics import Metrics

    registry = CollectorRegistry()
    Metrics(registry)
    exported = {family.name for family in registry.collect()} | {"tokenreward_gpu_memory_bytes"}
    text = README.read_text()
    section = text[text.index("### Metrics") : text.index("## Use from a trainer")]
    missing = sorted(
        name for name in exported if name.startswith("tokenreward_") and f"`{name}" not in section
    )
    assert not missing, f"metrics not in the README: {missing}"
    assert "`process_*`" in section


def _readme_default(text: str) -> object:
    """A default as the README's settings table writes it, as Settings holds it."""
    text = text.strip().strip("`")
    if text.startswith("none") or text.startswith("the ") or text.startswith("from "):
        return "<unset>"
    if text.endswith(" MiB"):
        return int(text.removesuffix(" MiB")) * 1024 * 1024
    if text in ("true", "false"):
        return text == "true"
    for kind in (int, float):
        try:
            return kind(text.replace(",", ""))
        except ValueError:
            pass
    return text


def test_the_readme_settings_table_states_the_real_defaults() -> None:
    """Every row's defaults equal Settings' (before, the table said the default model was a
    random tiny RM)."""
    table = README.read_text().split("| flag | default | what it trades |")[1].split("\n\n")[0]
    rows = [line.split("|")[1:3] for line in table.strip().splitlines()[1:]]
    parser_flags = {
        "--" + str((f.json_schema_extra or {}).get("flag", n.replace("_", "-"))): n  # type: ignore[union-attr]
        for n, f in Settings.model_fields.items()
    }
    seen = set()
    for flags, defaults in rows:
        names = [f.strip().strip("`") for f in flags.split(" / ")]
        values = defaults.split(" / ") if len(names) > 1 else [defaults]
        assert len(values) == len(names), flags
        for flag, value in zip(names, values, strict=True):
            field = parser_flags[flag]
            seen.add(field)
            actual = Settings.model_fields[field].get_default(call_default_factory=True)
            expected = _readme_default(value)
            if expected == "<unset>":
                assert actual in (None, []), (flag, actual)
            else:
                assert actual == expected, (flag, actual, expected)
    missing = {"model", "host", "port", "api_keys", "max_batch_tokens"} - seen
    assert not missing
