"""localmoa.presets: from candidates and a budget to a models.toml that reads back and fits.

Pure: candidates are made-up header facts, footprints come from the estimate itself, so these
tests state rules (what fits, which model goes where, what the text says), never figures."""

from __future__ import annotations

import random
import tomllib
from datetime import date
from pathlib import Path

import pytest

from localmoa.config import LlamaCppModel, OllamaModel, parse_config
from localmoa.errors import BudgetError
from localmoa.footprint.estimate import GGUFFacts
from localmoa.hardware import Budget
from localmoa.presets import (
    CONTEXTS,
    ENSEMBLE,
    MAX_TOKENS,
    PRESETS,
    SELF_SAMPLES,
    TOP_K,
    WIDTH,
    Candidate,
    Selection,
    Written,
    choose,
    write_preset,
)
from localmoa.sizes import format_bytes

GB = 1_000_000_000
BASE = Path("/home/me/project")
DAY = date(2025, 3, 14)


def facts(weights: int, *, n_layer: int = 32, n_ctx_train: int = 8192) -> GGUFFacts:
    """An 8B-like shape (GQA, 128k vocabulary) with ``weights`` bytes of tensors."""
    return GGUFFacts(
        path=Path("x.gguf"),
        architecture="llama",
        n_layer=n_layer,
        n_embd=4096,
        n_head=32,
        n_head_kv_total=8 * n_layer,
        key_length=128,
        value_length=128,
        n_ff=14336,
        n_vocab=128256,
        n_ctx_train=n_ctx_train,
        weights_bytes=weights,
    )


def gguf(name: str, gb: float, family: str = "llama", **shape: int) -> Candidate:
    weights = int(gb * GB)
    return Candidate("llamacpp", BASE / "models" / name, family, weights, facts(weights, **shape))


def ollama(tag: str, gb: float, family: str, measured: dict[int, int] | None = None) -> Candidate:
    weights = int(gb * GB)
    return Candidate("ollama", tag, family, weights, facts(weights), measured or {})


def budget(size: int) -> Budget:
    return Budget(bytes=size, source="flag", detail="--memory-budget")


def written(
    preset: str, candidates: list[Candidate], size: int = 64 * GB, **kwargs: object
) -> Written:
    return write_preset(
        PRESETS[preset],
        candidates,
        budget(size),
        written_budget=str(size),
        made=DAY,
        output=BASE / "models.toml",
        **kwargs,  # type: ignore[arg-type]
    )


def layers(result: Written) -> list[list[tuple[str, int]]]:
    ensemble = result.config.ensembles[ENSEMBLE]
    return [[(a.model, a.samples) for a in layer] for layer in ensemble.layers]


FOUR_FAMILIES = [
    gguf("llama-8b.gguf", 4.9, "llama"),
    gguf("llama-3b.gguf", 2.0, "llama"),
    gguf("qwen-7b.gguf", 4.7, "qwen2"),
    gguf("gemma-2b.gguf", 1.6, "gemma2"),
    gguf("phi-4b.gguf", 2.3, "phi3"),
]


# --- the shapes ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("preset", "depth"), [("moa", 3), ("moa-lite", 2), ("sparse", 2)])
def test_layered_presets_have_their_paper_depth_and_the_largest_model_aggregates(
    preset: str, depth: int
) -> None:
    result = written(preset, FOUR_FAMILIES)
    ensemble = result.config.ensembles[ENSEMBLE]
    assert list(result.config.ensembles) == [ENSEMBLE]  # the one run picks without --ensemble
    assert len(ensemble.layers) == depth
    assert all(layer == layers(result)[0] for layer in layers(result))
    assert ensemble.aggregator.model == "llama-8b"
    assert ensemble.judge is None if preset != "sparse" else ensemble.judge is not None


def test_proposers_come_from_distinct_families_largest_first() -> None:
    result = written("moa", FOUR_FAMILIES)
    assert layers(result)[0] == [("llama-8b", 1), ("qwen-7b", 1), ("phi-4b", 1)]
    assert any(r.startswith("not used llama-3b.gguf") for r in result.reasons)
    assert any(r.startswith("not used gemma-2b.gguf") for r in result.reasons)


