"""models.toml: schema, lookup order, and one message listing every problem."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest
from conftest import write_config

from localmoa.config import (
    Agent,
    DeviceDeclaration,
    FakeModel,
    LlamaCppModel,
    find_config,
    load_config,
    parse_config,
)
from localmoa.errors import ConfigError

GiB = 1 << 30

GOOD = """
[settings]
memory_budget = "12GiB"

[models.qwen]
backend = "llamacpp"
path = "models/qwen.gguf"
n_ctx = 8192

[models.llama]
backend = "llamacpp"
path = "~/llama.gguf"
memory = "6GiB"

[models.gemma]
backend = "fake"
memory = "512MiB"

[ensembles.default]
layers = [["qwen", "llama", "gemma"], ["qwen", {model = "llama", temperature = 0.2, system_prompt = "Be brief."}, "gemma"]]
aggregator = "qwen"
temperature = 0.7
max_tokens = 512
"""


def test_valid_file_parses_with_defaults_and_resolved_paths(tmp_path: Path) -> None:
    config = load_config(write_config(tmp_path, GOOD))
    assert config.settings.memory_budget == 12 * (1 << 30)
    qwen, llama, gemma = (config.models[n] for n in ("qwen", "llama", "gemma"))
    assert isinstance(qwen, LlamaCppModel) and qwen.path == tmp_path / "models/qwen.gguf"
    assert qwen.n_ctx == 8192 and qwen.memory is None and qwen.n_gpu_layers == -1
    assert isinstance(llama, LlamaCppModel) and llama.path == Path.home() / "llama.gguf"
    assert llama.memory == 6 * (1 << 30)
    assert isinstance(gemma, FakeModel) and gemma.memory == 512 * (1 << 20)
    ensemble = config.ensemble("default")
    assert ensemble.layers[1][1] == Agent(model="llama", temperature=0.2, system_prompt="Be brief.")
    assert ensemble.aggregator == Agent(model="qwen")


def test_every_problem_is_listed_with_its_key_path(tmp_path: Path) -> None:
    bad = (
        GOOD.replace("n_ctx = 8192", "n_ctxx = 8192")
        .replace('"qwen", {model', '"qwen", {modle = "x", model')
        .replace('["qwen", "llama", "gemma"], [', '["qwen", "llama", "gemmma"], [')
    )
    bad = bad.replace('memory_budget = "12GiB"', 'memory_budget = "twelve"')
    with pytest.raises(ConfigError) as caught:
        load_config(write_config(tmp_path, bad))
    message = str(caught.value)
    assert message.startswith(f"{tmp_path / 'models.toml'}: 4 problems:")
    allowed = message.split("models.qwen.n_ctxx: unknown key (allowed: ")[1].split(")")[0]
    assert {"backend", "path", "n_ctx"} <= set(allowed.split(", "))
    assert "ensembles.default.layers[1][1].modle: unknown key" in message
    assert (
        'ensembles.default.layers[0][2]: unknown model "gemmma" (defined: gemma, llama, qwen)'
        in message
    )
    assert "settings.memory_budget: not a size: 'twelve'" in message


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("x = [", "not valid TOML: "),
        (
            '[models.a]\nbackend = "llamacp"\npath = "a"',
            'models.a.backend: unknown backend "llamacp"',
        ),
        ('[models.a]\npath = "a"', "models.a.backend: required key is missing"),
        ('[models.a]\nbackend = "llamacpp"', "models.a.path: required key is missing"),
        ('[models.a]\nbackend = "fake"\nmemory = "-1GiB"', "models.a.memory: not a size"),
        ('[models.a]\nbackend = "fake"\nmemory = true', "models.a.memory: not a size: True"),
        ("[settings]\n", "models: no models defined"),
        ('[model.a]\nbackend = "fake"', "model: unknown key (top-level tables are [settings]"),
        (
            '[models.a]\nbackend = "fake"\nmemory = 1\n[ensembles.default]\nlayers = [[]]\naggregator = "a"',
            "ensembles.default.layers[0]: a layer needs at least one agent",
        ),
        (
            '[models.a]\nbackend = "fake"\nmemory = 1\n[ensembles.default]\nlayers = [["a"]]',
            "ensembles.default.aggregator: required key is missing",
        ),
        (
            '[models.a]\nbackend = "fake"\nmemory = 1\n[ensembles.default]\nlayers = [["a"]]\n'
            'aggregator = {model = "a", temperature = 3}',
            "ensembles.default.aggregator.temperature: Input should be less than or equal to 2",
        ),
    ],
)
def test_bad_files_name_the_culprit(tmp_path: Path, text: str, expected: str) -> None:
    with pytest.raises(ConfigError, match=None) as caught:
        load_config(write_config(tmp_path, text))
    assert expected in str(caught.value)
    assert "Traceback" not in str(caught.value)


def test_unknown_ensemble_lists_the_defined_ones(tmp_path: Path) -> None:
    config = load_config(write_config(tmp_path, GOOD))
    with pytest.raises(
        ConfigError, match=r'no ensemble "fast" \(defined: default\); add \[ensembles.fast\]'
    ):
        config.ensemble("fast")


def test_lookup_order_flag_then_cwd_then_user_dir(tmp_path: Path) -> None:
    home = tmp_path / "home"
    user = write_config(home, GOOD)
    assert find_config() == user
    local = write_config(tmp_path, GOOD)
    assert find_config() == local
    explicit = tmp_path / "other.toml"
    explicit.write_text(GOOD)
    assert find_config(explicit) == explicit


def test_missing_files_say_where_we_looked(tmp_path: Path) -> None:
    with pytest.raises(
        ConfigError, match=r"no models.toml found .looked at .*models.toml and .*home"
    ):
        find_config()
    with pytest.raises(ConfigError, match=r"nope.toml does not exist; check the --config path"):
        find_config(tmp_path / "nope.toml")


def test_example_models_toml_in_the_repository_is_valid() -> None:
    example = Path(__file__).parents[1] / "models.toml"
    config = load_config(example)
    assert {"default", "sparse", "self"} <= set(config.ensembles)
    assert config.ensembles["sparse"].judge is not None
    assert config.ensembles["self"].layers[0][0].samples == 4


def test_the_examples_declared_devices_parse_once_uncommented(tmp_path: Path) -> None:
    example = (Path(__file__).parents[1] / "models.toml").read_text(encoding="utf-8")
    lines = example.splitlines()
    start = lines.index("# [[settings.devices]]")
    end = start + next(i for i, line in enumerate(lines[start:]) if not line.startswith("# "))
    lines[start:end] = [line.removeprefix("# ") for line in lines[start:end]]
    config = load_config(write_config(tmp_path, "\n".join(lines)))
    devices = config.settings.devices
    assert [(d.name, d.memory, d.kind, d.index) for d in devices] == [
        ("gpu0", 22 * GiB, "gpu", 0),
        ("gpu1", 22 * GiB, "gpu", 1),
    ]


TWO_DEVICES = """
[settings]
max_parallel_calls = 4

