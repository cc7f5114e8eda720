import pytest

from cyllm.coordinator.settings import CoordinatorSettings
from cyllm.gateway.settings import GatewaySettings
from cyllm.settings import ConfigError, load_settings
from cyllm.worker.settings import DEFAULT_MODEL_ID, WorkerSettings


def write(tmp_path, text):
    path = tmp_path / "cyllm.yaml"
    path.write_text(text)
    return path


def test_defaults_are_the_seed_ports_and_the_default_model(monkeypatch):
    assert load_settings(GatewaySettings).port == 8080
    assert load_settings(CoordinatorSettings).port == 50050
    worker = load_settings(WorkerSettings)
    assert worker.port == 50051
    assert [m.id for m in worker.models] == [DEFAULT_MODEL_ID]


def test_file_then_environment_then_overrides(tmp_path, monkeypatch):
    cfg = write(tmp_path, "coordinator:\n  port: 6000\n  queue_max_size: 7\n")
    assert load_settings(CoordinatorSettings, cfg).queue_max_size == 7
    monkeypatch.setenv("CYLLM_COORDINATOR_QUEUE_MAX_SIZE", "9")
    s = load_settings(CoordinatorSettings, cfg)
    assert (s.port, s.queue_max_size) == (6000, 9)
    assert load_settings(CoordinatorSettings, cfg, port=6001, host=None).port == 6001


def test_models_section_is_read_by_the_worker(tmp_path):
    cfg = write(tmp_path, "models:\n  - id: tiny\n    engine: fake\n    max_batch_size: 3\n")
    (spec,) = load_settings(WorkerSettings, cfg).models
    assert (spec.id, spec.engine, spec.max_batch_size) == ("tiny", "fake", 3)


def test_bad_value_names_the_key(tmp_path):
    cfg = write(tmp_path, "gateway:\n  port: not-a-port\n")
    with pytest.raises(ConfigError, match="port"):
        load_settings(GatewaySettings, cfg)


def test_unknown_key_and_unknown_section_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="queue_size"):
        load_settings(CoordinatorSettings, write(tmp_path, "coordinator:\n  queue_size: 3\n"))
    with pytest.raises(ConfigError, match="unknown section"):
        load_settings(CoordinatorSettings, write(tmp_path, "coordinatr: {}\n"))


def test_a_model_needs_exactly_one_source(tmp_path):
    cfg = write(tmp_path, "models:\n  - id: x\n    path: /a\n    gguf: /b.gguf\n")
    with pytest.raises(ConfigError, match="exactly one of 'path' or 'gguf'"):
        load_settings(WorkerSettings, cfg)


def test_an_embedded_coordinator_address_must_be_host_and_port():
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-m", "cyllm", "gateway", "--embed-coordinator", "nowhere"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2
    assert "'nowhere' is not HOST:PORT" in out.stderr


def test_a_dotenv_file_sits_between_the_environment_and_the_config_file(tmp_path, monkeypatch):
    """``.env`` in the working directory, as operators keep it: over the YAML file, under
    the environment; a misspelt variable of a component's prefix stops it by name."""
    from cyllm.gateway.settings import GatewaySettings
    from cyllm.settings import ConfigError, load_settings

    monkeypatch.chdir(tmp_path)
    config = tmp_path / "cyllm.yaml"
    config.write_text("gateway:\n  port: 7001\n  max_body_bytes: 2048\n")
    (tmp_path / ".env").write_text("CYLLM_GATEWAY_PORT=7002\nCYLLM_WORKER_PORT=7010\n# a comment\n")
    monkeypatch.delenv("CYLLM_GATEWAY_PORT", raising=False)
    loaded = load_settings(GatewaySettings, config)
    assert (loaded.port, loaded.max_body_bytes) == (7002, 2048)  # .env over the file
    monkeypatch.setenv("CYLLM_GATEWAY_PORT", "7003")
    assert load_settings(GatewaySettings, config).port == 7003  # the environment over .env
    (tmp_path / ".env").write_text("CYLLM_GATEWAY_PROT=7002\nCYLLM_GATEWAY_JWT_SECRT=s3cr3t-value\n")
    with pytest.raises(ConfigError, match="prot") as refused:
        load_settings(GatewaySettings, config)
    assert "jwt_secrt" in str(refused.value) and "s3cr3t" not in str(refused.value)  # named, not quoted