def test_sparse_takes_four_proposers_as_the_smoa_code_does() -> None:
    result = written("sparse", FOUR_FAMILIES)
    assert [m for m, _ in layers(result)[0]] == ["llama-8b", "qwen-7b", "phi-4b", "gemma-2b"]
    judge = result.config.ensembles[ENSEMBLE].judge
    assert judge is not None and (judge.top_k, judge.early_stop, judge.model) == (2, True, None)


def test_one_family_fills_the_proposers_with_the_next_largest() -> None:
    result = written("moa-lite", [gguf("a.gguf", 1), gguf("b.gguf", 3), gguf("c.gguf", 2)])
    assert [m for m, _ in layers(result)[0]] == ["b", "c", "a"]
    assert "only 1 model family fits" in result.text


def test_self_moa_samples_the_largest_model_which_also_aggregates() -> None:
    result = written("self-moa", FOUR_FAMILIES)
    assert layers(result) == [[("llama-8b", SELF_SAMPLES)]]
    assert result.config.ensembles[ENSEMBLE].aggregator.model == "llama-8b"
    assert list(result.config.models) == ["llama-8b"]


# --- sizing -------------------------------------------------------------------------------------


def test_every_model_fits_the_budget_at_the_context_written() -> None:
    candidates = [gguf("big.gguf", 6), gguf("mid.gguf", 3, "qwen2"), gguf("small.gguf", 1, "x")]
    size = candidates[0].footprint(2048) + 1  # big fits at 2048, not at 4096
    result = written("moa-lite", candidates, size)
    contexts = {
        name: m.n_ctx for name, m in result.config.models.items() if isinstance(m, LlamaCppModel)
    }
    assert contexts == {"big": 2048, "mid": 4096, "small": 4096}
    for chosen in result.selection.models:
        assert chosen.bytes == chosen.candidate.footprint(chosen.n_ctx) <= size


def test_a_model_that_fits_at_no_context_is_skipped_with_its_size() -> None:
    huge, small = gguf("huge.gguf", 40), gguf("small.gguf", 1)
    result = written("moa-lite", [huge, small], 8 * GB)
    assert list(result.config.models) == ["small"]
    line = next(r for r in result.reasons if r.startswith("skipped huge.gguf"))
    assert f"at n_ctx {min(CONTEXTS)}" in line and "over the 7.5 GiB budget" in line


def test_the_context_stops_at_what_the_model_was_trained_for() -> None:
    result = written("moa-lite", [gguf("short.gguf", 1, n_ctx_train=2048)])
    model = result.config.models["short"]
    assert isinstance(model, LlamaCppModel) and model.n_ctx == 2048


def test_nothing_fits_names_the_smallest_model_and_the_budget() -> None:
    candidates = [gguf("a.gguf", 9), gguf("b.gguf", 5), gguf("c.gguf", 7)]
    with pytest.raises(BudgetError) as raised:
        choose(PRESETS["moa"], candidates, 2 * GB)
    message = str(raised.value)
    need = candidates[1].footprint(min(CONTEXTS))
    assert "b.gguf" in message and "1.9 GiB budget" in message
    assert f"needs {format_bytes(need)} at n_ctx {min(CONTEXTS)}" in message


def test_self_moa_takes_fewer_samples_when_four_do_not_fit_together() -> None:
    model = gguf("m.gguf", 4)
    size = model.footprint(4096, 3)  # three sequences of 4096 fit, four do not
    assert model.footprint(4096, 4) > size
    result = written("self-moa", [model], size)
    assert layers(result) == [[("m", 3)]]
    assert "parallel" not in result.config.models["m"].model_fields_set
    assert result.selection.models[0].bytes <= size


def test_self_moa_passes_a_model_whose_two_samples_do_not_fit_for_one_whose_do() -> None:
    big, small = gguf("big.gguf", 6), gguf("small.gguf", 2, "qwen2")
    size = max(big.footprint(1024), small.footprint(4096, 4))
    assert big.footprint(1024, 2) > size
    result = written("self-moa", [big, small], size)
    assert layers(result) == [[("small", 4)]]
    assert "not big.gguf: two samples of it at once do not fit the budget" in result.reasons