[[settings.devices]]
name = "gpu0"
memory = "8GiB"
index = 0

[[settings.devices]]
name = "ram"
memory = 17179869184
kind = "cpu"

[settings.cluster]
engine = "ray"
address = "127.0.0.1:6379"

[models.a]
backend = "fake"
memory = "1GiB"
"""


def test_declared_devices_and_the_cluster_table_parse(tmp_path: Path) -> None:
    settings = load_config(write_config(tmp_path, TWO_DEVICES)).settings
    assert settings.devices == [
        DeviceDeclaration(name="gpu0", memory=8 * GiB, kind="gpu", index=0),
        DeviceDeclaration(name="ram", memory=16 * GiB, kind="cpu", index=None),
    ]
    assert (settings.cluster.engine, settings.cluster.address) == ("ray", "127.0.0.1:6379")
    assert settings.device_problems() == []
    plain = load_config(write_config(tmp_path, GOOD)).settings
    assert plain.devices == [] and plain.cluster.engine == "local"


def device_file(*tables: str, settings: str = "") -> str:
    """A models.toml declaring ``tables`` (each the body of one [[settings.devices]])."""
    devices = "".join(f"[[settings.devices]]\n{body}\n" for body in tables)
    return f'[settings]\n{settings}\n{devices}[models.a]\nbackend = "fake"\nmemory = 1\n'


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            device_file(
                'name = "gpu0"\nmemory = "8GiB"',
                'name = "gpu1"\nmemory = "8GiB"',
                'name = "gpu0"\nmemory = "4GiB"',
            ),
            'settings.devices[2].name: "gpu0" is declared twice (also settings.devices[0]); '
            "give each device its own name",
        ),
        (
            device_file(
                'name = "a"\nmemory = "8GiB"\nindex = 1', 'name = "b"\nmemory = "8GiB"\nindex = 1'
            ),
            "settings.devices[1].index: GPU 1 is declared twice (also settings.devices[0]); "
            "give each device its own GPU index",
        ),
        (
            device_file('name = "gpu0"'),
            "settings.devices[0].memory: required key is missing: give the bytes models may use "
            'on the device, e.g. memory = "24GiB"',
        ),
        (
            device_file('name = "gpu0"\nmemory = 0'),
            "settings.devices[0].memory: 0 is no memory: give the bytes models may use on the "
            'device, above 0, e.g. memory = "24GiB" (to keep a GPU free, leave it out of '
            "settings.devices)",
        ),
        (
            device_file('name = "gpu0"\nmemory = "0GiB"'),
            "settings.devices[0].memory: '0GiB' is no memory: give the bytes",
        ),
        (
            device_file('name = "gpu0"\nmemory = "lots"'),
            "settings.devices[0].memory: not a size: 'lots' (write e.g.",
        ),
        (
            device_file('name = "gpu0"\nmemory = "8GiB"', settings='memory_budget = "12GiB"'),
            "settings.memory_budget: set together with settings.devices; keep one",
        ),
        (
            device_file('memory = "8GiB"'),
            'settings.devices[0].name: required key is missing: name the device, e.g. name = "gpu0"',
        ),
        (
            device_file('name = ""\nmemory = "8GiB"'),
            'settings.devices[0].name: empty: name the device, e.g. name = "gpu0"',
        ),
        (
            device_file('name = "my gpu"\nmemory = "8GiB"'),
            "settings.devices[0].name: 'my gpu' is not a device name: use letters, digits and "
            "- _ . : only",
        ),
        (
            device_file('name = "ram"\nmemory = "8GiB"\nkind = "cpu"\nindex = 0'),
            "settings.devices[0].index: only a gpu device has an index, and this one is kind = "
            '"cpu"; remove index, or set kind = "gpu"',
        ),
        (
            device_file('name = "gpu0"\nmemory = "8GiB"\nindex = -1'),
            "settings.devices[0].index: Input should be greater than or equal to 0",
        ),
        (
            device_file('name = "gpu0"\nmemory = "8GiB"\nkind = "tpu"'),
            "settings.devices[0].kind: Input should be 'gpu', 'unified' or 'cpu'",
        ),
        (
            device_file('name = "gpu0"\nmemory = "8GiB"\nmem = 1'),
            "settings.devices[0].mem: unknown key (allowed: name, memory, kind, index)",
        ),
        (
            '[settings.devices]\nname = "gpu0"\nmemory = "8GiB"\n[models.a]\nbackend = "fake"\nmemory = 1',
            "settings.devices: write one [[settings.devices]] table per device (double brackets)",
        ),
        (
            '[settings.cluster]\nadress = "h:1"\n[models.a]\nbackend = "fake"\nmemory = 1',
            "settings.cluster.adress: unknown key (allowed: engine, address, ",
        ),
        (
            '[settings.cluster]\nengine = "slurm"\n[models.a]\nbackend = "fake"\nmemory = 1',
            "settings.cluster.engine: Input should be 'local' or 'ray'",
        ),
    ],
)
def test_bad_devices_name_the_key_and_what_to_do(tmp_path: Path, text: str, expected: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(write_config(tmp_path, text))
    assert expected in str(caught.value)


def test_every_device_problem_is_listed_at_once(tmp_path: Path) -> None:
    text = device_file(
        'name = "a"\nmemory = "8GiB"\nindex = 0',
        'name = "a"\nmemory = "8GiB"\nindex = 0',
        'name = "b"',
        settings='memory_budget = "12GiB"',
    )
    with pytest.raises(ConfigError) as caught:
        load_config(write_config(tmp_path, text))
    message = str(caught.value)
    assert message.startswith(f"{tmp_path / 'models.toml'}: 4 problems:")
    for key in ("memory_budget", "devices[1].name", "devices[1].index", "devices[2].memory"):
        assert f"  settings.{key}: " in message


def test_agents_take_stop_seed_and_response_format(tmp_path: Path) -> None:
    config = load_config(
        write_config(
            tmp_path,
            """
            [models.a]
            backend = "fake"
            memory = "1GiB"

            [ensembles.default]
            layers = [[{model = "a", stop = "END", seed = 7}]]
            aggregator = {model = "a", stop = ["###", "END"], response_format = {type = "json_schema", json_schema = {name = "answer", schema = {type = "object", required = ["text"], properties = {text = {type = "string"}}}}}}

            [ensembles.json]
            layers = [["a"]]
            aggregator = {model = "a", response_format = {type = "json_object"}}
            """,
        )
    )
    default = config.ensembles["default"]
    proposer, aggregator = default.layers[0][0], default.aggregator
    assert (proposer.stop, proposer.seed) == (["END"], 7)
    assert aggregator.stop == ["###", "END"]
    assert aggregator.response_format is not None and aggregator.response_format.json_schema
    assert aggregator.response_format.json_schema.name == "answer"
    assert aggregator.response_format.json_schema.schema_["required"] == ["text"]
    json_only = config.ensembles["json"].aggregator.response_format
    assert json_only is not None and json_only.type == "json_object"


@pytest.mark.parametrize(
    ("agent", "expected"),
    [
        (
            '{model = "a", stop = ""}',
            "ensembles.default.aggregator.stop: a stop string cannot be empty",
        ),
        (
            '{model = "a", stop = ["1", "2", "3", "4", "5"]}',
            "ensembles.default.aggregator.stop: at most 4 stop strings (OpenAI's limit), not 5",
        ),
        (
            '{model = "a", seed = "x"}',
            "ensembles.default.aggregator.seed: Input should be a valid integer",
        ),
        (
            '{model = "a", response_format = {type = "yaml"}}',
            "ensembles.default.aggregator.response_format.type: Input should be 'text', "
            "'json_object' or 'json_schema'",
        ),
        (
            '{model = "a", response_format = {type = "json_schema"}}',
            'ensembles.default.aggregator.response_format: type "json_schema" needs json_schema = '
            '{name = "...", schema = {...}}',
        ),
        (
            '{model = "a", response_format = {type = "json_schema", json_schema = {name = "x", shema = {}}}}',
            "ensembles.default.aggregator.response_format.json_schema.shema: unknown key",
        ),
    ],
)
def test_bad_agent_options_name_their_key(tmp_path: Path, agent: str, expected: str) -> None:
    text = f'[models.a]\nbackend = "fake"\nmemory = 1\n[ensembles.default]\nlayers = [["a"]]\naggregator = {agent}\n'
    with pytest.raises(ConfigError) as caught:
        load_config(write_config(tmp_path, text))
    assert expected in str(caught.value)


@pytest.mark.parametrize(
    ("table", "where"),
    [
        ("cycles = 0", "ensembles.default.cycles"),
        ('aggregate_prompt = "Merge these."', "ensembles.default.aggregate_prompt"),
        (
            'aggregator = { model = "a", aggregate_prompt = "no slot" }',
            "ensembles.default.aggregator.aggregate_prompt",
        ),
    ],
)
def test_cycles_and_aggregate_prompts_are_checked_with_their_key_path(
    table: str, where: str
) -> None:
    text = f"""
[models.a]
backend = "fake"
memory = "1GiB"
[ensembles.default]
layers = [["a"]]
{table if table.startswith("aggregator") else 'aggregator = "a"'}
{"" if table.startswith("aggregator") else table}
"""
    with pytest.raises(ConfigError) as caught:
        parse_config(tomllib.loads(text))
    message = str(caught.value)
    assert where in message
    if "aggregate_prompt" in where:
        assert "{responses}" in message
