"""Captions as a text-to-image teacher sees them: a frozen text encoder's embeddings, computed
once and cached on disk, so that training workers never hold the encoder.

(A StableDiffusion3Pipeline's captions go through the pipeline's own ``encode_prompt``, its
two CLIP encoders and its T5 encoder where it has one: ``encode_sd3``.)

A Stable Diffusion pipeline directory (``teachers.TEXT_PIPELINES``) holds a ``tokenizer/``
(``CLIPTokenizer``: ``vocab.json`` and ``merges.txt``, or ``tokenizer.json``) and a ``text_encoder/``
(``CLIPTextModel``). A caption is tokenized as the pipeline does it (padded to the tokenizer's
``model_max_length``, longer captions truncated: diffusers warns and cuts them, and so does this
module, with one line saying how many were cut) and embedded as the encoder's last hidden
state, [L, D], the U-Net's ``encoder_hidden_states``. The empty caption's embedding is the
unconditional input of classifier-free guidance.

A data set's captions repeat (the built-in captioned set has a few templates per digit), so
the cache holds one embedding per distinct caption (``Captions.table`` [U, L, D]) and each
image the index of its caption (``Captions.index`` [N]); row 0 of the table is always the
empty caption. The cache is a safetensors file under ``$LIFTPLACE_CACHE/text`` named by the
SHA-256 of the encoder's and tokenizer's files and of the captions: other files or other
captions give another name, so a stale cache is never read.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from filelock import FileLock
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from liftplace import files

TOKENIZER_FILES = ("vocab.json", "merges.txt")  # a CLIPTokenizer's files, or instead:
FAST_TOKENIZER = "tokenizer.json"  # (what transformers 5 saves)
EMPTY = ""  # the unconditional caption of classifier-free guidance
# A StableDiffusion3Pipeline's T5 tokens per caption (diffusers' default max_sequence_length);
# without its third text encoder, as many zero tokens, as diffusers gives.
SD3_T5_TOKENS = 256


@dataclass
class Captions:
    """A split's captions as the denoisers see them: one embedding per distinct caption and
    each image's row of that table. ``table[0]`` is the empty caption's (``null``)."""

    table: torch.Tensor  # [U, L, D] float32
    index: torch.Tensor  # [N] int64, rows of table
    texts: list[str]  # the distinct captions, table's rows in order ("" first)

    @property
    def null(self) -> torch.Tensor:
        """The empty caption's embedding [L, D]: the unconditional input."""
        return self.table[0]

    def embeddings(self, rows: torch.Tensor) -> torch.Tensor:
        """Embeddings [B, L, D] of images ``rows`` ([B] indices into the split)."""
        return self.table[self.index[rows]]

    def __len__(self) -> int:
        return len(self.index)


def cache_root() -> Path:
    """Where caption embeddings are cached (under LIFTPLACE_CACHE, beside the latents)."""
    return Path(os.environ.get("LIFTPLACE_CACHE", Path.home() / ".cache" / "liftplace")) / "text"


def is_sd3(pipeline: str | Path) -> bool:
    """Whether a pipeline directory is a StableDiffusion3Pipeline (three text encoders, MMDiT)."""
    index = Path(pipeline) / "model_index.json"
    try:
        return json.loads(index.read_text()).get("_class_name") == "StableDiffusion3Pipeline"
    except (OSError, ValueError):
        return False