def test_self_moa_samples_take_turns_when_two_cannot_decode_together() -> None:
    only = gguf("only.gguf", 6)
    size = only.footprint(min(CONTEXTS))
    assert only.footprint(min(CONTEXTS), 2) > size
    result = written("self-moa", [only], size)
    model = result.config.models["only"]
    assert layers(result) == [[("only", 2)]]
    assert isinstance(model, LlamaCppModel) and model.parallel == 1
    assert result.selection.models[0].bytes <= size


@pytest.mark.parametrize(("models", "samples"), [(1, 3), (2, 2), (3, 1)])
def test_sparse_gives_the_judge_more_answers_than_it_keeps(models: int, samples: int) -> None:
    families = ["llama", "qwen2", "gemma2"][:models]
    result = written("sparse", [gguf(f"{f}.gguf", 2 + i, f) for i, f in enumerate(families)])
    (layer, _) = layers(result)
    assert {s for _, s in layer} == {samples}
    assert sum(s for _, s in layer) > TOP_K  # parse_config's rule held, or it would not parse


def test_ollama_samples_cost_no_memory_and_a_larger_measurement_counts() -> None:
    model = ollama("qwen2.5:7b", 4.7, "qwen2", measured={4096: 9 * GB})
    assert model.footprint(4096, 4) == model.footprint(4096) == 9 * GB
    result = written("self-moa", [model], 9 * GB)
    table = result.config.models["qwen2-5-7b"]
    assert isinstance(table, OllamaModel) and table.model == "qwen2.5:7b"
    assert layers(result) == [[("qwen2-5-7b", SELF_SAMPLES)]]
    assert f"# parallel = {SELF_SAMPLES}" in result.text and "OLLAMA_NUM_PARALLEL" in result.text


def test_ollama_and_gguf_models_mix() -> None:
    result = written("moa-lite", [gguf("llama-8b.gguf", 4.9), ollama("qwen2.5:7b", 4.7, "qwen2")])
    assert {m.backend for m in result.config.models.values()} == {"llamacpp", "ollama"}


@pytest.mark.parametrize("preset", list(PRESETS))
def test_max_tokens_leaves_room_for_the_references_in_the_smallest_context(preset: str) -> None:
    for n_ctx_train in (1024, 2048, 8192):
        result = written(preset, [gguf("a.gguf", 2, n_ctx_train=n_ctx_train), *FOUR_FAMILIES])
        selection = result.selection
        most = result.config.ensembles[ENSEMBLE].max_tokens
        smallest = min(c.n_ctx for c in selection.models)
        judge = 256 if selection.top_k is not None else most
        assert selection.answers * most + max(most, judge) + most <= smallest
        assert most <= MAX_TOKENS
    assert written("moa", FOUR_FAMILIES).config.ensembles[ENSEMBLE].max_tokens == MAX_TOKENS


def test_random_machines_get_files_that_read_back_and_fit() -> None:
    """By property: whatever the models and the budget, a file that parses, whose every model
    fits, whose judge leaves an answer out; or BudgetError when nothing fits."""
    rng = random.Random(11)
    families = ["llama", "qwen2", "gemma2", "phi3", "mistral"]
    for case in range(60):
        candidates = [
            (gguf if rng.random() < 0.7 else _ollama_random)(
                f"m{i}.gguf", rng.uniform(0.3, 20), rng.choice(families)
            )
            for i in range(rng.randint(1, 6))
        ]
        size = int(rng.uniform(0.5, 30) * GB)
        preset = rng.choice(list(PRESETS))
        try:
            result = written(preset, candidates, size)
        except BudgetError:
            assert all(c.footprint(min(c.contexts())) > size for c in candidates), case
            continue
        selection = result.selection
        assert all(c.bytes <= size for c in selection.models), case
        assert all(c.bytes == c.candidate.footprint(c.n_ctx, c.together) for c in selection.models)
        judge = result.config.ensembles[ENSEMBLE].judge
        if judge is not None:
            assert judge.top_k < selection.answers, case


