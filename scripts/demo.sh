#!/usr/bin/env bash
# The quickstart demo: three tiny random-weight models, a 2-layer ensemble, its plan, its answer.
#
# The models are generated here (nothing is downloaded); llama.cpp really loads and runs them,
# but their weights are random, so every answer is noise. The plan, the swaps, the streaming and
# the memory accounting are the real thing.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh

demo=.localmoa-demo
.venv/bin/python scripts/make_tiny_models.py "$demo/models" >/dev/null
cat >"$demo/models.toml" <<'TOML'
# Written by scripts/demo.sh. The budget holds two of the three models, so the plan must swap.
[settings]
memory_budget = "110MiB"

[models.tiny-a]
backend = "llamacpp"
path = "models/tiny-a.gguf"
n_ctx = 2048

[models.tiny-b]
backend = "llamacpp"
path = "models/tiny-b.gguf"
n_ctx = 2048

[models.tiny-c]
backend = "llamacpp"
path = "models/tiny-c.gguf"
n_ctx = 2048

[ensembles.default]
layers = [["tiny-a", "tiny-b", "tiny-c"], ["tiny-a", "tiny-b", "tiny-c"]]
aggregator = "tiny-c"
max_tokens = 48

# Sparse MoA: a judge after each layer passes its 2 best answers on (and may stop early).
[ensembles.sparse]
layers = [["tiny-a", "tiny-b", "tiny-c"], ["tiny-a", "tiny-b", "tiny-c"]]
aggregator = "tiny-c"
judge = { top_k = 2, early_stop = true }
max_tokens = 24
TOML

echo
echo "== localmoa plan: who is resident together, before anything loads"
.venv/bin/localmoa plan --config "$demo/models.toml"
echo
echo "== localmoa run: progress on stderr, the aggregator's answer streamed to stdout"
echo "   (random weights: the text below is noise; the machinery around it is real)"
.venv/bin/localmoa run --config "$demo/models.toml" "Why would anyone run language models locally?"
echo
echo "== localmoa run --ensemble sparse: a judge after each layer (its choice on stderr)"
.venv/bin/localmoa run --config "$demo/models.toml" --ensemble sparse "Why run models locally?"
echo
echo "== localmoa batch: four prompts planned together, every load serving all four"
printf '%s\n' '{"id": 1, "prompt": "Why run models locally?"}' \
    '{"id": 2, "prompt": "What is a mixture of agents?"}' \
    '{"id": 3, "prompt": "Name a use for a local model."}' \
    '{"id": 4, "prompt": "Why plan memory before loading?"}' >"$demo/prompts.jsonl"
rm -f "$demo/answers.jsonl"
.venv/bin/localmoa batch --config "$demo/models.toml" "$demo/prompts.jsonl" -o "$demo/answers.jsonl"
echo "   $(wc -l <"$demo/answers.jsonl") lines in $demo/answers.jsonl, one per prompt"
echo
echo "Use your own GGUF models: see 'Your own models' in README.md."