def check_encoder(pipeline: str | Path, denoiser: dict) -> None:
    """Check what a pipeline's text side needs, from its files only (``denoiser``: the U-Net's
    or transformer's config): tokenizer folders with their files and a model_max_length, encoder
    configs, and widths that fit the denoiser (a U-Net's ``cross_attention_dim`` equal to the
    encoder's hidden size; an SD3 transformer's ``pooled_projection_dim`` equal to its two CLIP
    encoders' projections together, its ``joint_attention_dim`` equal to the T5 encoder's width
    and at least the CLIP widths together). Refused in one line naming the file otherwise. An
    SD3 pipeline's third (T5) encoder may be missing, as diffusers allows."""
    pipeline = Path(pipeline)
    sd3 = is_sd3(pipeline)
    kind = "StableDiffusion3Pipeline" if sd3 else "StableDiffusionPipeline"
    suffixes = ("", "_2") if sd3 else ("",)
    configs = []
    for suffix in suffixes:
        tokenizer = pipeline / f"tokenizer{suffix}"
        missing = [name for name in TOKENIZER_FILES if not (tokenizer / name).is_file()]
        if missing and not (tokenizer / FAST_TOKENIZER).is_file():
            raise FileNotFoundError(f"teacher {pipeline}: its tokenizer folder {tokenizer} lacks {', '.join(missing)} "
                                    f"and {FAST_TOKENIZER} (a CLIPTokenizer saves vocab.json and merges.txt, or "
                                    f"{FAST_TOKENIZER})")
        if context_length(pipeline, f"tokenizer{suffix}") is None:
            raise ValueError(f"teacher {pipeline}: its tokenizer{suffix}/tokenizer_config.json gives no model_max_length "
                             "(the tokens per caption, 77 for CLIP): captions could not be padded to one length")
        configs.append(_encoder_config(pipeline, f"text_encoder{suffix}", kind))
    if not sd3:
        hidden, wanted = configs[0].get("hidden_size"), denoiser.get("cross_attention_dim")
        if wanted is not None and hidden != wanted:
            raise ValueError(f"teacher {pipeline / 'text_encoder' / 'config.json'}: the text encoder's hidden_size "
                             f"{hidden} differs from the U-Net's cross_attention_dim {wanted}: they are not one pipeline")
        return
    pooled = sum(int(c.get("projection_dim", 0)) for c in configs)
    if pooled != denoiser.get("pooled_projection_dim"):
        raise ValueError(f"teacher {pipeline}: its CLIP text encoders project to {pooled} together, the transformer's "
                         f"pooled_projection_dim is {denoiser.get('pooled_projection_dim')}: they are not one pipeline")
    joint, widths = denoiser.get("joint_attention_dim"), sum(int(c.get("hidden_size", 0)) for c in configs)
    if (pipeline / "text_encoder_3" / "config.json").is_file():
        t5 = _encoder_config(pipeline, "text_encoder_3", kind).get("d_model")
        if t5 != joint:
            raise ValueError(f"teacher {pipeline / 'text_encoder_3' / 'config.json'}: the T5 encoder's d_model {t5} "
                             f"differs from the transformer's joint_attention_dim {joint}")
    if not isinstance(joint, int) or widths > joint or pooled > joint:
        raise ValueError(f"teacher {pipeline}: the transformer's joint_attention_dim {joint} is narrower than its CLIP "
                         f"encoders' widths together ({widths}) or their projections ({pooled})")


def _encoder_config(pipeline: Path, folder: str, kind: str) -> dict:
    file = pipeline / folder / "config.json"
    if not file.is_file():
        raise FileNotFoundError(f"teacher {pipeline}: no {folder}/config.json (a {kind} has one)")
    return files.read_json_object(file, "teacher")


def context_length(pipeline: str | Path, tokenizer: str | None = None) -> int | None:
    """The tokens of every caption's embedding: the tokenizer's model_max_length, from its
    tokenizer_config.json (None where it gives none, or transformers' "no limit" stand-in); an
    SD3 pipeline's, its CLIP tokens, then its T5 tokens and the packed pooled projections'
    token (``models.pack_sd3``). ``tokenizer`` names one tokenizer folder only."""
    if tokenizer is None and is_sd3(pipeline):
        clip = context_length(pipeline, "tokenizer")
        return None if clip is None else clip + SD3_T5_TOKENS + 1
    file = Path(pipeline) / (tokenizer or "tokenizer") / "tokenizer_config.json"
    try:
        said = json.loads(file.read_text()).get("model_max_length") if file.is_file() else None
    except (json.JSONDecodeError, UnicodeDecodeError):
        said = None
    return int(said) if isinstance(said, int) and 0 < said < 100_000 else None


_FINGERPRINTS: dict[tuple, str] = {}  # (each file's path, size, mtime) -> its digest: hashed once per process


def encoder_fingerprint(pipeline: str | Path) -> str:
    """SHA-256 over the text encoder's config and weights and the tokenizer's files (computed
    once per process while their sizes and modification times stay the same: every evaluation
    asks for it, and a Stable Diffusion text encoder is hundreds of MB)."""
    pipeline = Path(pipeline)
    folders = ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "text_encoder_3", "tokenizer_3")
    paths = [p for folder in folders for p in sorted((pipeline / folder).glob("*"))
             if p.is_file() and p.suffix in (".json", ".txt", ".safetensors", ".model")]
    key = tuple((str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns) for p in paths)
    if key not in _FINGERPRINTS:
        _FINGERPRINTS[key] = files.digest_files(pipeline, paths)
    return _FINGERPRINTS[key]


