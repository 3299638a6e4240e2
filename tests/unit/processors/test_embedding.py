"""The embedder against the packaged all-MiniLM-L6-v2 (int8 ONNX) and user model directories."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from morag.core.config import Settings
from morag.core.errors import ConfigurationError
from morag.processors.embedding import load_embedder, resolve_model

TEXTS = [
    "The worker acknowledges a message only after the job has finished.",
    "Redis keeps the queued jobs in lists, one per queue.",
    "A cat slept all afternoon on the warm windowsill.",
    "Uploads larger than the limit are refused with a clear error.",
    "x",
    "Chunks of a document are packed by tokens " * 20,
]


@pytest.fixture(scope="module")
def embedder():
    return load_embedder()


def test_dimensions_dtype_and_unit_length(embedder) -> None:
    vectors = embedder.embed_documents(TEXTS)
    assert embedder.dim == 384
    assert vectors.shape == (len(TEXTS), 384)
    assert vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    query = embedder.embed_query("when is a message acknowledged?")
    assert query.shape == (384,) and query.dtype == np.float32
    assert abs(float(np.linalg.norm(query)) - 1.0) < 1e-5
    assert embedder.embed_documents([]).shape == (0, 384)


def test_batches_give_the_vectors_of_one_text_at_a_time() -> None:
    batched = load_embedder(batch_size=4).embed_documents(TEXTS)
    alone = np.stack([load_embedder(batch_size=1).embed_documents([t])[0] for t in TEXTS])
    # Padding is masked out, so only float rounding differs.
    np.testing.assert_allclose(batched, alone, atol=2e-4)


def test_a_paraphrase_ranks_above_unrelated_sentences(embedder) -> None:
    query = embedder.embed_query("How do I stop a job that is already running?")
    documents = embedder.embed_documents(
        [
            "The vegetable soup simmers for forty minutes before serving.",
            "A running task can be terminated by revoking it.",
            "Mountain goats climb steep cliffs with ease.",
        ]
    )
    scores = documents @ query
    assert int(np.argmax(scores)) == 1
    assert scores[1] > scores[0] + 0.2 and scores[1] > scores[2] + 0.2


def test_text_beyond_the_model_window_still_counts(embedder) -> None:
    # all-MiniLM-L6-v2 reads 256 tokens; the answer sits after them in a long chunk.
    filler = "The bakery sells fresh bread, croissants and cakes every morning. " * 30
    answer = "Redis persists queued messages to disk with its append-only file."
    whole, truncated = embedder.embed_documents([filler + answer, filler])
    query = embedder.embed_query("how does redis keep messages on disk")
    assert float(whole @ query) > float(truncated @ query) + 0.05


def test_the_same_model_loads_once_per_process() -> None:
    assert load_embedder() is load_embedder()
    assert load_embedder(None) is load_embedder("")


def _user_model(directory: Path) -> Path:
    """A user model directory built from the packaged model's files."""
    packaged = resolve_model()
    (directory / "onnx").mkdir(parents=True)
    shutil.copyfile(packaged.model_file, directory / "onnx" / "model.onnx")
    shutil.copyfile(packaged.tokenizer_file, directory / "tokenizer.json")
    return directory


def test_a_user_model_directory_loads_with_its_settings(tmp_path: Path, embedder) -> None:
    directory = _user_model(tmp_path / "my-model")
    (directory / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 128}))
    (directory / "config_sentence_transformers.json").write_text(
        json.dumps({"prompts": {"query": "query: ", "document": "passage: "}})
    )
    user = load_embedder(directory)
    assert user is not embedder
    assert (user.name, user.dim, user.spec.max_length) == ("my-model", 384, 128)
    # Its prefixes are applied: the vectors are the packaged model's for the prefixed text.
    np.testing.assert_allclose(
        user.embed_query("redis"), embedder.embed_documents(["query: redis"])[0], atol=2e-4
    )
    np.testing.assert_allclose(
        user.embed_documents(["a job"]), embedder.embed_documents(["passage: a job"]), atol=2e-4
    )


def test_morag_embedding_json_names_the_model_and_its_pooling(tmp_path: Path, embedder) -> None:
    directory = _user_model(tmp_path / "dir")
    (directory / "1_Pooling").mkdir()
    (directory / "1_Pooling" / "config.json").write_text(
        json.dumps({"pooling_mode_cls_token": True, "pooling_mode_mean_tokens": False})
    )
    assert resolve_model(directory).pooling == "cls"
    (directory / "morag_embedding.json").write_text(json.dumps({"name": "mine", "pooling": "mean"}))
    user = load_embedder(directory)
    assert (user.name, user.spec.pooling) == ("mine", "mean")
    np.testing.assert_allclose(
        user.embed_documents(TEXTS[:2]), embedder.embed_documents(TEXTS[:2]), atol=2e-4
    )


@pytest.mark.parametrize("kind", ["missing", "file", "empty", "no-tokenizer", "not-onnx"])
def test_a_bad_model_path_fails_with_a_clear_configuration_error(tmp_path: Path, kind) -> None:
    path = tmp_path / "model"
    if kind == "file":
        path.write_text("not a directory")
    elif kind == "empty":
        path.mkdir()
    elif kind == "no-tokenizer":
        _user_model(path)
        (path / "tokenizer.json").unlink()
    elif kind == "not-onnx":
        _user_model(path)
        (path / "onnx" / "model.onnx").write_bytes(b"this is no onnx graph")
    with pytest.raises(ConfigurationError) as caught:
        load_embedder(path)
    assert "MORAG_EMBEDDING_MODEL_PATH" in str(caught.value)
    assert caught.value.details["setting"] == "MORAG_EMBEDDING_MODEL_PATH"


def test_settings_carry_the_model_path_and_batch_size() -> None:
    cfg = Settings(embedding_model_path="/models/bge", embedding_batch_size=8)
    assert (cfg.embedding_model_path, cfg.embedding_batch_size) == ("/models/bge", 8)
    with pytest.raises(ValueError):
        Settings(embedding_batch_size=0)


def test_batches_bound_padded_tokens_not_only_texts(embedder) -> None:
    # Activations grow with batch x width^2: full windows go a few to a call, short ones
    # up to batch_size.
    from morag.processors.embedding import BATCH_TOKENS

    full = embedder._batches([[1] * 256] * 10)
    assert sorted(i for b in full for i in b) == list(range(10))
    assert all(len(b) * 256 <= BATCH_TOKENS for b in full)
    short = embedder._batches([[1] * 12] * 70)
    assert [len(b) for b in short] == [32, 32, 6]
