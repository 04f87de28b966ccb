"""Build small Wan2.1-architecture pipelines in the diffusers folder layout.

No weights can be downloaded on our machines, so tests and the built-in default model are made
here: the real diffusers/transformers classes (WanTransformer3DModel, AutoencoderKLWan,
UMT5EncoderModel, a T5 tokenizer trained with the ``tokenizers`` library, UniPC flow scheduler),
only with tiny shapes, saved exactly as Wan-AI/Wan2.1-T2V-1.3B-Diffusers is laid out.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

import torch

# The vocabulary of the synthetic world the reference model is trained on, plus everyday words, so
# the tokenizer splits real prompts into meaningful pieces rather than single characters.
COLORS = ["red", "green", "blue", "yellow", "white", "black", "purple", "orange"]
SHAPES = ["circle", "square", "triangle"]
DIRECTIONS = ["left", "right", "up", "down"]
_EVERYDAY = (
    "a an the of in on with and at to from by is are cat dog person car tree house sky sea city "
    "night day light dark small large fast slow video camera scene moving walking running flying "
    "over under through bright colorful low quality blurry static still frame picture photo"
).split()

TINY_WAN_TRANSFORMER: dict[str, Any] = dict(
    patch_size=(1, 2, 2),
    num_attention_heads=3,
    attention_head_dim=32,
    in_channels=16,
    out_channels=16,
    text_dim=32,
    freq_dim=64,
    ffn_dim=256,
    num_layers=4,
    cross_attn_norm=True,
    qk_norm="rms_norm_across_heads",
    rope_max_seq_len=1024,
)
TINY_WAN_VAE: dict[str, Any] = dict(
    base_dim=8,
    z_dim=16,
    dim_mult=[1, 1, 2, 2],
    num_res_blocks=1,
    temperal_downsample=[False, True, True],
)
TINY_UMT5: dict[str, Any] = dict(
    d_model=32,
    d_kv=8,
    d_ff=64,
    num_layers=2,
    num_heads=4,
    relative_attention_num_buckets=8,
    relative_attention_max_distance=16,
    dropout_rate=0.0,
    feed_forward_proj="gated-gelu",
    pad_token_id=0,
    eos_token_id=1,
    decoder_start_token_id=0,
)
# Wan2.1-T2V-1.3B-Diffusers' scheduler: UniPC over flow-matching sigmas.
WAN_SCHEDULER: dict[str, Any] = dict(
    num_train_timesteps=1000,
    prediction_type="flow_prediction",
    use_flow_sigmas=True,
    flow_shift=3.0,
    solver_order=2,
    predict_x0=True,
    solver_type="bh2",
    lower_order_final=True,
)
TINY_TEXT_LENGTH = 32


def caption_corpus() -> list[str]:
    """Sentences for tokenizer training: every caption of the synthetic world, plus everyday text."""
    captions = [
        f"a {c} {s} moving {d} on a {bg} background"
        for c, s, d, bg in itertools.product(COLORS, SHAPES, DIRECTIONS, COLORS)
        if c != bg
    ]
    everyday = [" ".join(_EVERYDAY[i : i + 8]) for i in range(0, len(_EVERYDAY), 3)]
    return captions + everyday * 20


def train_tokenizer(output_dir: Path, vocab_size: int = 256, max_length: int = TINY_TEXT_LENGTH) -> None:
    """Train a T5-style Unigram tokenizer (pad=0, eos=1, unk=2) and save it as transformers does."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import T5TokenizerFast

    tok = Tokenizer(models.Unigram())
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.UnigramTrainer(
        vocab_size=vocab_size, special_tokens=["<pad>", "</s>", "<unk>"], unk_token="<unk>", shrinking_factor=0.9
    )
    tok.train_from_iterator(caption_corpus(), trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)]
    )
    T5TokenizerFast(tokenizer_object=tok, extra_ids=0, model_max_length=max_length).save_pretrained(output_dir)


def build_tiny_wan(
    output_dir: str | Path,
    seed: int = 0,
    transformer_config: dict[str, Any] | None = None,
    vae_config: dict[str, Any] | None = None,
    text_encoder_config: dict[str, Any] | None = None,
) -> Path:
    """Write a random-weight tiny Wan2.1 T2V pipeline to ``output_dir`` in the diffusers layout."""
    from diffusers import AutoencoderKLWan, WanTransformer3DModel
    from transformers import AutoTokenizer, UMT5Config, UMT5EncoderModel

    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    train_tokenizer(out / "tokenizer")
    vocab_size = len(AutoTokenizer.from_pretrained(out / "tokenizer"))

    torch.manual_seed(seed)
    text_encoder = UMT5EncoderModel(UMT5Config(vocab_size=vocab_size, **(text_encoder_config or TINY_UMT5)))
    transformer_kwargs = {**TINY_WAN_TRANSFORMER, **(transformer_config or {})}
    transformer_kwargs["text_dim"] = text_encoder.config.d_model
    transformer = WanTransformer3DModel(**transformer_kwargs)
    vae = AutoencoderKLWan(**{**TINY_WAN_VAE, **(vae_config or {})})
    save_wan_components(out, text_encoder, transformer, vae)
    return out


def save_wan_components(out: Path, text_encoder, transformer, vae) -> None:
    """Save the model components, the UniPC flow scheduler and model_index.json next to a tokenizer."""
    from diffusers import UniPCMultistepScheduler

    text_encoder.save_pretrained(out / "text_encoder", safe_serialization=True)
    transformer.save_pretrained(out / "transformer", safe_serialization=True)
    vae.save_pretrained(out / "vae", safe_serialization=True)
    UniPCMultistepScheduler(**WAN_SCHEDULER).save_pretrained(out / "scheduler")
    write_model_index(out)


def write_model_index(out: Path) -> None:
    import diffusers

    index = {
        "_class_name": "WanPipeline",
        "_diffusers_version": diffusers.__version__,
        "scheduler": ["diffusers", "UniPCMultistepScheduler"],
        "text_encoder": ["transformers", "UMT5EncoderModel"],
        "tokenizer": ["transformers", "T5TokenizerFast"],
        "transformer": ["diffusers", "WanTransformer3DModel"],
        "vae": ["diffusers", "AutoencoderKLWan"],
    }
    (out / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
