"""Configuration classes and files: plain data validated once, in Rust, with the CLI's rules
and located messages."""

from pathlib import Path
from typing import Any, Dict

import pytest

import dstack
from dstack.api import (
    CPU,
    GPU,
    BackendType,
    DevEnvironment,
    Disk,
    Memory,
    OpenAIChatModel,
    Range,
    RegistryAuth,
    Resources,
    Service,
    Task,
    TGIChatModel,
)
from dstack.errors import ConfigurationError


def test_task_normalizes_like_yaml() -> None:
    task = Task(
        name="train",
        commands=["python train.py"],
        env={"A": "1"},
        resources=Resources(
            cpu=CPU(count=Range[int](min=2)),
            memory="8GB..",
            gpu=GPU(name=["A100", "H100"], count=Range[int](min=1, max=2)),
            disk=Disk(size="100GB.."),
        ),
    )
    yaml = dstack.load_configuration(
        "type: task\nname: train\ncommands: [python train.py]\nenv: [A=1]\n"
        "resources:\n  cpu: 2..\n  memory: 8GB..\n  gpu: {name: [A100, H100], count: 1..2}\n"
        "  disk: 100GB..\n"
    )
    assert task.dict() == yaml.dict()
    assert task.name == "train"
    assert task.image is None  # normalized default, read as an attribute
    assert task.dict()["resources"]["gpu"]["count"] == {"min": 1, "max": 2}


def test_documentation_objects() -> None:
    task = Task(name="my-run", commands=["echo hello"], resources=Resources(gpu=GPU(count=0)))
    assert task.dict()["resources"]["gpu"]["count"] == {"min": 0, "max": 0}
    service = Service(
        port=8000,
        commands=["python -m http.server 8000"],
        image="python:3.12",
        registry_auth=RegistryAuth(username="u", password="p"),
    )
    assert service.dict()["port"]["container_port"] == 8000
    dev = DevEnvironment(ide="vscode")
    assert dev.dict()["ide"] == "vscode"


def test_backend_types_and_service_models_are_dstack_data() -> None:
    task = Task(commands=["true"], backends=[BackendType.AWS, BackendType.LOCAL])
    assert task.dict()["backends"] == ["aws", "local"]
    assert str(BackendType.LAMBDA) == "lambda" and BackendType("remote") is BackendType.REMOTE
    service = Service(port=8000, commands=["serve"], model=OpenAIChatModel(name="llama"))
    assert service.dict()["model"] == {"type": "chat", "name": "llama", "format": "openai", "prefix": "/v1"}
    tgi = Service(port=80, commands=["serve"], model=TGIChatModel(name="m", eos_token="</s>"))
    assert tgi.dict()["model"]["format"] == "tgi" and tgi.dict()["model"]["eos_token"] == "</s>"
    with pytest.raises(ConfigurationError, match="model"):
        Service(port=80, commands=["serve"], model=OpenAIChatModel(name="m", format="grpc"))


def test_memory_values() -> None:
    assert Memory.parse("512MB") == 0.5
    assert Memory.parse("1TB") == 1024
    task = Task(commands=["x"], resources=Resources(memory=Range[Memory](min=Memory(16))))
    assert task.dict()["resources"]["memory"]["min"] == 16.0


def test_invalid_fields_raise_with_paths_and_data() -> None:
    with pytest.raises(ConfigurationError) as info:
        Task(commands=["x"], resources=Resources(gpu=GPU(count="many")), nodes=0, colour="red")
    message = str(info.value)
    assert "Task(...): resources.gpu.count:" in message
    assert "Task(...): colour: unknown field" in message
    locs = {e["loc"] for e in info.value.errors}
    assert {"resources.gpu.count", "colour"} <= locs
    assert all(e["line"] is None and e["type"] for e in info.value.errors)


def test_a_configuration_object_that_contains_itself_is_refused() -> None:
    resources = Resources(cpu=1)
    resources.gpu = resources
    with pytest.raises(ConfigurationError, match="contain itself"):
        Task(commands=["x"], resources=resources)
    task = Task(commands=["x"])
    task.env = {"loop": task}
    with pytest.raises(ConfigurationError, match="contain itself"):
        task.validate()


def test_changed_fields_are_validated_again() -> None:
    task = Task(commands=["x"])
    task.nodes = "two"
    with pytest.raises(ConfigurationError, match="nodes"):
        task.validate()


def test_files_report_file_line_and_column(tmp_path: Path) -> None:
    path = tmp_path / "bad.dstack.yml"
    path.write_text("type: task\ncommands: [x]\nmax_duration: soon\n")
    with pytest.raises(ConfigurationError) as info:
        dstack.load_configuration(path)
    assert str(info.value).startswith(f"{path}:3:15: max_duration:")
    (error,) = info.value.errors
    assert (error["file"], error["line"], error["column"]) == (str(path), 3, 15)
    assert error["loc"] == "max_duration"


def test_load_configuration_returns_typed_objects(tmp_path: Path) -> None:
    path = tmp_path / "fleet.dstack.yml"
    path.write_text("type: fleet\nname: f\nnodes: 2\n")
    fleet = dstack.load_configuration(str(path))
    assert type(fleet).__name__ == "Fleet"
    assert (fleet.nodes["min"], fleet.nodes["max"]) == (2, 2)
    text = dstack.load_configuration("type: service\nport: 80\ncommands: [x]\n")
    assert type(text).__name__ == "Service"


def test_non_plain_values_are_type_errors() -> None:
    with pytest.raises(TypeError, match="env.A: expected plain data"):
        Task(commands=["x"], env={"A": object()})


def test_a_dict_that_contains_itself_is_a_configuration_error() -> None:
    from dstack._native import validate

    env: Dict[str, Any] = {"A": "1"}
    env["B"] = env
    with pytest.raises(ConfigurationError, match="nested more than 64 levels") as info:
        Task(commands=["x"], env=env)
    (error,) = info.value.errors
    assert error["type"] == "limit"
    assert error["loc"].startswith("env.B.B.B")
    # Handed to the native side as it is, too.
    with pytest.raises(ConfigurationError, match=r"^configuration: env\.B\.B"):
        validate({"type": "task", "commands": ["x"], "env": env})


def test_an_alias_bomb_is_a_located_configuration_error(tmp_path: Path) -> None:
    lines = ["type: task", "commands: [x]", "a0: &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    for i in range(1, 10):
        refs = ", ".join([f"*a{i - 1}"] * 9)
        lines.append(f"a{i}: &a{i} [{refs}]")
    path = tmp_path / "bomb.dstack.yml"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ConfigurationError) as info:
        dstack.load_configuration(path)
    (error,) = info.value.errors
    assert error["type"] == "limit"
    assert (error["file"], error["line"]) == (str(path), 7)
    assert "100000 values" in error["msg"]


def test_a_file_over_the_size_limit_is_refused_without_reading_it_all(tmp_path: Path) -> None:
    from dstack._native import MAX_TEXT_BYTES

    path = tmp_path / "huge.dstack.yml"
    with path.open("wb") as f:
        f.write(b"type: task\ncommands: [x]\n#")
        f.truncate(16 * MAX_TEXT_BYTES)  # a sparse file, mostly NUL bytes
    with pytest.raises(ConfigurationError) as info:
        dstack.load_configuration(path)
    (error,) = info.value.errors
    assert (error["type"], error["line"], error["column"]) == ("limit", 1, 1)