def _ollama_random(name: str, gb: float, family: str) -> Candidate:
    return ollama(name.removesuffix(".gguf") + ":latest", gb, family)


# --- the text -----------------------------------------------------------------------------------


def test_the_header_says_how_the_file_was_made_and_how_to_edit_it() -> None:
    result = written("sparse", FOUR_FAMILIES, skipped=["skipped junk.gguf: not a GGUF file"])
    head = result.text.split("\n[settings]")[0]
    assert "`localmoa init --preset sparse` on 2025-03-14" in head
    assert "59.6 GiB, from --memory-budget" in head
    assert "#   skipped junk.gguf: not a GGUF file" in head
    assert "proposer, aggregator and judge llama-8b.gguf" in head
    for key in ("memory_budget", "n_ctx", "parallel", "layers", "aggregator", "samples", "judge"):
        assert f"#   {key} " in head
    for paper in ("arXiv 2406.04692", "arXiv 2411.03284", "arXiv 2502.00674"):
        assert paper in head
    assert all(len(line) <= WIDTH for line in result.text.splitlines() if line.startswith("#"))


def test_every_model_table_says_why_it_was_chosen() -> None:
    result = written("moa", FOUR_FAMILIES)
    for chosen in result.selection.models:
        table = result.text.split(f"[models.{chosen.key}]\n")[1]
        assert table.startswith(f"# {chosen.roles[0]}")


def test_paths_under_the_files_folder_are_relative_others_absolute() -> None:
    inside = gguf("in.gguf", 2)
    outside = Candidate("llamacpp", Path("/srv/models/out.gguf"), "qwen2", GB, facts(GB))
    result = written("moa-lite", [inside, outside])
    assert 'path = "./models/in.gguf"' in result.text
    assert 'path = "/srv/models/out.gguf"' in result.text
    assert result.sources == {"in": "./models/in.gguf", "out": "/srv/models/out.gguf"}
    model = result.config.models["in"]
    assert isinstance(model, LlamaCppModel) and model.path == BASE / "models" / "in.gguf"


def test_a_budget_given_is_written_as_given_a_detected_one_as_auto() -> None:
    detected = Budget(bytes=12 * GB, source="ram", detail="system RAM: 14 GiB available")
    text = write_preset(
        PRESETS["moa"],
        FOUR_FAMILIES,
        detected,
        written_budget="auto",
        made=DAY,
        output=BASE / "models.toml",
    ).text
    assert 'memory_budget = "auto"' in text and "from system RAM: 14 GiB available" in text
    given = written("moa", FOUR_FAMILIES, 64 * GB)
    assert given.config.settings.memory_budget == 64 * GB


def test_names_from_files_and_servers_become_safe_keys_strings_and_comments() -> None:
    odd = [
        gguf('we"ird\\name.v2.gguf', 3),
        gguf("we-ird-name-v2.gguf", 2, "qwen2"),
        ollama("evil\nmodel:7b", 1, "x\ny"),
    ]
    result = written("moa", odd)
    assert list(result.config.models) == ["we-ird-name-v2", "we-ird-name-v2-2", "evil-model-7b"]
    table = result.config.models["we-ird-name-v2"]
    assert isinstance(table, LlamaCppModel) and table.path.name == 'we"ird\\name.v2.gguf'
    served = result.config.models["evil-model-7b"]
    assert isinstance(served, OllamaModel) and served.model == "evil\nmodel:7b"
    assert "evil model:7b" in result.text  # the tag's newline, in a comment, made a space


def test_the_text_is_what_parse_config_reads() -> None:
    result = written("self-moa", FOUR_FAMILIES)
    again = parse_config(tomllib.loads(result.text), source=BASE / "models.toml")
    assert again == result.config


def test_choose_needs_a_candidate() -> None:
    with pytest.raises(ValueError, match="at least one candidate"):
        choose(PRESETS["moa"], [], GB)


def test_the_selection_lists_every_candidate_once_in_its_reasons() -> None:
    selection: Selection = choose(PRESETS["moa"], FOUR_FAMILIES, 64 * GB)
    for candidate in FOUR_FAMILIES:
        assert sum(candidate.label in line for line in selection.reasons) == 1