def load_encoder(pipeline: str | Path, device: str | torch.device = "cpu"):
    """(tokenizer, frozen text encoder) of a pipeline directory, from its files only."""
    from transformers import CLIPTextModel, CLIPTokenizer
    from transformers.utils import logging as hf_logging

    pipeline = Path(pipeline)
    hf_logging.disable_progress_bar()
    try:
        tokenizer = CLIPTokenizer.from_pretrained(str(pipeline / "tokenizer"), local_files_only=True)
        encoder = CLIPTextModel.from_pretrained(str(pipeline / "text_encoder"), local_files_only=True,
                                                use_safetensors=True)
    except (OSError, ValueError, RuntimeError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"teacher {pipeline}: its tokenizer or text encoder does not load: {first}") from None
    return tokenizer, encoder.to(device).eval().requires_grad_(False)


@torch.no_grad()
def encode(tokenizer, encoder, captions: Sequence[str], *, batch: int = 256,
           log: Callable[[str], object] = print) -> torch.Tensor:
    """Embeddings [N, L, D] (float32, CPU) of ``captions``: padded to the tokenizer's
    model_max_length, longer ones truncated (one line says how many), the encoder's last
    hidden state."""
    limit = tokenizer.model_max_length
    long = [c for c in captions if len(tokenizer(c).input_ids) > limit]
    if long:
        log(f"captions: {len(long)} of the {len(captions)} distinct captions are longer than the tokenizer's {limit} "
            f"tokens and are truncated, as diffusers truncates them (e.g. {long[0][:60]!r})")
    device = next(encoder.parameters()).device
    out = []
    for start in range(0, len(captions), batch):
        ids = tokenizer(list(captions[start:start + batch]), padding="max_length", max_length=limit, truncation=True,
                        return_tensors="pt").input_ids
        out.append(encoder(ids.to(device))[0].float().cpu())
    return torch.cat(out)


def captions_of(pipeline: str | Path, captions: Sequence[str], *, log: Callable[[str], object] = print,
                cache_dir: str | Path | None = None) -> Captions:
    """``Captions`` of a split's captions under a pipeline's text encoder: read from the cache
    when these captions were embedded by these files before, else computed (the encoder is
    loaded only then) and written there. Processes that start together wait on a lock file
    while the first one encodes."""
    pipeline = Path(pipeline)
    texts = [EMPTY, *sorted(set(captions) - {EMPTY})]
    row = {text: i for i, text in enumerate(texts)}
    index = torch.tensor([row[c] for c in captions], dtype=torch.long)
    encoder_key = encoder_fingerprint(pipeline)
    text_key = hashlib.sha256(json.dumps(texts).encode()).hexdigest()
    key = hashlib.sha256(f"{encoder_key}|{text_key}".encode()).hexdigest()
    cache_dir = Path(cache_dir) if cache_dir is not None else cache_root()
    cache_dir.mkdir(parents=True, exist_ok=True)
    path = cache_dir / f"captions-{key[:20]}.safetensors"
    with FileLock(str(path) + ".lock"):
        table = _read(path, encoder_key, text_key, len(texts)) if path.is_file() else None
        if table is None:
            table = encode_sd3(pipeline, texts, log=log) if is_sd3(pipeline) else encode(*load_encoder(pipeline), texts,
                                                                                           log=log)
            metadata = {"encoder": encoder_key, "texts": text_key, "count": str(len(texts)),
                        "pipeline": str(pipeline.resolve())}
            files.atomic_write(path, lambda tmp: save_file({"table": table.contiguous()}, str(tmp), metadata=metadata))
            log(f"captions: embedded {len(texts):,} distinct captions to {tuple(table.shape[1:])} with "
                f"{pipeline / 'text_encoder'}; cached in {path}")
    return Captions(table, index, texts)


@torch.no_grad()
def encode_sd3(pipeline: str | Path, captions: Sequence[str], *, batch: int = 256,
               log: Callable[[str], object] = print) -> torch.Tensor:
    """An SD3 pipeline's conditions of ``captions``, by the pipeline's own ``encode_prompt``
    (its two CLIP encoders' penultimate states side by side, padded to the joint width, then the
    T5 encoder's tokens, or zeros without it; the CLIP encoders' pooled projections), packed as
    [N, L + 1, D] (``models.pack_sd3``). Only the text side is loaded."""
    from diffusers import StableDiffusion3Pipeline
    from transformers.utils import logging as hf_logging

    from liftplace.models import pack_sd3

    from diffusers import SD3Transformer2DModel

    pipeline = Path(pipeline)
    hf_logging.disable_progress_bar()
    # encode_prompt reads the transformer's joint width (for the zero T5 tokens) from its config:
    # a shape-only ("meta") copy stands in for it, holding no weights
    with torch.device("meta"):
        stand_in = SD3Transformer2DModel.from_config(SD3Transformer2DModel.load_config(str(pipeline / "transformer")))
    parts = {"transformer": stand_in, "vae": None}
    if not (pipeline / "text_encoder_3" / "config.json").is_file():
        parts.update(text_encoder_3=None, tokenizer_3=None)
    try:
        pipe = StableDiffusion3Pipeline.from_pretrained(str(pipeline), local_files_only=True, **parts)
    except (OSError, ValueError, RuntimeError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"teacher {pipeline}: its tokenizers or text encoders do not load: {first}") from None
    pipe.set_progress_bar_config(disable=True)
    limit = pipe.tokenizer.model_max_length
    long = [c for c in captions if len(pipe.tokenizer(c).input_ids) > limit]
    if long:
        log(f"captions: {len(long)} of the {len(captions)} distinct captions are longer than the CLIP tokenizers' "
            f"{limit} tokens and are truncated there, as diffusers truncates them (e.g. {long[0][:60]!r})")
    out = []
    for start in range(0, len(captions), batch):
        chunk = list(captions[start:start + batch])
        context, _, pooled, _ = pipe.encode_prompt(chunk, chunk, chunk, device="cpu", do_classifier_free_guidance=False,
                                                   max_sequence_length=SD3_T5_TOKENS)
        out.append(pack_sd3(context.float(), pooled.float()))
    return torch.cat(out)


def _read(path: Path, encoder_key: str, text_key: str, count: int) -> torch.Tensor | None:
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            table = handle.get_tensor("table") if "table" in handle.keys() else None
    except (SafetensorError, OSError, ValueError):
        return None
    if metadata.get("encoder") != encoder_key or metadata.get("texts") != text_key:
        return None
    if table is None or table.ndim != 3 or len(table) != count or not bool(torch.isfinite(table).all()):
        return None
    return table


def build_tokenizer(folder: str | Path, *, max_length: int = 32):
    """A character-level ``CLIPTokenizer`` saved to ``folder`` (for tests and the shipped
    text-to-image teacher, where no pretrained vocabulary is at hand offline): every lower-case
    letter, digit and a few marks as a token of its own, and as a word's last token (CLIP's
    ``</w>``), with no merges; ``max_length`` tokens per caption, start and end included."""
    from transformers import CLIPTokenizer

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    symbols = "abcdefghijklmnopqrstuvwxyz0123456789-',."
    vocab = {s: i for i, s in enumerate(symbols)}
    vocab.update({s + "</w>": len(symbols) + i for i, s in enumerate(symbols)})
    vocab.update({"<|startoftext|>": len(vocab), "<|endoftext|>": len(vocab) + 1})
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=max_length)
    tokenizer.save_pretrained(str(folder))
    return tokenizer


def build_encoder(tokenizer, *, hidden: int = 32, layers: int = 2, heads: int = 2, seed: int = 0,
                  projection: int | None = None):
    """A small ``CLIPTextModel`` for ``tokenizer``'s vocabulary, initialised from ``seed`` (with
    ``projection``, a ``CLIPTextModelWithProjection`` of that projection width: SD3's kind)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    vocab = tokenizer.get_vocab()
    config = CLIPTextConfig(vocab_size=len(vocab), hidden_size=hidden, intermediate_size=2 * hidden,
                            num_hidden_layers=layers, num_attention_heads=heads,
                            max_position_embeddings=tokenizer.model_max_length,
                            bos_token_id=vocab["<|startoftext|>"], eos_token_id=vocab["<|endoftext|>"],
                            pad_token_id=vocab["<|endoftext|>"], projection_dim=projection or hidden)
    torch.manual_seed(seed)
    return (CLIPTextModel if projection is None else CLIPTextModelWithProjection)(config).eval()
